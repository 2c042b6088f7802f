"""GraniteMoeHybrid (IBM Granite 4.0-H): Mamba-2 and attention layers, MoE with a shared MLP.

Architecture
============
Bamba's layer (transformers derives one from the other) with Granite's µP-style
multipliers and Granite-MoE's feed-forward. Each of ``num_hidden_layers``
layers::

    h = x + r · mixer(input_layernorm(x))              mixer: Mamba-2 or attention
    y = h + r · ffn(post_attention_layernorm(h))       r = residual_multiplier

    ffn(u) = moe(u) + shared_mlp(u)     (num_local_experts > 0)
    ffn(u) = shared_mlp(u)              (num_local_experts = 0: "dense" Granite-H)

then the final ``norm`` and the head (tied by default). Norms are plain
RMSNorms.

Multipliers (as data, each where transformers applies it)
---------------------------------------------------------
* ``embedding_multiplier``: the token embeddings are multiplied by it before
  the first layer (not the tied head's weights).
* ``residual_multiplier``: scales each sub-block's output before it is added
  to the residual stream (both sub-blocks of every layer).
* ``attention_multiplier``: *is* the attention logit scale (it replaces
  ``head_dim^-1/2``, it does not multiply it).
* ``logits_scaling``: the logits are *divided* by it.

Layer schedule (``layer_types``)
--------------------------------
One entry per layer: ``mamba`` / ``attention`` as the published Granite 4.0
configs write it, ``linear_attention`` / ``full_attention`` as transformers 5
writes it (the converter accepts both and writes the former, which mlx-lm
reads).

The Mamba-2 mixer
-----------------
Exactly Bamba's (:mod:`hybridconv.models.bamba`; math in
:mod:`hybridconv.models.ssm`): ``in_proj → [z | xBC | dt]``, conv1d + SiLU,
grouped ``B``/``C`` (``mamba_n_groups``), ``Δ = clamp(softplus(dt + dt_bias),
*time_step_limit)``, SSD scan, ``out_proj(rmsnorm_g(y ⊙ silu(z)))`` with the
norm's statistics per group of ``H·P / n_groups`` channels. (mlx-lm normalises
over all ``H·P`` channels at once, the same only for one group: with
``n_groups = 2`` its logits differ.)

Attention
---------
Grouped-query attention (``q_proj``/``k_proj``/``v_proj``/``o_proj``, biases if
``attention_bias``), ``head_dim = hidden_size / num_attention_heads``, scale
``attention_multiplier``, full causal. Position embedding per
``position_embedding_type``: ``"rope"`` — rotary over the whole head,
``rope_theta`` top-level (published) or in ``rope_parameters``
(transformers 5) — or none (``"nope"``, or the key absent or null: transformers
builds no rotary embedding unless the type is ``"rope"``; Granite 4.0-H is
published without position embedding, the Mamba layers carrying order).
mlx-lm applies RoPE unless the type is ``"nope"``, so the converter always
writes the type.

Mixture of experts (:mod:`hybridconv.models.moe`)
-------------------------------------------------
Granite's top-k gating: router logits ``W_r x`` (``router.layer``, ``[E, H]``),
the ``num_experts_per_tok`` largest *logits* chosen, weights ``softmax`` over
those ``k`` logits only (weights sum to one). Experts are gated MLPs
``down(silu(gate(x)) ⊙ up(x))`` of width ``intermediate_size``; the checkpoint
stores each layer's experts fused (``input_linear`` ``[E, 2I, H]`` = gate then
up, ``output_linear`` ``[E, H, I]``), split by the converter into mlx-lm's
stacked ``switch_mlp`` layout. The shared MLP (``shared_mlp``, width
``shared_intermediate_size``, always on, no gate) is the same gated MLP with
``input_linear`` ``[2S, H]`` (gate then up) and ``output_linear``. In a dense
Granite-H it is the whole feed-forward and is stored under mlx-lm's dense
names ``mlp.gate_proj`` / ``up_proj`` / ``down_proj``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .bamba import Mamba2Keys, mamba2_mixer
from .common import MLP, Attention, CausalLM
from .moe import SwitchGLU, combine, route


@dataclass
class ModelArgs(Mamba2Keys):
    model_type: str = "granitemoehybrid"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: Optional[int] = None
    layer_types: list[str] = field(default_factory=list)
    attention_bias: bool = False
    mlp_bias: bool = False
    embedding_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    shared_intermediate_size: int = 1024
    position_embedding_type: str = "nope"
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False

    @property
    def use_moe(self) -> bool:
        return self.num_local_experts > 0


def layer_schedule(args: ModelArgs) -> list[str]:
    """``"mamba"`` or ``"attention"`` for every layer (normalised by the converter)."""
    return list(args.layer_types) if args.layer_types else ["mamba"] * args.num_hidden_layers


def layer_windows(args: ModelArgs) -> list[Optional[int]]:
    """Granite-H attention is full (no window)."""
    return [None] * args.num_hidden_layers


class TopKGating(nn.Module):
    """Holds the router as ``router.layer`` (the checkpoint's and mlx-lm's name)."""

    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.layer = nn.Linear(hidden, num_experts, bias=False)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.router = TopKGating(args.hidden_size, args.num_local_experts)
        self.switch_mlp = SwitchGLU(args.hidden_size, args.intermediate_size, args.num_local_experts)

    def __call__(self, x: mx.array) -> mx.array:
        inds, weights = route(self.router.layer(x), self.top_k, score="softmax_topk")
        return combine(self.switch_mlp(x, inds), weights)


class SharedMLP(nn.Module):
    """``output_linear(silu(g) ⊙ u)`` with ``[g | u] = input_linear(x)``."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.input_linear = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.output_linear = nn.Linear(intermediate, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        g, u = mx.split(self.input_linear(x), 2, axis=-1)
        return self.output_linear(nn.silu(g) * u)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, kind: str):
        super().__init__()
        self.kind = kind
        self.is_mamba = kind == "mamba"
        self.residual_multiplier = args.residual_multiplier
        H = args.hidden_size
        if self.is_mamba:
            self.mamba = mamba2_mixer(args)
        else:
            d = args.head_dim or H // args.num_attention_heads
            rope = None
            if args.position_embedding_type == "rope":
                rope = nn.RoPE(d, traditional=False, base=args.rope_theta)
            self.self_attn = Attention(
                H, args.num_attention_heads, args.num_key_value_heads, d,
                bias=args.attention_bias, rope=rope, scale=args.attention_multiplier,
            )
        if args.use_moe:
            self.block_sparse_moe = MoE(args)
            self.shared_mlp = SharedMLP(H, args.shared_intermediate_size)
        else:  # dense: mlx-lm's names; the converter sets intermediate_size = shared_intermediate_size
            self.mlp = MLP(H, args.intermediate_size, args.mlp_bias)
        self.input_layernorm = nn.RMSNorm(H, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(H, eps=args.rms_norm_eps)

    def ffn(self, u: mx.array) -> mx.array:
        if "mlp" in self:
            return self.mlp(u)
        return self.block_sparse_moe(u) + self.shared_mlp(u)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        r = self.residual_multiplier
        mixer = self.mamba if self.is_mamba else self.self_attn
        h = x + mixer(self.input_layernorm(x), cache=cache) * r
        return h + self.ffn(self.post_attention_layernorm(h)) * r


class Model(CausalLM):
    """GraniteMoeHybrid for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``."""

    def __init__(self, args: ModelArgs):
        super().__init__(
            args,
            layers=[DecoderLayer(args, kind) for kind in layer_schedule(args)],
            norm=nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps),
        )

    def scale_embeddings(self, h: mx.array) -> mx.array:
        return h * self.args.embedding_multiplier

    def scale_logits(self, logits: mx.array) -> mx.array:
        return logits / self.args.logits_scaling
