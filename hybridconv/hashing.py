"""A content hash of a converted folder's weights (what verify vouches for)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .checkpoint import INDEX_NAME, index_weights


def weights_hash(folder: Path, cancelled=None) -> str | None:
    """``sha256:<hex>`` over the weight files (names and contents) and the index.
    ``cancelled()``, when given, is asked between 16 MB reads: True stops (None is returned)."""
    folder = Path(folder)
    files = [p for p in index_weights(folder).shards]
    if (folder / INDEX_NAME).is_file():
        files.append(folder / INDEX_NAME)
    total = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                if cancelled is not None and cancelled():
                    return None
                h.update(block)
        total.update(f"{f.name}\0{h.hexdigest()}\n".encode())
    return "sha256:" + total.hexdigest()
