"""The gated delta rule: one implementation for every delta-rule hybrid.

Used by Qwen3-Next, Qwen3.5 (dense and MoE) and OLMo-Hybrid (gated DeltaNet,
a scalar decay per head) and by Kimi-Linear (Kimi Delta Attention, a decay per
head *and key channel*).

The recurrence (Yang et al. 2024, "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length", arXiv:2406.06484; Yang et al. 2025, "Gated
Delta Networks: Improving Mamba2 with Delta Rule", arXiv:2412.06464)
----------------------------------------------------------------------------
Per head, the memory is a matrix ``S ∈ R^{Dk×Dv}`` (transformers' layout:
rows are key channels, ``[b, H, Dk, Dv]`` for the batch). For each step ``t``
with key ``k_t``, value ``v_t``, query ``q_t``, log-decay ``g_t ≤ 0`` and
write strength ``β_t``::

    S' = diag(exp(g_t)) · S_{t-1}                 (decay; exp(g_t) a scalar per head
                                                   for gated DeltaNet, a vector over
                                                   the Dk key channels for KDA)
    S_t = S' + β_t · k_t (v_t − S'ᵀ k_t)ᵀ          (delta rule: replace what S'
        = (I − β_t k_t k_tᵀ) S' + β_t k_t v_tᵀ       already predicts for k_t by v_t)
    o_t = S_tᵀ (scale · q_t)                        (read-out, scale = Dk^-1/2)

``β_t ∈ (0, 1)`` makes ``I − β k kᵀ`` a contraction for unit ``k``; OLMo-Hybrid
allows ``β ∈ (0, 2)`` (negative eigenvalues of the transition, Grazzi et al.
2024, arXiv:2411.12537); nothing here assumes either range.

Chunked (WY / UT-transform) form, used for prefill
--------------------------------------------------
The sequence is split into chunks of ``C`` steps (``chunk_size``, a power of
two; the tail is padded with ``k = v = q = 0``, ``β = 0``, ``g = 0``, which
leaves outputs and the final state unchanged). Inside a chunk starting from
state ``S0`` let ``G_i = Σ_{j≤i} g_j`` (cumulative log-decay, per channel for
KDA) and ``Γ_i = exp(G_i)``. The corrections ``u_i = β_i (v_i − P_iᵀ k_i)``
(``P_i`` the decayed state just before step ``i`` writes) satisfy a unit
lower-triangular system::

    (I + A) u = β v − (β k ⊙ Γ) S0,   A_ij = β_i Σ_d k_id k_jd exp(G_id − G_jd)  (j < i)

so with the UT transform ``T = (I + A)^{-1}``: ``u = T(βv) − T(βk⊙Γ) S0``. Then::

    o_i   = (scale·q_i ⊙ Γ_i)ᵀ S0 + Σ_{j≤i} (scale·q_i)ᵀ (k_j ⊙ exp(G_i − G_j)) u_j
    S_end = diag(Γ_C) S0 + Σ_j (k_j ⊙ exp(G_C − G_j)) u_jᵀ

Everything except the ``S0`` terms is computed for groups of 32 chunks at
once (bounding memory for long prompts); only the carry of ``S`` from chunk to
chunk is a Python loop (``T / C`` iterations).
The pairwise decays are formed as ``exp(G_i − G_j)`` masked to ``j ≤ i`` (never
as ``exp(G_i)·exp(−G_j)``, which overflows in float32 for strong decays;
the cutting into chunks and these pairwise log-decays are
:mod:`hybridconv.models.linear_attention`'s ``to_chunks`` and
``causal_log_decays``, shared with the mLSTM / WKV core). For
the per-channel (KDA) form they are per key channel: formed directly within
sub-blocks of 16 steps and factored through the previous sub-block's end
between sub-blocks (:func:`_decayed_products`), one chunk at a time inside the
loop to bound memory.

``T`` is computed by recursive block inversion (``[[A, 0], [B, D]]⁻¹ =
[[A⁻¹, 0], [−D⁻¹BA⁻¹, D⁻¹]]`` over block sizes 1, 2, 4, … C/2): log₂ C levels
of batched matmuls, the same exact inverse as transformers'
``solve_triangular``/forward substitution, and it runs on any MLX device
(``mx.linalg.solve_triangular`` is CPU-only).

Without the delta rule: gated linear attention (lightning attention)
--------------------------------------------------------------------
The same chunked machinery, with the write ``S_t = diag(exp(g_t)) S_{t-1} +
k_t v_tᵀ`` (no ``β``, nothing subtracted), is the *gated linear recurrence*
behind RetNet (Sun et al. 2023, arXiv:2307.08621; a fixed decay per head),
lightning attention (Qin et al. 2024, "Various Lengths, Constant Speed:
Efficient Language Modeling with Lightning Attention", arXiv:2405.17381;
MiniMax-01, arXiv:2501.08313: a fixed decay ``exp(−slope_h)`` per head, no
read-out scale) and GLA (Yang et al. 2023, arXiv:2312.06635: per-channel
data-dependent decay). There the corrections are the values themselves —
``u = v``, no UT transform, no ``S0`` term in ``u`` — so::

    o_i   = (scale·q_i ⊙ Γ_i)ᵀ S0 + Σ_{j≤i} (scale·q_i)ᵀ (k_j ⊙ exp(G_i − G_j)) v_j
    S_end = diag(Γ_C) S0 + Σ_j (k_j ⊙ exp(G_C − G_j)) v_jᵀ

(:func:`gated_linear_attention_chunked`, :func:`gated_linear_attention_step`,
:func:`gated_linear_attention`). With a per-head decay the chunk size is then any
positive integer (no block inversion); the result does not depend on it beyond
float rounding, so a model's own block length (MiniMax's ``block_size``) need
not be followed.

Conventions (match transformers' ``torch_chunk_gated_delta_rule`` /
``torch_recurrent_gated_delta_rule`` and ``chunk_kimi_delta_attention``)
--------------------------------------------------------------------------
* Shapes: ``q, k: [b, T, Hk, Dk]``; ``v: [b, T, H, Dv]``; ``g: [b, T, H]``
  (per head) or ``[b, T, H, Dk]`` (per key channel); ``beta: [b, T, H]``;
  ``state: [b, H, Dk, Dv]`` or ``None`` (zeros). When ``Hk < H`` (Qwen3-Next's
  grouped value heads) each q/k head serves ``H // Hk`` consecutive value heads
  (``repeat_interleave``), as in transformers.
* **L2 normalisation of q and k is the caller's job** (all the models use it;
  :func:`l2norm` is transformers'/FLA's ``x · rsqrt(Σx² + 1e-6)``). The core
  *does* apply the read-out scale ``Dk^-1/2`` to ``q`` (``scale=`` overrides),
  as both transformers references do inside their kernels.
* Computation and the returned output and state are float32; the caller
  casts the output back.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .linear_attention import causal_log_decays, to_chunks


def l2norm(x: mx.array, eps: float = 1e-6) -> mx.array:
    """``x · rsqrt(Σ_d x_d² + eps)`` over the last axis, in float32 (FLA's and
    transformers' normalisation of q and k before the delta rule)."""
    x = x.astype(mx.float32)
    return x * mx.rsqrt((x * x).sum(axis=-1, keepdims=True) + eps)


def _prepare(q, k, v, g, beta, state, scale):
    """float32, grouped q/k heads expanded to the value heads, q scaled
    (``beta=None``: the linear recurrence without the delta rule)."""
    f32 = mx.float32
    q, k, v, g = (x.astype(f32) for x in (q, k, v, g))
    beta = None if beta is None else beta.astype(f32)
    b, _, hk, dk = k.shape
    h, dv = v.shape[2], v.shape[3]
    if h != hk:
        if h % hk:
            raise ValueError(f"value heads ({h}) must be a multiple of key heads ({hk})")
        q = mx.repeat(q, h // hk, axis=2)
        k = mx.repeat(k, h // hk, axis=2)
    if g.ndim not in (3, 4):
        raise ValueError(f"g must be [b, T, H] or [b, T, H, Dk], got shape {tuple(g.shape)}")
    q = q * (dk**-0.5 if scale is None else scale)
    if state is None:
        state = mx.zeros((b, h, dk, dv), dtype=f32)
    return q, k, v, g, beta, state.astype(f32)


def gated_delta_step(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: Optional[mx.array],
    *,
    scale: Optional[float] = None,
) -> tuple[mx.array, mx.array]:
    """The recurrence one step at a time (decode; loops over ``T``, meant for
    ``T = 1``). Same arguments and conventions as :func:`gated_delta_chunked`;
    returns ``(o [b, T, H, Dv] float32, state [b, H, Dk, Dv] float32)``."""
    q, k, v, g, beta, S = _prepare(q, k, v, g, beta, state, scale)
    per_channel = g.ndim == 4
    outs = []
    for t in range(q.shape[1]):
        decay = mx.exp(g[:, t])  # [b, H] or [b, H, Dk]
        S = S * (decay[..., None] if per_channel else decay[..., None, None])
        k_t = k[:, t][..., None]  # [b, H, Dk, 1]
        delta = (v[:, t] - (S * k_t).sum(axis=-2)) * beta[:, t][..., None]
        S = S + k_t * delta[..., None, :]
        outs.append((S * q[:, t][..., None]).sum(axis=-2))
    return mx.stack(outs, axis=1), S


def unit_lower_inverse(m: mx.array) -> mx.array:
    """Inverse of ``I + L`` for ``L = m`` strictly lower triangular (entries on
    and above the diagonal of ``m`` are ignored), batched over leading axes;
    the size must be a power of two. Recursive block inversion (log₂ n levels
    of matmuls); see the module docstring."""
    n = m.shape[-1]
    if n & (n - 1):
        raise ValueError(f"chunk size must be a power of two, got {n}")
    lead = m.shape[:-2]
    inv = mx.ones((*lead, n, 1, 1), dtype=m.dtype)  # inverses of the 1×1 diagonal blocks
    s = 1
    while s < n:
        nb = n // (2 * s)
        # Diagonal 2s-blocks of m: [..., nb, 2s, 2s]; their lower-left s×s quarter.
        blocks = m.reshape(*lead, nb, 2 * s, nb, 2 * s)
        blocks = mx.moveaxis(mx.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)
        lower_left = blocks[..., s:, :s]
        a_inv, d_inv = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        new_lower = -(d_inv @ lower_left @ a_inv)
        top = mx.concatenate([a_inv, mx.zeros_like(a_inv)], axis=-1)
        bottom = mx.concatenate([new_lower, d_inv], axis=-1)
        inv = mx.concatenate([top, bottom], axis=-2)
        s *= 2
    return inv[..., 0, :, :]


INTRA_GROUP = 32  # chunks whose intra-chunk terms are formed together (2048 steps at C = 64)
SUB_CHUNK = 16  # per-channel decays: sub-blocks whose pairwise decays are formed directly


def _decayed_products(xs, k, G, sub: int = SUB_CHUNK):
    """For each ``x`` in ``xs``: ``P[i, j] = Σ_d x_id k_jd exp(G_id − G_jd)`` for
    ``j ≤ i`` (0 above), ``[.., C, C]``, with ``G`` the per-channel cumulative
    log-decay ``[.., C, Dk]``.

    Within diagonal sub-blocks of ``sub`` rows the decays are formed pairwise
    (``[sub, sub, Dk]``). For ``j`` in an earlier sub-block than ``i`` the
    decay factors through ``r``, the last position before ``i``'s sub-block:
    ``exp(G_i − G_j) = exp(G_i − G_r) · exp(G_r − G_j)``, both factors ≤ 1 (so
    no overflow, unlike ``exp(G_i)·exp(−G_j)``), and the sum over channels is a
    matmul. Same values as the direct ``[C, C, Dk]`` form, a fraction of its
    memory and work (FLA's sub-chunking for KDA)."""
    *lead, C, D = k.shape
    s = min(sub, C)
    m = C // s
    blk = lambda t: t.reshape(*lead, m, s, D)  # noqa: E731
    Gb, kb = blk(G), blk(k)
    i = mx.arange(s)
    pair = mx.exp(mx.where((i[:, None] >= i[None, :])[..., None], Gb[..., :, None, :] - Gb[..., None, :, :], -mx.inf))
    # ref[a] = G at the last position of sub-block a - 1 (block 0 has no earlier blocks).
    ref = mx.concatenate([mx.zeros_like(Gb[..., :1, -1:, :]), Gb[..., :-1, -1:, :]], axis=-3)  # [.., m, 1, D]
    a_idx = mx.arange(m)
    earlier = (a_idx[:, None] > a_idx[None, :])[:, :, None, None]  # block b before block a
    expo = mx.where(earlier, ref[..., :, None, :, :] - Gb[..., None, :, :, :], -mx.inf)  # [.., m(a), m(b), s, D]
    right = kb[..., None, :, :, :] * mx.exp(expo)
    left = mx.exp(Gb - ref)  # [.., m, s, D]
    eye = mx.eye(m)[:, :, None, None]
    out = []
    for x in xs:
        xb = blk(x)
        diag = (xb[..., :, None, :] * kb[..., None, :, :] * pair).sum(axis=-1)  # [.., m, s, s]
        off = (xb * left)[..., :, None, :, :] @ right.swapaxes(-1, -2)  # [.., m, m, s, s]
        full = off + eye * diag[..., :, None, :, :]
        out.append(mx.moveaxis(full, -3, -2).reshape(*lead, C, C))
    return out


def _intra_chunk(q, k, v, g, beta, per_channel):
    """State-independent terms for chunks ``[b, H, n, C, ·]`` (see the module
    docstring): decayed queries, the masked intra-chunk ``q·k`` matrix, ``T(βv)``,
    ``T(βk⊙Γ)``, keys decayed to the chunk end, and the whole-chunk decay.
    ``beta=None`` (no delta rule): ``v`` and ``None`` in place of the two ``T`` terms."""
    C = q.shape[-2]
    idx = mx.arange(C)
    strict = idx[:, None] > idx[None, :]  # j < i
    G = mx.cumsum(g, axis=3)
    delta = beta is not None
    k_beta = k * beta[..., None] if delta else None
    if per_channel:
        if delta:
            A, qk = _decayed_products((k_beta, q), k, G)
        else:
            (qk,) = _decayed_products((q,), k, G)
        gamma = mx.exp(G)
        to_end = mx.exp(G[..., -1:, :] - G)
        chunk_decay = mx.exp(G[..., -1, :])[..., None]  # [.., Dk, 1]: scales rows of S
    else:
        pair = mx.exp(causal_log_decays(G))
        A = (k_beta @ k.swapaxes(-1, -2)) * pair if delta else None
        qk = (q @ k.swapaxes(-1, -2)) * pair
        gamma = mx.exp(G)[..., None]
        to_end = mx.exp(G[..., -1:] - G)[..., None]
        chunk_decay = mx.exp(G[..., -1])[..., None, None]
    if not delta:
        return q * gamma, qk, v, None, k * to_end, chunk_decay
    T = unit_lower_inverse(mx.where(strict, A, 0.0))
    u = T @ (v * beta[..., None])
    w = T @ (k_beta * gamma)
    return q * gamma, qk, u, w, k * to_end, chunk_decay


def gated_delta_chunked(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: Optional[mx.array] = None,
    chunk_size: int = 64,
    *,
    scale: Optional[float] = None,
) -> tuple[mx.array, mx.array]:
    """Chunked (WY/UT) evaluation of the gated delta rule over a whole sequence.

    ``q, k: [b, T, Hk, Dk]`` (already L2-normalised by the caller),
    ``v: [b, T, H, Dv]``, ``g``: log-decay ``[b, T, H]`` or ``[b, T, H, Dk]``,
    ``beta: [b, T, H]``, ``state: [b, H, Dk, Dv]`` or ``None``. ``q`` is scaled
    by ``scale`` (default ``Dk^-1/2``). Returns ``(o [b, T, H, Dv], state)``,
    both float32. Vectorised within chunks; loops over chunks only.
    """
    q, k, v, g, beta, S = _prepare(q, k, v, g, beta, state, scale)
    return _chunked(q, k, v, g, beta, S, chunk_size)


def _chunked(q, k, v, g, beta, S, C):
    """The chunk loop of :func:`gated_delta_chunked` (``beta=None``: of
    :func:`gated_linear_attention_chunked`) on prepared float32 inputs."""
    b, T, H, dk = q.shape
    dv = v.shape[-1]
    per_channel = g.ndim == 4
    n = (T + (-T) % C) // C
    # [b, T, H, ...] -> [b, H, n, C, ...], zero-padded at the end (beta None: no delta rule)
    q, k, v, g, beta = (None if x is None else to_chunks(x, C) for x in (q, k, v, g, beta))
    # State-independent terms for a group of chunks at once (one chunk for the
    # per-channel form): vectorised, with memory bounded whatever T is.
    group = 1 if per_channel else INTRA_GROUP
    outs = []
    for c in range(n):
        if c % group == 0:
            sl = (slice(None), slice(None), slice(c, c + group))
            terms = _intra_chunk(q[sl], k[sl], v[sl], g[sl], None if beta is None else beta[sl], per_channel)
        q_dec, qk, u, w, k_end, decay = (None if x is None else x[:, :, c % group] for x in terms)
        v_new = u if w is None else u - w @ S
        outs.append(q_dec @ S + qk @ v_new)
        S = S * decay + k_end.swapaxes(-1, -2) @ v_new
    o = mx.stack(outs, axis=2).reshape(b, H, n * C, dv)[:, :, :T]
    return o.transpose(0, 2, 1, 3), S


def gated_delta(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: Optional[mx.array] = None,
    chunk_size: int = 64,
    *,
    scale: Optional[float] = None,
) -> tuple[mx.array, mx.array]:
    """Dispatch: one decode step through :func:`gated_delta_step`, anything
    longer through :func:`gated_delta_chunked` (same results, see the tests)."""
    if q.shape[1] == 1:
        return gated_delta_step(q, k, v, g, beta, state, scale=scale)
    return gated_delta_chunked(q, k, v, g, beta, state, chunk_size, scale=scale)


def gated_linear_attention_step(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    state: Optional[mx.array],
    *,
    scale: Optional[float] = None,
) -> tuple[mx.array, mx.array]:
    """The gated linear recurrence ``S_t = diag(exp(g_t)) S_{t−1} + k_t v_tᵀ``,
    ``o_t = S_tᵀ (scale·q_t)`` one step at a time (decode; loops over ``T``,
    meant for ``T = 1``). Same arguments and conventions as
    :func:`gated_linear_attention_chunked`."""
    q, k, v, g, _, S = _prepare(q, k, v, g, None, state, scale)
    per_channel = g.ndim == 4
    outs = []
    for t in range(q.shape[1]):
        decay = mx.exp(g[:, t])  # [b, H] or [b, H, Dk]
        S = S * (decay[..., None] if per_channel else decay[..., None, None])
        S = S + k[:, t][..., None] * v[:, t][..., None, :]
        outs.append((S * q[:, t][..., None]).sum(axis=-2))
    return mx.stack(outs, axis=1), S


def gated_linear_attention_chunked(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    state: Optional[mx.array] = None,
    chunk_size: int = 64,
    *,
    scale: Optional[float] = None,
) -> tuple[mx.array, mx.array]:
    """Chunked evaluation of the gated linear recurrence (no delta rule; module
    docstring): ``q, k: [b, T, Hk, Dk]``, ``v: [b, T, H, Dv]``, log-decay
    ``g [b, T, H]`` or ``[b, T, H, Dk]``, ``state [b, H, Dk, Dv]`` or ``None``;
    ``q`` scaled by ``scale`` (default ``Dk^-1/2``; lightning attention passes
    1). Returns ``(o [b, T, H, Dv], state)``, float32; loops over chunks only."""
    if chunk_size < 1:
        raise ValueError(f"chunk size must be positive, got {chunk_size}")
    q, k, v, g, _, S = _prepare(q, k, v, g, None, state, scale)
    return _chunked(q, k, v, g, None, S, chunk_size)


def gated_linear_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    state: Optional[mx.array] = None,
    chunk_size: int = 64,
    *,
    scale: Optional[float] = None,
) -> tuple[mx.array, mx.array]:
    """Dispatch: one decode step through :func:`gated_linear_attention_step`, anything
    longer through :func:`gated_linear_attention_chunked` (same results, see the tests)."""
    if q.shape[1] == 1:
        return gated_linear_attention_step(q, k, v, g, state, scale=scale)
    return gated_linear_attention_chunked(q, k, v, g, state, chunk_size, scale=scale)


def gdn_decay(a: mx.array, A_log: mx.array, dt_bias: mx.array) -> mx.array:
    """Gated DeltaNet's per-head log-decay ``g = -exp(A_log) · softplus(a + dt_bias)``
    (Mamba-2's ``dt · A`` with ``A = -exp(A_log)``; always ``≤ 0``), float32."""
    f32 = mx.float32
    return -mx.exp(A_log.astype(f32)) * nn.softplus(a.astype(f32) + dt_bias.astype(f32))


class RMSNormGated(nn.Module):
    """Output norm of the delta-rule mixers: ``rms_norm(o) · weight · silu(gate)``
    per head (FLA's ``FusedRMSNormGated``; norm before gate), computed in float32
    and returned in ``o``'s dtype. ``weight`` is the plain scale (ones at init).
    ``activation="sigmoid"``: ``σ(gate)`` instead (Qwen4-Exp's ``output_gate_type``)."""

    def __init__(self, dims: int, eps: float = 1e-6, activation: str = "silu"):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps
        if activation not in ("silu", "sigmoid"):
            raise ValueError(f"RMSNormGated: activation {activation!r} is not 'silu' or 'sigmoid'")
        self.activation = activation

    def __call__(self, o: mx.array, gate: mx.array) -> mx.array:
        y = mx.fast.rms_norm(o.astype(mx.float32), self.weight.astype(mx.float32), self.eps)
        act = nn.silu if self.activation == "silu" else mx.sigmoid
        return (y * act(gate.astype(mx.float32))).astype(o.dtype)
