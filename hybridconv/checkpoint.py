"""Locating a checkpoint (local folder or Hub repo id) and indexing its weights.

A Hub repo id is fetched with ``huggingface_hub.snapshot_download`` into the
standard Hugging Face cache, limited to the files a conversion reads
(:func:`download_plan`): the weight files the safetensors index names (or the
``model*.safetensors`` files when there is no index), config.json, the index,
and the small files carried into the output or read for the model card
(tokenizer files, generation config, remote-code ``.py``, README, LICENSE).
Any other weight file is never fetched — e.g. the Mistral-format
``consolidated.safetensors`` that Mamba-Codestral ships beside its
transformers shards (14.6 GB). With ``HF_HUB_OFFLINE=1`` an already cached
snapshot is used without any network access.
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
from .safetensors_io import FP8_DTYPES, BlockScale, TensorInfo, read_float32, read_header

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
# Files a conversion reads or carries over, besides the weights (download_plan);
# weights in pickle formats are not fetched.
METADATA_PATTERNS = ["config.json", INDEX_NAME, "README.md", "LICENSE*", *CARRY_PATTERNS]
HUB_PATTERNS = [*METADATA_PATTERNS, "model*.safetensors"]  # offline: what a cached snapshot is checked for
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


@dataclass
class DownloadPlan:
    """What :func:`_download` fetches from a Hub repo: ``files`` ``{name: bytes}``,
    why these weights (``note``), and the repo's other weight files, not fetched."""

    commit: str | None
    files: dict[str, int]
    note: str
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(self.files.values())

    def describe(self) -> dict:
        return {"commit": self.commit, "files": [{"name": n, "bytes": b} for n, b in sorted(self.files.items())],
                "bytes": self.bytes, "note": self.note,
                "not_fetched": [{"name": n, "bytes": b} for n, b in sorted(self.skipped.items())]}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf", ".npz", ".msgpack", ".h5")


def download_plan(repo_id: str, revision: str | None = None, allow_pickle: bool = False) -> DownloadPlan:
    """The files a conversion of ``repo_id`` downloads, with their sizes (module
    docstring), from the repo's file list and its index (fetched first: it is
    what names the weights). Pickle weights only with ``allow_pickle`` and no
    safetensors."""
    import fnmatch

    from huggingface_hub import HfApi, hf_hub_download

    info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    sizes = {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}
    top = {n: b for n, b in sizes.items() if "/" not in n}
    rev = info.sha or revision
    if INDEX_NAME in top:
        index = json.loads(Path(hf_hub_download(repo_id, INDEX_NAME, revision=rev)).read_text(encoding="utf-8"))
        named = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(named, dict):
            raise CheckpointError(f"{repo_id}: {INDEX_NAME} is not a valid index (no 'weight_map' object)")
        weights = {n: sizes.get(n, 0) for n in dict.fromkeys(named.values()) if isinstance(n, str)}
        note = f"the {len(weights)} weight file(s) {INDEX_NAME} names"
    else:
        weights = {n: b for n, b in top.items() if fnmatch.fnmatch(n, "model*.safetensors")}
        note = "model*.safetensors (no index)"
    if not weights and allow_pickle:
        pickle_index = "pytorch_model.bin.index.json"
        if pickle_index in top:
            named = json.loads(Path(hf_hub_download(repo_id, pickle_index, revision=rev)).read_text())["weight_map"]
            weights = {n: sizes.get(n, 0) for n in dict.fromkeys(named.values())}
            weights[pickle_index] = top[pickle_index]
        else:
            weights = {n: b for n, b in top.items() if n.endswith(PICKLE_SUFFIXES)}
        note = "pickle weights (--allow-pickle; no safetensors)"
    files = dict(weights)
    for n, b in top.items():
        if not n.endswith(WEIGHT_SUFFIXES) and any(fnmatch.fnmatch(n, pat) for pat in METADATA_PATTERNS):
            files[n] = b
    skipped = {n: b for n, b in sizes.items() if n.endswith(WEIGHT_SUFFIXES) and n not in files}
    return DownloadPlan(rev, files, note, skipped)


def _download(repo_id: str, revision: str | None, allow_pickle: bool = False, **kwargs) -> Source:
    from huggingface_hub import constants, snapshot_download

    cached = HUB_PATTERNS + (["*.bin", "pytorch_model.bin.index.json"] if allow_pickle else [])
    with _hub_errors(repo_id, revision):
        if kwargs.get("local_files_only") or constants.HF_HUB_OFFLINE:
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=cached, **kwargs)
        else:
            _quiet_hub_logs()
            try:
                plan = download_plan(repo_id, revision, allow_pickle)
            except Exception as exc:
                if not _unreachable(exc):
                    raise
                # No network: a cached snapshot serves, as snapshot_download would fall back to it.
                folder = snapshot_download(repo_id, revision=revision, allow_patterns=cached, local_files_only=True)
            else:
                # exact names: fnmatch patterns, so [ and ] are escaped
                names = [re.sub(r"([\[\]*?])", r"[\1]", n) for n in plan.files]
                folder = snapshot_download(repo_id, revision=revision, allow_patterns=names, **kwargs)
    path = Path(folder)
    commit = path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else revision
    return Source(path=path, repo_id=repo_id, revision=commit)


def _unreachable(exc: Exception) -> bool:
    """Whether ``exc`` says the Hub could not be reached (not that it answered no)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return True
    if isinstance(exc, HfHubHTTPError):  # it answered: 404, 401, gated, ... (5xx: down)
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return status is not None and status >= 500
    name = type(exc).__name__.lower()
    return isinstance(exc, (ConnectionError, TimeoutError)) or "connect" in name or "timeout" in name


def _quiet_hub_logs() -> None:
    """huggingface_hub logs every retry ("thrown while requesting HEAD …"); our
    error says what failed, once."""
    import logging

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def remote_headers(repo_id: str, revision: str | None) -> tuple[Source, "WeightIndex", DownloadPlan | None]:
    """config.json and the safetensors headers of a Hub repo, without the weights:
    the headers come through HTTP range requests (``get_safetensors_metadata``),
    with what a conversion would download (:func:`download_plan`). A snapshot
    already in the local cache is used as is (nothing to download: None)."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import NotASafetensorsRepoError

    try:
        return (src := _download(repo_id, revision, local_files_only=True)), index_weights(src.path), None
    except CheckpointError:
        pass  # not (completely) cached: ask the Hub for headers only
    with _hub_errors(repo_id, revision):
        # One plain request first (the file list): it fails at once when the Hub is
        # unreachable, where the file requests below retry with back-off.
        _quiet_hub_logs()
        download = download_plan(repo_id, revision)
        try:
            config = Path(hf_hub_download(repo_id, "config.json", revision=download.commit or revision))
            meta = HfApi().get_safetensors_metadata(repo_id, revision=download.commit or revision)
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
    return Source(path=config.parent, repo_id=repo_id, revision=commit), index, download


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


# --- quantized sources ----------------------------------------------------------------------

# Names of transformers' quant_method values, for messages about sources hybridconv
# refuses (anything but fp8).
QUANT_METHOD_NAMES = {
    "gptq": "GPTQ", "awq": "AWQ", "bitsandbytes": "bitsandbytes", "compressed-tensors": "compressed-tensors",
    "modelopt": "NVIDIA ModelOpt", "mxfp4": "MXFP4", "fbgemm_fp8": "FBGEMM FP8", "hqq": "HQQ", "quark": "Quark",
    "torchao": "torchao", "eetq": "EETQ", "higgs": "HIGGS", "aqlm": "AQLM", "quanto": "Quanto", "vptq": "VPTQ",
    "bitnet": "BitNet", "spqr": "SpQR", "fp_quant": "FP-Quant", "gguf": "GGUF", "exl2": "EXL2",
}


@dataclass(frozen=True)
class Fp8Source:
    """A checkpoint stored in FP8 with block scales (transformers' ``quant_method:
    fp8``): ``block`` is ``weight_block_size`` (None: one scale per tensor)."""

    block: tuple[int, int] | None
    fmt: str | None = None  # the config's "fmt" (e4m3 / e5m2), informative: each tensor's dtype decides
    activation_scheme: str | None = None
    scale_fmt: str | None = None

    def describe(self) -> dict:
        return {"method": "fp8", "weight_block_size": list(self.block) if self.block else None,
                "fmt": self.fmt, "activation_scheme": self.activation_scheme, "scale_fmt": self.scale_fmt}


def _quantization_entries(raw: dict):
    yield raw
    for key in ("text_config", "llm_config"):  # a wrapper may state it in its language model's config
        if isinstance(raw.get(key), dict):
            yield raw[key]


def source_quantization(raw: dict, label: str) -> Fp8Source | None:
    """What quantization the checkpoint's config declares: None (float weights), an
    :class:`Fp8Source` (read, dequantized), or refused: an MLX/hybridconv output
    (``quantization``), or any other method, named in the message."""
    for cfg in _quantization_entries(raw):
        if cfg.get("quantization"):
            raise UsageError(
                f"{label}: is already quantized (an MLX checkpoint: config.json has 'quantization')",
                "start from the float checkpoint (the Hugging Face original or a float `hybridconv convert` output)",
            )
    for cfg in _quantization_entries(raw):
        q = cfg.get("quantization_config")
        if not q:
            continue
        if not isinstance(q, dict):
            raise CheckpointError(f"{label}: config.json's quantization_config is not an object")
        method = q.get("quant_method")
        if method == "fp8":
            block = q.get("weight_block_size")
            if block is not None and not (
                isinstance(block, list) and len(block) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
            ):
                raise CheckpointError(
                    f"{label}: quantization_config.weight_block_size is {block!r}; expected [rows, cols] (or null)"
                )
            return Fp8Source(tuple(block) if block else None, q.get("fmt"), q.get("activation_scheme"),
                             q.get("scale_fmt"))
        detail = q.get("quant_algo") or q.get("format") or (
            "4-bit" if q.get("load_in_4bit") else "8-bit" if q.get("load_in_8bit") else None)
        name = QUANT_METHOD_NAMES.get(method, repr(method))
        raise UsageError(
            f"{label}: is quantized with {name}{f' ({detail})' if detail else ''} "
            f"(config.json: quantization_config.quant_method = {method!r}); hybridconv reads float checkpoints "
            "and FP8 block-scaled ones (quant_method 'fp8') only",
            "start from the float (bf16 / fp16 / fp32) or FP8 release of the model",
        )
    return None


SCALE_SUFFIX = "_scale_inv"
ACTIVATION_SCALES = (".activation_scale", ".input_scale")


def scale_owner(name: str) -> str | None:
    """The weight a scale tensor belongs to: ``X.weight_scale_inv`` -> ``X.weight``,
    ``X.gate_up_proj_scale_inv`` -> ``X.gate_up_proj`` (transformers' names); None
    for other tensors."""
    return name[: -len(SCALE_SUFFIX)] if name.endswith(SCALE_SUFFIX) else None


@dataclass
class Fp8Pairs:
    """The FP8 weights of a checkpoint and what goes with them: ``scales``
    (scale tensor -> its weight) and ``activation_scales`` (per-layer input
    scales of FP8 matmuls, unused once the weights are dequantized)."""

    scales: dict[str, str] = field(default_factory=dict)
    activation_scales: list[str] = field(default_factory=list)

    @property
    def weights(self) -> list[str]:
        return list(self.scales.values())


def attach_scales(index: WeightIndex, fp8: Fp8Source, label: str = "") -> tuple[WeightIndex, Fp8Pairs]:
    """``index`` with every FP8 weight's :class:`~hybridconv.safetensors_io.BlockScale`
    attached (its data is then read dequantized), checked from the headers alone:
    every FP8 tensor has its scales, every scale tensor an FP8 weight, and the
    scales tile the weight in blocks of ``fp8.block`` (partial blocks at the
    edges). Fails naming the tensor otherwise."""
    pairs = Fp8Pairs()
    tensors = dict(index.tensors)
    for name, t in index.tensors.items():
        owner = scale_owner(name)
        if owner is None:
            if name.endswith(ACTIVATION_SCALES):
                pairs.activation_scales.append(name)
            continue
        w = index.tensors.get(owner)
        if w is None or w.dtype not in FP8_DTYPES:
            found = "no such tensor" if w is None else f"it is {w.dtype}"
            raise CheckpointError(
                f"{label}: tensor '{name}' holds FP8 scales for '{owner}', but {found}",
                "the checkpoint is incomplete or not an FP8 block-scaled one; fetch it again",
            )
        if len(w.shape) < 1 or not w.numel:
            raise CheckpointError(f"{label}: FP8 tensor '{owner}' has shape {list(w.shape)}; expected a matrix")
        if t.dtype not in ("F32", "BF16", "F16", "F8_E8M0"):
            raise CheckpointError(f"{label}: scales '{name}' are {t.dtype}; expected a float dtype")
        cols = w.shape[-1]
        if t.numel == 1:  # one scale for the whole tensor: one block over its [rows, cols] view
            view = (w.numel // cols, cols)
            scale = BlockScale(t, view, view, w.begin)
        else:
            block = fp8.block or (w.shape[-2] if len(w.shape) > 1 else 1, cols)
            rows = w.shape[-2] if len(w.shape) > 1 else 1
            want = (*w.shape[:-2], -(-rows // block[0]), -(-cols // block[1]))
            if len(w.shape) == 1:
                want = (-(-cols // block[1]),)
            if tuple(t.shape) != want:
                raise CheckpointError(
                    f"{label}: scales '{name}' have shape {list(t.shape)}; FP8 weight '{owner}' {list(w.shape)} "
                    f"in blocks of {list(block)} needs {list(want)}",
                    "config.json's quantization_config.weight_block_size does not match the checkpoint",
                )
            scale = BlockScale(t, tuple(block), tuple(w.shape), w.begin)
        tensors[owner] = _replace_info(w, scale=scale)
        pairs.scales[name] = owner
    scaled = set(pairs.scales.values())
    unscaled = [n for n, t in index.tensors.items() if t.dtype in FP8_DTYPES and n not in scaled]
    if unscaled:
        raise CheckpointError(
            f"{label}: {len(unscaled)} FP8 tensor(s) without scales ('<name>{SCALE_SUFFIX}'): "
            + ", ".join(f"'{n}'" for n in unscaled[:6]) + (" ..." if len(unscaled) > 6 else ""),
            "the checkpoint is incomplete or uses an FP8 layout hybridconv does not read",
        )
    return WeightIndex(shards=index.shards, tensors=tensors, metadata=index.metadata), pairs


def _replace_info(info: TensorInfo, **kw) -> TensorInfo:
    from dataclasses import replace

    return replace(info, **kw)


def model_tensors(folder: Path) -> dict[str, TensorInfo]:
    """The checkpoint's tensors as a model reads them: for an FP8 block-scaled
    checkpoint (:func:`source_quantization`), the FP8 weights with their scales
    attached (read them with :func:`hybridconv.safetensors_io.read_float32`:
    dequantized, float32) and the scale and activation-scale tensors left out;
    otherwise every tensor as stored. The seam a PyTorch reference loads its
    weights through, tensor by tensor or block by block."""
    from .config import read_config

    folder = Path(folder)
    raw = read_config(folder)
    index = index_weights(folder)
    fp8 = source_quantization(raw, str(folder))
    if fp8 is None:
        return dict(index.tensors)
    index, pairs = attach_scales(index, fp8, str(folder))
    skip = set(pairs.scales) | set(pairs.activation_scales)
    return {n: t for n, t in index.tensors.items() if n not in skip}


def read_model_tensor(info: TensorInfo):
    """One tensor of :func:`model_tensors` as numpy: float32 for an FP8 weight
    (dequantized) and float32 for other floats; other dtypes as stored."""
    from .safetensors_io import FLOAT_DTYPES, read_tensor

    if info.scale is not None or info.dtype in FLOAT_DTYPES:
        return read_float32(info)
    return read_tensor(info)
