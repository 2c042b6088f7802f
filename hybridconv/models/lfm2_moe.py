"""LFM2-MoE (Liquid AI, LFM2-8B-A1B): LFM2 with sparse mixture-of-experts feed-forwards.

Everything but the feed-forward is LFM2 (:mod:`hybridconv.models.lfm2`: gated
short convolutions, QK-normed attention, the same schedule and norms).

Feed-forward schedule
---------------------
Layers ``0 .. num_dense_layers − 1`` keep a dense SwiGLU of width
``intermediate_size`` (no auto-adjust rule in LFM2-MoE); every later layer has
``num_experts`` SwiGLU experts of width ``moe_intermediate_size``, of which
``num_experts_per_tok`` run per token.

Routing (transformers' ``Lfm2MoeTopKRouter``; :func:`hybridconv.models.moe.route`)
-------------------------------------------------------------------------------
Sigmoid scores ``s = σ(W_gate x)`` (independent per expert, as DeepSeek-V3).
With ``use_expert_bias`` the ``k`` experts are chosen by ``s + expert_bias`` —
a load-balancing bias adjusted during training, outside the gradient — and
weighted by the unbiased ``s``. With ``norm_topk_prob`` the weights are divided
by ``Σ s + 1e-6`` over the chosen experts, then multiplied by
``routed_scaling_factor``. No shared expert. Routing runs in float32;
``expert_bias`` is stored in float32 (it decides discrete choices between
scores that may differ by less than a bf16 step).

Parameter names are mlx-lm's: dense ``feed_forward.{gate,up,down}_proj``,
router ``feed_forward.gate``, bias ``feed_forward.expert_bias``, experts
stacked as ``feed_forward.switch_mlp.{gate,up,down}_proj.weight [E, out, in]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn

from . import lfm2
from .lfm2 import MLP, layer_schedule, layer_windows  # noqa: F401  (module interface)
from .moe import MoEBlock

ROUTER_NORM_EPS = 1e-6  # Lfm2MoeTopKRouter: routing_weights / (sum + 1e-6)


@dataclass
class ModelArgs(lfm2.ModelArgs):
    model_type: str = "lfm2_moe"
    moe_intermediate_size: int = 1792
    num_dense_layers: int = 2
    num_experts: int = 32
    num_experts_per_tok: int = 4
    use_expert_bias: bool = True
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    block_auto_adjust_ff_dim: bool = False  # LFM2-MoE's dense MLP has no width rule


class Model(lfm2.Model):
    """LFM2-MoE for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``."""

    @staticmethod
    def feed_forward(args: ModelArgs, layer: int) -> nn.Module:
        names = ("gate_proj", "down_proj", "up_proj")
        if layer < args.num_dense_layers:
            return MLP(args.hidden_size, args.intermediate_size, names)
        return MoEBlock(
            args.hidden_size,
            args.moe_intermediate_size,
            args.num_experts,
            args.num_experts_per_tok,
            routing=dict(
                score="sigmoid",
                norm_topk=args.norm_topk_prob,
                norm_eps=ROUTER_NORM_EPS,
                routed_scaling=args.routed_scaling_factor,
            ),
            correction_bias="expert_bias" if args.use_expert_bias else None,
        )
