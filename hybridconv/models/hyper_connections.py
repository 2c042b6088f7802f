"""Hyper-connections: a residual stream widened to ``n`` streams.

Hyper-connections (Zhu et al. 2024, "Hyper-Connections", arXiv:2409.19606)
replace the residual ``h + f(h)`` by ``n`` parallel streams ``H ∈ R^{n×d}``
per token: a block reads a learned mixture of the streams, and its output is
written back into every stream with learned weights while the streams are
also mixed among themselves. The blocks keep their width ``d``; only the
residual carries ``n·d``. The embedding starts every stream as the token
embedding; after the last block the streams are reduced to one again before
the head. Here a block's input and output (what verify compares with
transformers' decoder layers) is the stream tensor flattened to ``[B, T, n·d]``
(stream-major: ``[stream 0 | stream 1 | …]``).

Two parametrisations are used:

Gated residual (Qwen4-Exp): :class:`GatedResidual`
    ``Ĥ = RMSNorm_d(H)`` per stream (one scale over all ``n·d`` channels,
    stored zero-centred and folded by the converter), then::

        a = σ(up(silu(down(Ĥ) / n)))                 ∈ (0, 1)^{n×d}    (low rank)
        x = mean_s (a_s ⊙ Ĥ_s)                        the block's input (d)
        w = 2 σ(inject(Ĥ) / n)                        ∈ (0, 2)^n
        H' = H + w ⊗ f(x)                              each stream gets the output, scaled

    The block's input is thus already normalised (no separate pre-norm). The
    final reduction is the same module without ``inject``: ``x`` feeds the head.
Manifold-constrained hyper-connections (mHC; DeepSeek-V4, GLM-5.3-Flash):
:class:`ManifoldHyperConnection`
    From the flattened streams, RMS-normalised without a scale,
    ``z = fn · rms(H)`` (``(2 + n)·n`` outputs) gives, with the per-group
    scalars ``scale`` and biases ``base``::

        pre  = σ(z_pre · scale_0 + base_pre) + ε                 (n)
        post = 2 σ(z_post · scale_1 + base_post)                  (n)
        comb = Sinkhorn(softmax_rows(z_comb · scale_2 + base_comb) + ε)   (n × n)
        x = Σ_s pre_s H_s                              the block's input
        H'_i = post_i f(x) + Σ_j comb_{j,i} H_j

    ``comb`` is pushed towards a doubly stochastic matrix (rows and columns
    summing to 1, the "manifold" constraint that keeps the mixing
    norm-preserving) by Sinkhorn-Knopp iterations (Sinkhorn & Knopp 1967): a
    column normalisation, then ``iters − 1`` times rows then columns, each
    ``m / (sum + ε)`` — transformers' order and ε placement, kept exactly.
    Computed in float32 (``base`` and ``scale`` are float32 parameters).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class GroupRMSNorm(nn.Module):
    """RMSNorm over each group of ``group`` channels of an ``n·group`` vector,
    one scale over all of them (``weight``: the plain scale; Qwen4-Exp stores
    ``1 + w`` zero-centred, folded by the converter). Float32 inside, the
    input's dtype out."""

    def __init__(self, dims: int, group: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.group, self.eps = group, eps

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        y = mx.fast.rms_norm(x.astype(mx.float32).reshape(*shape[:-1], -1, self.group), None, self.eps)
        return (y.reshape(shape) * self.weight.astype(mx.float32)).astype(x.dtype)


class GatedResidual(nn.Module):
    """Qwen4-Exp's hyper-connection (module docstring), the checkpoint's names
    (``hc_norm``, ``input_mix_weight_down``, ``input_mix_weight_up``,
    ``block_inject_weight``). ``__call__(H) -> (x, w)``: the block's input and
    the injection weights ``[B, T, n]`` (``None`` with ``combine=False``, the
    final reduction); :meth:`inject` writes a block's output back."""

    def __init__(self, hidden: int, streams: int, rank: int, eps: float, combine: bool = True):
        super().__init__()
        self.hidden, self.streams = hidden, streams
        width = hidden * streams
        self.hc_norm = GroupRMSNorm(width, hidden, eps)
        self.input_mix_weight_down = nn.Linear(width, rank, bias=False)
        self.input_mix_weight_up = nn.Linear(rank, width, bias=False)
        if combine:
            self.block_inject_weight = nn.Linear(width, streams, bias=False)

    def __call__(self, h: mx.array):
        n, d = self.streams, self.hidden
        hn = self.hc_norm(h)
        a = mx.sigmoid(self.input_mix_weight_up(nn.silu(self.input_mix_weight_down(hn) / n)))
        x = (a.reshape(*a.shape[:-1], n, d) * hn.reshape(*hn.shape[:-1], n, d)).mean(axis=-2)
        if "block_inject_weight" not in self:
            return x, None
        return x, 2 * mx.sigmoid(self.block_inject_weight(hn) / n)

    def inject(self, h: mx.array, y: mx.array, w: mx.array) -> mx.array:
        """``H + w ⊗ y``: the output ``y [B, T, d]`` added to every stream, scaled by ``w [B, T, n]``."""
        return h + (y[..., None, :] * w[..., None]).reshape(h.shape)


def sinkhorn(m: mx.array, iters: int, eps: float) -> mx.array:
    """transformers' Sinkhorn-Knopp on ``m [..., n, n]`` (positive): columns,
    then ``iters − 1`` times rows and columns, each divided by ``sum + eps``."""
    m = m / (m.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):  # a loop over iterations, not time
        m = m / (m.sum(axis=-1, keepdims=True) + eps)
        m = m / (m.sum(axis=-2, keepdims=True) + eps)
    return m


class ManifoldHyperConnection(nn.Module):
    """mHC (module docstring) with transformers' parameter names ``fn``
    ``[(2+n)·n, n·d]``, ``base [(2+n)·n]``, ``scale [3]``. ``__call__(H) ->
    (x, post, comb)``; :meth:`merge` forms the new streams."""

    def __init__(self, hidden: int, streams: int, eps: float, norm_eps: float, iters: int):
        super().__init__()
        n = streams
        self.hidden, self.streams, self.eps, self.norm_eps, self.iters = hidden, n, eps, norm_eps, iters
        self.fn = mx.zeros(((2 + n) * n, n * hidden))
        self.base = mx.zeros(((2 + n) * n,))
        self.scale = mx.ones((3,))

    def __call__(self, h: mx.array):
        n, d = self.streams, self.hidden
        flat = h.astype(mx.float32)
        z = mx.fast.rms_norm(flat, None, self.norm_eps) @ self.fn.astype(mx.float32).T
        base, scale = self.base.astype(mx.float32), self.scale.astype(mx.float32)
        pre = mx.sigmoid(z[..., :n] * scale[0] + base[:n]) + self.eps
        post = 2 * mx.sigmoid(z[..., n : 2 * n] * scale[1] + base[n : 2 * n])
        comb = z[..., 2 * n :].reshape(*z.shape[:-1], n, n) * scale[2] + base[2 * n :].reshape(n, n)
        comb = sinkhorn(mx.softmax(comb, axis=-1, precise=True) + self.eps, self.iters, self.eps)
        streams = h.reshape(*h.shape[:-1], n, d)
        x = (pre[..., None] * streams.astype(mx.float32)).sum(axis=-2).astype(h.dtype)
        return x, post, comb

    def merge(self, h: mx.array, y: mx.array, post: mx.array, comb: mx.array) -> mx.array:
        """``H'_i = post_i y + Σ_j comb_{j,i} H_j`` in the activations' dtype, flattened."""
        n, d = self.streams, self.hidden
        streams = h.reshape(*h.shape[:-1], n, d)
        out = post.astype(h.dtype)[..., None] * y[..., None, :] + comb.astype(h.dtype).swapaxes(-1, -2) @ streams
        return out.reshape(h.shape)
