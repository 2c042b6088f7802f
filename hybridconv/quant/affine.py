"""Affine quantization that minimises each group's squared error, in MLX's format.

MLX's ``mx.quantize`` (and so ``mlx_lm.convert``) maps each group of
``group_size`` weights linearly from ``[min, max]`` onto ``0 … 2^bits − 1``:
``w ≈ scale · q + bias``. The extremes decide the step, so one outlier widens
every other weight's rounding error, and the scale and bias are then rounded to
the output dtype (bfloat16: 8 bits of mantissa) after the codes were chosen.

Here, per group, several ranges are tried — MLX's own result and the min/max
range shrunk about its middle (``SHRINK``) — and for each, the codes are
assigned, ``scale`` and ``bias`` refitted by least squares to those codes
(the affine fit that minimises ``‖w − (scale·q + bias)‖²`` for fixed ``q``),
rounded to the output dtype, and the codes assigned again with the rounded
values; the candidate with the smallest squared error against the *float32
source* weights wins (MLX's own candidate included, so a group is never worse
than ``mx.quantize`` gives). The codes are quantized from the source values,
not from a copy first rounded to the output dtype. The stored format — packed
codes, scales, biases — is MLX's, so ``mx.dequantize``, ``nn.QuantizedLinear``
and mlx-lm read it unchanged. (The same idea as llama.cpp's ``make_qkx``
quantizers: fit the affine map to the codes rather than to the extremes.)
"""

from __future__ import annotations

import os

import numpy as np

from ..safetensors_io import from_float32, to_float32

# Fractions of the min/max half-range tried as the quantization range (1.0: min/max).
# Mild on purpose: shrinking to 0.7 lowers the squared error further at 2-3 bits,
# but clips the outlier weights that matter most (PLaMo-2's tiny fixture at 3 bits:
# mean KL 0.0249 against mlx-lm's 0.0242 with shrinks down to 0.70; 0.0216 with these).
SHRINK = (1.0, 0.95, 0.9)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to ``dtype`` ("F32", "F16", "BF16"), returned as float32."""
    return to_float32(from_float32(np.ascontiguousarray(x, dtype=np.float32), dtype), dtype)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``[rows, cols]`` (0 … 2^bits − 1) packed as MLX packs them: each row a
    little-endian bit stream, ``bits`` per code, read as uint32 words."""
    rows, cols = q.shape
    if 32 % bits == 0:  # whole codes per word: shift and add
        per = 32 // bits
        shifts = (np.arange(per, dtype=np.uint32) * bits)
        return (q.astype(np.uint32).reshape(rows, cols // per, per) << shifts).sum(axis=-1, dtype=np.uint32)
    b = ((q[..., None].astype(np.uint32) >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    by = np.packbits(b.reshape(rows, cols * bits // 8, 8), axis=-1, bitorder="little").reshape(rows, -1)
    return np.ascontiguousarray(by).view(np.uint32)


def _codes(g, s, b, qmax, out):
    """Codes of the groups ``g`` for scale ``s`` and bias ``b`` (per group), into ``out``."""
    inv = np.divide(1, s, out=np.ones_like(s), where=s != 0)
    np.subtract(g, b, out=out)
    np.multiply(out, inv, out=out)
    np.rint(out, out=out)
    return np.clip(out, 0, qmax, out=out)


def _error(g, s, b, qmax, buf):
    """Each group's squared error with scale ``s`` and bias ``b`` (``buf``: scratch)."""
    q = _codes(g, s, b, qmax, buf)
    np.multiply(q, s, out=buf)
    np.add(buf, b, out=buf)
    np.subtract(g, buf, out=buf)
    np.square(buf, out=buf)
    return buf.sum(axis=1, keepdims=True)


def _choose(g, s0, b0, qmax, dtype):
    """Per group of ``g [groups, group_size]``: the best (scale, bias) among MLX's
    (``s0``, ``b0``) and the refitted shrunk ranges (module docstring)."""
    buf = np.empty_like(g)
    best_s, best_b = s0, b0
    best_e = _error(g, s0, b0, qmax, buf)
    lo, hi = g.min(axis=1, keepdims=True), g.max(axis=1, keepdims=True)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    mean_w = g.mean(axis=1, keepdims=True)
    centred = g - mean_w
    for shrink in SHRINK:
        s = 2 * half * np.float32(shrink) / qmax
        q = _codes(g, s, mid - half * np.float32(shrink), qmax, buf)
        # least-squares scale and bias for these codes: s = cov(q, w) / var(q)
        mq = q.mean(axis=1, keepdims=True)
        np.subtract(q, mq, out=q)
        var = np.einsum("ij,ij->i", q, q)[:, None]
        cov = np.einsum("ij,ij->i", q, centred)[:, None]
        s = np.where(var > 0, cov / np.where(var > 0, var, np.float32(1.0)), s)
        b = mean_w - s * mq
        s, b = round_to(s, dtype), round_to(b, dtype)
        e = _error(g, s, b, qmax, buf)
        better = e < best_e
        best_e = np.where(better, e, best_e)
        best_s = np.where(better, s, best_s)
        best_b = np.where(better, b, best_b)
    # NaN/Inf weights (quantized only with allow_nonfinite) must not spill into other codes
    q = np.nan_to_num(_codes(g, best_s, best_b, qmax, buf), nan=0.0).astype(np.uint32)
    return q, best_s, best_b


# Groups per piece: bounded scratch memory (about 4 x 4 MB per piece), and pieces
# run on several threads (numpy releases the GIL inside its loops).
PIECE_ELEMENTS = 1 << 20


def quantize_rows(w: np.ndarray, bits: int, group_size: int, dtype: str):
    """Quantize float32 ``w [rows, cols]``: returns ``(packed uint32 [rows, cols·bits/32],
    scales, biases)``, the last two ``[rows, cols/group_size]`` as stored in ``dtype``."""
    import mlx.core as mx

    rows, cols = w.shape
    qmax = np.float32(2**bits - 1)
    g = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, group_size)
    # MLX's own range (mx.quantize of the weights cast to the output dtype) is one candidate
    mx_dtype = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}[dtype]
    _, s0, b0 = mx.quantize(mx.array(w).astype(mx_dtype), group_size=group_size, bits=bits)
    s0 = np.array(s0.astype(mx.float32)).reshape(-1, 1)
    b0 = np.array(b0.astype(mx.float32)).reshape(-1, 1)
    step = max(1, PIECE_ELEMENTS // group_size)
    pieces = [slice(i, i + step) for i in range(0, g.shape[0], step)]
    if len(pieces) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(len(pieces), os.cpu_count() or 1, 4)) as pool:
            parts = list(pool.map(lambda sl: _choose(g[sl], s0[sl], b0[sl], qmax, dtype), pieces))
    else:
        parts = [_choose(g, s0, b0, qmax, dtype)]
    q = np.concatenate([p[0] for p in parts])
    ng = cols // group_size
    scales = np.concatenate([p[1] for p in parts]).reshape(rows, ng)
    biases = np.concatenate([p[2] for p in parts]).reshape(rows, ng)
    return pack(q.reshape(rows, cols), bits), from_float32(scales, dtype), from_float32(biases, dtype)
