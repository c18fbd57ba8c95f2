"""`vlm-adapters infer`: answer a question about an image, with or without trained adapters."""

from __future__ import annotations

from pathlib import Path

import typer

from .big_base import ATTN_IMPLEMENTATION, DEVICE_MAP, OFFLOAD_FOLDER, QUANTIZATION, load_options
from .common import quiet_transformers, user_errors


def infer(
    image: Path = typer.Option(..., "--image", exists=True, dir_okay=False, help="The image file."),
    question: str = typer.Option(..., "--question", help="The question asked about the image."),
    adapters: Path = typer.Option(None, "--adapters", help="An adapter directory, or a training output directory "
                                  "(its latest checkpoint is used). Without it the base model answers."),
    model: str = typer.Option(None, "--model", help="The base model: a hub id or local directory. Default: the "
                                                    "one the adapters were trained on."),
    semclip: str = typer.Option(None, "--semclip", help="SemClip settings, as eval's: 'true' for the defaults or a "
                                "JSON object of SemClipConfig fields, e.g. '{\"scorer\": \"attention\"}' (the "
                                "model's own attention chooses the crop: no weights at all); with --adapters, "
                                "only the settings that hold no weights."),
    dtype: str = typer.Option("float32", "--dtype", help="Weights dtype: float32, bfloat16 or float16."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:1 ... or auto (cuda when available)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="The longest answer, in tokens."),
    device_map: str = DEVICE_MAP,
    offload_folder: Path = OFFLOAD_FOLDER,
    quantization: str = QUANTIZATION,
    attn_implementation: str = ATTN_IMPLEMENTATION,
) -> None:
    """Print the model's answer (greedy decoding) to QUESTION about IMAGE."""
    import torch

    from vlm_adapters.errors import AdapterError
    from vlm_adapters.inputs import chat_prompt, open_image
    from vlm_adapters.io import read_config
    from vlm_adapters.processing import process
    from vlm_adapters.provenance import stored_base
    from vlm_adapters.semclip.scorer import to_rgb
    from vlm_adapters.bases import move
    from vlm_adapters.devices import execution_device
    from vlm_adapters.train import load_base, load_trained, resolve_adapter_dir
    from vlm_adapters.train.model import torch_dtype

    quiet_transformers()
    with user_errors():
        torch_dtype(dtype)
        options = load_options(device, device_map, offload_folder, quantization, attn_implementation)
        directory = resolve_adapter_dir(adapters) if adapters else None
        if model is None:
            if directory is None:
                raise AdapterError("give --model (a hub id or local directory) or --adapters")
            model = stored_base(read_config(directory), directory)
        if semclip:
            from vlm_adapters.eval.load import load, plan

            runner, processor = load(plan(model, directory, semclip), dtype, options)
        else:
            base, processor = load_base(model, dtype, options=options)
            runner = load_trained(base, directory, processor) if directory else base
        adapted = hasattr(runner, "wants_images")
        move(runner, device, options)
        picture = open_image(image)
        inputs = process(processor, [chat_prompt(processor, question)], [to_rgb(picture)])
        where = execution_device(runner.get_input_embeddings())  # a split base: its first device
        inputs = inputs.to(where, dtype=torch_dtype(dtype))  # floating tensors take the dtype
        extra = {"guidance_text": [question]} if adapted else {}
        if adapted and runner.wants_images:
            extra["images"] = [picture]  # SemClip crops the original image, TG-DP cuts its tiles from it
        runner.eval()
        with torch.no_grad():
            out = runner.generate(**inputs, **extra, max_new_tokens=max_new_tokens, do_sample=False)
        answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        used = [f"adapters {directory}"] * bool(directory) + [f"semclip {semclip}"] * bool(semclip)
        typer.echo(f"[{', '.join(used) or 'base model'}]", err=True)
        typer.echo(answer.strip())
