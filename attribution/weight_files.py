"""Are a model directory's safetensors files readable and whole? Checked at resolve time from their
headers alone (no tensor is read), so a corrupt or truncated file fails before any compute starts.

A safetensors file is: 8 bytes little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}}, then the data; every [begin, end) must lie inside the data.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from attribution.errors import ModelError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_safetensors_file(path: Path) -> int:
    """Raise ModelError unless `path` is a readable, whole safetensors file; returns its tensor count."""
    where = f"weights file {str(path)!r}"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(f"{where} is truncated or empty ({size} bytes): not a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise ModelError(f"{where} is not a safetensors file or is truncated (header of {n:,} bytes "
                                 f"in a {size:,}-byte file)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ModelError(f"{where} cannot be read: {e.strerror or type(e).__name__}") from None
    except (ValueError, UnicodeDecodeError):
        raise ModelError(f"{where} has a corrupt header: not a safetensors file") from None
    if not isinstance(header, dict):
        raise ModelError(f"{where} has a corrupt header: not a safetensors file")
    data = size - 8 - n
    count = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            width = DTYPE_BYTES.get(info["dtype"])
            elements = math.prod(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{where} has a corrupt header entry for tensor {name[:80]!r}") from None
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise ModelError(f"{where}: tensor {name[:80]!r} has bad offsets: corrupt file")
        if end > data:
            raise ModelError(f"{where} is truncated: tensor {name[:80]!r} ends at byte {end:,} of the data, "
                             f"which holds {data:,} bytes")
        if width is not None and (end - begin) != width * elements:
            raise ModelError(f"{where}: tensor {name[:80]!r} holds {end - begin:,} bytes for "
                             f"{elements:,} {info['dtype']} values: corrupt file")
        count += 1
    return count


def check_weight_files(directory: str | Path) -> None:
    """Every *.safetensors of the model directory whole, and every file its index names present."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(f"weights index {str(index)!r} cannot be read as a safetensors index") from None
        missing = sorted(name for name in names if not (directory / name).is_file())
        if missing:
            raise ModelError(f"weights index {str(index)!r} names files that are missing: {', '.join(missing[:5])}")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelError(f"model directory {str(directory)!r} has no *.safetensors weights")
    if sum(check_safetensors_file(path) for path in files) == 0:
        raise ModelError(f"model directory {str(directory)!r}: its safetensors files hold no tensors")
