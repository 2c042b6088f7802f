"""The float32 compute path's arithmetic, for any MLX model: hybridconv's own,
mlx-lm's built-in ones, or the model file an output carries.

On MLX's CPU backend bf16/fp16 and quantized matmuls have no fast kernels
(1-2 GFLOP/s); float32 products go through the BLAS. The float32 path computes
the weights exactly as stored (bf16/fp16 values, N-bit affine codes with their
scales and biases: nothing re-rounded) in float32 products, with float32
activations: :func:`use_float32_compute` upcasts each layer's matrix when the
layer runs (the model stays its stored size), :func:`upcast_model` once, one
tensor at a time. See :mod:`hybridconv.loading` for when verify uses which.

Nothing here imports hybridconv's model code: verify's mlx-lm runtime applies it
in a separate process to what ``mlx_lm.utils.load_model`` built, which must not
use hybridconv's models. Expert layers are recognised by what they are (a
``SwitchLinear`` / ``QuantizedSwitchLinear``: stacked ``weight [E, out, in]``
called as ``layer(x, indices, sorted_indices)``), whichever module defined them:
hybridconv's ``models.moe``, the copy an output carries, or mlx-lm's
``switch_layers``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

SWITCH = "SwitchLinear"
QUANTIZED_SWITCH = "QuantizedSwitchLinear"


def _kind(module) -> str | None:
    """``"switch"`` / ``"qswitch"`` for stacked-expert layers (by class name and
    layout, whichever module defined them), else None."""
    for cls in type(module).__mro__:
        if cls.__name__ == QUANTIZED_SWITCH and "scales" in module:
            return "qswitch"
        if cls.__name__ == SWITCH and "weight" in module and module["weight"].ndim == 3:
            return "switch"
    return None


def _dequantize_f32(layer, rows=None):
    """A quantized layer's weight (or some of its rows) as float32: ``scale·q + bias``
    computed in float32 from the stored codes, scales and biases."""
    import mlx.core as mx

    w, scales, biases = layer["weight"], layer["scales"], layer.get("biases")
    if rows is not None:
        w, scales = w[rows], scales[rows]
        biases = biases[rows] if biases is not None else None
    mode = getattr(layer, "mode", "affine")
    if mode == "affine" and biases is not None and layer.bits in (2, 4, 8):
        return _unpack_affine(w, scales, biases, layer.group_size, layer.bits)
    return mx.dequantize(w, scales.astype(mx.float32), None if biases is None else biases.astype(mx.float32),
                         group_size=layer.group_size, bits=layer.bits, mode=mode)


def _unpack_affine(w, scales, biases, group_size: int, bits: int):
    """``mx.dequantize`` of affine 2/4/8-bit codes (whole codes per uint32 word, lowest
    bits first) as shifts, masks and one ``scale·q + bias`` per element: the same
    float32 values bit for bit (tests/test_float32_compute.py), about twice as fast on
    the CPU, whose ``dequantize`` kernel is scalar (0.33 s -> 0.18 s for a 64-expert
    stack of 50 M weights: most of a 4-bit MoE block's load in the streamed verify)."""
    import mlx.core as mx

    per_word = 32 // bits
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    codes = (w[..., None] >> shifts) & ((1 << bits) - 1)
    n_in = w.shape[-1] * per_word
    codes = codes.reshape(*w.shape[:-1], n_in // group_size, group_size)
    y = codes.astype(mx.float32) * scales.astype(mx.float32)[..., None] + biases.astype(mx.float32)[..., None]
    return y.reshape(*w.shape[:-1], n_in)


def _per_expert(x, w, indices):
    """``gather_mm`` of rows sorted by expert (``x [P, 1, in]``, ``indices [P]``
    ascending, ``w [E, out, in]`` float32) as one dense product per expert over its
    consecutive rows. MLX's CPU ``gather_mm`` multiplies row by row (a matrix–vector
    product per row, each reading its expert's matrix again); a product per expert
    reads each matrix once through the BLAS: 4-5x faster on a 64-expert layer's
    prefill (``scripts/bench_verify.py``'s Granite-shaped block: 1.0 s -> 0.22 s for
    1440 rows), equal to float32 rounding. The experts' row counts are read on the
    host (a synchronisation: fine for verify's passes, which evaluate block by block)."""
    import mlx.core as mx

    counts = np.bincount(np.array(indices), minlength=w.shape[0])
    ends = np.cumsum(counts)
    rows = x.reshape(x.shape[0], x.shape[-1])
    parts = [rows[int(end - c):int(end)] @ w[e].T for e, (c, end) in enumerate(zip(counts, ends)) if c]
    return mx.concatenate(parts, axis=0)[:, None, :]


def _switch_f32(layer, w, x, indices, sorted_indices):
    import mlx.core as mx

    x, w = x.astype(mx.float32), w.astype(mx.float32)
    if sorted_indices and x.ndim == 3 and x.shape[1] == 1 and indices.ndim == 1 and mx.default_device() == mx.cpu:
        y = _per_expert(x, w, indices)
    else:
        y = mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
    if "bias" in layer:
        y = y + mx.expand_dims(layer["bias"][indices].astype(mx.float32), -2)
    return y


@lru_cache(maxsize=None)
def _float32_class(cls):
    """``cls`` with a float32 ``__call__`` (same parameters and attributes): each call
    upcasts (or dequantizes) the layer's stored matrix and multiplies in float32."""
    import mlx.core as mx
    import mlx.nn as nn

    if issubclass(cls, nn.QuantizedLinear):
        def call(self, x):
            y = x.astype(mx.float32) @ _dequantize_f32(self).T
            return y + self["bias"] if "bias" in self else y

        return type(f"Float32{cls.__name__}", (cls,), {"__call__": call})
    if issubclass(cls, nn.QuantizedEmbedding):
        def call(self, x):
            return _dequantize_f32(self, x)

        def as_linear(self, x):
            return x.astype(mx.float32) @ _dequantize_f32(self).T

        return type(f"Float32{cls.__name__}", (cls,), {"__call__": call, "as_linear": as_linear})
    if any(c.__name__ == QUANTIZED_SWITCH for c in cls.__mro__):
        def call(self, x, indices, sorted_indices=False):
            # each token's expert matrices, dequantized from their codes (gather_mm is float32 on the CPU)
            return _switch_f32(self, _dequantize_f32(self), x, indices, sorted_indices)

        return type(f"Float32{cls.__name__}", (cls,), {"__call__": call})

    def call(self, x, indices, sorted_indices=False):  # a float SwitchLinear
        return _switch_f32(self, self["weight"], x, indices, sorted_indices)

    return type(f"Float32{cls.__name__}", (cls,), {"__call__": call})


def use_float32_compute(model) -> int:
    """Make ``model`` compute in float32 from its stored weights, upcasting each
    large matrix when its layer runs (see the module docstring); returns how many
    layers changed.

    Matrices of linear, embedding and expert layers keep their stored arrays
    (bf16/fp16 promote exactly inside the product; affine N-bit layers dequantize
    in float32 from their codes). Every other low-precision parameter (norm
    weights, conv kernels, gates: small) becomes float32 here, once, so that
    arithmetic the model does on parameters themselves (``1 + w``, a scale) is
    float32 as well, exactly as with :func:`upcast_model`."""
    import mlx.core as mx
    import mlx.nn as nn

    dense = (nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding)
    for _, module in model.named_modules():
        if isinstance(module, dense) or _kind(module):
            continue
        for key, value in list(module.items()):
            if isinstance(value, mx.array) and value.dtype in (mx.bfloat16, mx.float16):
                module[key] = value.astype(mx.float32)
    n = 0
    for _, module in model.named_modules():
        quantized = isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) or _kind(module) == "qswitch"
        if quantized and getattr(module, "mode", "affine") != "affine":
            continue  # no float32 form of this quantization mode
        if quantized or _kind(module) == "switch":
            module.__class__ = _float32_class(type(module))  # same parameters and attributes; only the call differs
            n += 1
    return n


def upcast_model(model) -> int:
    """Hold ``model``'s weights in float32 from now on, one tensor at a time: affine
    quantized layers become float32 dense layers of their dequantized weights,
    bf16/fp16 tensors become float32 (the same values). Each low-precision tensor
    is freed (and MLX's buffer cache cleared) as soon as its float32 copy exists,
    so memory grows to the float32 model, never to both. Returns the tensors changed.

    The float32 compute path with the weights resident in float32: every product
    reads 4 bytes per weight instead of upcasting again at every call (2 + 4 + 4);
    for callers whose memory already held the float32 model (verify after a float32
    PyTorch reference)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten

    def owner_of(path):
        *parents, last = path.split(".")
        owner = model
        for part in parents:
            owner = owner[int(part)] if isinstance(owner, list) else getattr(owner, part)
        return owner, last

    def quantized(m) -> bool:
        return (isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) or _kind(m) == "qswitch") \
            and getattr(m, "mode", "affine") == "affine"

    # paths only: a list of the modules would keep every replaced one alive
    paths = [p for p, m in model.named_modules() if quantized(m)]
    n = 0
    for path in paths:
        owner, last = owner_of(path)
        m = owner[int(last)] if isinstance(owner, list) else getattr(owner, last)
        if isinstance(m, nn.QuantizedLinear):
            new = nn.Linear(1, 1, bias="bias" in m)
        elif isinstance(m, nn.QuantizedEmbedding):
            new = nn.Embedding(1, 1)
        else:  # stacked experts: the same call on float32 matrices
            new = _experts_class()()
        new.weight = _dequantize_f32(m)
        if "bias" in m:
            new.bias = m["bias"].astype(mx.float32)
        mx.eval(new.parameters())
        if isinstance(owner, list):
            owner[int(last)] = new
        else:
            setattr(owner, last, new)
        del m, new
        mx.clear_cache()
        n += 1
    names = [name for name, p in tree_flatten(model.parameters()) if p.dtype in (mx.bfloat16, mx.float16)]
    for name in names:
        q = dict(tree_flatten(model.parameters()))[name].astype(mx.float32)
        mx.eval(q)
        model.update(tree_unflatten([(name, q)]))
        del q
        mx.clear_cache()
        n += 1
    return n


@lru_cache(maxsize=None)
def _experts_class():
    import mlx.nn as nn

    class SwitchLinear(nn.Module):
        """Stacked expert matrices held in float32 (``weight [E, out, in]``, optional
        ``bias [E, out]``), called as the layer it replaces: ``(x, indices, sorted_indices)``."""

        def __call__(self, x, indices, sorted_indices=False):
            return _switch_f32(self, self["weight"], x, indices, sorted_indices)

    return SwitchLinear


def to_float32_compute(model, upcast: str = "layer") -> int:
    """Put any MLX model (hybridconv's, mlx-lm's, or a carried one) on the float32
    path: weights upcast once and held (``upcast="model"``: :func:`upcast_model`) or
    each time a layer runs (``"layer"``: :func:`use_float32_compute`)."""
    return (upcast_model if upcast == "model" else use_float32_compute)(model)
