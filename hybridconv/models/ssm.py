"""The state-space core shared by every Mamba-family block: Mamba-1's selective
scan, Mamba-2's SSD scan, the gated (grouped) RMSNorm and the mixers in the
layouts transformers uses (Mamba-1, Zamba's multi-head Mamba-1, Mamba-2).

Selective state spaces (Mamba-1)
================================
Gu & Dao, 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces", arXiv:2312.00752. Every one of ``Dch`` channels carries its own state
of ``N`` numbers. With ``A = -exp(A_log)`` of shape ``[Dch, N]`` (the checkpoint
stores the log of ``-A`` so that ``A`` stays negative and the state decays),
an input-dependent step ``Δ_t = softplus(dt_proj(δ_t))`` per channel (``δ_t``
is a low-rank, ``time_step_rank``-wide projection of the input) and
input-dependent ``B_t, C_t ∈ R^N`` shared by all channels::

    h_t = exp(Δ_t · A) ⊙ h_{t-1} + (Δ_t · x_t) B_t        h ∈ R^{Dch×N}
    y_t = h_t · C_t + D ⊙ x_t

(zero-order-hold for ``A``, Euler for ``B``, as in the paper's reference code).
:func:`selective_scan` evaluates it without a loop over time steps: the
recurrence ``h_t = a_t h_{t-1} + u_t`` is associative in the pair ``(a, u)``
and a Hillis–Steele scan does it in ``log2(Q)`` vectorised steps within chunks
of ``Q`` steps (memory ``O(b·Q·Dch·N)``, bounded however long the prompt); the
state is carried from chunk to chunk. Zamba's multi-head variant
(:class:`MultiHeadMamba1Mixer`) splits the channels into heads, each with its
own ``B_t``, ``C_t`` (and low-rank ``Δ``): the same scan with ``B``/``C`` per
group of channels.

State-space duality (Mamba-2, SSD)
==================================
Dao & Gu, 2024, "Transformers are SSMs: Generalized Models and Efficient
Algorithms Through Structured State Space Duality", arXiv:2405.21060. ``A`` is
a *scalar* per head (``[H]``), each head has ``P`` channels, and ``B``/``C`` are
shared by the heads of a group (``G`` groups, head ``h`` uses group
``h // (H/G)``)::

    h_t = exp(Δ_t A) · h_{t-1} + Δ_t · x_t ⊗ B_t           h ∈ R^{P×N} per head
    y_t = h_t C_t + D · x_t

Because the decay is a scalar per head, the outputs within a chunk of ``Q``
steps are a masked, decay-weighted "attention" product

    y_t = Σ_{s≤t} (C_t·B_s) · exp(Σ_{s<k≤t} Δ_k A) · Δ_s x_s  +  exp(Σ_{k≤t} Δ_k A) · h_0 C_t

(``L = exp(segsum(ΔA))`` is the decay matrix), and the state at the chunk's end
is ``exp(ΣΔA) h_0 + Σ_s exp(Σ_{s<k≤Q} Δ_k A) Δ_s x_s ⊗ B_s``. :func:`ssd_scan`
loops over chunks only; decoding runs the same code with ``T = 1``.

Δ in Mamba-2 is ``softplus(dt + dt_bias)`` clamped to ``time_step_limit``,
which transformers defaults to ``(0, inf)`` (no clamp). mlx-lm's generic SSD
defaults to ``(1e-3, 100)``; that clip belongs to no checkpoint and is not
applied here unless a config asks for it.

Gated RMSNorm
=============
Mamba-2's output norm ``rms(y ⊙ silu(z)) · w`` (``norm_before_gate=False``, the
transformers default) or ``rms(y) · w ⊙ silu(z)`` (``True``, Falcon-H1's
option), with the RMS statistics taken per group of ``group_size`` channels —
the same ``n_groups`` as B and C. Ignoring the groups (as mlx-lm's Mamba-2 does)
is a silently different model once ``n_groups > 1``. Computed in float32, as
every transformers variant upcasts.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from .common import causal_depthwise_conv

# Steps per chunk of the Mamba-1 scan: log2(64) = 6 vectorised steps, and the
# [b, 64, Dch, N] intermediates stay small for real channel counts.
SELECTIVE_CHUNK = 64


def segsum(a: mx.array) -> mx.array:
    """``out[..., t, s] = sum(a[..., s+1 : t+1])`` for ``s <= t``, ``-inf`` above.

    Computed as a masked cumulative sum rather than ``cumsum[t] - cumsum[s]``,
    which loses precision in float32 once the running sum is large.
    """
    q = a.shape[-1]
    x = mx.repeat(a[..., None], q, axis=-1)  # x[..., t, s] = a[t]
    x = mx.tril(x, -1)  # keep t > s
    out = mx.cumsum(x, axis=-2)
    lower = mx.tril(mx.ones((q, q), dtype=mx.bool_))
    return mx.where(lower, out, -mx.inf)


def ssd_scan(
    x: mx.array,
    dt: mx.array,
    A: mx.array,
    B: mx.array,
    C: mx.array,
    D: Optional[mx.array],
    state: Optional[mx.array],
    chunk_size: int,
) -> tuple[mx.array, mx.array]:
    """The Mamba-2 recurrence in chunked (SSD) form, float32 throughout.

    ``x``: ``[b, T, H, P]``; ``dt``: ``[b, T, H]`` (after softplus and clamp);
    ``A``: ``[H]`` (negative); ``B``, ``C``: ``[b, T, G, N]`` with ``H % G == 0``
    (a ``[b, T, N]`` input means one group); ``D``: ``[H]`` or ``None``;
    ``state``: ``[b, H, P, N]`` or ``None`` (zeros). Returns ``y``
    ``[b, T, H, P]`` and the final state.
    """
    x, dt, A = x.astype(mx.float32), dt.astype(mx.float32), A.astype(mx.float32)
    B, C = B.astype(mx.float32), C.astype(mx.float32)
    if B.ndim == 3:
        B, C = B[:, :, None], C[:, :, None]
    b, T, H, P = x.shape
    G, N = B.shape[-2], B.shape[-1]
    if H % G:
        raise ValueError(f"{H} heads are not a multiple of {G} groups")
    R = H // G  # heads per group
    if state is None:
        state = mx.zeros((b, H, P, N), dtype=mx.float32)
    state = state.astype(mx.float32).reshape(b, G, R, P, N)
    ys = []
    for start in range(0, T, chunk_size):  # loop over chunks, not time steps
        stop = min(start + chunk_size, T)
        Q = stop - start
        xs, dts = x[:, start:stop], dt[:, start:stop]
        Bs = B[:, start:stop].transpose(0, 2, 1, 3)[:, :, None]  # [b, G, 1, Q, N]
        Cs = C[:, start:stop].transpose(0, 2, 1, 3)[:, :, None]
        dtA = (dts * A).transpose(0, 2, 1)  # [b, H, Q]
        L = mx.exp(segsum(dtA)).reshape(b, G, R, Q, Q)  # decay from s to t
        CB = Cs @ Bs.swapaxes(-1, -2)  # [b, G, 1, Q(t), Q(s)]
        dtx = (dts[..., None] * xs).transpose(0, 2, 1, 3).reshape(b, G, R, Q, P)
        # Within the chunk: y_t = sum_s (C_t . B_s) exp(sum_{s<k<=t} dtA_k) dt_s x_s
        y = (CB * L) @ dtx  # [b, G, R, Q, P]
        # From the state carried in: exp(sum_{k<=t} dtA_k) * (h0 . C_t)
        decay_in = mx.exp(mx.cumsum(dtA, axis=-1)).reshape(b, G, R, Q)
        y = y + decay_in[..., None] * (Cs @ state.swapaxes(-1, -2))
        # Carry: h_end = exp(sum dtA) h0 + sum_s exp(sum_{s<k<=end} dtA_k) dt_s x_s (x) B_s
        decay_out = L[..., -1, :]  # [b, G, R, Q(s)]
        weighted = dtx.swapaxes(-1, -2) * decay_out[..., None, :]  # [b, G, R, P, Q]
        state = decay_in[..., -1, None, None] * state + weighted @ Bs
        ys.append(y.reshape(b, H, Q, P).transpose(0, 2, 1, 3))
    y = mx.concatenate(ys, axis=1) if len(ys) > 1 else ys[0]
    if D is not None:
        y = y + x * D.astype(mx.float32)[:, None]
    return y, state.reshape(b, H, P, N)


def _linear_scan(a: mx.array, u: mx.array, h0: mx.array) -> mx.array:
    """All states of ``h_t = a_t h_{t-1} + u_t`` along axis 1 from ``h0``
    (Hillis–Steele: after the step with shift ``k`` position ``t`` combines the
    ``2k`` inputs ending at ``t``; ``log2(T)`` steps)."""
    u = mx.concatenate([u[:, :1] + a[:, :1] * h0[:, None], u[:, 1:]], axis=1)
    T = u.shape[1]
    pad = [(0, 0)] * u.ndim
    k = 1
    while k < T:
        pad[1] = (k, 0)
        u_prev = mx.pad(u[:, : T - k], pad)
        a_prev = mx.pad(a[:, : T - k], pad, constant_values=1.0)
        u = u + a * u_prev
        a = a * a_prev
        k *= 2
    return u


def selective_scan(
    x: mx.array,
    dt: mx.array,
    A: mx.array,
    B: mx.array,
    C: mx.array,
    D: Optional[mx.array],
    state: Optional[mx.array],
    chunk_size: int = SELECTIVE_CHUNK,
) -> tuple[mx.array, mx.array]:
    """The Mamba-1 selective scan, float32 throughout.

    ``x``, ``dt``: ``[b, T, Dch]`` (``dt`` after softplus); ``A``: ``[Dch, N]``
    (negative); ``B``, ``C``: ``[b, T, N]`` shared by all channels, or ``[b, T,
    G, N]``, one per group of ``Dch / G`` consecutive channels (Zamba's
    multi-head Mamba: a head is a group); ``D``: ``[Dch]`` or ``None``;
    ``state``: ``[b, Dch, N]`` or ``None`` (zeros). Returns ``y`` ``[b, T, Dch]``
    and the final state.
    """
    x, dt, A = x.astype(mx.float32), dt.astype(mx.float32), A.astype(mx.float32)
    B, C = B.astype(mx.float32), C.astype(mx.float32)
    b, T, Dch = x.shape
    N = A.shape[-1]
    grouped = B.ndim == 4
    if grouped and Dch % B.shape[2]:
        raise ValueError(f"{Dch} channels are not a multiple of {B.shape[2]} B/C groups")
    if state is None:
        state = mx.zeros((b, Dch, N), dtype=mx.float32)
    state = state.astype(mx.float32)
    ys = []
    for start in range(0, T, chunk_size):  # loop over chunks, not time steps
        stop = min(start + chunk_size, T)
        Q = stop - start
        dts = dt[:, start:stop, :, None]  # [b, Q, Dch, 1]
        a = mx.exp(dts * A)  # [b, Q, Dch, N]
        if grouped:  # channels [b, Q, G, Dch/G]: each group with its own B_t, C_t
            G = B.shape[2]
            dx = (dts * x[:, start:stop, :, None]).reshape(b, Q, G, Dch // G, 1)
            u = (dx * B[:, start:stop, :, None, :]).reshape(b, Q, Dch, N)
        else:
            u = (dts * x[:, start:stop, :, None]) * B[:, start:stop, None, :]
        h = _linear_scan(a, u, state)  # [b, Q, Dch, N]
        if grouped:
            hg = h.reshape(b, Q, G, Dch // G, N)
            ys.append((hg @ C[:, start:stop, :, :, None]).reshape(b, Q, Dch))
        else:
            ys.append((h @ C[:, start:stop, :, None]).squeeze(-1))
        state = h[:, -1]
    y = mx.concatenate(ys, axis=1) if len(ys) > 1 else ys[0]
    if D is not None:
        y = y + x * D.astype(mx.float32)
    return y, state


class GatedRMSNorm(nn.Module):
    """RMSNorm gated by ``silu(gate)``, statistics per group of ``group_size``
    channels (``None``: the whole vector). ``norm_before_gate=False``:
    ``rms(x ⊙ silu(gate)) · w``; ``True``: ``rms(x) · w ⊙ silu(gate)``. Float32
    inside; returns float32 (the caller casts)."""

    def __init__(self, dims: int, eps: float = 1e-6, group_size: Optional[int] = None,
                 norm_before_gate: bool = False):
        super().__init__()
        group_size = group_size or dims
        if dims % group_size:
            raise ValueError(f"norm width {dims} is not a multiple of the group size {group_size}")
        self.weight = mx.ones((dims,))
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate

    def __call__(self, x: mx.array, gate: Optional[mx.array] = None) -> mx.array:
        x = x.astype(mx.float32)
        g = nn.silu(gate.astype(mx.float32)) if gate is not None else None
        if g is not None and not self.norm_before_gate:
            x = x * g
        shape = x.shape
        xg = x.reshape(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        xg = mx.fast.rms_norm(xg, None, self.eps)
        x = xg.reshape(shape) * self.weight.astype(mx.float32)
        if g is not None and self.norm_before_gate:
            x = x * g
        return x


class Mamba2Mixer(nn.Module):
    """Mamba-2 block in transformers' ``Mamba2Mixer`` layout (also Bamba,
    GraniteMoeHybrid, NemotronH, Zamba2, Falcon-H1).

    ``in_proj(x) = [z | xBC | dt]`` (``I = H·P``, ``xBC`` = ``I + 2·G·N``
    channels, ``dt`` one per head); ``xBC`` through the causal depthwise
    ``conv1d`` and SiLU, split into ``x``, ``B`` (``G·N``), ``C``;
    ``Δ = clamp(softplus(dt + dt_bias), *time_step_limit)``; :func:`ssd_scan`;
    ``out_proj(norm(y, z))`` with the grouped :class:`GatedRMSNorm` (or
    ``y ⊙ silu(z)`` when ``use_norm`` is false).

    Hooks for µP-scaled variants (Falcon-H1): ``in_multiplier`` scales the
    input of ``in_proj``; ``segment_multipliers`` = ``(z, x, B, C, dt)`` scales
    the segments of its output; :meth:`project_in` / :meth:`project_out` can be
    overridden.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        n_groups: int,
        d_state: int,
        d_conv: int,
        chunk_size: int = 256,
        use_conv_bias: bool = True,
        use_bias: bool = False,
        norm_eps: float = 1e-5,
        time_step_limit: Sequence[float] = (0.0, math.inf),
        norm_before_gate: bool = False,
        use_norm: bool = True,
        in_multiplier: float = 1.0,
        segment_multipliers: Optional[Sequence[float]] = None,
    ):
        super().__init__()
        if num_heads % n_groups:
            raise ValueError(f"num_heads ({num_heads}) is not a multiple of n_groups ({n_groups})")
        self.num_heads, self.head_dim, self.n_groups = num_heads, head_dim, n_groups
        self.d_state, self.chunk_size = d_state, chunk_size
        self.intermediate_size = inner = num_heads * head_dim
        self.conv_dim = inner + 2 * n_groups * d_state
        lo, hi = time_step_limit
        self.time_step_limit = (float(lo), float(hi))
        self.in_proj = nn.Linear(hidden_size, inner + self.conv_dim + num_heads, bias=use_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=use_conv_bias
        )
        self.dt_bias = mx.ones((num_heads,))
        self.A_log = mx.log(mx.arange(1, num_heads + 1, dtype=mx.float32))
        self.D = mx.ones((num_heads,))
        if use_norm:
            self.norm = GatedRMSNorm(inner, norm_eps, inner // n_groups, norm_before_gate)
        self.use_norm = use_norm
        self.out_proj = nn.Linear(inner, hidden_size, bias=use_bias)
        self.in_multiplier = in_multiplier
        self.segment_multipliers = tuple(segment_multipliers) if segment_multipliers else None

    def project_in(self, h: mx.array) -> mx.array:
        if self.in_multiplier != 1.0:
            h = h * self.in_multiplier
        zxbcdt = self.in_proj(h)
        if self.segment_multipliers is not None:
            gn = self.n_groups * self.d_state
            widths = (self.intermediate_size, self.intermediate_size, gn, gn, self.num_heads)
            scale = mx.concatenate(
                [mx.full((w,), m, dtype=zxbcdt.dtype) for w, m in zip(widths, self.segment_multipliers)]
            )
            zxbcdt = zxbcdt * scale
        return zxbcdt

    def project_out(self, y: mx.array) -> mx.array:
        return self.out_proj(y)

    def __call__(self, h: mx.array, cache=None, mask: Optional[mx.array] = None) -> mx.array:
        b, T, _ = h.shape
        inner, gn = self.intermediate_size, self.n_groups * self.d_state
        if mask is not None:  # padding positions contribute nothing
            h = h * mask[..., None].astype(h.dtype)
        zxbcdt = self.project_in(h)
        z = zxbcdt[..., :inner]
        xBC = zxbcdt[..., inner : inner + self.conv_dim]
        dt = zxbcdt[..., inner + self.conv_dim :]

        conv_state = cache[0] if cache is not None else None
        xBC, conv_state = causal_depthwise_conv(xBC, self.conv1d.weight, self.conv1d.get("bias"), conv_state)
        xBC = nn.silu(xBC)
        if mask is not None:
            xBC = xBC * mask[..., None].astype(xBC.dtype)
        x = xBC[..., :inner].reshape(b, T, self.num_heads, self.head_dim)
        Bm = xBC[..., inner : inner + gn].reshape(b, T, self.n_groups, self.d_state)
        Cm = xBC[..., inner + gn :].reshape(b, T, self.n_groups, self.d_state)

        dt = nn.softplus(dt.astype(mx.float32) + self.dt_bias.astype(mx.float32))
        lo, hi = self.time_step_limit
        if lo > 0.0 or hi < math.inf:
            dt = mx.clip(dt, lo, hi)
        A = -mx.exp(self.A_log.astype(mx.float32))
        ssm_state = cache[1] if cache is not None else None
        y, ssm_state = ssd_scan(x, dt, A, Bm, Cm, self.D, ssm_state, self.chunk_size)
        if cache is not None:
            cache[0], cache[1] = conv_state, ssm_state
        y = y.reshape(b, T, inner)
        if self.use_norm:
            y = self.norm(y, z)
        else:
            y = y * nn.silu(z.astype(mx.float32))
        return self.project_out(y.astype(h.dtype))


class _Mamba1Base(nn.Module):
    """The Mamba-1 block around the selective scan, shared by
    :class:`Mamba1Mixer` and :class:`MultiHeadMamba1Mixer`: ``in_proj`` → ``x``
    and ``z`` (:meth:`split_in_proj`), causal depthwise ``conv1d`` and SiLU on
    ``x``, the scan's inputs from ``x`` (:meth:`ssm_inputs`),
    :func:`selective_scan`, ``out_proj(y ⊙ silu(z))``. Decoding state: a
    :class:`~hybridconv.models.common.StateCache` ``[conv state, SSM state]``."""

    def split_in_proj(self, xz: mx.array) -> tuple[mx.array, mx.array]:
        I = self.intermediate_size
        return xz[..., :I], xz[..., I:]

    def ssm_inputs(self, x: mx.array):  # pragma: no cover - interface
        """``(dt, A, B, C, D)`` for :func:`selective_scan` (``dt`` after softplus)."""
        raise NotImplementedError

    def __call__(self, h: mx.array, cache=None, mask: Optional[mx.array] = None) -> mx.array:
        if mask is not None:
            h = h * mask[..., None].astype(h.dtype)
        x, z = self.split_in_proj(self.in_proj(h))
        conv_state = cache[0] if cache is not None else None
        x, conv_state = causal_depthwise_conv(x, self.conv1d.weight, self.conv1d.get("bias"), conv_state)
        x = nn.silu(x)
        if mask is not None:
            x = x * mask[..., None].astype(x.dtype)
        dt, A, Bm, Cm, D = self.ssm_inputs(x)
        ssm_state = cache[1] if cache is not None else None
        y, ssm_state = selective_scan(x, dt, A, Bm, Cm, D, ssm_state)
        if cache is not None:
            cache[0], cache[1] = conv_state, ssm_state
        y = y * nn.silu(z.astype(mx.float32))
        return self.out_proj(y.astype(h.dtype))


class Mamba1Mixer(_Mamba1Base):
    """Mamba-1 block in transformers' ``MambaMixer`` layout (also Falcon-Mamba
    and Jamba).

    ``in_proj(x) = [x | z]``; ``x`` through the causal depthwise ``conv1d`` and
    SiLU; ``x_proj(x) = [δ (time_step_rank) | B (N) | C (N)]``; optional RMS
    norms on ``δ``, ``B``, ``C`` (``bcdt_norm``: ``None`` for Mamba,
    ``"weightless"`` for Falcon-Mamba with ``bcdt_eps`` = ``mixer_rms_eps``,
    ``"weighted"`` for Jamba: ``dt_layernorm``, ``b_layernorm``,
    ``c_layernorm``); ``Δ = softplus(dt_proj(δ))`` (``dt_proj`` carries the
    bias); :func:`selective_scan`; ``out_proj(y ⊙ silu(z))``.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        d_state: int,
        d_conv: int,
        time_step_rank: int,
        use_conv_bias: bool = True,
        use_bias: bool = False,
        bcdt_norm: Optional[str] = None,
        bcdt_eps: float = 1e-6,
    ):
        super().__init__()
        if bcdt_norm not in (None, "weightless", "weighted"):
            raise ValueError(f"bcdt_norm must be None, 'weightless' or 'weighted', not {bcdt_norm!r}")
        self.intermediate_size, self.d_state = intermediate_size, d_state
        self.time_step_rank = time_step_rank
        self.bcdt_norm, self.bcdt_eps = bcdt_norm, bcdt_eps
        self.in_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=use_bias)
        self.conv1d = nn.Conv1d(
            intermediate_size, intermediate_size, d_conv, groups=intermediate_size, bias=use_conv_bias
        )
        self.x_proj = nn.Linear(intermediate_size, time_step_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(time_step_rank, intermediate_size, bias=True)
        self.A_log = mx.log(mx.broadcast_to(mx.arange(1, d_state + 1, dtype=mx.float32), (intermediate_size, d_state)))
        self.D = mx.ones((intermediate_size,))
        self.out_proj = nn.Linear(intermediate_size, hidden_size, bias=use_bias)
        if bcdt_norm == "weighted":
            self.dt_layernorm = nn.RMSNorm(time_step_rank, eps=bcdt_eps)
            self.b_layernorm = nn.RMSNorm(d_state, eps=bcdt_eps)
            self.c_layernorm = nn.RMSNorm(d_state, eps=bcdt_eps)

    def _norm(self, v: mx.array, name: str) -> mx.array:
        if self.bcdt_norm is None:
            return v
        if self.bcdt_norm == "weightless":  # in float32, as transformers does
            return mx.fast.rms_norm(v.astype(mx.float32), None, self.bcdt_eps).astype(v.dtype)
        return getattr(self, name)(v)

    def ssm_inputs(self, x: mx.array):
        N, r = self.d_state, self.time_step_rank
        dbc = self.x_proj(x)
        delta = self._norm(dbc[..., :r], "dt_layernorm")
        Bm = self._norm(dbc[..., r : r + N], "b_layernorm")
        Cm = self._norm(dbc[..., r + N :], "c_layernorm")
        # dt_proj's bias is kept float32 by the converters: the sum is float32.
        dt = nn.softplus(self.dt_proj(delta).astype(mx.float32))
        A = -mx.exp(self.A_log.astype(mx.float32))
        return dt, A, Bm, Cm, self.D


class MultiHeadMamba1Mixer(_Mamba1Base):
    """Zamba's multi-head Mamba-1 block (transformers' ``ZambaMambaMixer``;
    Glorioso et al. 2024, arXiv:2405.16712): the ``I`` inner channels form
    ``num_heads`` heads of ``I / num_heads``; each head runs Mamba-1 with its own
    low-rank ``Δ``, ``B`` and ``C`` from its own channels.

    Parameters as the checkpoint stores them: ``in_proj`` ``[2I, hidden]`` with
    ``x`` and ``z`` *interleaved* (row ``2c`` is channel ``c`` of ``x``, row
    ``2c + 1`` of ``z``: transformers views the output as ``[I, 2]``);
    ``x_proj_weight`` ``[heads, R + 2N, I/heads]`` (per head ``[δ | B | C]``);
    ``dt_proj_weight`` ``[heads, I/heads, R]``; ``dt_proj_bias``, ``D``
    ``[heads, I/heads]``; ``A_log`` ``[heads, I/heads, N]``. Per head::

        [δ | B | C] = x_proj_weight[h] · x_h
        Δ_h = softplus(dt_proj_weight[h] · δ + dt_proj_bias[h])
        h_t = exp(Δ ⊙ A) ⊙ h_{t−1} + (Δ ⊙ x_h) ⊗ B_t,   y = h_t · C_t + D ⊙ x_h

    (the scan is :func:`selective_scan` with per-head ``B``/``C``), then
    ``out_proj(y ⊙ silu(z))`` over all heads.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        d_state: int,
        d_conv: int,
        time_step_rank: int,
        num_heads: int,
        use_conv_bias: bool = True,
        use_bias: bool = False,
    ):
        super().__init__()
        if intermediate_size % num_heads:
            raise ValueError(f"intermediate size {intermediate_size} is not a multiple of {num_heads} heads")
        I, H, R, N = intermediate_size, num_heads, time_step_rank, d_state
        hd = I // H
        self.intermediate_size, self.d_state, self.time_step_rank, self.num_heads = I, N, R, H
        self.in_proj = nn.Linear(hidden_size, 2 * I, bias=use_bias)
        self.conv1d = nn.Conv1d(I, I, d_conv, groups=I, bias=use_conv_bias)
        self.x_proj_weight = mx.zeros((H, R + 2 * N, hd))
        self.dt_proj_weight = mx.zeros((H, hd, R))
        self.dt_proj_bias = mx.zeros((H, hd))
        self.A_log = mx.log(mx.broadcast_to(mx.arange(1, N + 1, dtype=mx.float32), (H, hd, N)))
        self.D = mx.ones((H, hd))
        self.out_proj = nn.Linear(I, hidden_size, bias=use_bias)

    def split_in_proj(self, xz: mx.array) -> tuple[mx.array, mx.array]:
        pairs = xz.reshape(*xz.shape[:-1], self.intermediate_size, 2)  # interleaved [x_c, z_c]
        return pairs[..., 0], pairs[..., 1]

    def _per_head(self, v: mx.array, w: mx.array) -> mx.array:
        """``v`` ``[b, T, heads, d]`` times each head's ``w[h]ᵀ`` (``[heads, out, d]``)
        -> ``[b, T, heads, out]``: one batched matmul over heads."""
        b, T, H, d = v.shape
        out = v.transpose(2, 0, 1, 3).reshape(H, b * T, d) @ w.swapaxes(1, 2).astype(v.dtype)
        return out.reshape(H, b, T, -1).transpose(1, 2, 0, 3)

    def ssm_inputs(self, x: mx.array):
        b, T, I = x.shape
        H, R, N = self.num_heads, self.time_step_rank, self.d_state
        dbc = self._per_head(x.reshape(b, T, H, I // H), self.x_proj_weight)  # [b, T, H, R + 2N]
        delta, Bm, Cm = dbc[..., :R], dbc[..., R : R + N], dbc[..., R + N :]
        dt = self._per_head(delta, self.dt_proj_weight).astype(mx.float32)  # [b, T, H, I/H]
        dt = nn.softplus(dt + self.dt_proj_bias.astype(mx.float32)).reshape(b, T, I)
        A = -mx.exp(self.A_log.astype(mx.float32)).reshape(I, N)
        return dt, A, Bm, Cm, self.D.reshape(I)
