"""Falcon-Mamba converter: the Mamba converter with ``model_type`` falcon_mamba.

Architecture and math: :mod:`hybridconv.models.falcon_mamba` (Mamba-1 plus
weightless RMS norms on B, C and Δ, eps ``mixer_rms_eps``, default 1e-6).

The checkpoint layout, tensor rules (conv1d to MLX, ``A_log`` / ``D`` /
``dt_proj.bias`` kept float32), protections and quantization roles are those
of :mod:`hybridconv.converters.mamba` (see its docstring for the policy and the
measurement behind it, taken on both ``mamba-tiny`` and ``falcon_mamba-tiny``).
The norms have no parameters: nothing to convert. The output config keeps
``model_type: falcon_mamba``, which mlx-lm maps to its ``mamba`` module with
the same norms.
"""

from __future__ import annotations

from ..models import falcon_mamba as model_module
from . import mamba
from .registry import Architecture, register


def normalize_config(raw: dict) -> dict:
    return mamba.normalize_config(raw, model_type="falcon_mamba")


ARCH = register(
    Architecture(
        model_type="falcon_mamba",
        architectures=("FalconMambaForCausalLM",),
        title="Falcon-Mamba (Mamba-1 with B/C/dt norms)",
        normalize_config=normalize_config,
        rules=mamba.rules,
        model_module=model_module,
        roles=mamba.ROLES,
        protected=mamba.PROTECTED,
    )
)
