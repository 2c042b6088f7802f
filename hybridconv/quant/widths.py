"""Widths by measured sensitivity (``--calibrate-methods ...,widths``): which
quantized matrices get one bit more, and which one bit less, at the plan's bits
per weight.

On trained models *where the bits go* matters more than how each matrix is
rounded (mlx-lm's ``dynamic_quant`` shows it: a bit more for the sensitive
layers, a bit less for the others, at the same size). This module measures each
free matrix's cost at each candidate width and chooses the widths that minimise
the summed cost with the stored bits at most the plan's.

What moves: every tensor the plan quantizes at its recipe width ("free"); a
width the user fixed (``--bits-for``) and everything the plan keeps in float or
protects stay as they are. Candidates: the planned width ``b`` and ``b - 1``,
``b + 1`` (:data:`OFFSETS`; widths MLX's affine mode supports, group size
unchanged).

The measure (one streamed pass, block by block, over the calibration windows,
before the calibration proper; memory: one block):

* a block's matrix ``m`` at width ``w``: the squared error it adds to the
  block's output (the residual stream) when only ``m`` is rounded to ``w``
  (round-to-nearest with the error-minimising ranges, the grid GPTQ also uses),
  on the float model's stream, summed over the calibration tokens:
  ``e_m(w) = Σ‖B(x; W_m → Q_w(W_m)) − B(x)‖²``;
* the residual errors are turned into the logits' KL by one factor ``c``,
  measured on the same pass: a second stream runs the model with every matrix at
  its planned width, and ``c = KL(float ‖ that stream, final hidden through the
  float head) / Σ‖h_float − h_stream‖²`` — the KL per unit of squared residual
  error, as an error that reaches the last block costs (the residual connection
  carries an error added in any block to the head nearly unchanged, so one
  factor serves every block);
* the embedding at width ``w``: ``c ·`` the squared error its rows, as the tokens
  read them, cause at the first block's output (the skip and the mixer pass it on:
  the first block's norm sees it relative to the embeddings' small scale, so the
  raw ``‖Δx₀‖²`` would undercount it) — plus, for a tied embedding, the head's KL;
* an untied (or tied) head at width ``w``: ``KL(float ‖ head_w)`` on the float
  model's final hidden states, summed over the tokens.

So every cost is in KL × tokens, and the choice minimises the sum of the
matrices' costs (errors of different matrices are taken as adding) with
``Σ bits ≤`` the plan's bits for the free tensors: a Lagrangian search
(``argmin_w cost(w) + λ·bits(w)`` per matrix, the smallest ``λ`` whose total
fits), then the remaining bits given greedily to the upgrades with the largest
cost saved per bit that still fit, then exchanges (one matrix wider, paid by
another narrower) while the summed cost falls. The total never exceeds the plan's, so the
output's bits per weight is at most the uniform plan's.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .. import interrupt
from .modes import MODES, can_quantize, quantized_entries, storage_bits

OFFSETS = (-1, 0, 1)
REASON = "width by measured sensitivity (calibration)"


def is_free(t) -> bool:
    """A tensor whose width the sensitivity may move: quantized at its recipe's width
    (not a user's ``--bits-for``)."""
    return t.decision == "quantize" and t.spec.mode == "affine" and not t.reason.startswith("--bits-for")


def candidate_specs(t, offsets=OFFSETS) -> list:
    allowed = MODES["affine"][0]
    out = []
    for o in offsets:
        b = t.spec.bits + o
        if b in allowed:
            spec = replace(t.spec, bits=b)
            if can_quantize(t.step.shape, spec) is None:
                out.append(spec)
    return out


def _bits(t, spec, float_dtype) -> int:
    return storage_bits(quantized_entries(t.step.target, t.step.shape, spec, float_dtype))


# --- the measurement ------------------------------------------------------------------


def _sq(a, b) -> float:
    import mlx.core as mx

    return float(mx.sum((a - b) ** 2).item())


def _kl_sum(ref_logits, logits) -> float:
    """Σ over tokens of KL(softmax(ref) ‖ softmax(logits)), float32."""
    import mlx.core as mx

    lp = ref_logits - mx.logsumexp(ref_logits, axis=-1, keepdims=True)
    lq = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return float(mx.sum(mx.exp(lp) * (lp - lq)).item())


ROW_CHUNK = 8192  # rows of a large matrix (a vocabulary's) rounded, and multiplied, at a time
LOGIT_BYTES = 256 << 20  # float32 logits per piece of the head's KL (256 tokens of a 256k vocabulary)


def _head_pieces(W, spec=None, out_dtype=None) -> list:
    """The head matrix ``W`` (as loaded) as pieces of :data:`ROW_CHUNK` rows, each a
    function giving its float32 rows: ``W``'s own, or (``spec``) rounded to ``spec`` —
    kept packed (MLX's format, dequantized when used), so a 256k-row head costs its
    codes, never a float32 copy per candidate."""
    import mlx.core as mx

    from .calibrate import _quantize_matrix

    pieces = []
    for a in range(0, W.shape[0], ROW_CHUNK):
        if spec is None:
            pieces.append(lambda a=a: W[a:a + ROW_CHUNK].astype(mx.float32))
            continue
        packed, sc, bi, _ = _quantize_matrix(np.array(W[a:a + ROW_CHUNK].astype(mx.float32)), None, spec, out_dtype,
                                             False)
        parts = mx.array(packed), mx.array(sc), mx.array(bi)
        mx.eval(*parts)
        pieces.append(lambda p=parts: mx.dequantize(*p, group_size=spec.group_size, bits=spec.bits))
    return pieces


class HeadKL:
    """``Σ KL(float head(xf) ‖ head_w(h))`` over the tokens of the streams ``xf`` (the float
    model's final hidden states) and ``h``, the head matrix ``W`` (as loaded) float or
    rounded to a candidate ``spec``: a few tokens at a time (a 256k vocabulary's logits
    are 1 MB per token, and the KL holds four such arrays) and the matrix a piece of rows
    at a time (:func:`_head_pieces`)."""

    def __init__(self, model, W, xf):
        import mlx.core as mx
        from mlx.utils import tree_map

        self.model, self.W, self.xf = model, W, xf
        norm = getattr(model.trunk, getattr(model, "norm_name", "norm"), None)  # the final norm in float32
        if norm is not None:
            norm.update(tree_map(lambda a: a.astype(mx.float32), norm.parameters()))
        self.float_pieces = _head_pieces(W)
        self.step = max(1, LOGIT_BYTES // (4 * int(W.shape[0])))  # tokens per piece of the KL

    def logits(self, h, pieces):
        import mlx.core as mx

        hn = self.model.final_norm(h.astype(mx.float32), mx.float32).astype(mx.float32)
        out = []
        for piece in pieces:
            out.append(hn @ piece().T)
            mx.eval(out[-1])
        return self.model.scale_logits(mx.concatenate(out, axis=-1) if len(out) > 1 else out[0]).astype(mx.float32)

    def kl_sum(self, stream, spec=None, out_dtype=None) -> float:
        """One stream's summed KL, the head float (``spec`` None) or rounded to ``spec``."""
        return self.kl_sums([(stream, spec)], out_dtype)[0]

    def kl_sums(self, jobs, out_dtype=None, check=lambda: None) -> list[float]:
        """The summed KL of each ``(stream, spec)`` of ``jobs`` in one pass over the
        tokens: the float reference logits of a piece of tokens are computed once for
        every job (a 256k vocabulary's are the pass's main cost, and too large to keep
        for all tokens). Each job's sum runs over the same pieces in the same order as
        :meth:`kl_sum` alone, so the figures are identical. ``check`` runs per piece
        (an interrupt)."""
        import mlx.core as mx

        pieces = [self.float_pieces if spec is None else _head_pieces(self.W, spec, out_dtype) for _, spec in jobs]
        totals = [0.0] * len(jobs)
        for k, hf in enumerate(self.xf):
            hf = hf.reshape(-1, hf.shape[-1])
            hs = [stream[k].reshape(-1, stream[k].shape[-1]) for stream, _ in jobs]
            for a in range(0, hf.shape[0], self.step):
                check()
                r = self.logits(hf[a:a + self.step], self.float_pieces)
                mx.eval(r)
                for j, h in enumerate(hs):
                    totals[j] += _kl_sum(r, self.logits(h[a:a + self.step], pieces[j]))
                del r
        return totals


def _rounded_rows(W, spec, out_dtype, rows):
    """``W``'s rows (the indices ``rows``) rounded to ``spec`` and dequantized,
    float32, as an MLX array: a chunk of :data:`ROW_CHUNK` rows at a time (rows are
    rounded independently: groups run along a row), so a 256k-row embedding's
    rounding never holds more than a chunk's temporaries."""
    import mlx.core as mx

    from .calibrate import _quantize_matrix

    index = np.asarray(rows)
    parts = []
    for a in range(0, len(index), ROW_CHUNK):
        chunk = np.array(W[mx.array(index[a:a + ROW_CHUNK])].astype(mx.float32))
        parts.append(mx.array(_quantize_matrix(chunk, None, spec, out_dtype, False)[3]))
        mx.eval(parts[-1])
    return mx.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]


def measure(qp, float_dir, batches, say=lambda m: None, offsets=OFFSETS) -> dict:
    """Costs ``{tensor: {bits: cost}}`` of the free tensors of ``qp`` at their candidate
    widths, and the factor ``c`` (module docstring). ``batches``: lists of token ids
    ([B, T] arrays). Loads its own lazy model of ``float_dir``; one block in memory."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map, tree_unflatten

    from ..loading import load
    from .calibrate import _block_prefixes, _embedding, _matrices, _quantize_matrix, _run, _set_weight, _weight_np

    out_dtype = qp.conversion.dtype
    planned = {t.step.target: t for t in qp.tensors}
    model = load(float_dir, lazy=True)
    emb_module, emb_key = _embedding(model)
    x0s = [model.embed(b).astype(mx.float32) for b in batches]
    mx.eval(x0s)
    xf, xu = list(x0s), list(x0s)
    costs: dict[str, dict[int, float]] = {}
    residual: dict[str, dict[int, float]] = {}
    for i, (layer, prefix) in enumerate(zip(model.layers, _block_prefixes(model))):
        interrupt.check()  # a safe point: between blocks (a 2B block takes about a minute)
        stored = dict(tree_flatten(layer.parameters()))
        layer.update(tree_map(lambda a: a.astype(mx.float32), layer.parameters()))
        mx.eval(layer.parameters())
        mats = _matrices(layer)
        quantized = {p: planned[f"{prefix}.{p}.weight"] for p in mats
                     if f"{prefix}.{p}.weight" in planned and planned[f"{prefix}.{p}.weight"].decision == "quantize"}
        yf = _run(model, layer, xf, x0s)
        t = planned.get(emb_key)
        if i == 0 and t is not None and is_free(t):
            # the embedding: its rows' error as the first block passes it on (skip and mixer)
            # only the rows the calibration tokens read (each row is rounded alone)
            used = np.unique(np.concatenate([np.array(b).ravel() for b in batches]))
            at = [mx.array(np.searchsorted(used, np.array(b))) for b in batches]
            row = {}
            for spec in candidate_specs(t, offsets):
                Q = _rounded_rows(emb_module["weight"], spec, out_dtype, used)
                xs = [model.scale_embeddings(mx.take(Q, i, axis=0)).astype(mx.float32) for i in at]
                y = _run(model, layer, xs, xs)
                row[spec.bits] = sum(_sq(a, b) for a, b in zip(y, yf))
            residual[emb_key] = row
        for p, t in quantized.items():
            if not is_free(t):
                continue
            interrupt.check()  # a safe point: between matrices (every weight is back in place)
            W = _weight_np(mats[p])
            row = {}
            for spec in candidate_specs(t, offsets):
                _set_weight(mats[p], _quantize_matrix(W, None, spec, out_dtype, False)[3])
                y = _run(model, layer, xf, x0s)
                row[spec.bits] = sum(_sq(a, b) for a, b in zip(y, yf))
            _set_weight(mats[p], W)
            residual[t.step.target] = row
        # the planned-width stream (for c)
        originals = {p: _weight_np(mats[p]) for p in quantized}
        for p, t in quantized.items():
            _set_weight(mats[p], _quantize_matrix(originals[p], None, t.spec, out_dtype, False)[3])
        yu = _run(model, layer, xu, x0s)
        xf, xu = yf, yu
        layer.update(tree_map(lambda a: mx.zeros((0,), a.dtype), tree_unflatten(list(stored.items()))))
        del stored, originals
        mx.clear_cache()
        say(f"widths: block {i + 1}/{len(model.layers)} measured")
    # the head in float32, on the final hidden states of both streams
    head_key = emb_key if model.tied else "lm_head.weight"
    head_module = emb_module if model.tied else model.lm_head
    head = HeadKL(model, head_module["weight"], xf)
    t = planned.get(head_key)
    specs = list(candidate_specs(t, offsets)) if t is not None and is_free(t) else []
    # the planned stream's KL (for c) and each head candidate's, in one pass (HeadKL.kl_sums)
    kl_u, *kl_head = head.kl_sums([(xu, None)] + [(xf, spec) for spec in specs], out_dtype, interrupt.check)
    sq_u = sum(_sq(a, b) for a, b in zip(xf, xu))
    c = kl_u / sq_u if sq_u > 0 else 0.0
    for name, row in residual.items():
        costs[name] = {b: c * e for b, e in row.items()}
    # the head (a tied embedding: on top of its cost as the embedding)
    ids = [np.array(b) for b in batches]
    if specs:
        row = dict(costs.get(head_key, {}))
        for spec, kl in zip(specs, kl_head):
            row[spec.bits] = row.get(spec.bits, 0.0) + kl
        costs[head_key] = row
    del model, head
    mx.clear_cache()
    return {"costs": costs, "kl_per_squared_error": c, "planned_stream_kl": kl_u / max(sum(int(np.prod(b.shape)) for b in ids), 1)}


# --- the choice -----------------------------------------------------------------------


def allocate(options: dict[str, list[tuple[int, int, float]]], budget: int) -> dict[str, int]:
    """``options[name] = [(width, bits, cost), ...]``: the width per name minimising the
    summed cost with the summed bits ≤ ``budget`` (Lagrangian, then greedy; module
    docstring). The planned widths must fit the budget."""

    def pick(lam):
        return {n: min(opts, key=lambda o: (o[2] + lam * o[1], o[1])) for n, opts in options.items()}

    def total(ch):
        return sum(o[1] for o in ch.values())

    ch = pick(0.0)
    if total(ch) > budget:
        lo, hi = 0.0, 1.0
        while total(pick(hi)) > budget:
            hi *= 4
            if hi > 1e30:
                break
        for _ in range(100):
            mid = (lo + hi) / 2
            if total(pick(mid)) > budget:
                lo = mid
            else:
                hi = mid
        ch = pick(hi)
    # the bits left over: the upgrades saving the most cost per bit that still fit
    left = budget - total(ch)
    while True:
        best, gain = None, 0.0
        for n, opts in options.items():
            cur = ch[n]
            for o in opts:
                extra = o[1] - cur[1]
                if 0 < extra <= left and cur[2] - o[2] > 0 and (cur[2] - o[2]) / extra > gain:
                    best, gain = (n, o), (cur[2] - o[2]) / extra
        if best is None:
            break
        left -= best[1][1] - ch[best[0]][1]
        ch[best[0]] = best[1]
    # exchanges: one matrix wider, paid by another narrower, while the cost falls
    # (the Lagrangian's choice is coarse with few matrices)
    for _ in range(4 * len(options) + 4):
        best, saved = None, 0.0
        ups = [(n, o) for n, opts in options.items() for o in opts if o[1] > ch[n][1] and o[2] < ch[n][2]]
        downs = [(n, o) for n, opts in options.items() for o in opts if o[1] < ch[n][1]]
        for n, o in ups:
            need = o[1] - ch[n][1] - left
            gain = ch[n][2] - o[2]
            for n2, o2 in downs:
                if n2 == n or ch[n2][1] - o2[1] < need:
                    continue
                net = gain - (o2[2] - ch[n2][2])
                if net > saved * (1 + 1e-12) and net > 1e-15 * max(gain, 1e-300):
                    best, saved = ((n, o), (n2, o2)), net
        if best is None:
            break
        for n, o in best:
            left -= o[1] - ch[n][1]
            ch[n] = o
    return {n: o[0] for n, o in ch.items()}


def reset(qp) -> None:
    """Undo an earlier choice on ``qp`` (a plan calibrated twice, as ``--target-kl`` writes
    its winner again): widths move around the *planned* widths, never further."""
    for t in qp.tensors:
        planned = getattr(t, "planned", None)
        if planned is not None:
            t.spec, t.entries, t.reason = planned
            t.planned = None


def choose(qp, measured: dict, offsets=OFFSETS) -> dict:
    """Apply the width choice to ``qp`` in place (specs, stored entries, reasons) and
    return the record for conversion.json."""
    float_dtype = qp.conversion.dtype
    reset(qp)
    costs = measured["costs"]
    tensors = [t for t in qp.tensors if t.step.target in costs and is_free(t)]
    options, planned_bits = {}, {}
    for t in tensors:
        opts = []
        for spec in candidate_specs(t, offsets):
            if spec.bits in costs[t.step.target]:
                opts.append((spec.bits, _bits(t, spec, float_dtype), costs[t.step.target][spec.bits]))
        options[t.step.target] = opts
        planned_bits[t.step.target] = t.spec.bits
    budget = sum(_bits(t, t.spec, float_dtype) for t in tensors)
    before = qp.bits_per_weight
    chosen = allocate(options, budget)
    rows = []
    for t in tensors:
        b = chosen[t.step.target]
        rows.append({"tensor": t.step.target, "planned_bits": t.spec.bits, "bits": b,
                     "cost": {str(k): v for k, v in sorted(costs[t.step.target].items())}})
        if b != t.spec.bits:
            t.planned = (t.spec, t.entries, t.reason)
            t.spec = replace(t.spec, bits=b)
            t.entries = quantized_entries(t.step.target, t.step.shape, t.spec, float_dtype)
            t.reason = REASON
    est = lambda pick: sum(costs[n][pick(n)] for n in options)
    return {
        "measure": "block-output squared error x KL per squared error (c); embedding through the first block; head KL",
        "offsets": list(offsets),
        "kl_per_squared_error": measured["kl_per_squared_error"],
        "planned_stream_kl_per_token": measured["planned_stream_kl"],
        "estimated_cost_planned": est(lambda n: planned_bits[n]),
        "estimated_cost_chosen": est(lambda n: chosen[n]),
        "bits_per_weight_planned": round(before, 4),
        "bits_per_weight": round(qp.bits_per_weight, 4),
        "moved": {"up": sum(r["bits"] > r["planned_bits"] for r in rows),
                  "down": sum(r["bits"] < r["planned_bits"] for r in rows),
                  "kept": sum(r["bits"] == r["planned_bits"] for r in rows)},
        "tensors": rows,
    }
