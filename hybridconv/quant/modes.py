"""Quantization modes MLX supports, validated before any work starts."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UsageError

# mode -> (allowed bits, allowed group sizes, default group size)
MODES: dict[str, tuple[tuple[int, ...], tuple[int, ...], int]] = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128), 64),
    "mxfp4": ((4,), (32,), 32),
    "nvfp4": ((4,), (16,), 16),
    "mxfp8": ((8,), (32,), 32),
}


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    mode: str = "affine"

    def to_config(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def label(self) -> str:
        return f"{self.bits}-bit {self.mode} g{self.group_size}" if self.mode == "affine" else f"{self.mode} g{self.group_size}"


def default_bits(mode: str) -> int:
    """The width ``--bits`` means when not given: 4, or the one width of an 8-bit mode."""
    allowed = MODES.get(mode, ((4,),))[0]
    return 4 if 4 in allowed else allowed[0]


def validate(bits: int | None, group_size: int | None, mode: str) -> QuantSpec:
    """A :class:`QuantSpec` for ``bits`` / ``group_size`` / ``mode``, checked against what
    MLX supports (``None``: the mode's default width and group size)."""
    if mode not in MODES:
        raise UsageError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    allowed_bits, allowed_groups, default_group = MODES[mode]
    if bits is None:
        bits = default_bits(mode)
    group_size = default_group if group_size is None else group_size
    if bits not in allowed_bits:
        raise UsageError(
            f"--bits {bits} is not supported by mode {mode}: allowed {', '.join(map(str, allowed_bits))}"
        )
    if group_size not in allowed_groups:
        raise UsageError(
            f"--group-size {group_size} is not supported by mode {mode}: allowed {', '.join(map(str, allowed_groups))}"
        )
    return QuantSpec(bits, group_size, mode)


def quantized_entries(name: str, shape: tuple[int, ...], spec: QuantSpec, float_dtype: str):
    """The tensors MLX stores for a quantized ``<module>.weight`` of ``shape``:
    packed uint32 weights, scales, and (affine only) biases."""
    module = name[: -len(".weight")]
    rows = shape[:-1]
    cols = shape[-1]
    out = [(name, "U32", (*rows, cols * spec.bits // 32))]
    scale_dtype = float_dtype if spec.mode == "affine" else "U8"
    out.append((f"{module}.scales", scale_dtype, (*rows, cols // spec.group_size)))
    if spec.mode == "affine":
        out.append((f"{module}.biases", scale_dtype, (*rows, cols // spec.group_size)))
    return out


def can_quantize(shape: tuple[int, ...], spec: QuantSpec) -> str | None:
    """None when ``shape`` can be quantized with ``spec``, else the reason it cannot."""
    if len(shape) not in (2, 3):
        return f"not a matrix or a stack of matrices ({len(shape)}-D)"
    if shape[-1] % spec.group_size:
        return f"input dimension {shape[-1]} is not a multiple of group size {spec.group_size}"
    if (shape[-1] * spec.bits) % 32:
        return f"input dimension {shape[-1]} x {spec.bits} bits does not pack into 32-bit words"
    return None


def storage_bits(entries) -> int:
    from ..safetensors_io import ITEMSIZE

    return sum(math.prod(shape) * ITEMSIZE[dtype] * 8 for _, dtype, shape in entries)
