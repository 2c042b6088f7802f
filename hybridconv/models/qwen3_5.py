"""Qwen3.5 (Qwen team, 2026), dense: Qwen3-Next's gated DeltaNet + gated attention, SwiGLU MLP.

The same model as :mod:`.qwen3_next` (schedule, zero-centred norms folded by
the converter, gated DeltaNet on the shared delta-rule core
:mod:`.gated_delta`, gated attention with partial RoPE); this module only names
what differs:

* DeltaNet projections stored separately — ``in_proj_qkv`` (flat
  ``[q | k | v]``, the conv input), ``in_proj_z`` (output gate), ``in_proj_b``
  (β) and ``in_proj_a`` (decay input) — instead of Qwen3-Next's fused,
  per-key-head interleaved ``in_proj_qkvz`` / ``in_proj_ba``;
* every layer's feed-forward is a SwiGLU MLP (``intermediate_size``);
* rotary embeddings are declared as multimodal sections (``mrope_section``);
  for text the temporal, height and width positions are all the token
  position, which is plain RoPE over the first ``partial_rotary_factor ·
  head_dim`` channels;
* checkpoints are published as the multimodal ``Qwen3_5ForConditionalGeneration``
  (``text_config``; weights under ``model.language_model.``, vision tower under
  ``model.visual.``): the converter keeps the language model only. The model
  here is the text model (transformers' ``Qwen3_5ForCausalLM``).

Layer schedule: ``layer_types`` (or ``full_attention_interval``, default 4:
three DeltaNet layers, then attention). Cache: :class:`~.common.StateCache`
``[conv state, recurrent state]`` per DeltaNet layer, a KV cache per
attention layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import qwen3_next
from .qwen3_next import Model, layer_schedule, layer_windows, moe_layers  # noqa: F401


@dataclass
class ModelArgs(qwen3_next.ModelArgs):
    model_type: str = "qwen3_5"
    rope_theta: float = 10_000_000.0
    num_experts: int = 0
