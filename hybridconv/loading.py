"""Loading a converted folder into hybridconv's own MLX model."""

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


def load(path, lazy: bool = False, activation_dtype: str | None = None):
    """The MLX model of a converted folder; ``model(ids[B, T]) -> logits[B, T, V]``.

    Activations run in the folder's float dtype (config ``dtype``/``torch_dtype``)
    unless ``activation_dtype`` says otherwise."""
    import mlx.core as mx

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder")
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
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    return model
