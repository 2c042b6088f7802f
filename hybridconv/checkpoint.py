"""Locating a checkpoint (local folder or Hub repo id) and indexing its weights.

A Hub repo id is fetched with ``huggingface_hub.snapshot_download`` into the
standard Hugging Face cache, limited to the files a conversion needs
(:data:`HUB_PATTERNS`). With ``HF_HUB_OFFLINE=1`` an already cached snapshot is
used without any network access.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, UsageError
from .safetensors_io import TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
# Files a conversion reads or carries over; weights in pickle formats are not fetched.
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    INDEX_NAME,
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template.*",
    "*.py",
    "README.md",
    "LICENSE*",
]
# Copied verbatim into the output: tokenizer files and remote-code modules.
CARRY_PATTERNS = [
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template.*",
    "generation_config.json",
    "*.py",
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Source:
    path: Path
    repo_id: str | None = None
    revision: str | None = None  # the commit, when known

    @property
    def label(self) -> str:
        return self.repo_id or str(self.path)


def resolve(source: str, revision: str | None = None) -> Source:
    """A local folder as is; otherwise a Hub repo id, downloaded (or found in the cache)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{source}: is a file; SOURCE must be a checkpoint folder or a Hub repo id")
        return Source(path=path.resolve())
    if not REPO_ID.match(source):
        raise UsageError(
            f"{source}: no such folder, and not a Hub repo id (ORG/NAME)",
            "pass the path of a local checkpoint folder or a repo id such as google/recurrentgemma-2b",
        )
    return _download(source, revision)


def _download(repo_id: str, revision: str | None) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except GatedRepoError:
        raise CheckpointError(
            f"{repo_id}: the repository is gated",
            "accept its terms on the Hub, then log in (huggingface-cli login) or set HF_TOKEN",
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo_id}: repository not found (or private)",
            "check the repo id; for a private repository log in or set HF_TOKEN",
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo_id}: revision {revision!r} not found") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo_id}: not in the local Hugging Face cache and the Hub cannot be reached",
            "check the network, or unset HF_HUB_OFFLINE, or pass a local folder",
        ) from None
    except OSError as exc:  # network errors surface as OSError subclasses
        raise CheckpointError(f"{repo_id}: download failed ({exc})") from None
    path = Path(folder)
    commit = path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else revision
    return Source(path=path, repo_id=repo_id, revision=commit)


@dataclass
class WeightIndex:
    """Every tensor of a checkpoint, grouped by the shard that holds it."""

    shards: list[Path]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    metadata: dict[Path, dict] = field(default_factory=dict)

    def by_shard(self) -> dict[Path, list[TensorInfo]]:
        out: dict[Path, list[TensorInfo]] = {s: [] for s in self.shards}
        for t in self.tensors.values():
            out[t.file].append(t)
        return out

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _check_shard_name(folder: Path, name: object) -> Path:
    if (
        not isinstance(name, str)
        or not name
        or "/" in name
        or "\\" in name
        or name in (".", "..")
        or Path(name).is_absolute()
    ):
        raise CheckpointError(
            f"{folder / INDEX_NAME}: shard name {name!r} is not a plain file name",
            "an index may only name files in its own folder; the index is corrupt or hostile",
        )
    return folder / name


def index_weights(folder: Path) -> WeightIndex:
    """Read the safetensors index (or the single ``model*.safetensors`` files)."""
    folder = Path(folder)
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(
                f"{index_path}: not a valid index (expected JSON with a 'weight_map' object)"
            ) from None
        shards: list[Path] = []
        for name in dict.fromkeys(weight_map.values()):
            path = _check_shard_name(folder, name)
            if not path.is_file():
                raise CheckpointError(
                    f"{index_path}: lists shard '{name}', which is missing",
                    "the download is incomplete; fetch the checkpoint again",
                )
            shards.append(path)
    else:
        shards = sorted(folder.glob("model*.safetensors"))
        weight_map = None
        if not shards:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(
                    f"{folder}: only pickle weights ({', '.join(pickles)}); no safetensors",
                    "pickle files can run arbitrary code when loaded; convert them to safetensors with a trusted tool first",
                )
            raise CheckpointError(
                f"{folder}: no weights found (no {INDEX_NAME}, no model*.safetensors)"
            )
    result = WeightIndex(shards=shards)
    for shard in shards:
        tensors, meta = read_header(shard)
        result.metadata[shard] = meta
        for name, info in tensors.items():
            if name in result.tensors:
                raise CheckpointError(
                    f"tensor '{name}' is stored twice: in {result.tensors[name].file.name} and {shard.name}"
                )
            if weight_map is not None and weight_map.get(name) != shard.name:
                if name not in weight_map:
                    raise CheckpointError(
                        f"{shard}: tensor '{name}' is not listed in {INDEX_NAME}"
                    )
                raise CheckpointError(
                    f"tensor '{name}': {INDEX_NAME} places it in {weight_map[name]}, found in {shard.name}"
                )
            result.tensors[name] = info
    if weight_map is not None:
        for name, shard_name in weight_map.items():
            if name not in result.tensors:
                raise CheckpointError(
                    f"{INDEX_NAME} lists tensor '{name}' in {shard_name}, but that shard does not hold it",
                    "the checkpoint is incomplete or its index is stale; fetch it again",
                )
    return result
