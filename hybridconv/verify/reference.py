"""The PyTorch reference: run the *source* checkpoint once, keep its outputs.

This is the only module outside the tests that imports torch (lazily, inside
functions). Which implementation runs:

* architectures transformers implements (RecurrentGemma): its
  ``AutoModelForCausalLM``, safetensors only — or, for a multimodal wrapper
  that class does not map (GLM-5.3-Flash), the class the config's
  ``architectures`` names (its logits for token ids alone);
* PLaMo-2, which transformers lacks: the checkpoint's own modeling code only
  with ``trust_remote_code=True``; otherwise hybridconv's independent PyTorch
  PLaMo-2 (:mod:`hybridconv.verify.torch_plamo2`).

Outputs are kept as numpy: logits per sequence in memory, block outputs
(hidden states) in ``.npy`` files in a temporary folder, opened memory-mapped
one block at a time when compared. The torch model is freed before the MLX
model is loaded, so the two are never resident together.

Reference-logits files (``hybridconv reference``) are safetensors with exactly
the fixtures' layout — ``input_ids`` int32 ``[B, T]`` and ``logits`` float32
``[B, T, V]`` — plus, when needed, ``lengths`` int32 ``[B]`` (sequences of
different lengths, right-padded with 0), the top-k form (``topk_indices``
int32 and ``topk_logits`` float32 ``[B, T, k]``, ``logsumexp`` and
``token_logprobs`` float32 ``[B, T]``, instead of ``logits``), and
``hidden.N`` float32 ``[B, T, H]`` (block outputs, for localisation; a block
whose output is several residual streams ``[B, T, n, d]`` — hyper-connections
— is stored flattened, ``H = n·d``, as hybridconv's blocks output it).
Metadata: ``format = hybridconv-reference/1``, source, revision, reference
implementation, dtype.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__, interrupt
from ..checkpoint import Source, index_weights
from ..config import read_config
from ..converters import lookup
from ..errors import CheckpointError, UsageError
from .inputs import Inputs

FORMAT = "hybridconv-reference/1"
REF_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Reference:
    sequences: list[np.ndarray]
    outputs: list[dict]  # per sequence: {"logits": [T, V]} or the top-k form
    implementation: str
    source: str
    source_revision: str | None
    dtype: str
    block_kinds: list[str] | None = None
    model_type: str | None = None
    # [sequence][block] -> a .npy file (float32; bfloat16 bits in *.bf16.npy), or an
    # array (a memory map into a reference-logits file)
    hidden_files: list[list] | None = None
    file: str | None = None
    # how a live reference ran: path (whole-model / streamed), why, memory, seconds per part
    execution: dict | None = None
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def hidden(self, seq: int, block: int) -> np.ndarray | None:
        """Block ``block``'s output for sequence ``seq``, ``[T, H]`` float32 (memory-mapped)."""
        if not self.hidden_files:
            return None
        entry = self.hidden_files[seq][block]
        if isinstance(entry, np.ndarray):
            return entry
        from .torch_stream import hidden_array

        return hidden_array(entry)

    @property
    def n_blocks(self) -> int:
        return len(self.hidden_files[0]) if self.hidden_files else 0

    @property
    def top_k(self) -> int | None:
        """How many logits per token a top-k reference file stores (None: all)."""
        out = self.outputs[0]
        return None if "logits" in out else int(out["topk_indices"].shape[-1])

    @property
    def vocab_size(self) -> int:
        out = self.outputs[0]
        return int(out["logits"].shape[-1]) if "logits" in out else -1


def _remote_code_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.py"))


# Configs transformers' own classes cannot read as published, rewritten to what
# computes the same function on the CPU. xLSTM: NX-AI/xLSTM-7b's config (the
# xlstm package's layout) names Triton kernels, which transformers 5's strict
# xLSTMConfig rejects without that package (and which need a GPU with it);
# every kernel computes the same recurrence (hybridconv.models.xlstm), so the
# reference runs the native PyTorch ones, in inference mode (train mode refuses
# lengths that are not a multiple of chunk_size); and it states its width as
# embedding_dim / num_blocks only, where transformers would fall back to its
# defaults for hidden_size / num_hidden_layers.
def _xlstm_patch(raw: dict, config: dict) -> dict:
    return {"chunkwise_kernel": "chunkwise--native_autograd", "sequence_kernel": "native_sequence__native",
            "step_kernel": "native", "mode": "inference", "hidden_size": config["hidden_size"],
            "num_hidden_layers": config["num_hidden_layers"]}


_REFERENCE_CONFIG = {"xlstm": _xlstm_patch}


def _reference_config(model_type: str, raw: dict, config: dict):
    """transformers' config object for the reference where config.json needs a
    rewrite (:data:`_REFERENCE_CONFIG`), else None (read config.json as is)."""
    fn = _REFERENCE_CONFIG.get(model_type)
    patch = fn(raw, config) if fn is not None else {}
    if all(raw.get(k) == v for k, v in patch.items()):
        return None
    from transformers import AutoConfig

    return AutoConfig.for_model(**{**raw, **patch})



def _source_config(source: Source, trust_remote_code: bool) -> tuple[dict, object, dict]:
    """(raw config, architecture, normalised config) of a reference source, refused
    when it is a hybridconv output or has no weights hybridconv can read."""
    raw = read_config(source.path)
    if (source.path / "conversion.json").is_file():
        raise UsageError(
            f"{source.label}: is a hybridconv output (MLX layout), not the original checkpoint",
            "pass the Hugging Face checkpoint it was converted from as --reference",
        )
    arch = lookup(raw)
    config = arch.normalize_config(raw)
    index_weights(source.path)  # safetensors present and well formed (no pickle)
    if arch.model_type == "plamo2" and trust_remote_code and not raw.get("auto_map"):
        raise UsageError(
            f"{source.label}: --trust-remote-code given, but config.json has no auto_map naming modeling code"
        )
    return raw, arch, config


def _plamo2_label(source: Source) -> str:
    label = "hybridconv PyTorch PLaMo-2 reference"
    py = _remote_code_files(source.path)
    if py:
        label += f" (the checkpoint's {', '.join(py)} was not run: pass --trust-remote-code to use it)"
    return label


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_torch_model(source: Source, dtype: str, trust_remote_code: bool):
    """(callable ids -> logits with block hooks, implementation label, block kinds)."""
    import torch

    if dtype not in REF_DTYPES:
        raise UsageError(f"--ref-dtype {dtype!r}: expected one of {', '.join(REF_DTYPES)}")
    tdtype = getattr(torch, dtype)
    raw, arch, config = _source_config(source, trust_remote_code)
    kinds = [k for k, _ in arch.schedule(config)]
    n = config["num_hidden_layers"]
    model_type = arch.model_type

    if arch.model_type == "plamo2" and not trust_remote_code:
        from .torch_plamo2 import TorchPlamo2

        model = TorchPlamo2(source.path, tdtype)
        label = _plamo2_label(source)

        def run(ids: np.ndarray, hidden: list):
            return model(torch.tensor(ids[None], dtype=torch.long), hidden)

        return run, label, kinds, model_type

    from .torch_source import decoder_layers, reference_loader

    _quiet_transformers()
    kwargs = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
    # A multimodal wrapper runs as its image-text-to-text class; an FP8 source on its
    # dequantized weights (torch_source.py: the seam a block-wise reference shares).
    cls, where, extra = reference_loader(source.path, raw, trust_remote_code,
                                         config=_reference_config(arch.model_type, raw, config))
    kwargs.update(extra)
    try:
        model = cls.from_pretrained(where, dtype=tdtype, **kwargs)
    except TypeError:  # transformers 4 spells it torch_dtype
        model = cls.from_pretrained(where, torch_dtype=tdtype, **kwargs)
    model.eval()
    layers = decoder_layers(model, n)
    label = f"transformers {type(model).__name__}" + (" (remote code)" if trust_remote_code else "")
    captured: list = []

    def hook(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        # several residual streams ([B, T, streams, H], hyper-connections): one
        # [B, T, streams·H] row per token, as hybridconv's blocks output them
        captured.append(h.flatten(2) if h.dim() > 3 else h)

    for layer in layers:
        layer.register_forward_hook(hook)

    def run(ids: np.ndarray, hidden: list):
        captured.clear()
        with torch.no_grad():
            out = model(torch.tensor(ids[None], dtype=torch.long), use_cache=False)
        hidden.extend(captured)
        return out.logits

    return run, label, kinds, model_type


def _sizes(source: Source, inputs: Inputs, dtype: str) -> dict:
    """What the memory estimates need, from config.json and the safetensors headers:
    parameters in total, outside the blocks and in the largest block, the vocabulary,
    hidden size and longest input."""
    from ..converters import layer_of

    index = index_weights(source.path)
    raw = read_config(source.path)
    cfg = lookup(raw).normalize_config(raw)
    per_block: dict = {}
    for name, t in index.tensors.items():
        b = layer_of(name)
        per_block[b] = per_block.get(b, 0) + t.numel
    return {
        "params": sum(per_block.values()),
        "global": per_block.pop(None, 0),
        "block": max(per_block.values(), default=0),
        "width": 4 if dtype == "float32" else 2,
        "vocab": cfg["vocab_size"],
        "hidden": cfg.get("hidden_size", 0),
        "longest": max(len(s) for s in inputs.sequences),
    }


def estimate_memory(source: Source, inputs: Inputs, dtype: str) -> int:
    """Bytes the whole-model PyTorch reference needs: its weights in ``dtype`` plus a
    margin for activations, and one sequence's logits twice (the model's and our copy)."""
    z = _sizes(source, inputs, dtype)
    return int(z["params"] * z["width"] * 1.2) + 2 * z["longest"] * z["vocab"] * 4


def estimate_streamed_memory(source: Source, inputs: Inputs, dtype: str) -> int:
    """Bytes the streamed PyTorch reference needs: the parameters outside the blocks
    (embedding, norm, head), the largest block twice (transformers' loader may stack
    per-expert tensors beside their copies), one sequence's logits twice and its
    activations."""
    z = _sizes(source, inputs, dtype)
    return (z["global"] * z["width"] + 2 * z["block"] * z["width"] + 2 * z["longest"] * z["vocab"] * 4
            + 32 * z["longest"] * z["hidden"] * 4)


REFERENCE_HINT = "use --ref-dtype bfloat16 (half the memory), fewer or shorter inputs, or a machine with more memory"


def plan_reference(source: Source, inputs: Inputs, dtype: str = "float32", stream: bool | None = None,
                   max_memory: str | None = None) -> dict:
    """Whole-model or streamed for this reference (``resources.choose_path``); refuses
    (exit 2) when the path it would take does not fit."""
    from ..resources import choose_path

    return choose_path(f"the PyTorch reference ({dtype})", estimate_memory(source, inputs, dtype),
                       estimate_streamed_memory(source, inputs, dtype), stream, max_memory, REFERENCE_HINT)


def compute_reference(
    source: Source, inputs: Inputs, dtype: str = "float32", trust_remote_code: bool = False,
    keep_hidden: bool = True, progress=None, max_memory: str | None = None, stream: bool | None = None,
) -> Reference:
    """Run ``source`` in PyTorch on ``inputs`` (float32 by default) and keep its logits
    (and, with ``keep_hidden``, every block's output) on disk, memory-mapped; the torch
    model is freed before this returns.

    ``stream``: True runs it one block at a time (:mod:`.torch_stream`: memory the
    largest block, not the model), False the whole model at once, None chooses
    (whole-model when it fits with a margin: ``resources.choose_path``). Refuses
    (exit 2) when the path taken would not fit in memory. ``Reference.execution``
    records the path, why, the memory and the seconds per part."""
    import time

    from ..resources import peak_rss

    if dtype not in REF_DTYPES:
        raise UsageError(f"--ref-dtype {dtype!r}: expected one of {', '.join(REF_DTYPES)}")
    decision = plan_reference(source, inputs, dtype, stream, max_memory)
    # Outputs go to disk and are read back memory-mapped: T x V logits of a large
    # vocabulary are gigabytes per sequence (TMPDIR chooses the folder).
    tmp = tempfile.TemporaryDirectory(prefix="hybridconv-ref-")
    outputs: list = []
    seconds: dict = {}
    t0 = time.perf_counter()
    try:
        run = _run_streamed if decision["path"] == "streamed" else _run_whole
        hidden_files, label, kinds, model_type = run(source, inputs, dtype, trust_remote_code, keep_hidden,
                                                     progress, Path(tmp.name), outputs, seconds)
        interrupt.check()
    except BaseException as exc:
        outputs.clear()  # drop the memory maps before their files go
        with interrupt.critical():
            tmp.cleanup()
        from ..resources import is_full_disk

        if is_full_disk(exc):  # the temporary outputs (TMPDIR) filled the disk
            from ..convert import output_error

            err = output_error(Path(tmp.name), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                               needed=_outputs_bytes(source, inputs, keep_hidden or decision["path"] == "streamed"))
            err.hint = "free space there, or point TMPDIR at a folder with more room (the reference's temporary outputs)"
            raise err from None
        raise
    if decision["estimated_bytes"]["whole-model"] > 256 << 20:
        gc.collect()  # free the torch model before anything MLX is loaded (a pass costs ~0.5 s)
    seconds["total"] = time.perf_counter() - t0
    return Reference(
        sequences=inputs.sequences,
        outputs=outputs,
        implementation=label,
        source=source.label,
        source_revision=source.revision,
        dtype=dtype,
        block_kinds=kinds,
        model_type=model_type,
        hidden_files=hidden_files if keep_hidden else None,
        execution={**decision, "seconds": {k: round(v, 3) for k, v in seconds.items()}, "peak_rss_bytes": peak_rss()},
        _tmp=tmp,
    )


def _outputs_bytes(source: Source, inputs: Inputs, keep_hidden: bool) -> int | None:
    """What the temporary outputs need on disk: float32 logits, and block outputs
    with ``keep_hidden``, for every token of the inputs."""
    try:
        raw = read_config(source.path)
        cfg = lookup(raw).normalize_config(raw)
        width = cfg["vocab_size"] + (cfg["hidden_size"] * cfg["num_hidden_layers"] if keep_hidden else 0)
    except Exception:  # noqa: BLE001  (only an estimate for a message)
        return None
    return 4 * width * sum(len(s) for s in inputs.sequences)


def _save_logits(logits, path: Path, outputs: list) -> None:
    np.save(path, logits[0].float().numpy())
    outputs.append({"logits": np.load(path, mmap_mode="r")})


def _run_whole(source, inputs, dtype, trust_remote_code, keep_hidden, progress, tmp: Path, outputs, seconds):
    """The whole model in memory, one sequence after another (hooks record the blocks)."""
    import time

    t = time.perf_counter()
    run, label, kinds, model_type = load_torch_model(source, dtype, trust_remote_code)
    seconds["load"] = time.perf_counter() - t
    t = time.perf_counter()
    hidden_files = []
    for s, ids in enumerate(inputs.sequences):
        interrupt.check()  # a safe point: between sequences
        hidden: list = []
        logits = run(ids, hidden)
        _save_logits(logits, tmp / f"seq{s}-logits.npy", outputs)
        if keep_hidden:
            files = []
            for b, h in enumerate(hidden):
                path = tmp / f"seq{s}-block{b}.npy"
                np.save(path, h[0].float().numpy())
                files.append(path)
            hidden_files.append(files)
        del hidden, logits
        if progress:
            progress(f"sequence {s + 1}/{len(inputs.sequences)}")
    seconds["forward"] = time.perf_counter() - t
    del run
    return hidden_files, label, kinds, model_type


def open_blocks(source: Source, dtype: str, trust_remote_code: bool):
    """(block runner, implementation label, block kinds, model_type) for the streamed
    reference: :class:`.torch_stream.TransformersBlocks`, or hybridconv's PyTorch
    PLaMo-2 block by block (:class:`.torch_stream.Plamo2Blocks`)."""
    import torch

    from .torch_stream import Plamo2Blocks, TransformersBlocks

    raw, arch, config = _source_config(source, trust_remote_code)
    kinds = [k for k, _ in arch.schedule(config)]
    tdtype = getattr(torch, dtype)
    if arch.model_type == "plamo2" and not trust_remote_code:
        return Plamo2Blocks(source, index_weights(source.path), tdtype), _plamo2_label(source), kinds, arch.model_type
    from types import SimpleNamespace

    from ..checkpoint import model_tensors
    from .torch_source import reference_loader

    _quiet_transformers()
    # the same seam as the whole-model reference (torch_source.py): a config
    # rewritten where config.json cannot be read as published, and for an FP8
    # source the config without quantization and its weights read dequantized
    _, _, extra = reference_loader(source.path, raw, trust_remote_code,
                                   config=_reference_config(arch.model_type, raw, config))
    tensors = SimpleNamespace(tensors=model_tensors(source.path))
    blocks = TransformersBlocks(source, tensors, tdtype, config["num_hidden_layers"], trust_remote_code,
                                config=extra.get("config"))
    return blocks, blocks.label, kinds, arch.model_type


def _run_streamed(source, inputs, dtype, trust_remote_code, keep_hidden, progress, tmp: Path, outputs, seconds):
    """One block at a time (:mod:`.torch_stream`): the global parameters, then per
    block its weights, every sequence through it, its outputs to disk, the block
    freed; the logits last. Block outputs are kept whatever ``keep_hidden`` says:
    each block reads the previous one's."""
    import time

    from .torch_stream import OutputStore

    t = time.perf_counter()
    blocks, label, kinds, model_type = open_blocks(source, dtype, trust_remote_code)
    blocks.load_globals()
    seconds["load"] = time.perf_counter() - t
    seconds["forward"] = 0.0
    store = OutputStore(tmp)
    seqs = inputs.sequences
    for b in range(blocks.n):
        interrupt.check()  # a safe point: between blocks
        t = time.perf_counter()
        blocks.load_block(b)
        seconds["load"] += time.perf_counter() - t
        t = time.perf_counter()
        for s, ids in enumerate(seqs):
            interrupt.check()  # a safe point: between sequences
            blocks.run_block(b, s, ids, store)
        seconds["forward"] += time.perf_counter() - t
        blocks.release_block(b)
        if progress:
            progress(f"block {b + 1}/{blocks.n}")
    t = time.perf_counter()
    for s, ids in enumerate(seqs):
        interrupt.check()
        _save_logits(blocks.logits(s, ids, store), tmp / f"seq{s}-logits.npy", outputs)
    seconds["head"] = time.perf_counter() - t
    if getattr(blocks, "forward_seconds", 0.0):
        # of the forward time, what the model's own forward spent outside the block
        # being run (embedding, masks, rotary tables: repeated per block and sequence)
        seconds["outside_blocks"] = blocks.forward_seconds - blocks.block_seconds
    del blocks
    hidden_files = [[store.hidden[s, b] for b in range(len(kinds))] for s in range(len(seqs))]
    return hidden_files, label, kinds, model_type


# --- reference-logits files ------------------------------------------------------------


def write_reference_file(ref: Reference, path: Path, top_k: int | None = None, with_hidden: bool = False):
    """Store a :class:`Reference` as a reference-logits file (README, "Reference-logits
    files"): full logits, or the top-k form; with ``with_hidden``, the block outputs.

    Written tensor by tensor (the header first, from the shapes), one sequence's rows
    at a time: memory is one sequence's logits or block output, not the file."""
    from ..safetensors_io import header_bytes, write_all

    lengths = [len(s) for s in ref.sequences]
    B, T = len(lengths), max(lengths)
    ids = np.zeros((B, T), dtype=np.int32)
    for i, s in enumerate(ref.sequences):
        ids[i, : len(s)] = s
    V = ref.vocab_size
    small: dict[str, np.ndarray] = {"input_ids": ids}
    if len(set(lengths)) > 1:
        small["lengths"] = np.array(lengths, dtype=np.int32)
    if top_k is not None:
        if not 1 <= top_k <= V:
            raise UsageError(f"--top-k {top_k}: expected 1..{V}")
        idx = np.zeros((B, T, top_k), dtype=np.int32)
        tl = np.zeros((B, T, top_k), dtype=np.float32)
        # float64: p = exp(logit - logsumexp) must be exact enough that the mass
        # outside the top-k (1 - sum p) is not rounding noise.
        lse = np.zeros((B, T), dtype=np.float64)
        tlp = np.zeros((B, T), dtype=np.float64)
        for i, (seq, out) in enumerate(zip(ref.sequences, ref.outputs)):
            lg = np.asarray(out["logits"]).astype(np.float64)
            n = lengths[i]
            order = np.argsort(-lg, axis=-1)[:, :top_k]
            idx[i, :n] = order
            tl[i, :n] = np.take_along_axis(lg, order, axis=-1)
            m = lg.max(-1, keepdims=True)
            l = (m + np.log(np.exp(lg - m).sum(-1, keepdims=True)))[:, 0]
            lse[i, :n] = l
            tlp[i, : n - 1] = lg[np.arange(n - 1), seq[1:]] - l[: n - 1]
            del lg
        small.update(topk_indices=idx, topk_logits=tl, logsumexp=lse, token_logprobs=tlp)
    codes = {np.dtype(np.int32): "I32", np.dtype(np.float32): "F32", np.dtype(np.float64): "F64"}
    entries = [(k, codes[v.dtype], v.shape) for k, v in small.items()]
    # the large tensors, written one sequence at a time: [B, T, width] float32
    rows: list[tuple[str, int, object]] = []
    if top_k is None:
        rows.append(("logits", V, lambda i: ref.outputs[i]["logits"]))
    if with_hidden and ref.hidden_files:
        width = ref.hidden(0, 0).shape[-1]
        for b in range(ref.n_blocks):
            rows.append((f"hidden.{b}", width, lambda i, _b=b: ref.hidden(i, _b)))
    entries += [(name, "F32", (B, T, width)) for name, width, _ in rows]
    metadata = {
        "format": FORMAT,
        "tool": f"hybridconv {__version__}",
        "source": ref.source,
        "source_revision": ref.source_revision or "",
        "implementation": ref.implementation,
        "dtype": ref.dtype,
        "block_kinds": json.dumps(ref.block_kinds or []),
        "model_type": ref.model_type or "",
    }
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    total = sum(a.nbytes for a in small.values()) + sum(B * T * width * 4 for _, width, _ in rows)
    try:
        with open(tmp, "wb", buffering=0) as f:
            write_all(f, header_bytes(entries, metadata))
            for arr in small.values():
                write_all(f, np.ascontiguousarray(arr))
            for _, width, get in rows:
                pad = np.zeros((1, width), dtype=np.float32)
                for i in range(B):
                    interrupt.check()  # a safe point: between rows written
                    write_all(f, np.ascontiguousarray(np.asarray(get(i), dtype=np.float32)))
                    for _ in range(T - lengths[i]):
                        write_all(f, pad)
        tmp.replace(path)
    except OSError as exc:  # written here row by row: a failed write is an OSError
        from ..convert import output_error

        raise output_error(path, exc, needed=total) from None
    finally:
        tmp.unlink(missing_ok=True)


def read_reference_file(path: Path) -> Reference:
    """Read a reference-logits file (or a fixture's ``expected.safetensors``) as a
    :class:`Reference`; a malformed file is refused naming what is wrong. Its
    tensors are memory-mapped (nothing is copied: a file larger than memory works)."""
    from ..safetensors_io import read_header

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: reference-logits file not found")
    infos, meta = read_header(path)  # validates the header with clear errors
    np_dtypes = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I32": np.int32, "I64": np.int64}
    t: dict[str, np.ndarray] = {}
    for name, info in infos.items():
        if info.dtype not in np_dtypes:
            raise CheckpointError(f"{path}: tensor '{name}' has dtype {info.dtype}; a reference-logits file holds "
                                  "I32 ids and F32 logits")
        t[name] = (np.memmap(path, dtype=np_dtypes[info.dtype], mode="r", offset=info.begin, shape=info.shape)
                   if info.numel else np.zeros(info.shape, dtype=np_dtypes[info.dtype]))
    if "input_ids" not in t or ("logits" not in t and "topk_indices" not in t):
        raise CheckpointError(
            f"{path}: not a reference-logits file (needs input_ids and logits, or the top-k form); "
            f"found {', '.join(sorted(t)) or 'no tensors'}"
        )
    ids = t["input_ids"]
    if ids.ndim != 2:
        raise CheckpointError(f"{path}: input_ids must be [B, T], found {list(ids.shape)}")
    B, T = ids.shape
    lengths = np.asarray(t["lengths"]).tolist() if "lengths" in t else [T] * B
    sequences = [np.asarray(ids[i, : lengths[i]]).astype(np.int32) for i in range(B)]
    outputs = []
    for i in range(B):
        n = lengths[i]
        if "logits" in t:
            lg = t["logits"]
            if lg.shape[:2] != (B, T):
                raise CheckpointError(f"{path}: logits {list(lg.shape)} do not match input_ids [{B}, {T}]")
            outputs.append({"logits": lg[i, :n] if lg.dtype == np.float32 else lg[i, :n].astype(np.float32)})
        else:
            outputs.append({k: t[k][i, :n] for k in ("topk_indices", "topk_logits", "logsumexp", "token_logprobs")})
    hidden_keys = sorted((k for k in t if k.startswith("hidden.")), key=lambda k: int(k.split(".")[1]))
    ref = Reference(
        sequences=sequences,
        outputs=outputs,
        implementation=meta.get("implementation", "unknown (file without hybridconv metadata)"),
        source=meta.get("source", "unknown"),
        source_revision=meta.get("source_revision") or None,
        dtype=meta.get("dtype", "float32"),
        block_kinds=json.loads(meta["block_kinds"]) if meta.get("block_kinds") else None,
        model_type=meta.get("model_type") or None,
        file=str(path),
    )
    if hidden_keys:
        ref.hidden_files = [[t[k][i, : lengths[i]] for k in hidden_keys] for i in range(B)]
    return ref
