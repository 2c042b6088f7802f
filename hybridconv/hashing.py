"""A content hash of a converted folder's weights and the model code it carries
(what verify vouches for, and what ``upload`` checks before publishing)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .checkpoint import INDEX_NAME, index_weights


def _carried_model_file(folder: Path) -> Path | None:
    """The model file ``config.json`` names for mlx-lm (``model_file``): code that
    mlx-lm runs with ``trust_remote_code``, so it is hashed with the weights. A
    name that would leave the folder is not a model file of the folder."""
    try:
        name = json.loads((folder / "config.json").read_text()).get("model_file")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(name, str) or not name or Path(name).name != name:
        return None
    return folder / name


def weights_hash(folder: Path, cancelled=None) -> str | None:
    """``sha256:<hex>`` over the weight files (names and contents), the index, and
    the model file the folder carries for mlx-lm when ``config.json`` names one
    (``model_file``: hybridconv's model, run with ``trust_remote_code``; a
    missing one hashes as missing). Folders that carry no code hash as before.
    ``cancelled()``, when given, is asked between 16 MB reads: True stops (None is returned)."""
    folder = Path(folder)
    files = [p for p in index_weights(folder).shards]
    if (folder / INDEX_NAME).is_file():
        files.append(folder / INDEX_NAME)
    total = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        digest = _file_sha(f, cancelled)
        if digest is None:
            return None
        total.update(f"{f.name}\0{digest}\n".encode())
    code = _carried_model_file(folder)
    if code is not None:
        digest = _file_sha(code) if code.is_file() else "missing"
        total.update(f"model_file:{code.name}\0{digest}\n".encode())
    return "sha256:" + total.hexdigest()


def _file_sha(path: Path, cancelled=None) -> str | None:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            if cancelled is not None and cancelled():
                return None
            h.update(block)
    return h.hexdigest()
