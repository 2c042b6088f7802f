"""Calibrated quantization (``quantize --calibrate``): the same plan, the same
MLX affine format, codes chosen with the model's activations on calibration text.

Order of work
-------------
1. The quantization plan is built exactly as without calibration (policy,
   recipe, ``--bits-for``, ``--keep``): calibration changes *which codes* a
   quantized matrix gets and, with ``widths`` (:mod:`.widths`, first, in its own
   streamed pass), a free matrix's width by one bit at no more bits in all;
   never what is quantized, a ``--bits-for`` width or a ``--keep``; protected
   tensors (the SSM / recurrence dynamics, conv kernels, norms' protection from
   quantization) stay as the policy says.
2. SOURCE is converted once into a temporary float folder (its own dtype;
   float32 when a rule scales values) next to OUT, and hybridconv's own
   verified MLX model of it is loaded lazily: only the block at work is read.
3. Calibration windows (:mod:`.calibration`) are embedded, then the blocks are
   processed one at a time, in float32, with two activation streams — the float
   model's (``x_f``) and the quantized model's (``x_q``, the output of the
   blocks already quantized):

   a. the float block's output on ``x_f`` (the target, and the next ``x_f``);
   b. ``awq`` (:mod:`.scaling`): per fold group, the power-of-two scale from the
      consumers' inputs on ``x_q``, folded exactly into the float block;
   c. ``gptq`` (:mod:`.gptq`): each quantized matrix with ``H = XᵀX`` of its
      inputs on ``x_q`` (per expert for stacked experts, from the tokens routed to
      it), else round-to-nearest with the error-minimising ranges;
   d. ``learn`` (:mod:`.learned`): the block's scales and biases tuned against
      the float block's output (codes fixed), kept only if the block's error on
      held-back calibration windows falls;
   e. the quantized block's output on ``x_q`` (the next ``x_q``).

   Then the LM head — untied, or the embedding matrix where it is tied — by GPTQ
   with the final norm's outputs (in pieces of rows). Memory: one
   block's weights and Hessians, and ``[windows, length, hidden]`` float32
   arrays for the streams.
4. The output is written by the ordinary streamed writer: each calibrated
   matrix's packed codes, scales and biases (and every float tensor a fold
   changed: norm weights, a float router's or ``in_proj_b``'s columns, biases)
   come from a temporary store; every other tensor exactly as without
   calibration. ``conversion.json`` records the methods, the data and, per block,
   the relative output error before and after each step.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import interrupt
from ..errors import UsageError
from ..safetensors_io import from_float32, has_nonfinite, write_all
from . import scaling
from .calibration import DEFAULT_LEARN_STEPS, DEFAULT_LENGTH, DEFAULT_SAMPLES, calibration_tokens
from .gptq import gptq, rtn

METHODS = ("widths", "awq", "gptq", "learn")
DEFAULT_METHODS = ("widths", "awq", "gptq", "learn")
BATCH = 4  # calibration windows per block call
SAMPLE_ROWS = 2048  # token rows kept per matrix (per expert) for the scale search
CHECK_TOKENS = 64  # tokens of one window for the exactness check of a fold


def parse_methods(value: str | None) -> tuple[str, ...]:
    if value in (None, "", "default"):
        return DEFAULT_METHODS
    got = tuple(dict.fromkeys(m.strip() for m in value.replace("+", ",").split(",") if m.strip()))
    bad = [m for m in got if m not in METHODS + ("rtn",)]
    if bad or not got:
        raise UsageError(f"--calibrate-methods {value!r}: unknown method {bad[0] if bad else '(none)'}",
                         f"methods: {', '.join(METHODS)} (joined with commas), or rtn for none")
    return tuple(m for m in got if m != "rtn")


@dataclass
class CalibrationOptions:
    file: Path | None = None
    samples: int = DEFAULT_SAMPLES
    length: int = DEFAULT_LENGTH
    methods: tuple[str, ...] = DEFAULT_METHODS
    learn_steps: int = DEFAULT_LEARN_STEPS
    seed: int = 0


@dataclass
class Store:
    """Calibrated tensors on disk until written: ``quantized[name] = (packed, scales, biases)``
    files, ``floats[name]`` float32 ``.npy`` (a float tensor a fold changed)."""

    folder: Path
    quantized: dict[str, tuple[Path, Path, Path]] = field(default_factory=dict)
    floats: dict[str, Path] = field(default_factory=dict)

    def put_quantized(self, name: str, packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, dtype: str):
        base = self.folder / f"q{len(self.quantized)}"
        paths = (base.with_suffix(".w.npy"), base.with_suffix(".s.npy"), base.with_suffix(".b.npy"))
        np.save(paths[0], np.ascontiguousarray(packed, dtype=np.uint32))
        np.save(paths[1], from_float32(np.ascontiguousarray(scales, dtype=np.float32), dtype))
        np.save(paths[2], from_float32(np.ascontiguousarray(biases, dtype=np.float32), dtype))
        self.quantized[name] = paths

    def put_float(self, name: str, value: np.ndarray):
        path = self.folder / f"f{len(self.floats)}.npy"
        np.save(path, np.ascontiguousarray(value, dtype=np.float32))
        self.floats[name] = path


class StoreWriter:
    """The writer (``WriteItem.quantizer``) of stored tensors: the arrays in the order
    of the item's entries (packed codes, scales, biases; or the float tensor)."""

    def __init__(self, store: Store):
        self.store = store

    def _write(self, item, dst) -> None:
        name = item.step.target
        if name in self.store.quantized:
            for p in self.store.quantized[name]:
                write_all(dst, np.load(p))
        else:
            _, dtype, shape = item.entries[0]
            value = np.load(self.store.floats[name]).reshape(shape)
            write_all(dst, from_float32(value, dtype))

    def write_quantized(self, info, item, src, dst, buf, progress=None) -> bool:
        self._write(item, dst)
        if progress:
            progress(info.nbytes, item.step.source)
        return False

    def write_quantized_ranges(self, ranges, item, open_file, dst, progress=None) -> list:
        self._write(item, dst)
        if progress:
            progress(sum(r.end - r.begin for r in ranges), item.step.source)
        return []


FLOAT_OVERRIDE = object()  # WriteItem.spec of a float tensor written from the store


# --- capturing the inputs of a block's matrices ---------------------------------------


class Stats:
    """Per matrix (or per expert): ``H = XᵀX`` (float64), token count, ``Σ|x|`` and a
    sample of input rows."""

    def __init__(self, experts: int, width: int, keep_rows: bool):
        n = max(experts, 1)
        self.experts = experts
        self.H = [np.zeros((width, width)) for _ in range(n)]
        self.count = np.zeros(n, dtype=np.int64)
        self.absum = np.zeros((n, width))
        self.rows: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.kept = np.zeros(n, dtype=np.int64)
        self.keep_rows = keep_rows

    def add(self, e: int, x: np.ndarray) -> None:
        if not len(x):
            return
        self.H[e] += (x.T @ x).astype(np.float64)
        self.count[e] += len(x)
        self.absum[e] += np.abs(x).sum(0)
        if self.keep_rows and self.kept[e] < SAMPLE_ROWS:
            take = x[: SAMPLE_ROWS - self.kept[e]]
            self.rows[e].append(take)
            self.kept[e] += len(take)

    def sample(self, e: int) -> np.ndarray:
        return np.concatenate(self.rows[e]) if self.rows[e] else np.zeros((0, self.H[0].shape[0]), np.float32)

    def mean_abs(self) -> np.ndarray:
        return self.absum / np.maximum(self.count, 1)[:, None]


def _tap(module, stats: Stats):
    """Record ``module``'s inputs into ``stats`` while it runs; returns the undo."""
    import mlx.core as mx

    from ..models.moe import SwitchLinear

    old = module.__class__
    switch = isinstance(module, SwitchLinear)

    def record(x, indices=None):
        xf = np.array(x.astype(mx.float32))
        if not switch:
            stats.add(0, xf.reshape(-1, xf.shape[-1]))
            return
        xe = xf.squeeze(-2)
        idx = np.array(indices)
        xe = np.broadcast_to(xe, idx.shape + xe.shape[-1:]).reshape(-1, xe.shape[-1])
        idx = idx.reshape(-1)
        for e in range(stats.experts):
            stats.add(e, xe[idx == e])

    class Tapped(old):
        def __call__(self, x, *args, **kwargs):
            record(x, args[0] if args else kwargs.get("indices"))
            return old.__call__(self, x, *args, **kwargs)

    module.__class__ = Tapped
    return lambda: setattr(module, "__class__", old)


# --- the calibration ------------------------------------------------------------------


@dataclass
class CalibrationResult:
    store: Store
    report: dict
    float32_norms: set[str] = field(default_factory=set)


def _block_prefixes(model) -> list[str]:
    ids = {id(m): p for p, m in model.named_modules()}
    return [ids[id(layer)] for layer in model.layers]


def _embedding(model):
    """The trunk's embedding module and its weight's tensor name (as the plan names it)."""
    module = getattr(model.trunk, getattr(model, "embedding_name", "embed_tokens"))
    return module, next(p for p, m in model.named_modules() if m is module) + ".weight"


def _run(model, layer, xs, x0s):
    """The block on every batch of ``xs`` (lists of [B, T, H] arrays): outputs, evaluated."""
    import mlx.core as mx

    out = []
    for x, x0 in zip(xs, x0s):
        y = model.call_layer(layer, x, None, x0).astype(mx.float32)
        mx.eval(y)
        out.append(y)
    return out


def _rel(a: list, b: list) -> float:
    import mlx.core as mx

    num = sum(float(mx.sum((x - y) ** 2).item()) for x, y in zip(a, b))
    den = sum(float(mx.sum(y**2).item()) for y in b)
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


def _matrices(layer) -> dict[str, object]:
    return {p: m for p, m in layer.named_modules() if scaling.is_matrix(m)}


def _weight_np(m) -> np.ndarray:
    import mlx.core as mx

    return np.array(m["weight"].astype(mx.float32))


def _set_weight(m, w: np.ndarray) -> None:
    import mlx.core as mx

    m["weight"] = mx.array(w.astype(np.float32))


def _quantize_matrix(W, stats: Stats | None, spec, dtype: str, use_gptq: bool):
    """(packed, scales, biases, dequantized) of ``W`` ([out, in] or [E, out, in])."""
    mats = [W] if W.ndim == 2 else list(W)
    parts = []
    for e, w in enumerate(mats):
        if use_gptq and stats is not None and stats.count[e] > 0:
            parts.append(gptq(w, stats.H[e], spec.bits, spec.group_size, dtype))
        else:
            parts.append(rtn(w, spec.bits, spec.group_size, dtype))
    if W.ndim == 2:
        return parts[0]
    return tuple(np.stack([p[i] for p in parts]) for i in range(4))


def _awq_loss(W, X, s, spec, cols) -> float:
    """Output error of round-to-nearest on ``W·s`` with inputs ``X/s`` (mx.quantize: fast)."""
    import mlx.core as mx

    if not len(X):
        return 0.0
    Ws = mx.array(W * cols[None, :])
    q = mx.dequantize(*mx.quantize(Ws, group_size=spec.group_size, bits=spec.bits),
                      group_size=spec.group_size, bits=spec.bits)
    Xm = mx.array(X)
    ref = Xm @ mx.array(W).T
    got = (Xm / mx.array(cols)) @ q.T
    return float(mx.sum((ref - got) ** 2).item())


def _search_scale(layer, g: scaling.Group, stats: dict, specs: dict, alphas=scaling.ALPHAS):
    """The power-of-two scale of group ``g`` minimising its quantized consumers' output error."""
    first = g.consumers[0]
    st = stats[first]
    if g.experts:
        a = st.mean_abs()  # [E, width]
    else:
        a = st.mean_abs()[: 1].reshape(-1)
        if st.experts:  # a norm feeding stacked experts first: the router or another consumer has all tokens
            full = next((stats[c] for c in g.consumers if not stats[c].experts), None)
            a = full.mean_abs()[0] if full is not None else (st.absum.sum(0) / max(st.count.sum(), 1))
        if g.tile > 1:
            a = a.reshape(g.tile, g.width).mean(0)
        if isinstance(g.fold, scaling.LinearFold) and g.fold.heads and a.shape[-1] != g.width:
            # o_proj's columns -> v_proj's rows: the mean over the query heads sharing a key/value head
            lay = scaling._attention_layout(layer, g.fold)
            n_q, n_kv, d = lay
            a = a.reshape(n_kv, n_q // n_kv, d).mean(1).reshape(-1)
    best, best_loss, losses = None, None, {}
    for alpha in alphas:
        s = scaling.pow2_scale(a, alpha)
        cols = scaling.column_scale(layer, g, s)
        loss = 0.0
        for c in g.consumers:
            if c not in specs:
                continue  # a float consumer: scaled, never rounded
            W = _weight_np(scaling.get_module(layer, c))
            cst = stats[c]
            if W.ndim == 2:
                loss += _awq_loss(W, cst.sample(0), s, specs[c], cols)
            else:
                for e in range(W.shape[0]):
                    ce = cols[e] if cols.ndim == 2 else cols
                    loss += _awq_loss(W[e], cst.sample(e), s, specs[c], ce)
        losses[alpha] = loss
        if best_loss is None or loss < best_loss * (1 - 1e-9):
            best, best_loss = s, loss
    return best, losses


def _check_exact(model, layer, g, xs, x0s, rng) -> float:
    """Relative change of the float block's output when ``g`` is folded with random
    power-of-two scales (then undone): 0 up to rounding when the fold is exact."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    saved = dict(tree_flatten(layer.parameters()))
    base = _run(model, layer, xs, x0s)
    scaling.apply(layer, g, scaling.random_pow2(g, rng))
    got = _run(model, layer, xs, x0s)
    layer.update(_unflatten(saved))
    mx.eval(layer.parameters())
    return _rel(got, base)


def _unflatten(d: dict):
    from mlx.utils import tree_unflatten

    return tree_unflatten(list(d.items()))


def calibrate(qp, source, options: CalibrationOptions, workdir: Path,
              report: Callable[[str], None] | None = None, allow_nonfinite: bool = False) -> CalibrationResult:
    """Calibrated codes for the quantized matrices of ``qp`` (module docstring)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    from ..convert import convert
    from ..loading import load
    from .learned import learn_block

    say = report or (lambda msg: None)
    t0 = time.time()
    planned = {t.step.target: t for t in qp.tensors}
    out_dtype = qp.conversion.dtype
    methods = options.methods
    float_dir = workdir / "float"
    temp_dtype = "float32" if any(t.step.scale is not None for t in qp.tensors) else None
    cfg = qp.conversion.config
    # the text first: a bad file fails before any conversion
    cal = calibration_tokens(source.path, cfg["vocab_size"], options.file, options.samples, options.length)
    say(f"calibration: {cal.description}")
    say("converting SOURCE to a temporary float folder")
    convert(str(source.path), float_dir, dtype=temp_dtype, allow_nonfinite=allow_nonfinite)
    ids = cal.sequences
    widths_record = None
    from . import widths

    widths.reset(qp)  # a plan calibrated before (--target-kl's winner): from its planned widths
    if "widths" in methods:

        say("widths: measuring each quantized matrix's sensitivity")
        tw = time.time()
        measured = widths.measure(qp, float_dir, [mx.array(ids[i : i + BATCH]) for i in range(0, len(ids), BATCH)],
                                  say)
        widths_record = widths.choose(qp, measured)
        widths_record["seconds"] = round(time.time() - tw, 1)
        planned = {t.step.target: t for t in qp.tensors}
        mv = widths_record["moved"]
        say(f"widths: {mv['up']} matrices one bit wider, {mv['down']} one bit narrower, {mv['kept']} kept; "
            f"{widths_record['bits_per_weight']:.4f} bits per weight (planned {widths_record['bits_per_weight_planned']:.4f})")
    model = load(float_dir, lazy=True)
    store = Store(workdir / "store")
    store.folder.mkdir()
    # streams: batches of windows; the last quarter of the windows (at least one) held back for the learned step
    n = len(ids)
    batches = [mx.array(ids[i : i + BATCH]) for i in range(0, n, BATCH)]
    x0s = [model.embed(b).astype(mx.float32) for b in batches]
    mx.eval(x0s)
    xf = list(x0s)
    xq = list(x0s)
    rng = np.random.default_rng(options.seed)
    prefixes = _block_prefixes(model)
    blocks_report = []
    float32_norms: set[str] = set()
    for b, (layer, prefix) in enumerate(zip(model.layers, prefixes)):
        interrupt.check()
        tb = time.time()
        stored = dict(tree_flatten(layer.parameters()))
        layer.update(tree_map(lambda a: a.astype(mx.float32), layer.parameters()))
        mx.eval(layer.parameters())
        original = dict(tree_flatten(layer.parameters()))
        mats = _matrices(layer)
        specs = {p: planned[f"{prefix}.{p}.weight"].spec for p in mats
                 if f"{prefix}.{p}.weight" in planned and planned[f"{prefix}.{p}.weight"].decision == "quantize"}
        rec: dict = {"block": b, "kind": getattr(layer, "kind", None), "quantized": len(specs)}
        yf = _run(model, layer, xf, x0s)
        changed: dict[str, str] = {}
        if "awq" in methods and specs:
            groups = []
            for g in scaling.resolve(layer):
                if not any(c in specs for c in g.consumers):
                    continue
                probe = [xq[0][:1, :CHECK_TOKENS]], [x0s[0][:1, :CHECK_TOKENS]]
                err = _check_exact(model, layer, g, *probe, rng)
                if err > scaling.EXACT_TOL:
                    rec.setdefault("folds_skipped", []).append({"fold": g.label, "relative_change": err})
                    continue
                groups.append(g)
            if groups:
                stats = {}
                undo = []
                for c in {c for g in groups for c in g.consumers}:
                    m = scaling.get_module(layer, c)
                    w = m["weight"]
                    stats[c] = Stats(int(w.shape[0]) if w.ndim == 3 else 0, int(w.shape[-1]), keep_rows=True)
                    undo.append(_tap(m, stats[c]))
                try:
                    _run(model, layer, xq, x0s)
                finally:
                    for u in undo:
                        u()
                folds = []
                for g in groups:
                    s, losses = _search_scale(layer, g, stats, specs)
                    alpha = min(losses, key=losses.get)
                    if alpha == 0.0:
                        continue
                    changed.update({k: v for k, v in scaling.apply(layer, g, s).items()})
                    folds.append({"fold": g.label, "alpha": alpha,
                                  "error_ratio": losses[alpha] / losses[0.0] if losses[0.0] else None})
                mx.eval(layer.parameters())
                probe = [xq[0][:1, :CHECK_TOKENS]], [x0s[0][:1, :CHECK_TOKENS]]
                after = _run(model, layer, *probe)
                rec["folds"] = folds
                if folds:
                    # the folded float block must compute what it computed before
                    layer_f = dict(tree_flatten(layer.parameters()))
                    layer.update(_unflatten(original))
                    before = _run(model, layer, *probe)
                    layer.update(_unflatten(layer_f))
                    mx.eval(layer.parameters())
                    rec["fold_relative_change"] = _rel(after, before)
        # quantize: GPTQ with the Hessians of the (folded) block's inputs on the quantized stream
        stats = {}
        if specs:
            undo = []
            for p in specs:
                m = mats[p]
                w = m["weight"]
                stats[p] = Stats(int(w.shape[0]) if w.ndim == 3 else 0, int(w.shape[-1]), keep_rows=False)
                undo.append(_tap(m, stats[p]))
            try:
                if "gptq" in methods:
                    _run(model, layer, xq, x0s)
            finally:
                for u in undo:
                    u()
        float_block = dict(tree_flatten(layer.parameters()))
        rec["error_float_input"] = None
        quantized_parts = {}
        for p, spec in specs.items():
            interrupt.check()  # a safe point: between matrices (GPTQ of a wide one takes seconds)
            W = _weight_np(mats[p])
            packed, sc, bi, deq = _quantize_matrix(W, stats.get(p), spec, out_dtype, "gptq" in methods)
            quantized_parts[p] = (packed, sc, bi)
            _set_weight(mats[p], deq)
        mx.eval(layer.parameters())
        yq = _run(model, layer, xq, x0s)
        rec["relative_error"] = _rel(yq, yf)
        if "learn" in methods and specs:
            res = learn_block(model, layer, mats, specs, quantized_parts, xq, x0s, yf, out_dtype,
                              steps=options.learn_steps, seed=options.seed)
            rec["learn"] = res
            if res["kept"]:
                yq = _run(model, layer, xq, x0s)
                rec["relative_error_learned"] = _rel(yq, yf)
        for p, (packed, sc, bi) in quantized_parts.items():
            store.put_quantized(f"{prefix}.{p}.weight", packed, sc, bi, out_dtype)
        for k in changed:
            name = f"{prefix}.{k}"
            t = planned.get(name)
            if t is None or (t.decision == "quantize" and k.endswith(".weight")):
                continue
            value = np.array(float_block[k].astype(mx.float32))
            if not np.isfinite(value).all():
                raise UsageError(f"calibration made '{name}' non-finite", "try --calibrate-methods gptq")
            store.put_float(name, value)
            norm = scaling.get_module(layer, k.rsplit(".", 1)[0])
            if getattr(norm, "offset", None) and out_dtype != "F32":
                float32_norms.add(name)  # (1 + w)/s - 1 rounds in a narrower dtype (scaling docstring)
        rec["seconds"] = round(time.time() - tb, 2)
        blocks_report.append(rec)
        say(f"block {b + 1}/{len(model.layers)}: relative output error {rec.get('relative_error_learned', rec['relative_error']):.4g}")
        xf, xq = yf, yq
        # free the block: its float32 copies and the stored arrays it read
        layer.update(tree_map(lambda a: mx.zeros((0,), a.dtype), _unflatten(stored)))
        del stored, original, float_block, stats
        mx.clear_cache()
    head = _calibrate_head(model, planned, xq, out_dtype, methods, store, say)
    report_ = {
        "methods": list(methods) or ["rtn"],
        "data": cal.to_dict(),
        "seconds": round(time.time() - t0, 1),
        "blocks": blocks_report,
        **({"head": head} if head else {}),
        **({"widths": widths_record} if widths_record else {}),
    }
    return CalibrationResult(store, report_, float32_norms)


def _calibrate_head(model, planned, xq, out_dtype, methods, store, say) -> dict | None:
    """GPTQ of the LM head on the final norm's outputs (the quantized stream's): an
    untied ``lm_head``, or the embedding matrix where the head is tied to it.

    A tied embedding is both the head and the input lookup; its codes are chosen for
    the head (the logits ``h·Eᵀ``, where its error reaches every token's probability),
    with GPTQ's usual damping keeping the rows close to the weights for the lookup
    (measured on RecurrentGemma: README, "On trained models")."""
    import mlx.core as mx

    if "gptq" not in methods:
        return None
    if model.tied:
        module, name = _embedding(model)
    else:
        module, name = model.lm_head, "lm_head.weight"
    t = planned.get(name)
    if t is None or t.decision != "quantize":
        return None
    interrupt.check()
    th = time.time()
    W = module["weight"]  # read by GPTQ a piece of rows at a time (a 256k-row embedding)
    st = Stats(0, W.shape[1], keep_rows=False)
    for x in xq:
        h = model.final_norm(x.astype(mx.float32), mx.float32).astype(mx.float32)
        st.add(0, np.array(h).reshape(-1, W.shape[1]))
    say(f"head: GPTQ of {name} ({W.shape[0]} x {W.shape[1]}{', tied to the embedding' if model.tied else ''})")
    packed, sc, bi, _ = gptq(W, st.H[0], t.spec.bits, t.spec.group_size, out_dtype, dequantized=False)
    store.put_quantized(name, packed, sc, bi, out_dtype)
    return {"method": "gptq", "tensor": name, "tied": model.tied, "tokens": int(st.count[0]),
            "seconds": round(time.time() - th, 2)}


def write_items(qp, result: CalibrationResult):
    """The WriteItems of ``qp`` with calibrated tensors written from the store."""
    from dataclasses import replace

    from ..convert import WriteItem
    from . import writer

    sw = StoreWriter(result.store)
    items = []
    for t in qp.tensors:
        name = t.step.target
        if name in result.store.quantized:
            items.append(WriteItem(t.step, t.entries, t.spec, sw))
        elif name in result.store.floats:
            entries, step = t.entries, t.step
            if name in result.float32_norms:
                step = replace(step, dtype="F32")
                entries = [(name, "F32", tuple(step.shape))]
                t.entries = entries
            items.append(WriteItem(step, entries, FLOAT_OVERRIDE, sw))
        else:
            items.append(WriteItem(t.step, t.entries, t.spec, writer if t.spec is not None else None))
    return items


def write_calibrated_output(qp, source, out: Path, tmp: Path, options: CalibrationOptions, progress=None,
                            report=None, allow_nonfinite: bool = False, force: bool = False,
                            mlx_lm_code: str = "auto"):
    """Calibrate (:func:`calibrate`) and write ``qp`` into ``tmp`` → ``out`` (convert.write_output;
    ``force`` and ``mlx_lm_code`` as there)."""
    from ..convert import write_output

    parent = Path(out).expanduser().resolve().parent
    workdir = Path(tempfile.mkdtemp(prefix=".hybridconv-calibrate-", dir=parent if parent.is_dir() else None))
    try:
        result = calibrate(qp, source, options, workdir, report, allow_nonfinite)
        items = write_items(qp, result)
        entry = qp.config_entry()
        summary = qp.summary()
        method = "+".join(result.report["methods"])
        config_extra = {
            "quantization": entry,
            "quantization_config": entry,
            "hybridconv": {"recipe": qp.recipe, "bits_per_weight": summary["bits_per_weight"],
                           "calibration": method},
        }
        record_extra = {"quantization": {**summary, "plan": qp.rows(), "calibration": result.report}}
        res = write_output(qp.conversion, Path(out), tmp, progress, items, config_extra, record_extra, allow_nonfinite,
                           force, mlx_lm_code)
        return res, result.report
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
