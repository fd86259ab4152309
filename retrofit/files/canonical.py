"""Equal models give equal files: a safetensors header rewritten in one fixed order.

safetensors (0.8) keeps a file's metadata in a Rust ``HashMap``, seeded at random in each process, and
writes its keys in that map's order: two saves of the same model in two processes gave files with
other bytes (sorting the dict passed in changes nothing). The tensor entries and the data after the
header are already in a fixed order. :func:`sort_metadata` rewrites the header in place with the
metadata keys sorted: the same entries in the same compact JSON (serde_json's: no spaces, non-ASCII
as it is, the same escapes as Python's ``json``), so the same length, and the data is not touched.
"""

from __future__ import annotations

import json
from pathlib import Path


def sort_metadata(path: Path) -> bool:
    """Rewrite the safetensors file ``path``'s header with its ``__metadata__`` keys sorted (first, as
    safetensors writes it); True when it did. A header that would not come out the same length is left
    as written (the file stays valid; only its byte order is then the library's): that needs longer
    escapes than serde_json's, which a value of retrofit's metadata never has."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        text = f.read(size)
        header = json.loads(text)
        meta = header.pop("__metadata__", None)
        if meta is None:
            return False
        ordered = json.dumps(
            {"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"), ensure_ascii=False
        ).encode()
        if len(ordered) > size:
            return False  # longer escapes than serde_json's: leave it
        f.seek(8)
        f.write(ordered.ljust(size, b" "))  # safetensors pads its header with spaces too
    return True
