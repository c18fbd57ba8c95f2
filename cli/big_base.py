"""Options for loading a big base, shared by the commands that load one (infer, eval)."""

from __future__ import annotations

import typer

DEVICE_MAP = typer.Option(None, "--device-map", help="Let transformers place the base: auto, balanced, a device "
                          "(cpu, cuda:1), or a JSON map of module name -> device or disk. Replaces --device.")
OFFLOAD_FOLDER = typer.Option(None, "--offload-folder", help="Where weights mapped to disk are kept (with "
                              "--device-map).")
QUANTIZATION = typer.Option(None, "--quantization", help="Load the base in 4bit or 8bit (bitsandbytes; a CUDA GPU "
                            "only), or a JSON object of BitsAndBytesConfig fields.")
ATTN_IMPLEMENTATION = typer.Option(None, "--attn-implementation", help="The base's attention kernel: sdpa, eager, "
                                   "flash_attention_2 ... (default: transformers' choice).")


def load_options(device: str, device_map, offload_folder, quantization, attn_implementation):
    """The checked LoadOptions; --device with a device map or a quantized load is an error."""
    from vlm_adapters.bases import LoadOptions, check_device

    options = LoadOptions(device_map, quantization, attn_implementation,
                          None if offload_folder is None else str(offload_folder))
    check_device(device, options)
    return options
