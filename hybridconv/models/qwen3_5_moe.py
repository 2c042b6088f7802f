"""Qwen3.5-MoE (Qwen team, 2026): Qwen3.5 with a mixture of experts in every layer.

:mod:`.qwen3_5` with each layer's MLP replaced by Qwen3-Next's sparse MoE
block (:mod:`.qwen3_next`, "Feed-forward"; :mod:`.moe`): softmax router over
``num_experts``, the top ``num_experts_per_tok`` weights always renormalised
to sum to one, SwiGLU experts of ``moe_intermediate_size`` stored stacked
(``switch_mlp``), plus a shared SwiGLU expert of
``shared_expert_intermediate_size`` scaled by ``σ(shared_expert_gate(x))``.
Unlike Qwen3-Next there are no dense layers (no ``mlp_only_layers``, no
``decoder_sparse_step``).

Published checkpoints store the experts either one tensor per expert (what
transformers 5 saves) or fused (``experts.gate_up_proj [E, 2I, H]``,
``experts.down_proj [E, H, I]``); the converter stacks or splits both into
the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import qwen3_next
from .qwen3_next import Model, layer_schedule, layer_windows, moe_layers  # noqa: F401


@dataclass
class ModelArgs(qwen3_next.ModelArgs):
    model_type: str = "qwen3_5_moe"
    rope_theta: float = 10_000_000.0
