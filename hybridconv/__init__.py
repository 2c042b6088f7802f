"""hybridconv: convert hybrid (attention + SSM/recurrent) Hugging Face checkpoints
to MLX, and check that the result computes the same function.

Python API::

    import hybridconv, mlx.core as mx
    model = hybridconv.load("out-folder")
    logits = model(mx.array([[2, 17, 42]], dtype=mx.int32))   # [B, T, V]
"""

__version__ = "0.1.0"

# Before anything imports mlx: an optimised BLAS for MLX's CPU backend on Linux
# (see hybridconv.blas; HYBRIDCONV_BLAS=off skips it).
from . import blas as _blas  # noqa: E402

_blas.preload()


def load(path, lazy: bool = False, activation_dtype: str | None = None):
    """Load a converted MLX folder as a hybridconv model (see :mod:`hybridconv.loading`)."""
    from .loading import load as _load

    return _load(path, lazy=lazy, activation_dtype=activation_dtype)


__all__ = ["__version__", "load"]
