"""Writing one quantized weight: row blocks through ``mx.quantize``.

Quantization works on groups within a row, so quantizing a block of rows gives
exactly the rows of the whole-matrix result; peak memory is one block. The
packed weights are written as they come; scales (and biases) are small (1/16
of a 4-bit weight's size or less) and are written after the weights.
"""

from __future__ import annotations

import numpy as np

from ..converters.rules import scale_rows
from .affine import quantize_rows
from ..safetensors_io import (
    CHUNK_BYTES,
    ITEMSIZE,
    has_nonfinite,
    raw_array,
    rows_float32,
    write_all,
)

_MX_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _raw(a) -> np.ndarray:
    import mlx.core as mx

    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a))


def write_quantized(info, item, src, dst, buf, progress=None) -> bool:
    """Write the quantized parts of one weight; True if it held NaN or Inf."""
    return bool(write_quantized_ranges([info], item, lambda _: src, dst, progress))


def write_quantized_ranges(ranges, item, open_file, dst, progress=None) -> bool:
    """Quantize the rows of ``ranges`` (contiguous byte ranges of source tensors,
    e.g. the experts of a stacked weight, in output order) as one weight whose
    last axis is ``item.step.shape[-1]``; ``open_file(path)`` gives a readable
    file. Groups run along the last axis, so a stacked ``[E, out, in]`` weight
    is quantized expert by expert, exactly as ``mx.quantize`` on the stack
    (mlx-lm's ``QuantizedSwitchLinear``). Returns the names of the source
    tensors whose data held NaN or Inf."""
    import mlx.core as mx

    spec = item.spec
    float_dtype = getattr(mx, _MX_DTYPE[item.step.dtype])
    cols = item.step.shape[-1]
    scales, biases = [], []
    bad: list[str] = []
    for info in ranges:
        src = open_file(info.file)
        item_bytes = ITEMSIZE[info.dtype]
        rows = (info.end - info.begin) // (cols * item_bytes)
        block = max(1, CHUNK_BYTES // (cols * 4))
        for r0 in range(0, rows, block):
            r1 = min(rows, r0 + block)
            src.seek(info.begin + r0 * cols * item_bytes)
            raw = src.read((r1 - r0) * cols * item_bytes)
            # float32 rows (an FP8 source's dequantized at their position)
            w = rows_float32(info, raw_array(raw, info.dtype), r0 * cols).reshape(r1 - r0, cols)
            if info.name not in bad and has_nonfinite(w, "F32"):
                bad.append(info.name)
            if item.step.scale is not None:  # a folded constant (rules.Scale), before quantizing
                w = scale_rows(w, item.step.scale, r0)
            if spec.mode == "affine":  # error-minimising ranges, MLX's format (quant/affine.py)
                packed, sc, bi = quantize_rows(w, spec.bits, spec.group_size, item.step.dtype)
                write_all(dst, packed)
                scales.append(sc)
                biases.append(bi)
            else:
                parts = mx.quantize(mx.array(w).astype(float_dtype), group_size=spec.group_size, bits=spec.bits,
                                    mode=spec.mode)
                write_all(dst, _raw(parts[0]))
                scales.append(_raw(parts[1]))
                if len(parts) > 2 and parts[2] is not None:
                    biases.append(_raw(parts[2]))
            if progress:
                progress(len(raw), item.step.source)
    write_all(dst, np.concatenate(scales))
    if biases:
        write_all(dst, np.concatenate(biases))
    return bad
