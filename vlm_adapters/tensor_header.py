"""A safetensors file's header (tensor names, dtypes, shapes) read with json and struct alone.

`inspect` and the checkpoint checks need only the header; safetensors' own `safe_open(..., "pt")`
imports torch (seconds) to give it. The format: 8 bytes little-endian header length N, N bytes of
JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, the data.
A file cut short (the data ends before the last offset) or a header of the wrong shape is a
ValueError that says which.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own bound on the header's length


def read_header(file) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} of a safetensors file (the metadata left out).

    No tensor is read; the file's length is checked against the offsets, so a cut-short file fails."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes: shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER, size - 8):
            raise ValueError(f"the header claims {length} bytes, the file has {size - 8} after the length field")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"the header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {name!r}: the header entry is not a dtype, shape and data_offsets")
        if info.get("dtype") in DTYPE_BYTES and offsets[1] - offsets[0] != numel(shape) * DTYPE_BYTES[info["dtype"]]:
            raise ValueError(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for a {info['dtype']} {shape}")
        end = max(end, offsets[1])
    if 8 + length + end > size:
        raise ValueError(f"cut short: the header promises {end} bytes of data, the file holds {size - 8 - length}")
    return header


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
