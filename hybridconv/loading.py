"""Loading a converted folder into hybridconv's own MLX model.

Compute paths (``load(..., compute=...)``):

* ``native`` — MLX's own kernels for the stored dtypes: bf16/fp16 matmuls,
  ``quantized_matmul`` for N-bit layers; activations in the folder's dtype. What
  Metal (and CUDA) users run, fast there.
* ``float32`` — the weights exactly as stored (bf16/fp16 values, N-bit affine
  codes with their scales and biases: nothing re-rounded), used in float32: each
  layer's weight is upcast (or dequantized, ``scale·q + bias`` in float32) when
  the layer runs, one layer at a time inside MLX's lazy graph, never the whole
  model; activations are float32. The products then go through the float32 BLAS
  (see :mod:`hybridconv.blas`): on MLX's CPU backend bf16/fp16 and quantized
  matmuls have no fast kernels (1-2 GFLOP/s), float32 ones run at the BLAS's
  speed. Other low-precision parameters (norms, conv kernels: small) become
  float32 at load, so arithmetic on parameters is float32 too. With
  ``upcast="model"`` the matrices are upcast once at load instead, one tensor at
  a time (:func:`upcast_model`): the float32 model's memory, and products that
  read 4 bytes per weight instead of 2 + 4 + 4; verify does this only after a
  live float32 reference, whose model needed that memory already. It proves that
  the stored weights compute the reference's function; it says nothing of the
  rounding of low-precision *activations*.
* ``auto`` — ``float32`` where MLX has no fast low-precision kernels (the CPU
  device: Linux CPU, or a CPU stream elsewhere) and the folder stores bf16,
  fp16 or affine N-bit weights; ``native`` otherwise (Metal, CUDA, float32
  folders). :func:`compute_path` says which and why.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import index_weights
from .config import read_config
from .converters import lookup
from .errors import CheckpointError


class WeightMismatchError(CheckpointError):
    """The folder's weights do not fit the model its config describes."""

    def __init__(self, message: str, hint: str | None, parameter: str | None):
        super().__init__(message, hint)
        self.parameter = parameter


def load_config(path: Path) -> tuple[object, dict]:
    raw = read_config(Path(path))
    arch = lookup(raw)
    return arch, arch.normalize_config(raw)


COMPUTE_PATHS = ("auto", "native", "float32")


def _stored_dtype(path: Path) -> str | None:
    """The commonest float dtype of a folder's weights (from the headers)."""
    from collections import Counter

    from .safetensors_io import FLOAT_DTYPES

    counts = Counter(t.dtype for t in index_weights(path).tensors.values() if t.dtype in FLOAT_DTYPES)
    code = counts.most_common(1)[0][0] if counts else None
    return {"F32": "float32", "F64": "float32", "F16": "float16", "BF16": "bfloat16"}.get(code)


def compute_path(path, compute: str = "auto", activation_dtype: str | None = None, upcast: str = "layer") -> dict:
    """Which arithmetic ``load(path, compute=compute, activation_dtype=...)`` uses, as a
    JSON-ready dict: ``path`` (native / float32), ``weights``, ``activations``,
    ``device`` and ``reason``."""
    import mlx.core as mx

    if compute not in COMPUTE_PATHS:
        from .errors import UsageError

        raise UsageError(f"unknown compute path {compute!r}; expected one of {', '.join(COMPUTE_PATHS)}")
    path = Path(path)
    _, config = load_config(path)
    quant = config.get("quantization")
    stored = _stored_dtype(path) or "float32"
    if isinstance(quant, dict):
        mode = quant.get("mode", "affine")
        weights = f"{quant.get('bits')}-bit {mode}, group size {quant.get('group_size')}"
        low = mode == "affine"
    else:
        weights = stored
        low = stored in ("bfloat16", "float16")
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    if compute == "auto":
        if not low:
            path_, reason = "native", (
                "the weights are float32" if not isinstance(quant, dict)
                else f"{weights}: no float32 form of this quantization mode")
        elif device != "cpu":
            path_, reason = "native", "MLX has fast low-precision kernels on this device"
        else:
            path_, reason = "float32", (
                "MLX's CPU backend has no fast bf16/fp16/quantized matmul kernels: the stored "
                "weights are used in float32, through the float32 BLAS")
    else:
        path_, reason = compute, f"asked for ({compute})"
    if path_ == "float32" and not low and isinstance(quant, dict):
        path_, reason = "native", f"{weights}: no float32 form of this quantization mode"
    native_act = config.get("dtype") or config.get("torch_dtype") or stored
    return {
        "path": path_,
        "weights": f"{weights} (as stored" + (")" if path_ != "float32" else ", upcast to float32 one layer at a time)"
                                              if upcast != "model" else ", held in float32: upcast once at load)"),
        "activations": "float32" if path_ == "float32" else (activation_dtype or native_act),
        "device": device,
        "reason": reason,
    }


# The float32 path's arithmetic lives in hybridconv.float32_compute (no model code
# imported there: verify's mlx-lm runtime applies it to mlx-lm's models in a process
# that never imports hybridconv.models); the names stay importable from here.
from .float32_compute import (  # noqa: E402,F401
    _dequantize_f32,
    to_float32_compute,
    upcast_model,
    use_float32_compute,
)


def load(path, lazy: bool = False, activation_dtype: str | None = None, compute: str = "native",
         upcast: str = "layer"):
    """The MLX model of a converted folder; ``model(ids[B, T]) -> logits[B, T, V]``.

    Activations run in the folder's float dtype (config ``dtype``/``torch_dtype``)
    unless ``activation_dtype`` says otherwise. ``compute`` chooses the arithmetic
    for low-precision weights (module docstring; ``native`` by default): with
    ``float32``/``auto`` choosing float32, activations are float32, and ``upcast``
    says when the weights become float32: ``layer`` (each time a layer runs; the
    model stays its stored size) or ``model`` (once, here: :func:`upcast_model`,
    the float32 model's memory, faster products)."""
    import mlx.core as mx

    from .blas import warn_if_slow

    warn_if_slow()  # once per process: MLX on the bundled reference BLAS, and the fix
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder")
    if compute != "native":
        if compute_path(path, compute)["path"] == "float32":
            activation_dtype = "float32"
        else:
            compute = "native"
    arch, config = load_config(path)
    model = arch.build_model(config)
    index = index_weights(path)
    weights: dict = {}
    for shard in index.shards:
        weights.update(mx.load(str(shard)))
    quant = config.get("quantization")
    if isinstance(quant, dict):
        import mlx.nn as nn

        def predicate(module_path, module):
            # mlx-lm's convention: a per-layer entry (parameters or False) wins;
            # otherwise a layer is quantized when its scales are stored.
            if module_path in quant:
                return quant[module_path]
            return hasattr(module, "to_quantized") and f"{module_path}.scales" in weights

        nn.quantize(
            model,
            group_size=quant.get("group_size"),
            bits=quant.get("bits"),
            mode=quant.get("mode", "affine"),
            class_predicate=predicate,
        )
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        import re

        m = re.search(r"(model\.[\w.]+|lm_head\.[\w.]+)", str(exc))
        raise WeightMismatchError(
            f"{path}: weights do not fit the {arch.title} model: {exc}",
            "load a folder written by `hybridconv convert` (a Hugging Face checkpoint must be converted first)",
            m.group(1) if m else None,
        ) from None
    dtype = activation_dtype or config.get("dtype") or config.get("torch_dtype")
    if dtype in ("float32", "float16", "bfloat16"):
        model.activation_dtype = getattr(mx, dtype)
    del weights
    if compute != "native":
        if upcast == "model":
            mx.eval(model.parameters())  # the stored weights first, then one float32 copy at a time
        to_float32_compute(model, upcast)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    return model
