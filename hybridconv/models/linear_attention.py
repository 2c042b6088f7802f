"""Linear attention with exponential gates and a max stabiliser: one core for
xLSTM's mLSTM and RWKV-4's WKV; and the chunking helpers it shares with the
gated delta rule (:mod:`hybridconv.models.gated_delta`).

The recurrence
==============
Per head a matrix memory ``C ∈ R^{Dk×Dv}`` and a normaliser ``n ∈ R^{Dk}``,
with a log forget gate ``f̃_t ≤ 0`` (``log f_t``) and an *unbounded* log input
gate ``ĩ_t`` (the input gate is ``exp(ĩ_t)``: exponential gating)::

    C_t = f_t C_{t-1} + exp(ĩ_t) k_t v_tᵀ         n_t = f_t n_{t-1} + exp(ĩ_t) k_t
    num_t = C_tᵀ q_t                               den_t = n_tᵀ q_t

Written out, ``num_t = Σ_{s≤t} exp(F_t − F_s + ĩ_s) (q_t·k_s) v_s`` with
``F_t = Σ_{r≤t} f̃_r``: causal linear attention whose weights are an input
gate decayed by the forget gates (Katharopoulos et al. 2020; Yang et al. 2023,
"Gated Linear Attention", arXiv:2312.06635).

* **mLSTM** (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory",
  arXiv:2405.04517, eqs. 19–27; xLSTM-7B: Beck et al. 2025, arXiv:2503.13427):
  ``f̃ = logsigmoid(f_preact)``, ``ĩ = i_preact``, ``q`` scaled by
  ``Dk^-1/2``, and ``h_t = num_t / max(|den_t|, 1)`` (up to ``eps``: see
  the stabiliser).
* **WKV** (RWKV-4: Peng et al. 2023, "RWKV: Reinventing RNNs for the
  Transformer Era", arXiv:2305.13048, eq. 14): one head per channel with
  ``Dk = Dv = 1`` and no query or key vectors (every ``q·k`` is 1: "scalar
  keys" below), ``f̃ = −exp(time_decay)`` (constant), ``ĩ_t = k_t`` (the
  channel's key), and the output reads the state *before* step ``t`` writes,
  adding the current token with the bonus ``u = time_first`` instead::

      wkv_t = (Σ_{s<t} e^{−(t−1−s)w + k_s} v_s + e^{u + k_t} v_t)
            / (Σ_{s<t} e^{−(t−1−s)w + k_s}     + e^{u + k_t})

  (``bonus=u`` here: row ``t`` uses ``F_{t−1}`` and the diagonal weight
  ``exp(ĩ_t + u)``).

Stabiliser
----------
``exp(ĩ)`` overflows float32 (``ĩ`` is a raw pre-activation, a key), so the
states are stored scaled by ``exp(−m)`` with a running maximum of the log
weights (Milakov & Gimelshein's online softmax; the xLSTM paper's ``m_t``)::

    m_t = max(f̃_t + m_{t−1}, ĩ_t)
    C_t = exp(f̃_t + m_{t−1} − m_t) C_{t−1} + exp(ĩ_t − m_t) k_t v_tᵀ   (stored; true C = e^{m_t}·C_t)

WKV's ratio ``num/den`` does not depend on ``m``. mLSTM's output does, because
the reference adds ``eps`` to the stabilised denominator:
``h_t = num_t / (max(|den_t|, exp(−m_t)) + eps)`` (transformers' and NX-AI's
kernels) = ``ñum / (max(|ñden|, 1) + eps·e^{m_t})`` in true terms, so ``m_t``
is part of the function and is computed exactly as the reference does: the
running maximum above, from ``m_0 = 0`` (mLSTM) or ``−inf`` (WKV: "no state"),
which the chunked form reproduces (``m_t = max(F_t + m_0, max_{s≤t} L_ts)`` is
the same maximum).

The normaliser is carried as an extra value column: ``v' = [v | 1]`` makes
``C' = [C | n]`` and ``num'_t = [num_t | den_t]``, one matmul for both; the
state of a head is ``(C' [Dk, Dv+1], m)``.

Chunked form (prefill) and step form (decode)
---------------------------------------------
The sequence is cut into chunks of ``Q`` steps (the tail padded with
``ĩ = −inf``, ``f̃ = 0``, ``q = k = v = 0``: no write, no decay, outputs
dropped). Within a chunk starting from state ``(C'_0, m_0)``, with ``G`` the
cumulative ``f̃`` inside the chunk and ``L_ts = G_t − G_s + ĩ_s`` for ``s ≤ t``
(``−inf`` above; the row uses the exclusive ``G_{t−1}`` and the diagonal
``ĩ_t + u`` with a bonus)::

    μ_t   = max_s L_ts                                  (intra-chunk maximum)
    m_t   = max(G_t + m_0, μ_t)
    num'_t = e^{G_t + m_0 − m_t} q_tᵀ C'_0 + e^{μ_t − m_t} Σ_s e^{L_ts − μ_t} (q_t·k_s) v'_s
    a_s   = G_Q − G_s + ĩ_s,  m_Q = max(G_Q + m_0, max_s a_s)
    C'_Q  = e^{G_Q + m_0 − m_Q} C'_0 + e^{max a − m_Q} Σ_s e^{a_s − max a} k_s v'_sᵀ

Everything but the carry of ``(C', m)`` from chunk to chunk is computed for
groups of chunks at once (:data:`GROUP_ELEMENTS` bounds the ``[Q, Q]``
weights and ``[Dk, Dv+1]`` chunk states of a group); the carry is a Python
loop over chunks (``T / Q`` iterations), the outputs are then formed for the
whole group from the chunks' starting states. :func:`exp_gated_step` is the recurrence itself, one step at
a time, for decoding; the tests check both against each other and against
transformers' kernels.

Shared with the gated delta rule
--------------------------------
:func:`to_chunks` (pad and cut ``[b, T, H, …]`` into ``[b, H, n, Q, …]``) and
:func:`causal_log_decays` (``G_i − G_j`` on and below the diagonal, ``−inf``
above: the pairwise decays, never formed as ``exp(G_i)·exp(−G_j)``) are the
same steps in both cores. The delta rule adds its UT transform on top and needs
no stabiliser (its decays are ``≤ 1`` and it has no exponential input gate);
the mLSTM/WKV weights need the maximum and no triangular solve, so the two
stay two functions on these shared pieces.

Conventions: shapes ``q, k: [b, T, H, Dk]`` (or ``None``: scalar keys),
``v: [b, T, H, Dv]``, ``log_f, log_i: [b, T, H]``, ``bonus: [H]`` or ``None``;
computation and results float32.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx

# Elements of one intermediate of a group of chunks ([b, H, chunks, Q, Q]
# weights, [b, H, chunks, Dk, Dv+1] chunk states; 32 MiB in float32): bounds
# memory for long prompts, wide per-channel heads (WKV: one head per channel)
# and large heads (xLSTM-7B: 256 x 512), while short prompts of few heads form
# one group.
GROUP_ELEMENTS = 1 << 23


def to_chunks(x: mx.array, size: int, fill: float = 0.0) -> mx.array:
    """``[b, T, H, ...]`` -> ``[b, H, n, size, ...]``, the tail padded with ``fill``
    up to ``n · size`` steps."""
    b, T, H = x.shape[:3]
    pad = (-T) % size
    n = (T + pad) // size
    x = mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    x = x.reshape(b, n, size, H, *x.shape[3:])
    return mx.moveaxis(x, 3, 1)


def causal_log_decays(G: mx.array, rows: Optional[mx.array] = None, strict: bool = False) -> mx.array:
    """``out[..., i, j] = rows_i − G_j`` for ``j ≤ i`` (``j < i`` with ``strict``),
    ``−inf`` elsewhere; ``rows`` defaults to ``G`` (the log-decay from step ``j``
    to step ``i`` within a chunk, ``G`` the cumulative log-decay)."""
    C = G.shape[-1]
    idx = mx.arange(C)
    mask = idx[:, None] > idx[None, :] if strict else idx[:, None] >= idx[None, :]
    rows = G if rows is None else rows
    return mx.where(mask, rows[..., :, None] - G[..., None, :], -mx.inf)


def _prepare(q, k, v, log_f, log_i, state, scale, m0):
    f32 = mx.float32
    v, log_f, log_i = (x.astype(f32) for x in (v, log_f, log_i))
    b, _, H, Dv = v.shape
    if (q is None) != (k is None):
        raise ValueError("q and k must both be given or both be None (scalar keys)")
    if q is not None:
        q, k = q.astype(f32), k.astype(f32)
        q = q * (q.shape[-1] ** -0.5 if scale is None else scale)
    dk = 1 if k is None else k.shape[-1]
    v1 = mx.concatenate([v, mx.ones((*v.shape[:-1], 1), dtype=f32)], axis=-1)  # [v | 1]
    if state is None:
        C = mx.zeros((b, H, dk, Dv + 1), dtype=f32)
        m = mx.full((b, H), m0, dtype=f32)
    else:
        C, m = state[0].astype(f32), state[1].astype(f32)
    return q, k, v1, log_f, log_i, C, m


def exp_gated_step(
    q: Optional[mx.array],
    k: Optional[mx.array],
    v: mx.array,
    log_f: mx.array,
    log_i: mx.array,
    state=None,
    *,
    bonus: Optional[mx.array] = None,
    scale: Optional[float] = None,
    m0: float = 0.0,
):
    """The recurrence one step at a time (decode; loops over ``T``, meant for
    ``T = 1``). Arguments as :func:`exp_gated_chunked`; returns ``(num [b, T, H,
    Dv], den [b, T, H], m [b, T, H], state)``, float32."""
    q, k, v1, log_f, log_i, C, m = _prepare(q, k, v, log_f, log_i, state, scale, m0)
    outs, ms = [], []
    for t in range(v1.shape[1]):
        lf, li, vt = log_f[:, t], log_i[:, t], v1[:, t]  # [b, H], [b, H], [b, H, Dv+1]
        kv = vt[..., None, :] if k is None else k[:, t][..., None] * vt[..., None, :]  # [b, H, Dk, Dv+1]
        m_new = mx.maximum(lf + m, li)
        decay = mx.exp(lf + m - m_new)[..., None, None]
        C_new = decay * C + mx.exp(li - m_new)[..., None, None] * kv
        if bonus is None:  # read after the write
            out = C_new[..., 0, :] if q is None else (q[:, t][..., None, :] @ C_new)[..., 0, :]
            m_out = m_new
        else:  # read the state before the write, plus the current token with weight e^{ĩ + u}
            m_out = mx.maximum(m, li + bonus)
            old = C[..., 0, :] if q is None else (q[:, t][..., None, :] @ C)[..., 0, :]
            qk = 1.0 if q is None else (q[:, t] * k[:, t]).sum(-1, keepdims=True)
            out = mx.exp(m - m_out)[..., None] * old + (mx.exp(li + bonus - m_out)[..., None] * qk) * vt
        outs.append(out)
        ms.append(m_out)
        C, m = C_new, m_new
    out = mx.stack(outs, axis=1)
    return out[..., :-1], out[..., -1], mx.stack(ms, axis=1), (C, m)


def exp_gated_chunked(
    q: Optional[mx.array],
    k: Optional[mx.array],
    v: mx.array,
    log_f: mx.array,
    log_i: mx.array,
    state=None,
    chunk_size: int = 64,
    *,
    bonus: Optional[mx.array] = None,
    scale: Optional[float] = None,
    m0: float = 0.0,
):
    """Chunked evaluation of the stabilised exponentially gated recurrence (see the
    module docstring) over a whole sequence.

    ``q, k: [b, T, H, Dk]`` or both ``None`` (scalar keys: every ``q·k`` is 1,
    ``Dk = 1``); ``v: [b, T, H, Dv]``; ``log_f``: log forget gate, ``log_i``: log
    input gate, both ``[b, T, H]``; ``state``: ``(C' [b, H, Dk, Dv+1], m [b, H])``
    or ``None`` (zeros, ``m = m0``); ``bonus``: ``[H]`` (RWKV's ``u``: read
    before write) or ``None``; ``q`` is scaled by ``scale`` (default
    ``Dk^-1/2``; scalar keys: none). Returns ``(num [b, T, H, Dv], den [b, T, H],
    m [b, T, H], state)``, float32, each step's ``num``/``den`` stabilised by its
    ``m``. Vectorised within groups of chunks; loops over chunks only.
    """
    q, k, v1, log_f, log_i, C, m = _prepare(q, k, v, log_f, log_i, state, scale, m0)
    b, T, H, Dv1 = v1.shape
    Q = min(chunk_size, T)
    lf = to_chunks(log_f, Q)  # [b, H, n, Q]
    li = to_chunks(log_i, Q, -mx.inf)  # padded steps write nothing
    vc = to_chunks(v1, Q)  # [b, H, n, Q, Dv+1]
    qc = kc = None
    if k is not None:
        qc, kc = to_chunks(q, Q), to_chunks(k, Q)
    n = lf.shape[2]
    dk = 1 if k is None else k.shape[-1]
    group = max(1, GROUP_ELEMENTS // (b * H * max(Q * Q, dk * Dv1, Q * Dv1)))
    eye = mx.eye(Q, dtype=mx.bool_)
    nums, ms = [], []
    for g0 in range(0, n, group):
        sl = (slice(None), slice(None), slice(g0, g0 + group))
        f_, i_, v_ = lf[sl], li[sl], vc[sl]
        G = mx.cumsum(f_, axis=-1)
        # Intra-chunk log weights L_ts and their row maxima (state-independent).
        if bonus is None:
            rows = G
            L = causal_log_decays(G) + i_[..., None, :]
        else:
            rows = mx.cumsum(f_, axis=-1, inclusive=False)  # G_{t-1}: read before write
            L = causal_log_decays(G, rows, strict=True) + i_[..., None, :]
            L = mx.where(eye, (i_ + bonus[:, None, None])[..., None], L)
        mu = L.max(axis=-1)  # [b, H, g, Q]
        W = mx.exp(L - mu[..., None])
        if kc is not None:
            W = W * (qc[sl] @ kc[sl].swapaxes(-1, -2))
        intra = W @ v_  # [b, H, g, Q, Dv+1]
        # What each chunk writes into the state, relative to its own maximum.
        a = G[..., -1:] - G + i_
        a_max = a.max(axis=-1)  # [b, H, g]
        w = mx.exp(a - a_max[..., None])
        if kc is not None:
            kv = (kc[sl] * w[..., None]).swapaxes(-1, -2) @ v_  # [b, H, g, Dk, Dv+1]
        else:
            kv = (w[..., None, :] @ v_)  # [b, H, g, 1, Dv+1]
        G_end = G[..., -1]
        starts, m_starts = [], []
        for j in range(f_.shape[2]):  # the carry: a loop over chunks, not steps
            starts.append(C)
            m_starts.append(m)
            m_new = mx.maximum(G_end[:, :, j] + m, a_max[:, :, j])
            C = (mx.exp(G_end[:, :, j] + m - m_new)[..., None, None] * C
                 + mx.exp(a_max[:, :, j] - m_new)[..., None, None] * kv[:, :, j])
            m = m_new
        C0 = mx.stack(starts, axis=2)  # [b, H, g, Dk, Dv+1]
        m_in = rows + mx.stack(m_starts, axis=2)[..., None]  # [b, H, g, Q]
        m_t = mx.maximum(m_in, mu)
        inter = C0 if qc is None else qc[sl] @ C0  # scalar keys: [b, H, g, 1, Dv+1] broadcasts
        out = mx.exp(m_in - m_t)[..., None] * inter + mx.exp(mu - m_t)[..., None] * intra
        nums.append(out)
        ms.append(m_t)
    out = mx.concatenate(nums, axis=2).reshape(b, H, -1, Dv1)[:, :, :T]
    m_all = mx.concatenate(ms, axis=2).reshape(b, H, -1)[:, :, :T]
    out = out.transpose(0, 2, 1, 3)
    return out[..., :-1], out[..., -1], m_all.transpose(0, 2, 1), (C, m)


def exp_gated(q, k, v, log_f, log_i, state=None, chunk_size: int = 64, *, bonus=None, scale=None, m0: float = 0.0):
    """Dispatch: one decode step through :func:`exp_gated_step`, anything longer
    through :func:`exp_gated_chunked` (same results, see the tests)."""
    if v.shape[1] == 1:
        return exp_gated_step(q, k, v, log_f, log_i, state, bonus=bonus, scale=scale, m0=m0)
    return exp_gated_chunked(q, k, v, log_f, log_i, state, chunk_size, bonus=bonus, scale=scale, m0=m0)


def mlstm_readout(num: mx.array, den: mx.array, m: mx.array, eps: float) -> mx.array:
    """mLSTM's output ``num / (max(|den|, exp(-m)) + eps)`` (stabilised terms;
    ``num [b, T, H, Dv]``, ``den``, ``m`` ``[b, T, H]``), float32."""
    return num / (mx.maximum(mx.abs(den), mx.exp(-m)) + eps)[..., None]


NO_STATE = -math.inf  # WKV's initial stabiliser: an empty state (transformers: -1e38)
