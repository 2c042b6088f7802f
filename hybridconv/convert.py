"""Planning and running a conversion.

:func:`plan` reads only config.json and safetensors headers: it normalises the
config, runs every tensor's metadata through the architecture's rules and
checks the result against the parameters of the MLX model (built lazily, so no
weight memory is allocated). The ledger must balance: every source tensor kept
or dropped with a reason, every model parameter filled with the right shape.

:func:`convert` then streams the data shard by shard and tensor by tensor in
bounded chunks (peak memory: a chunk, or one conv kernel), writes into a
temporary sibling of OUT and renames it into place only when everything —
weights, index, config, tokenizer files — is written.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__, interrupt
from .checkpoint import (
    CARRY_PATTERNS,
    INDEX_NAME,
    Fp8Pairs,
    Fp8Source,
    Source,
    WeightIndex,
    attach_scales,
    index_weights,
    source_folder,
    source_quantization,
)
from .config import read_config
from .converters import Architecture, layer_of, lookup
from .converters._wrappers import text_roots, layout_rules
from .converters.rules import (
    Consume,
    Dequantize,
    Meta,
    Step,
    apply_whole,
    merge_regroups,
    merge_stacks,
    plan_tensors,
    scale_rows,
)
from .errors import CheckpointError, ConfigError, LedgerError, OutputError, UsageError
from .safetensors_io import (
    DTYPE_NAMES,
    FLOAT_DTYPES,
    ITEMSIZE,
    PAGE,
    chunk_buffer,
    convert_raw,
    copy_bytes,
    has_nonfinite,
    header_bytes,
    iter_float_chunks,
    iter_raw_chunks,
    read_tensor,
    rows_float32,
    scan_nonfinite,
    to_float32,
    write_all,
)

DTYPE_LABELS = {v: k for k, v in DTYPE_NAMES.items()}  # "F32" -> "float32"
CONVERSION_RECORD = "conversion.json"


@dataclass
class Plan:
    source: Source
    arch: Architecture
    raw_config: dict
    config: dict  # normalised
    index: WeightIndex
    dtype: str  # safetensors code of the output float dtype
    steps: list[Step] = field(default_factory=list)  # one per source tensor (per part of a split one)
    expected: dict[str, tuple[int, ...]] = field(default_factory=dict)
    outputs: list[Step] | None = None  # the written tensors, stacked experts merged (merge_stacks)
    # The rules, in order: where the language model lies (converters._wrappers,
    # decided from the tensor names), then the architecture's own.
    rules: list = field(default_factory=list)
    fp8: Fp8Source | None = None  # an FP8 block-scaled source (its weights are dequantized)
    download: dict | None = None  # inspect on a Hub repo not cached: what convert would download

    @property
    def kept(self) -> list[Step]:
        """One step per written tensor (a stacked target is one step with ``parts``)."""
        if self.outputs is not None:
            return self.outputs
        return [s for s in self.steps if s.target is not None]

    @property
    def dropped(self) -> list[Step]:
        return [s for s in self.steps if s.target is None]

    @property
    def parameter_count(self) -> int:
        total = 0
        for shape in self.expected.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    @property
    def dequantized(self) -> list[str]:
        """The source tensors read dequantized from FP8 (in source order)."""
        return list(dict.fromkeys(s.source for s in self.steps if s.dequantized))

    def output_bytes(self) -> int:
        return sum(_nbytes(s.dtype, s.shape) for s in self.kept)


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = ITEMSIZE[dtype]
    for d in shape:
        n *= d
    return n


def default_dtype(raw_config: dict, index: WeightIndex, fp8: bool = False) -> str:
    """The checkpoint's own dtype: config's dtype/torch_dtype, else the commonest float;
    for an FP8 source (whose weights are no float dtype of ours) the config's, else
    bfloat16. A dtype the output cannot have (``int8``, ``float64``, a typo) is refused
    naming it, rather than silently replaced: ``--dtype`` chooses the output dtype then."""
    for key in ("dtype", "torch_dtype"):
        value = raw_config.get(key)
        if value is None or value == "auto":  # "auto": transformers' "as stored"
            continue
        if isinstance(value, str) and value in DTYPE_NAMES:
            return DTYPE_NAMES[value]
        raise ConfigError(
            f"config.json: '{key}' = {value!r} is not a dtype hybridconv writes ({', '.join(DTYPE_NAMES)})",
            "pass --dtype float32, float16 or bfloat16 to choose the output dtype (or fix config.json)",
        )
    if fp8:
        return "BF16"
    counts = Counter(t.dtype for t in index.tensors.values() if t.dtype in FLOAT_DTYPES)
    code = counts.most_common(1)[0][0] if counts else "F32"
    return code if code in DTYPE_LABELS else "F32"


def expected_parameters(arch: Architecture, config: dict) -> dict[str, tuple[int, ...]]:
    from mlx.utils import tree_flatten

    model = arch.build_model(config)  # lazy: parameters are not materialised
    return {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}


def plan(source: Source | str | Path, dtype: str | None = None, index: WeightIndex | None = None) -> Plan:
    """The conversion plan of ``source`` (a :class:`Source`, a folder or a Hub repo
    id), reading only config.json and safetensors headers; ``index`` overrides
    reading the headers (a Hub repo inspected through its remote headers)."""
    if not isinstance(source, Source):
        from .checkpoint import resolve

        source = resolve(str(source))
    raw = read_config(source.path)
    arch = lookup(raw)
    fp8 = source_quantization(raw, source.label)  # other quantized sources are refused, naming the method
    config = arch.normalize_config(raw)
    index = index if index is not None else index_weights(source.path)
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
    quant_rules = []
    if fp8 is not None:
        index, pairs = attach_scales(index, fp8, source.label)
        quant_rules = fp8_rules(fp8, pairs)
    code = DTYPE_NAMES[dtype] if dtype else default_dtype(raw, index, fp8 is not None)
    p = Plan(source, arch, raw, config, index, code, fp8=fp8)
    rules = p.rules = quant_rules + layout_rules(index.tensors, arch) + arch.rules(config)
    p.steps = [
        s for t in index.tensors.values() for s in plan_tensors(Meta(t.name, t.dtype, t.shape), rules, code)
    ]
    p.outputs = merge_stacks(merge_regroups(p.steps, rules))
    p.expected = expected_parameters(arch, config)
    check_ledger(p)
    return p


def fp8_rules(fp8: Fp8Source, pairs: Fp8Pairs) -> list:
    """The rules of an FP8 block-scaled source, first in the plan: dequantize the
    FP8 weights, consume their scales, leave out the activation scales."""
    out = [
        Dequantize(frozenset(pairs.weights), fp8.block),
        Consume(dict(pairs.scales), "FP8 block scales of '{owner}': multiplied into it (dequantized)",
                "FP8 block scales *_scale_inv", "multiplied into their weights as they are dequantized"),
    ]
    if pairs.activation_scales:
        out.append(Consume({n: n.rsplit(".", 1)[0] for n in pairs.activation_scales},
                           "FP8 activation scale of '{owner}': only FP8 matmuls use it; the weights are dequantized",
                           "FP8 activation scales", "not needed: only FP8 matmuls use them"))
    return out


def check_ledger(p: Plan) -> None:
    """Every source tensor accounted for; every parameter filled, with its shape."""
    targets: dict[str, Step] = {}
    for s in p.kept:
        if s.target in targets:
            raise LedgerError(
                f"tensors '{targets[s.target].source}' and '{s.source}' both map to '{s.target}'"
            )
        targets[s.target] = s
    n_layers = p.config["num_hidden_layers"]
    unexpected = sorted(set(targets) - set(p.expected))
    if unexpected:
        beyond = sorted({i for n in unexpected if (i := layer_of(n)) is not None and i >= n_layers})
        if beyond:
            raise LedgerError(
                f"the checkpoint has tensors for layer {beyond[-1]} but config.json says "
                f"num_hidden_layers = {n_layers} (e.g. '{unexpected[0]}')",
                "config.json and the weights disagree; fix num_hidden_layers",
            )
        raise LedgerError(
            f"{len(unexpected)} source tensor(s) match no parameter of {p.arch.title}: "
            + ", ".join(f"'{targets[n].source}'" for n in unexpected[:8])
            + (" ..." if len(unexpected) > 8 else ""),
            _unexpected_hint(p, unexpected),
        )
    missing = sorted(set(p.expected) - set(targets))
    if missing:
        present = {i for n in targets if (i := layer_of(n)) is not None}
        hint = "the checkpoint is incomplete, or config.json describes a different model"
        if present and max(present) + 1 < n_layers and all(
            (i := layer_of(n)) is not None and i > max(present) for n in missing
        ):
            hint = f"config.json says num_hidden_layers = {n_layers}, the weights hold {max(present) + 1} layers"
        raise LedgerError(
            f"{len(missing)} model parameter(s) have no source tensor: "
            + ", ".join(f"'{n}'" for n in missing[:8])
            + (" ..." if len(missing) > 8 else ""),
            hint,
        )
    for name, step in targets.items():
        want = p.expected[name]
        if tuple(step.shape) != want:
            raise LedgerError(
                f"tensor '{step.source}': shape {list(step.shape)} after the rules, but the config "
                f"implies {list(want)}{_implied_by(p.raw_config, tuple(step.shape), want, p.config)}",
                "config.json and the weights disagree; check the sizes in config.json",
            )


def _unexpected_hint(p: Plan, unexpected: list[str]) -> str:
    """Blame config.json only where the names fit the model and the config does not:
    tensors outside the model's own roots are a layout (or extra tensors), not a
    config error."""
    trunk, _ = text_roots(p.arch)
    roots = {trunk, "lm_head"}
    outside = sorted({n.split(".")[0] for n in unexpected if n.split(".")[0] not in roots})
    if outside:
        return (f"names under {', '.join(repr(r + '.') for r in outside)} are not part of this model, whose tensors "
                f"are named '{trunk}.*' and 'lm_head.weight' (with or without a wrapper's prefix); the checkpoint "
                "holds extra tensors or a layout hybridconv does not know")
    return ("the tensors are named as this model's, but config.json describes other modules "
            "(e.g. another layer kind at those indices); check config.json")


def _implied_by(raw: dict, got: tuple[int, ...], want: tuple[int, ...], normalised: dict | None = None) -> str:
    """Which config.json keys hold the sizes that disagree with the weights, so the
    user knows what to fix: `` (hidden_size = 96)``; a size config.json leaves null
    or out, for which the converter used a default, is named too (``state_size =
    16: null in config.json, so the default was used``); empty when none holds them."""
    if len(got) != len(want):
        return ""
    sizes = {k: v for k, v in raw.items() if isinstance(v, int) and not isinstance(v, bool)}
    for sub in ("text_config", "linear_attn_config"):
        if isinstance(raw.get(sub), dict):
            sizes.update({f"{sub}.{k}": v for k, v in raw[sub].items() if isinstance(v, int) and not isinstance(v, bool)})
    defaulted = {k: v for k, v in (normalised or {}).items()
                 if isinstance(v, int) and not isinstance(v, bool) and raw.get(k) is None and not k.startswith("_")}
    named = []
    for g, w in zip(got, want):
        if g != w:
            keys = [k for k, v in sizes.items() if v == w]
            nulls = [k for k, v in defaulted.items() if v == w]
            if keys:
                named.append(" or ".join(f"{k} = {w}" for k in keys[:3]))
            elif nulls:
                named.append(" or ".join(
                    f"{k} = {w}: {'null in config.json' if k in raw else 'not in config.json'}, so the default was used"
                    for k in nulls[:3]))
            else:
                named.append(f"{w} (derived from several sizes)")
    return f" ({'; '.join(named)}; the weights have {', '.join(str(g) for g, w in zip(got, want) if g != w)})" if named else ""


# --- running ---------------------------------------------------------------------------


@dataclass
class Result:
    plan: Plan
    out: Path
    files: list[str]
    bytes_written: int
    # With --force: files of the replaced output that the new one does not hold
    # (a model card, a verification report), removed with it; named to the user.
    replaced: list[str] = field(default_factory=list)
    # Parent folders of OUT that did not exist and were created (named to the user).
    created: list[str] = field(default_factory=list)


Progress = Callable[[int, str], None]  # (bytes just processed, tensor name)


def output_config(p: Plan) -> dict:
    # Keys starting with "_" are the converter's notes for planning (e.g. that
    # this conversion folds a norm offset), not part of the written config.
    cfg = {k: v for k, v in p.config.items() if not k.startswith("_")}
    # The source's quantization (FP8, dequantized here) does not describe the output;
    # quantize writes its own.
    cfg.pop("quantization_config", None)
    limit = cfg.get("time_step_limit")
    if isinstance(limit, list) and len(limit) == 2 and limit[1] is None:
        # No upper limit: written as transformers 5 writes infinity, which its config
        # classes accept (a JSON null fails their validation, and with it loading the
        # output's tokenizer: mlx_lm.load, mlx_lm.generate) and mlx-lm decodes.
        cfg["time_step_limit"] = [limit[0], {"__float__": "Infinity"}]
    label = DTYPE_LABELS[p.dtype]
    cfg["torch_dtype"] = label
    cfg["dtype"] = label
    return cfg


def _carried_files(folder: Path) -> list[Path]:
    """The source's files copied verbatim (tokenizer, remote code), never an mlx-lm
    model file it carries (``config.json``'s ``model_file``, or hybridconv's own
    from a previous conversion): an output carries only the model file this
    conversion decides on (:func:`carry_mlx_lm_code`)."""
    from .mlx_lm_code import CARRIED_FILE

    try:
        model_file = json.loads((folder / "config.json").read_text()).get("model_file")
    except (OSError, ValueError, AttributeError):
        model_file = None
    out = []
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name not in ("config.json", CARRIED_FILE, model_file) and any(
            fnmatch.fnmatch(f.name, pat) for pat in CARRY_PATTERNS
        ):
            out.append(f)
    return out


def carry_mlx_lm_code(p: Plan, policy: str, tmp: Path | None = None) -> tuple[dict, dict]:
    """``--mlx-lm-code POLICY``: whether the output carries hybridconv's model as an
    mlx-lm model file (:mod:`hybridconv.mlx_lm_code`), written into ``tmp`` when
    given. Returns (config entries, the ``mlx_lm_code`` record of conversion.json)."""
    from .mlx_lm_code import CARRIED_FILE, decide, generate, sha256_of

    support = p.arch.mlx_lm_support(p.config)
    carry, why = decide(policy, support)
    record = {"policy": policy, "carried": carry, "reason": why,
              "mlx_lm_statement": {"status": support.status, "reason": support.reason,
                                   "measured_with": support.measured_with}}
    if not carry:
        return {}, record
    text = generate(p.arch)
    if tmp is not None:
        (tmp / CARRIED_FILE).write_text(text, encoding="utf-8")
    record.update({"file": CARRIED_FILE, "sha256": sha256_of(text), "trust_remote_code": True,
                   "hybridconv_version": __version__})
    return {"model_file": CARRIED_FILE}, record


# What a hybridconv output folder may hold: what convert/quantize write, the files
# carried from the source, and what verify and upload add. ``--force`` replaces
# a folder only if it is one of ours and holds nothing else.
OUTPUT_FILE_PATTERNS = (
    "model*.safetensors", INDEX_NAME, "config.json", CONVERSION_RECORD,
    "verification.json", "README.md", ".gitattributes", *CARRY_PATTERNS,
)


def _is_within(a: Path, b: Path) -> bool:
    """True if ``a`` is ``b`` or inside it (both resolved)."""
    return a == b or b in a.parents


def _foreign_entries(out: Path) -> list[str]:
    """Entries of an existing OUT that a hybridconv output would not hold."""
    foreign = []
    for f in sorted(out.iterdir()):
        if f.is_dir() or not any(fnmatch.fnmatch(f.name, pat) for pat in OUTPUT_FILE_PATTERNS):
            foreign.append(f.name + ("/" if f.is_dir() else ""))
    return foreign


def is_hybridconv_output(out: Path) -> bool:
    try:
        record = json.loads((out / CONVERSION_RECORD).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("tool") == "hybridconv"


def check_output_path(out: Path, force: bool, source: Source | None = None) -> None:
    """Refuse an OUT that would lose data: the source itself, a folder inside it or
    holding it, the current folder, or (with ``--force``) an existing folder that
    is not a previous hybridconv output. Nothing is written here. The same rules
    are applied again at the moment the new output is renamed into place
    (:func:`place_output`): another run may have written OUT meanwhile."""
    target = Path(out).expanduser().resolve()
    origins = []
    if source is not None:
        origins = [source.path.resolve()] + ([source.origin.resolve()] if source.origin else [])
    for src in origins:
        if target == src:
            raise UsageError(f"{out}: is the source folder; choose another output")
        if _is_within(src, target):
            raise UsageError(
                f"{out}: contains the source checkpoint {src}; writing there would replace it",
                "choose an output folder outside the source, e.g. a sibling",
            )
        if _is_within(target, src):
            raise UsageError(
                f"{out}: is inside the source checkpoint {src}; the source is never modified",
                "choose an output folder outside the source, e.g. a sibling",
            )
    if _is_within(Path.cwd().resolve(), target):
        raise UsageError(
            f"{out}: is the current folder (or holds it); it cannot be replaced while in use",
            "name a new folder for the output, e.g. -o ./model-mlx",
        )
    if not os.path.lexists(target):
        return
    if not force:
        raise UsageError(
            f"{out}: already exists",
            "choose another -o, or pass --force to replace it (the old one is kept until the new one is complete)",
        )
    why = replace_refusal(target, out)
    if why:
        raise UsageError(why, "choose another -o, or move those files away first; nothing was changed")


def replace_refusal(folder: Path, shown: Path | str | None = None) -> str | None:
    """Why ``--force`` may not replace the existing ``folder`` (None: it may): only an
    empty folder or a previous hybridconv output (its ``conversion.json``) holding
    nothing else is replaced. ``shown``: the path to name in the message."""
    shown = folder if shown is None else shown
    if not folder.is_dir():
        return f"{shown}: exists and is not a folder"
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return None  # an empty folder: nothing to lose
    foreign = _foreign_entries(folder)
    ours = is_hybridconv_output(folder)
    if ours and not foreign:
        return None
    listed = foreign or entries
    shown_entries = ", ".join(listed[:8]) + (" …" if len(listed) > 8 else "")
    what = "holds files a hybridconv output does not" if ours else (
        "is not a hybridconv output (no conversion.json written by hybridconv)"
    )
    return f"{shown}: --force replaces only a previous hybridconv output, and this folder {what}: {shown_entries}"


def prepare_output(out: Path, force: bool, source: Source | None = None) -> Path:
    """Check OUT can be written (:func:`check_output_path`); return the temporary
    sibling to write into. Missing parent folders are created only when the
    output is written (:func:`write_output`), and removed again if it fails."""
    check_output_path(out, force, source)
    out = Path(out).expanduser()
    parent = out.parent if str(out.parent) else Path(".")
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{existing}: is not a folder; the output {out} cannot be created under it")
    if existing == parent:
        _remove_stale(parent, out.name)
    if not os.access(existing, os.W_OK):
        raise OutputError(f"{existing}: not writable")
    return _own_sibling(parent, out.name, "partial")


def _own_sibling(parent: Path, name: str, kind: str) -> Path:
    """``.NAME.KIND-PID`` beside OUT (``-PID-N`` when this process already has one
    there: another run of the same process, e.g. a library user's thread)."""
    path = parent / f".{name}.{kind}-{os.getpid()}"
    n = 0
    while os.path.lexists(path):
        n += 1
        path = parent / f".{name}.{kind}-{os.getpid()}-{n}"
    return path


def make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones created, outermost first."""
    missing = []
    f = folder
    while not f.exists() and f != f.parent:
        missing.append(f)
        f = f.parent
    created: list[Path] = []
    for f in reversed(missing):
        try:
            f.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            remove_parents(created)
            raise OutputError(f"{f}: cannot create the output's parent folder ({exc.strerror or exc})") from None
        created.append(f)
    return created


def remove_parents(created: list[Path]) -> None:
    """Remove the parent folders a failed run created (innermost first), if empty."""
    for f in reversed(created):
        try:
            f.rmdir()
        except OSError:
            break


@dataclass
class WriteItem:
    """One planned tensor and what is written for it: itself (possibly cast or
    transposed) or, when ``spec`` is set, its quantized parts."""

    step: Step
    entries: list  # [(name, dtype, shape)]
    spec: object = None  # hybridconv.quant.modes.QuantSpec
    # What writes the quantized parts (hybridconv.quant.writer, handed down by the
    # quantize layer, so that this lower layer never imports it).
    quantizer: object = None


def _remove_stale(parent: Path, name: str) -> None:
    """Temporary siblings left by a run that was killed (SIGKILL, power loss):
    their process is gone, so they can only be debris."""
    for stale in list(parent.glob(f".{name}.partial-*")) + list(parent.glob(f".{name}.old-*")):
        try:
            pid = int(stale.name.split(".partial-" if ".partial-" in stale.name else ".old-", 1)[1].split("-")[0])
            os.kill(pid, 0)
            continue  # that process still runs: leave its work alone
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        if ".old-" in stale.name and replace_refusal(stale) is not None:
            # a folder moved aside and not (yet) put back: not ours to delete
            continue
        shutil.rmtree(stale, ignore_errors=True)


def write_weights(
    p: Plan,
    tmp: Path,
    progress: Progress | None = None,
    items: list[WriteItem] | None = None,
    allow_nonfinite: bool = False,
) -> list[str]:
    if items is None:
        items = [WriteItem(s, [(s.target, s.dtype, s.shape)]) for s in p.kept]
    groups = [
        (shard, [it for it in items if p.index.tensors[it.step.source].file == shard])
        for shard in p.index.shards
    ]
    groups = [(shard, its) for shard, its in groups if its]
    n = len(groups)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    weight_map: dict[str, str] = {}
    buf = chunk_buffer()
    nonfinite: list[str] = []
    # One scanning thread with its own buffer (single worker: never shared).
    scanner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridconv-scan")
    scan_buf = chunk_buffer()
    scans = []
    try:
        _write_shards(p, tmp, progress, names, groups, weight_map, buf, nonfinite,
                      lambda tensors: scans.append(scanner.submit(_scan, tensors, scan_buf)))
        for fut in scans:
            nonfinite.extend(fut.result())
    finally:
        scanner.shutdown(wait=True, cancel_futures=True)
    total = sum(_nbytes(d, s) for _, d, s in (e for it in items for e in it.entries))
    return _finish_weights(p, tmp, progress, names, weight_map, total, nonfinite, allow_nonfinite)


def _scan(tensors, buf: bytearray) -> list[str]:
    """Names of the tensors (all in one file) holding NaN or Inf."""
    try:
        return scan_nonfinite(tensors[0].file, tensors)
    except (OSError, ValueError):  # no mmap here: read through the buffer instead
        bad = []
        with open(tensors[0].file, "rb", buffering=0) as f:
            for t in tensors:
                if any(has_nonfinite(c, t.dtype) for c in iter_raw_chunks(t, f, buf)):
                    bad.append(t.name)
        return bad


def _write_shards(p, tmp, progress, names, groups, weight_map, buf, nonfinite, scan) -> None:
    for name, (shard, its) in zip(names, groups):
        # Source order, and a data section starting at the source's offset within
        # a page: runs of unchanged tensors are then one page-congruent kernel copy.
        its = sorted(its, key=lambda it: p.index.tensors[it.step.source].begin)
        entries = [e for it in its for e in it.entries]
        head = header_bytes(
            entries, {"format": "mlx"}, data_start_mod=p.index.tensors[its[0].step.source].begin % PAGE
        )
        with open(shard, "rb", buffering=0) as src, open(tmp / name, "wb", buffering=0) as dst:
            write_all(dst, head)
            for run in _runs(p, its):
                interrupt.check()  # a safe point: between tensors
                info = p.index.tensors[run[0].step.source]
                if len(run) > 1 or _unchanged(p, run[0]):
                    # The kernel copies the bytes; a second thread reads them (from the
                    # page cache) only to check for NaN/Inf, overlapping with the copy.
                    scan([p.index.tensors[it.step.source] for it in run])
                    end = p.index.tensors[run[-1].step.source].end
                    copy_bytes(src, dst, info.begin, end - info.begin, buf, str(shard))
                    if progress:
                        progress(end - info.begin, run[-1].step.source)
                    continue
                it = run[0]
                s = it.step
                if s.parts is not None or s.select is not None:  # stacked experts, split parts
                    nonfinite.extend(_write_ranges(p, it, src, shard, dst, buf, progress))
                    continue
                if it.spec is not None:  # quantize in row blocks
                    if it.quantizer.write_quantized(info, it, src, dst, buf, progress):
                        nonfinite.append(info.name)
                elif s.transpose or s.add is not None or isinstance(s.scale, tuple):
                    # conv kernels, offset norms, per-row scales: small, transformed whole
                    raw, raw_dtype = read_tensor(info, src), info.dtype
                    if info.scale is not None:  # FP8: dequantized first
                        raw, raw_dtype = rows_float32(info, raw).reshape(info.shape), "F32"
                    if has_nonfinite(raw, raw_dtype):
                        nonfinite.append(info.name)
                    raw, raw_dtype = apply_whole(raw, s, raw_dtype)
                    write_all(dst, np.ascontiguousarray(convert_raw(raw, raw_dtype, s.dtype)))
                    if progress:
                        progress(info.nbytes, s.source)
                else:  # cast in bounded chunks
                    bad = False
                    for chunk, chunk_dtype, nbytes in iter_float_chunks(info, src, buf):  # FP8: dequantized
                        interrupt.check()
                        bad = bad or has_nonfinite(chunk, chunk_dtype)
                        if s.scale is not None:  # a folded constant: float32, then one cast
                            chunk, chunk_dtype = scale_rows(to_float32(chunk, chunk_dtype), s.scale), "F32"
                        write_all(dst, convert_raw(chunk, chunk_dtype, s.dtype))
                        if progress:
                            progress(nbytes, s.source)
                    if bad:
                        nonfinite.append(info.name)
        for name_, dtype, shape in entries:
            weight_map[name_] = name


def _finish_weights(p, tmp, progress, names, weight_map, total, nonfinite, allow_nonfinite) -> list[str]:
    if nonfinite and not allow_nonfinite:
        raise CheckpointError(
            f"NaN or infinite values in {len(nonfinite)} tensor(s): "
            + ", ".join(f"'{n}'" for n in nonfinite[:8]) + (" ..." if len(nonfinite) > 8 else ""),
            "the checkpoint is corrupt or was saved from a diverged run; pass --allow-nonfinite to convert it anyway",
        )
    # Dropped tensors still count as processed for the progress bar.
    if progress:
        for s in p.dropped:
            progress(p.index.tensors[s.source].nbytes, s.source)
    index = {
        "metadata": {"total_size": total},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names + [INDEX_NAME]


def _unchanged(p: Plan, it: WriteItem) -> bool:
    s = it.step
    return (
        it.spec is None and s.transpose is None and s.parts is None and s.select is None and s.add is None
        and s.scale is None
        and p.index.tensors[s.source].dtype == s.dtype
    )


def source_ranges(p: Plan, s: Step) -> list:
    """The contiguous byte ranges of source tensors that make up ``s``'s output, in
    order, as TensorInfos of shape ``[rows, s.shape[-1]]``: each expert of a
    stacked target (stacking along axis 0 is concatenation), or the blocks of a
    source that a split step takes (``prod(shape[:axis])`` blocks)."""
    from dataclasses import replace

    cols = s.shape[-1]
    if s.parts is not None and s.rows is not None:  # Regroup: rows [a, b) of the concatenation along axis 0
        out, offset = [], 0
        for name in s.parts:
            info = p.index.tensors[name]
            n, row = info.shape[0], (info.numel // info.shape[0]) * ITEMSIZE[info.dtype]
            lo, hi = max(s.rows[0], offset), min(s.rows[1], offset + n)
            if lo < hi:
                begin = info.begin + (lo - offset) * row
                count = (hi - lo) * row // ITEMSIZE[info.dtype]
                out.append(replace(info, begin=begin, end=begin + (hi - lo) * row, shape=(count // cols, cols)))
            offset += n
        return out
    if s.parts is not None:
        infos = [p.index.tensors[name] for name in s.parts]
        return [replace(i, shape=(i.numel // cols, cols)) for i in infos]
    info = p.index.tensors[s.source]
    axis, a, b = s.select
    inner = 1
    for d in info.shape[axis + 1 :]:
        inner *= d
    outer = info.numel // (info.shape[axis] * inner)
    item = ITEMSIZE[info.dtype]
    out = []
    for o in range(outer):
        begin = info.begin + (o * info.shape[axis] + a) * inner * item
        n = (b - a) * inner
        out.append(replace(info, begin=begin, end=begin + n * item, shape=(n // cols, cols)))
    return out


def _write_ranges(p: Plan, it: WriteItem, src, shard, dst, buf, progress) -> list[str]:
    """Write a stacked or split tensor from its source ranges (cast in bounded
    chunks, or quantized in row blocks); the source tensors holding NaN or Inf."""
    s = it.step
    files = {shard: src}

    def open_file(path):
        if path not in files:
            files[path] = open(path, "rb", buffering=0)
        return files[path]

    try:
        ranges = source_ranges(p, s)
        if it.spec is not None:
            return it.quantizer.write_quantized_ranges(ranges, it, open_file, dst, progress)
        bad: list[str] = []
        for r in ranges:
            for chunk, chunk_dtype, nbytes in iter_float_chunks(r, open_file(r.file), buf):  # FP8: dequantized
                if r.name not in bad and has_nonfinite(chunk, chunk_dtype):
                    bad.append(r.name)
                write_all(dst, convert_raw(chunk, chunk_dtype, s.dtype))
                if progress:
                    progress(nbytes, s.source)
        return bad
    finally:
        for path, f in files.items():
            if path != shard:
                f.close()


def _runs(p: Plan, items: list[WriteItem]) -> list[list[WriteItem]]:
    """Group items (in source order) into runs of unchanged tensors that lie back to
    back in the source; every other item is a run of its own."""
    runs: list[list[WriteItem]] = []
    for it in items:
        if (
            runs
            and _unchanged(p, it)
            and _unchanged(p, runs[-1][-1])
            and p.index.tensors[runs[-1][-1].step.source].end == p.index.tensors[it.step.source].begin
        ):
            runs[-1].append(it)
        else:
            runs.append([it])
    return runs


def _source_card(folder: Path) -> dict:
    """License and language from the source's model card, for our card."""
    from .checkpoint import read_front_matter

    try:
        meta = read_front_matter((folder / "README.md").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return {}
    return {k: meta[k] for k in ("license", "language") if k in meta}


def ledger_record(p: Plan) -> dict:
    return {
        "source_card": _source_card(p.source.path),
        "tool": "hybridconv",
        "version": __version__,
        "source": p.source.label,
        "source_revision": p.source.revision,
        "model_type": p.arch.model_type,
        "dtype": DTYPE_LABELS[p.dtype],
        "rules": [r.describe() for r in p.rules],
        **({"source_quantization": {**p.fp8.describe(), "dequantized": p.dequantized}} if p.fp8 else {}),
        "tensors": [
            {
                "source": s.source,
                "target": s.target,
                "dtype": DTYPE_LABELS.get(s.dtype, s.dtype) if s.dtype else None,
                "shape": list(s.shape) if s.shape else None,
                "actions": s.actions,
                **({"dropped_because": s.dropped_because} if s.target is None else {}),
            }
            for s in p.steps
        ],
    }


def convert(
    source: str,
    out: Path,
    dtype: str | None = None,
    revision: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    allow_nonfinite: bool = False,
    allow_pickle: bool = False,
    mlx_lm_code: str = "auto",
) -> Result:
    """`hybridconv convert`: plan ``source`` (a folder or Hub repo id), check the ledger,
    stream the weights into a temporary sibling of ``out`` and rename it into place.
    ``dtype``: "float32" | "float16" | "bfloat16" (default: the checkpoint's own).
    ``mlx_lm_code``: "auto" | "always" | "never" (:func:`carry_mlx_lm_code`).
    Returns a :class:`Result` (the plan, the files written, their bytes)."""
    from .mlx_lm_code import check_policy

    check_policy(mlx_lm_code)  # a bad policy fails before any work
    with source_folder(source, revision, allow_pickle) as src:
        tmp = prepare_output(Path(out), force, src)
        p = plan(src, dtype)
        if on_plan:
            on_plan(p)
        return write_output(p, Path(out), tmp, progress, allow_nonfinite=allow_nonfinite, force=force,
                            mlx_lm_code=mlx_lm_code)


def write_output(
    p: Plan,
    out: Path,
    tmp: Path,
    progress: Progress | None = None,
    items: list[WriteItem] | None = None,
    config_extra: dict | None = None,
    record_extra: dict | None = None,
    allow_nonfinite: bool = False,
    force: bool = False,
    mlx_lm_code: str = "auto",
) -> Result:
    """Write weights, index, config, carried files, the mlx-lm model file
    (``mlx_lm_code``: :func:`carry_mlx_lm_code`) and the ledger into ``tmp``,
    then rename it to ``out`` (:func:`place_output`: the rules for an existing
    ``out`` hold at that moment, ``force`` or not); on any failure or interruption
    remove ``tmp`` and the parent folders this call created."""
    out = Path(out)
    created: list[Path] = []
    try:
        created = make_parents(tmp.parent)
        tmp.mkdir()
        files = write_weights(p, tmp, progress, items, allow_nonfinite)
        code_config, code_record = carry_mlx_lm_code(p, mlx_lm_code, tmp)
        if code_config:
            files.append(code_config["model_file"])
        cfg = output_config(p)
        cfg.pop("model_file", None)  # only the file this conversion writes
        cfg.update(config_extra or {})
        cfg.update(code_config)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        files.append("config.json")
        for f in _carried_files(p.source.path):
            shutil.copyfile(f, tmp / f.name)  # follows the HF cache's symlinks
            files.append(f.name)
        record = ledger_record(p)
        record["mlx_lm_code"] = code_record
        record.update(record_extra or {})
        (tmp / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        files.append(CONVERSION_RECORD)
        written = sum(f.stat().st_size for f in tmp.glob("model*.safetensors"))
        interrupt.check()
        with interrupt.critical():  # never half-renamed
            replaced = place_output(tmp, out, force)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_parents(created)
        raise output_error(out, exc, needed=_planned_bytes(p, items), temporary=tmp) from None
    except BaseException:
        with interrupt.critical():  # clean-up runs to its end
            shutil.rmtree(tmp, ignore_errors=True)
            remove_parents(created)
        raise
    return Result(p, out, files, written, replaced, [str(c) for c in created])


def _planned_bytes(p: Plan, items: list[WriteItem] | None) -> int:
    if items is None:
        return p.output_bytes()
    return sum(_nbytes(d, s) for it in items for _, d, s in it.entries)


def output_error(path: Path, exc: OSError, needed: int | None = None, temporary: Path | None = None) -> OutputError:
    """An :class:`OutputError` (exit 3) for a failed write of ``path``: the system's
    reason and, for a full disk, the space needed and the space free there."""
    import errno

    reason = exc.strerror or str(exc)
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        where = Path(path)
        probe = where if where.exists() else where.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            free = shutil.disk_usage(probe).free
        except OSError:
            free = None
        parts = [f"{path}: writing failed ({reason})"]
        if needed:
            parts.append(f"it needs about {_human(needed)}")
        if free is not None:
            parts.append(f"{_human(free)} free there ({probe})")
        return OutputError(
            "; ".join(parts),
            "free some space or choose an output on a larger filesystem; nothing was left at the output path",
        )
    what = f"{path}: writing failed ({reason})"
    return OutputError(what, "check free space and permissions; nothing was left at the output path")


def _human(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst`` only if nothing is at ``dst``: True if renamed, False
    if ``dst`` exists. Atomic on Linux (``renameat2(RENAME_NOREPLACE)``); elsewhere
    a check then ``rename`` (which still never replaces a folder that holds files)."""
    import errno

    fn = _renameat2()
    if fn is not None:
        import ctypes

        if fn(-100, os.fsencode(src), -100, os.fsencode(dst), 1) == 0:  # AT_FDCWD, RENAME_NOREPLACE
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # the filesystem may not support the flag
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        return False
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    return True


_RENAMEAT2: list = []


def _renameat2():
    if not _RENAMEAT2:
        fn = None
        try:
            import ctypes
            import sys

            if sys.platform.startswith("linux"):
                fn = ctypes.CDLL(None, use_errno=True).renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _RENAMEAT2.append(fn)
    return _RENAMEAT2[0]


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the complete ``tmp`` to ``out``, never over anything (FileExistsError
    when something is at ``out``)."""
    if not _rename_noreplace(tmp, out):
        raise FileExistsError(f"{out} exists")


def _discard(path: Path) -> None:
    if path.is_symlink():
        path.unlink(missing_ok=True)  # a link to a previous output: only the link goes
    else:
        shutil.rmtree(path, ignore_errors=True)


def place_output(tmp: Path, out: Path, force: bool = False) -> list[str]:
    """Put the complete output ``tmp`` at ``out`` under the rules of this moment
    (another run may have written ``out`` since the checks at the start): without
    ``force`` only where nothing is (else exit 2, nothing touched); with ``force``
    an existing ``out`` is replaced only if it is empty or a hybridconv output
    holding nothing else (:func:`replace_refusal`), else it is left as it was.
    Returns the names of files the replaced output held and the new one does not."""
    for _ in range(3):
        try:
            _swap_into_place(tmp, out)
            return []
        except FileExistsError:
            pass
        if not force:
            raise UsageError(
                f"{out}: already exists: it was created while this run worked (another run?); "
                "it was not touched, and this run's output was discarded",
                "choose another -o, or pass --force to replace a previous hybridconv output",
            )
        # Move whatever is there now aside, atomically: from here on it is ours alone,
        # and the rules are checked on exactly what would be deleted.
        old = _own_sibling(out.parent, out.name, "old")
        try:
            os.rename(out, old)
        except FileNotFoundError:
            continue  # gone meanwhile: try again
        why = replace_refusal(old, out)
        if why:
            if _rename_noreplace(old, out):
                raise UsageError(why, "move those files away first, or choose another -o; nothing was changed")
            raise UsageError(f"{why}; another run wrote {out} meanwhile, so the folder was left at {old}",
                             f"move {old} back yourself once the other run is done")
        try:
            _swap_into_place(tmp, out)
        except FileExistsError:
            _discard(old)  # a previous output --force may replace
            continue
        kept = {f.name for f in out.iterdir()}
        gone = sorted(f.name + ("/" if f.is_dir() else "") for f in old.iterdir() if f.name not in kept)
        _discard(old)
        return gone
    raise UsageError(f"{out}: other runs keep writing it; this run's output was discarded",
                     "run one conversion per output folder at a time")
