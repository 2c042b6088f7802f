"""GPTQ: Hessian-based error compensation (Frantar et al. 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers",
arXiv:2210.17323), in MLX's affine format.

For a linear layer ``y = W x`` and calibration inputs ``X`` (tokens × in), the
layer's output error is ``‖(W − Ŵ) Xᵀ‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ)`` with
``H = XᵀX``. GPTQ quantizes the input columns one at a time, left to right, and
after each column spreads its rounding error over the columns not yet quantized,
in proportion to ``H⁻¹`` (the optimal update of Optimal Brain Surgeon), using the
upper Cholesky factor ``U`` of ``H⁻¹``: quantize column ``i``, ``e = (w_i − q_i) /
U_ii``, ``W[:, i+1:] −= e ⊗ U[i, i+1:]`` — in blocks of :data:`BLOCK` columns, the
updates beyond a block applied once per block (the "lazy batch" form).

MLX's format fixes groups of ``group_size`` consecutive input columns, each with a
scale and bias per row. A group's scale and bias are chosen when GPTQ reaches
the group, from the weights as updated so far, by :func:`hybridconv.quant.affine.
quantize_rows` (the error-minimising range search, rounded to the output dtype);
the group's columns are then rounded on that grid one at a time. Codes, scales
and biases come out exactly as ``mx.quantize`` stores them.

``H`` is damped by :data:`DAMP` × its mean diagonal (as the reference
implementation) and inputs never seen (zero diagonal) get a unit diagonal.
Computed in float64 with numpy: a layer's ``H`` is ``in × in`` (7680² × 8 bytes
= 0.47 GB for the largest RecurrentGemma-2B matrix), one layer at a time.
"""

from __future__ import annotations

import numpy as np

from ..safetensors_io import to_float32
from .affine import pack, quantize_rows

DAMP = 0.01
BLOCK = 128


def _lower_inverse(L: np.ndarray) -> np.ndarray:
    """Inverse of the lower-triangular ``L``, by halves: inv([[A, 0], [C, D]]) =
    [[A⁻¹, 0], [−D⁻¹·C·A⁻¹, D⁻¹]] — matrix products (n³/3 multiply-adds in all) instead
    of a general LU inverse (numpy has no triangular inverse): 4x faster at n = 7680."""
    n = L.shape[0]
    if n <= 256:
        return np.tril(np.linalg.inv(L))  # exactly triangular (LU leaves 1e-17s above)
    k = n // 2
    a_inv, d_inv = _lower_inverse(L[:k, :k]), _lower_inverse(L[k:, k:])
    out = np.zeros_like(L)
    out[:k, :k], out[k:, k:] = a_inv, d_inv
    out[k:, :k] = -(d_inv @ (L[k:, :k] @ a_inv))
    return out


def inverse_cholesky(H: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``UᵀU = (H + λI)⁻¹``, float64).

    With ``J`` the order reversal and ``J·H·J = M·Mᵀ`` (lower ``M``):
    ``H⁻¹ = (J·M⁻¹·J)ᵀ·(J·M⁻¹·J)``, and ``J·M⁻¹·J`` is upper with a positive diagonal:
    one Cholesky factorisation and one triangular inverse, no second factorisation."""
    H = np.array(H, dtype=np.float64, copy=True)
    d = np.diag(H).copy()
    dead = d <= 0
    H[dead, dead] = 1.0
    lam = damp * float(np.mean(np.diag(H)))
    H[np.diag_indices_from(H)] += lam
    for _ in range(6):  # more damping until positive definite (near-singular H from few tokens)
        try:
            M = np.linalg.cholesky(np.ascontiguousarray(H[::-1, ::-1]))
            break
        except np.linalg.LinAlgError:
            H[np.diag_indices_from(H)] += lam
            lam *= 2
    else:
        raise np.linalg.LinAlgError("Hessian is not positive definite even after damping")
    return np.ascontiguousarray(_lower_inverse(M)[::-1, ::-1])


def _group_grid(w: np.ndarray, bits: int, group_size: int, dtype: str):
    """(scale, bias) per row for one group of columns ``w [rows, group_size]``:
    the range search of quant/affine.py, values as stored in ``dtype`` (float32 here)."""
    _, sc, bi = quantize_rows(np.ascontiguousarray(w, dtype=np.float32), bits, group_size, dtype)
    return to_float32(sc, dtype).reshape(-1), to_float32(bi, dtype).reshape(-1)


# Rows of ``W`` per piece: GPTQ's compensation runs along a row (its columns), so rows are
# independent and go a piece at a time, the float64 working copy bounded (a 256k-row
# tied embedding would otherwise take 5 GB in float64).
ROW_BYTES = 1 << 28


def gptq(W, H: np.ndarray, bits: int, group_size: int, dtype: str, damp: float = DAMP,
         dequantized: bool = True):
    """GPTQ of ``W [rows, cols]`` (numpy, or an MLX array read a piece of rows at a time)
    with Hessian ``H [cols, cols]``. Returns ``(packed uint32 [rows, cols·bits/32], scales
    [rows, groups], biases [rows, groups], dequantized float32 [rows, cols] or None)``;
    scales and biases float32 holding values of ``dtype``."""
    rows, cols = W.shape
    U = inverse_cholesky(H, damp)
    groups = cols // group_size
    scales = np.zeros((rows, groups), dtype=np.float32)
    biases = np.zeros((rows, groups), dtype=np.float32)
    packed = np.zeros((rows, cols * bits // 32), dtype=np.uint32)
    step = max(1, ROW_BYTES // (cols * 8))
    for r in range(0, rows, step):
        rs = slice(r, min(r + step, rows))
        codes, scales[rs], biases[rs] = _gptq_rows(_float64(W[rs]), U, bits, group_size, dtype)
        packed[rs] = pack(codes, bits)
    # the weights as every runtime computes them from the stored parts (float32 s·q + b)
    deq = dequantize(packed, scales, biases, bits, group_size) if dequantized else None
    return packed, scales, biases, deq


def _float64(w) -> np.ndarray:
    if isinstance(w, np.ndarray):
        return np.array(w, dtype=np.float64, copy=True)
    import mlx.core as mx

    return np.array(w.astype(mx.float32)).astype(np.float64)


def _gptq_rows(W: np.ndarray, U: np.ndarray, bits: int, group_size: int, dtype: str):
    """GPTQ's column loop over some rows of ``W`` (float64, worked on in place; ``U``:
    :func:`inverse_cholesky`'s factor): their codes, scales and biases."""
    rows, cols = W.shape
    qmax = float(2**bits - 1)
    groups = cols // group_size
    scales = np.zeros((rows, groups), dtype=np.float32)
    biases = np.zeros((rows, groups), dtype=np.float32)
    codes = np.zeros((rows, cols), dtype=np.uint8)  # bits <= 8
    block = max(BLOCK // group_size, 1) * group_size
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros_like(W1)
        for i in range(i1, i2):
            j = i - i1
            if i % group_size == 0:
                g = i // group_size
                s, b = _group_grid(W1[:, j : j + group_size], bits, group_size, dtype)
                scales[:, g], biases[:, g] = s, b
                s64, b64 = s.astype(np.float64), b.astype(np.float64)
                inv = np.divide(1.0, s64, out=np.ones_like(s64), where=s64 != 0)
            w = W1[:, j]
            q = np.clip(np.rint((w - b64) * inv), 0, qmax)
            dq = q * s64 + b64
            codes[:, i] = q
            e = (w - dq) / U[i, i]
            W1[:, j + 1 :] -= np.outer(e, U[i, i + 1 : i2])
            E1[:, j] = e
        if i2 < cols:
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return codes, scales, biases


def rtn(W: np.ndarray, bits: int, group_size: int, dtype: str):
    """Round-to-nearest with the range search (quant/affine.py): the same outputs as :func:`gptq`."""
    packed, sc, bi = quantize_rows(np.ascontiguousarray(W, dtype=np.float32), bits, group_size, dtype)
    scales, biases = to_float32(sc, dtype).reshape(W.shape[0], -1), to_float32(bi, dtype).reshape(W.shape[0], -1)
    return packed, scales, biases, dequantize(packed, scales, biases, bits, group_size)


def unpack(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Codes ``[rows, cols]`` of MLX-packed rows (the inverse of :func:`affine.pack`)."""
    rows = packed.shape[0]
    by = np.ascontiguousarray(packed).view(np.uint8).reshape(rows, -1)
    b = np.unpackbits(by, axis=-1, bitorder="little")[:, : cols * bits].reshape(rows, cols, bits)
    return (b.astype(np.uint32) << np.arange(bits, dtype=np.uint32)).sum(-1, dtype=np.uint32)


def dequantize(packed, scales, biases, bits: int, group_size: int) -> np.ndarray:
    cols = scales.shape[1] * group_size
    q = unpack(packed, bits, cols).astype(np.float32).reshape(packed.shape[0], -1, group_size)
    return (q * scales[..., None] + biases[..., None]).reshape(packed.shape[0], cols)
