"""Falcon-Mamba (TII): Mamba-1 with weightless RMS norms on B, C and Δ.

Zuo et al., 2024, "Falcon Mamba: The First Competitive Attention-free 7B
Language Model", arXiv:2410.05355; the block is Mamba-1 (Gu & Dao, 2023,
arXiv:2312.00752). transformers' ``FalconMambaForCausalLM``.

Everything — schedule (``num_hidden_layers`` Mamba blocks, no attention),
pre-norm residual blocks, parameter names, the selective scan — is
:mod:`hybridconv.models.mamba`; see its docstring for the math. The one
difference sits inside the mixer, after ``[δ | B | C] = x_proj(x)``::

    δ ← δ / rms(δ),   B ← B / rms(B),   C ← C / rms(C)      (eps mixer_rms_eps, no weight)

computed in float32. The norms have no parameters (transformers registers a
non-persistent dummy weight; nothing is stored in the checkpoint). mlx-lm runs
falcon_mamba through its mamba module with the same three norms
(``use_bcdt_rms``).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import mamba
from .mamba import Model, layer_schedule, layer_windows  # noqa: F401  (the module's interface)


@dataclass
class ModelArgs(mamba.ModelArgs):
    model_type: str = "falcon_mamba"
    use_bcdt_rms: bool = True
