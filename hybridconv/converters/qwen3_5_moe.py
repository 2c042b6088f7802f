"""Qwen3.5-MoE converter: ``qwen3_5_moe_text`` checkpoints and the multimodal
``Qwen3_5MoeForConditionalGeneration`` releases.

Architecture and math: :mod:`hybridconv.models.qwen3_5_moe`. Everything as in
:mod:`hybridconv.converters.qwen3_5` (wrapper handling, vision tower left out
and listed as dropped) and :mod:`hybridconv.converters.qwen3_next` (config
layouts, rules, quantization policy: routers kept in float, experts
quantized), with every layer's MLP the MoE block: ``norm_topk_prob`` is always
true and ``mlp_only_layers`` / ``decoder_sparse_step`` do not apply. Experts
are stacked from per-expert tensors or split from the fused
``experts.gate_up_proj``. Written ``model_type: qwen3_5_moe`` (mlx-lm's).
"""

from __future__ import annotations

from ..models import qwen3_5_moe as model_module
from .qwen3_5 import register_text_model
from .registry import Wrapper, register_wrapper

ARCH = register_text_model(
    "qwen3_5_moe_text", "qwen3_5_moe", "Qwen3_5MoeForCausalLM",
    "all", "Qwen3.5-MoE (gated DeltaNet + gated attention, MoE)", model_module,
)
register_wrapper(Wrapper("qwen3_5_moe", ("Qwen3_5MoeForConditionalGeneration",), "qwen3_5_moe_text",
                         "Qwen3.5-MoE (multimodal)", tie="text"))
