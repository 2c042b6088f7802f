"""Locating a checkpoint (local folder or Hub repo id) and indexing its weights.

A Hub repo id is fetched with ``huggingface_hub.snapshot_download`` into the
standard Hugging Face cache, limited to the files a conversion needs
(:data:`HUB_PATTERNS`). With ``HF_HUB_OFFLINE=1`` an already cached snapshot is
used without any network access.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, UsageError
from .safetensors_io import TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
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
# Files a conversion reads or carries over; weights in pickle formats are not fetched.
HUB_PATTERNS = ["config.json", "*.safetensors", INDEX_NAME, "README.md", "LICENSE*", *CARRY_PATTERNS]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Source:
    path: Path
    repo_id: str | None = None
    revision: str | None = None  # the commit, when known
    origin: Path | None = None  # the folder the user named, when ``path`` is a temporary copy

    @property
    def label(self) -> str:
        return self.repo_id or str(self.origin or self.path)


def resolve(source: str, revision: str | None = None, allow_pickle: bool = False) -> Source:
    """A local folder as is; otherwise a Hub repo id, downloaded (or found in the cache)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{source}: is a file; SOURCE must be a checkpoint folder or a Hub repo id")
        if revision is not None:
            # a local folder has no revisions: never read one while the user asked for another
            raise UsageError(
                f"--revision {revision}: {source} is a local folder, and --revision applies only to Hub repo ids",
                "drop --revision, or pass the Hub repo id (ORG/NAME) to download that revision",
            )
        return Source(path=path.resolve())
    if not REPO_ID.match(source):
        raise UsageError(
            f"{source}: no such folder, and not a Hub repo id (ORG/NAME)",
            "pass the path of a local checkpoint folder or a repo id such as google/recurrentgemma-2b",
        )
    return _download(source, revision, allow_pickle)


def _offline_variable() -> str | None:
    """The variable that puts huggingface_hub in offline mode (HF_HUB_OFFLINE or
    TRANSFORMERS_OFFLINE), when one does; None otherwise."""
    import os

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return name
    try:
        from huggingface_hub import constants

        if constants.is_offline_mode():
            return "HF_HUB_OFFLINE"
    except (ImportError, AttributeError):
        pass
    return None


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None):
    """huggingface_hub's exceptions, as errors that say what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .errors import is_network_error

    local = f"no local folder named '{repo_id}' exists either; "
    try:
        yield
    except GatedRepoError:
        raise CheckpointError(
            f"{repo_id}: the repository is gated",
            "accept its terms on the Hub, then log in (hf auth login) or set HF_TOKEN",
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo_id}: repository not found on the Hub (or private), and {local.rstrip('; ')}",
            "check the path or the repo id; for a private repository log in or set HF_TOKEN",
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo_id}: revision {revision!r} not found") from None
    except LocalEntryNotFoundError:
        offline = _offline_variable()
        if offline:
            raise CheckpointError(
                f"{repo_id}: not in the local Hugging Face cache, and {offline} is set: nothing is downloaded",
                f"{local}check the path, or unset {offline} to download it",
            ) from None
        raise CheckpointError(
            f"{repo_id}: not in the local Hugging Face cache and the Hub cannot be reached",
            f"{local}check the path or the network",
        ) from None
    except Exception as exc:  # network errors: OSErrors, or the HTTP client's own classes
        if not (isinstance(exc, OSError) or is_network_error(exc)):
            raise
        if is_network_error(exc):
            raise CheckpointError(
                f"{repo_id}: the Hub cannot be reached ({type(exc).__name__}: {exc})",
                f"{local}check the path or the network (and HF_ENDPOINT, if set)",
            ) from None
        raise CheckpointError(f"{repo_id}: download failed ({exc})", f"{local}check the path or the network") from None


def _download(repo_id: str, revision: str | None, allow_pickle: bool = False, **kwargs) -> Source:
    from huggingface_hub import snapshot_download

    patterns = HUB_PATTERNS + (["*.bin", "pytorch_model.bin.index.json"] if allow_pickle else [])
    with _hub_errors(repo_id, revision):
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, **kwargs)
    path = Path(folder)
    commit = path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else revision
    return Source(path=path, repo_id=repo_id, revision=commit)


def _quiet_hub_logs() -> None:
    """huggingface_hub logs every retry ("thrown while requesting HEAD …"); our
    error says what failed, once."""
    import logging

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def remote_headers(repo_id: str, revision: str | None) -> tuple[Source, "WeightIndex"]:
    """config.json and the safetensors headers of a Hub repo, without the weights:
    the headers come through HTTP range requests (``get_safetensors_metadata``).
    A snapshot already in the local cache is used as is."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import NotASafetensorsRepoError

    try:
        return (src := _download(repo_id, revision, local_files_only=True)), index_weights(src.path)
    except CheckpointError:
        pass  # not (completely) cached: ask the Hub for headers only
    with _hub_errors(repo_id, revision):
        # One plain request first, as snapshot_download makes: it fails at once when the
        # Hub is unreachable, where the file requests below retry with back-off.
        _quiet_hub_logs()
        HfApi().repo_info(repo_id, revision=revision)
        try:
            config = Path(hf_hub_download(repo_id, "config.json", revision=revision))
            meta = HfApi().get_safetensors_metadata(repo_id, revision=revision)
        except NotASafetensorsRepoError:
            raise CheckpointError(f"{repo_id}: no safetensors weights (model.safetensors or its index)") from None
    index = WeightIndex(shards=[])
    for fname, file_meta in sorted(meta.files_metadata.items()):
        shard = Path(fname)  # a name in the repo, never opened: only sizes are used
        index.shards.append(shard)
        for name, t in file_meta.tensors.items():
            begin, end = t.data_offsets
            index.tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), shard, begin, end)
    commit = config.parent.name if re.fullmatch(r"[0-9a-f]{40}", config.parent.name) else revision
    return Source(path=config.parent, repo_id=repo_id, revision=commit), index


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
        for name in weight_map.values():
            _check_shard_name(folder, name)  # before hashing: a value may be any JSON
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
                    "unpickling can run arbitrary code, so pickle files are refused; pass --allow-pickle to "
                    "load them with torch.load(weights_only=True), which restricts unpickling to tensors",
                )
            raise CheckpointError(
                f"{folder}: no weights found (no {INDEX_NAME}, no model*.safetensors)"
            )
    result = WeightIndex(shards=shards)
    headers = {}
    for shard in shards:
        tensors, meta = read_header(shard)
        result.metadata[shard] = meta
        headers[shard] = tensors
    seen: dict[str, Path] = {}
    for shard, tensors in headers.items():  # duplicates first: the clearest diagnosis
        for name in tensors:
            if name in seen:
                raise CheckpointError(
                    f"tensor '{name}' is stored twice: in {seen[name].name} and {shard.name}",
                    "the checkpoint's shards overlap; fetch it again",
                )
            seen[name] = shard
    for shard, tensors in headers.items():
        for name, info in tensors.items():
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


@contextlib.contextmanager
def source_folder(source: str, revision: str | None = None, allow_pickle: bool = False):
    """The resolved source; with ``allow_pickle``, a pickle-only checkpoint is first
    rewritten as safetensors in a temporary folder (removed afterwards)."""
    src = resolve(source, revision, allow_pickle)
    has_safetensors = (src.path / INDEX_NAME).is_file() or any(src.path.glob("model*.safetensors"))
    pickles = sorted(p for p in src.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if has_safetensors or not pickles or not allow_pickle:
        yield src
        return
    with tempfile.TemporaryDirectory(prefix="hybridconv-unpickled-") as tmp:
        _unpickle_to_safetensors(src.path, [p for p in pickles if p.suffix in (".bin", ".pt", ".pth")], Path(tmp))
        yield Source(path=Path(tmp), repo_id=src.repo_id, revision=src.revision, origin=src.path)


def _unpickle_to_safetensors(folder: Path, pickles: list[Path], tmp: Path) -> None:
    import torch
    from safetensors.torch import save_file

    weight_map = {}
    for i, path in enumerate(pickles):
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ...
            raise CheckpointError(
                f"{path}: refused or unreadable by torch.load(weights_only=True) ({type(exc).__name__}: {exc})",
                "the file holds more than tensors, or is corrupt; obtain a safetensors checkpoint",
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: not a plain state dict of tensors")
        name = f"model-{i + 1:05d}-of-{len(pickles):05d}.safetensors"
        # clone: tied weights share storage, which safetensors refuses to save twice
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in state})
        del state
    (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in folder.iterdir():
        if f.is_file() and f.suffix not in PICKLE_SUFFIXES and not f.name.endswith(".safetensors") and f.name != INDEX_NAME:
            shutil.copyfile(f, tmp / f.name)


def read_front_matter(text: str) -> dict:
    """The YAML front matter of a model card ({} when there is none or it is invalid):
    read from a source's README.md by convert, written into ours by publish."""
    import yaml

    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}
