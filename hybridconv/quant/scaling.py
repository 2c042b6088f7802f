"""Activation-aware scaling (Lin et al. 2023, "AWQ: Activation-aware Weight
Quantization", arXiv:2306.00978), folded exactly into the model.

A linear layer's output error from rounding its weights is dominated by the
input channels with the largest activations. Scaling input channel ``j`` of the
weights up by ``s_j`` and the activation down by ``s_j`` leaves ``W x`` unchanged
in exact arithmetic but gives the important channels a finer share of each
group's quantization grid. The ``1/s`` must go somewhere the quantized model
still computes: into the module that *produces* the input —

* a norm whose output only feeds the scaled layers (``input_layernorm`` → a
  Mamba-2 ``in_proj``; → attention ``q/k/v``; → the gated DeltaNet's
  ``in_proj_qkv``, ``in_proj_z`` *and* its float ``in_proj_b``/``in_proj_a``;
  ``post_attention_layernorm`` → the MLP's ``gate``/``up``, or the MoE's router
  (float), experts and shared MLP; RecurrentGemma's ``temporal_pre_norm`` →
  ``linear_x``/``linear_y`` or ``q/k/v``, ``channel_pre_norm`` → ``gate``/``up``):
  every consumer of the norm's output gets its columns scaled, quantized or not
  (a router or ``in_proj_b`` kept in float is scaled too, so its output is
  unchanged), and the norm weight is divided;
* the gated output norms (Mamba-2's grouped ``norm``, the DeltaNet's per-head
  ``norm``, whose ``[Dv]`` weight is shared by all heads: one scale per channel
  for all heads) → ``out_proj``;
* a projection whose output reaches the next one linearly: the MLP's ``up_proj``
  (``down(act(gate) ⊙ up)``) → ``down_proj``, per expert for stacked experts,
  and the up half of a fused ``[gate | up]`` → the output projection; attention's
  ``v_proj`` → ``o_proj`` (attention is linear in ``v``; with grouped-query
  attention each ``o_proj`` column takes its key/value head's scale; the output
  gate of gated attention multiplies elementwise and changes nothing).

Not folded, for lack of a place where ``1/s`` is exact: RecurrentGemma's
``linear_out`` (its input ``u ⊙ y`` passes the RG-LRU, whose gates read ``u``)
and the DeltaNet/Mamba input projections' other readers (the conv kernels).

Exactness. Scales are powers of two: dividing a norm weight (or a bias, or a
float router) by ``2^k`` and multiplying weights by it is exact in float32,
bfloat16 and float16 alike, so the float model computes bit for bit the same
function before rounding (``OffsetRMSNorm``, whose scale is ``1 + w``, is the one
case where ``(1 + w)/s − 1`` rounds; its folded weight is then stored in float32,
a few hundred bytes). Every fold is *checked*, not assumed: a candidate fold is
applied with random power-of-two scales to the block in float32 and kept only if
the block's output on calibration tokens is unchanged (relative difference
≤ :data:`EXACT_TOL`); a block that also feeds a norm's output to something the
table does not list fails that check and the fold is skipped and reported.

The scale: ``s = mean|x|^α`` per channel (mean over calibration tokens of the
quantized model's own input), normalised to geometric mean 1, rounded to a power
of two; ``α`` from :data:`ALPHAS` minimising the summed output error of the
quantized consumers ``‖W xᵀ − Q(W·s)(x/s)ᵀ‖²`` on calibration tokens (``α = 0``
is no scaling, so the search never picks worse than none on that measure).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))
EXACT_TOL = 1e-5
MAX_LOG2 = 8  # |log2 s| at most this: far beyond any useful scale, clear of overflow


@dataclass(frozen=True)
class NormFold:
    """``norm``'s output feeds ``consumers`` (block-relative paths; those present are used)."""

    norm: str
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class LinearFold:
    """``prev``'s output rows (``half``: its second half only, a fused ``[gate | up]``)
    reach ``next``'s input linearly."""

    prev: str
    next: str
    half: bool = False
    heads: bool = False  # v_proj -> o_proj: o's columns map to v's rows through the head layout


_MIXER_IN = (
    "mamba.in_proj", "mixer.in_proj",
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
    "linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_b", "linear_attn.in_proj_a",
    "linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba",
    "temporal_block.linear_x", "temporal_block.linear_y",
    "temporal_block.q_proj", "temporal_block.k_proj", "temporal_block.v_proj",
)
_FFN_IN = (
    "mlp.gate_proj", "mlp.up_proj",
    "mlp.gate", "mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj",
    "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert_gate",
    "block_sparse_moe.router.layer", "block_sparse_moe.switch_mlp.gate_proj",
    "block_sparse_moe.switch_mlp.up_proj", "shared_mlp.input_linear",
    "mlp_block.gate_proj", "mlp_block.up_proj",
)

# Candidate folds, by the parameter names hybridconv's models share with the
# checkpoints (module docstring). A candidate applies where its modules exist in
# a block, and only after the exactness check passes.
FOLDS = (
    NormFold("input_layernorm", _MIXER_IN),
    NormFold("temporal_pre_norm", _MIXER_IN),
    NormFold("post_attention_layernorm", _FFN_IN),
    NormFold("channel_pre_norm", _FFN_IN),
    NormFold("mamba.norm", ("mamba.out_proj",)),
    NormFold("linear_attn.norm", ("linear_attn.out_proj",)),
    LinearFold("mlp.up_proj", "mlp.down_proj"),
    LinearFold("mlp_block.up_proj", "mlp_block.down_proj"),
    LinearFold("mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"),
    LinearFold("mlp.switch_mlp.up_proj", "mlp.switch_mlp.down_proj"),
    LinearFold("block_sparse_moe.switch_mlp.up_proj", "block_sparse_moe.switch_mlp.down_proj"),
    LinearFold("shared_mlp.input_linear", "shared_mlp.output_linear", half=True),
    LinearFold("self_attn.v_proj", "self_attn.o_proj", heads=True),
    LinearFold("temporal_block.v_proj", "temporal_block.o_proj", heads=True),
)


def get_module(root, path: str):
    m = root
    for part in path.split("."):
        if isinstance(m, list):
            m = m[int(part)]
        elif part in m:
            m = m[part]
        else:
            return None
    return m


def is_matrix(m) -> bool:
    import mlx.nn as nn

    from ..models.moe import SwitchLinear

    return isinstance(m, (nn.Linear, SwitchLinear))


@dataclass
class Group:
    """One resolved fold in one block."""

    fold: NormFold | LinearFold
    consumers: list[str]  # block-relative paths of the scaled matrices
    width: int  # channels of the scale (per expert for stacked experts)
    experts: int = 0  # > 0: one scale per expert ([E, width])
    tile: int = 1  # consumer columns = width * tile (a per-head norm shared by all heads)
    note: str = ""
    scale: np.ndarray | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        f = self.fold
        src = f.norm if isinstance(f, NormFold) else f.prev + (" (up half)" if f.half else "")
        return f"{src} -> {', '.join(self.consumers)}"


def resolve(block) -> list[Group]:
    """The candidate folds present in ``block`` (shapes consistent); not yet checked."""
    out = []
    for fold in FOLDS:
        if isinstance(fold, NormFold):
            norm = get_module(block, fold.norm)
            if norm is None or "weight" not in norm or norm["weight"].ndim != 1:
                continue
            cons = [p for p in fold.consumers if get_module(block, p) is not None]
            mats = [get_module(block, p) for p in cons]
            if not cons or not all(is_matrix(m) for m in mats):
                continue
            width = int(norm["weight"].shape[0])
            ins = {int(m["weight"].shape[-1]) for m in mats}
            if len(ins) != 1 or next(iter(ins)) % width:
                continue
            out.append(Group(fold, cons, width, tile=next(iter(ins)) // width))
        else:
            prev, nxt = get_module(block, fold.prev), get_module(block, fold.next)
            if prev is None or nxt is None or not (is_matrix(prev) and is_matrix(nxt)):
                continue
            pw, nw = prev["weight"], nxt["weight"]
            if pw.ndim != nw.ndim:
                continue
            rows = pw.shape[-2] // (2 if fold.half else 1)
            experts = int(pw.shape[0]) if pw.ndim == 3 else 0
            if fold.heads:
                if nw.shape[-1] % rows:
                    continue
            elif nw.shape[-1] != rows:
                continue
            out.append(Group(fold, [fold.next], int(rows), experts=experts))
    return out


def _attention_layout(block, fold: LinearFold):
    att = get_module(block, fold.prev.rsplit(".", 1)[0])
    n_q, n_kv, d = (getattr(att, k, None) for k in ("n_q", "n_kv", "head_dim"))
    if not all(isinstance(v, int) and v > 0 for v in (n_q, n_kv, d)) or n_q % n_kv:
        return None
    return n_q, n_kv, d


def column_scale(block, g: Group, s: np.ndarray) -> np.ndarray | None:
    """The scale of the consumers' input columns for the group's scale ``s``
    ([width] or [E, width]); None when the head layout is unknown."""
    if isinstance(g.fold, LinearFold) and g.fold.heads:
        lay = _attention_layout(block, g.fold)
        if lay is None:
            return None
        n_q, n_kv, d = lay
        c = np.arange(n_q * d)
        return s[..., (c // d) // (n_q // n_kv) * d + c % d]
    return np.tile(s, g.tile) if g.tile > 1 else s


def apply(block, g: Group, s: np.ndarray) -> dict[str, str]:
    """Fold scale ``s`` into ``block`` (float weights): the producer divided, the
    consumers' columns multiplied. Returns {param path: what changed}."""
    import mlx.core as mx

    cols = column_scale(block, g, s)
    changed = {}
    for path in g.consumers:
        m = get_module(block, path)
        w = m["weight"]
        c = mx.array(cols.astype(np.float32))
        if w.ndim == 3:
            c = c[:, None, :] if c.ndim == 2 else c[None, None, :]
        m["weight"] = w * c.astype(w.dtype) if w.dtype != mx.float32 else w * c
        changed[f"{path}.weight"] = "columns x s"
    f = g.fold
    if isinstance(f, NormFold):
        norm = get_module(block, f.norm)
        w = norm["weight"]
        inv = mx.array((1.0 / s).astype(np.float32))
        off = getattr(norm, "offset", None)
        if off:  # OffsetRMSNorm: the scale is w + offset
            norm["weight"] = (w.astype(mx.float32) + off) * inv - off
        else:
            norm["weight"] = w * inv.astype(w.dtype)
        changed[f"{f.norm}.weight"] = "/ s"
    else:
        prev = get_module(block, f.prev)
        inv = mx.array((1.0 / s).astype(np.float32))
        rows = prev["weight"].shape[-2]
        if f.half:  # only the second half of the rows (the up part of [gate | up])
            inv = mx.concatenate([mx.ones(inv.shape[:-1] + (rows - inv.shape[-1],)), inv], axis=-1)
        w = prev["weight"]
        prev["weight"] = w * (inv[..., :, None] if w.ndim == 3 else inv[:, None]).astype(w.dtype)
        changed[f"{f.prev}.weight"] = "rows / s"
        if "bias" in prev:
            b = prev["bias"]
            prev["bias"] = b * inv.astype(b.dtype)
            changed[f"{f.prev}.bias"] = "/ s"
    return changed


def random_pow2(g: Group, rng: np.random.Generator) -> np.ndarray:
    shape = (g.experts, g.width) if g.experts else (g.width,)
    return np.exp2(rng.integers(-2, 3, size=shape)).astype(np.float32)


def pow2_scale(a: np.ndarray, alpha: float) -> np.ndarray:
    """``a^α`` normalised to geometric mean 1 (per expert), rounded to a power of two."""
    a = np.maximum(np.asarray(a, dtype=np.float64), 1e-8)
    la = alpha * np.log2(a)
    la = la - la.mean(axis=-1, keepdims=True)
    return np.exp2(np.clip(np.rint(la), -MAX_LOG2, MAX_LOG2)).astype(np.float32)
