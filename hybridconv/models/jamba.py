"""Jamba (AI21 Labs): Mamba-1 layers, a few attention layers, and mixture-of-experts MLPs.

Lieber et al., 2024, "Jamba: A Hybrid Transformer-Mamba Language Model"
(arXiv:2403.19887).

Architecture
============
A decoder-only stack of ``num_hidden_layers`` pre-norm residual layers::

    h = x + mixer(input_layernorm(x))          mixer: Mamba-1 or attention
    y = h + ffn(pre_ff_layernorm(h))           ffn: a gated MLP or an MoE of them

then ``final_layernorm`` and the ``lm_head`` (untied by default). Norms are
plain RMSNorms (``weight · x / rms(x)``).

Layer schedule: two independent periods
---------------------------------------
* Mixer: layer ``i`` is attention when ``i % attn_layer_period ==
  attn_layer_offset``, Mamba otherwise (Jamba-v0.1 / 1.5: period 8, offset 4:
  one attention layer in eight).
* FFN: layer ``i`` has ``num_experts`` experts when ``i % expert_layer_period
  == expert_layer_offset`` (and ``num_experts > 1``), a dense MLP otherwise
  (published: period 2, offset 1: every other layer).

Both are transformers' definitions. mlx-lm tests ``(i + expert_layer_offset)
% expert_layer_period == 0`` for the experts, the same set only when ``2 ·
offset ≡ 0 (mod period)`` (the published 2/1 is such a case); elsewhere its
model has experts where the checkpoint has dense MLPs and the weights do not
load. The converter writes the mixer schedule as ``layers_block_type`` (which
mlx-lm reads) and keeps the period/offset keys.

The Mamba-1 mixer (Gu & Dao, 2023, arXiv:2312.00752)
-----------------------------------------------------
:class:`hybridconv.models.ssm.Mamba1Mixer` (math in :mod:`hybridconv.models.ssm`):
``in_proj → [x | z]`` (``I = mamba_expand · hidden_size`` each), causal
depthwise conv1d (``mamba_d_conv`` taps, with bias) + SiLU, ``x_proj(x) = [δ |
B | C]`` (``δ``: ``mamba_dt_rank`` wide, ``"auto"`` = ``ceil(hidden/16)``).
Jamba's own addition: ``δ``, ``B`` and ``C`` are RMS-normalised with learned
weights (``dt_layernorm``, ``b_layernorm``, ``c_layernorm``, eps
``rms_norm_eps``) before use, which keeps the selective parameters in range at
scale. Then ``Δ = softplus(dt_proj(δ))`` per channel, ``A = -exp(A_log)``
(``[I, N]``, ``N = mamba_d_state``)::

    h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t x_t) B_t,     y_t = h_t C_t + D ⊙ x_t

and ``out_proj(y ⊙ silu(z))``. Prefill is a chunked log-depth scan, decoding
the same recurrence one step at a time.

Attention
---------
Grouped-query attention (``q_proj``/``k_proj``/``v_proj``/``o_proj``, no
biases), ``head_dim = hidden_size / num_attention_heads``, scale
``head_dim^-1/2``, full causal. **No position embedding at all**: the Mamba
layers before the first attention layer already carry order, so Jamba uses no
RoPE (paper, §6.4).

Mixture of experts (:mod:`hybridconv.models.moe`)
-------------------------------------------------
Router ``logits = W_r x`` (``[E, H]``, no bias), ``p = softmax(logits)`` over
all ``E`` experts, the ``num_experts_per_tok`` largest chosen, and their
weights are the probabilities ``p_e`` **as they are** — not renormalised over
the chosen (Mixtral's router, which Jamba's follows). Each expert is a gated
MLP ``down(silu(gate(x)) ⊙ up(x))``; output ``Σ_e p_e · expert_e(x)``.
mlx-lm takes a softmax over the chosen logits instead (weights summing to 1):
with top-2 of 4 experts that is 0.85 in max |Δlogit| on the oracle fixture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .common import MLP, Attention, BaseModelArgs, CausalLM
from .moe import MoEBlock
from .ssm import Mamba1Mixer


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "jamba"
    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: Optional[int] = None
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    layers_block_type: Optional[list[str]] = None
    num_experts: int = 16
    num_experts_per_tok: int = 2
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False

    @property
    def dt_rank(self) -> int:
        r = self.mamba_dt_rank
        return math.ceil(self.hidden_size / 16) if r == "auto" else int(r)


def layer_schedule(args: ModelArgs) -> list[str]:
    """``"mamba"`` or ``"attention"`` for every layer (see module docstring)."""
    if args.layers_block_type is not None:
        return list(args.layers_block_type)
    p, o = args.attn_layer_period, args.attn_layer_offset
    return ["attention" if i % p == o else "mamba" for i in range(args.num_hidden_layers)]


def expert_layers(args: ModelArgs) -> list[bool]:
    """Whether layer ``i`` has experts (transformers' ``layers_num_experts > 1``)."""
    p, o = args.expert_layer_period, args.expert_layer_offset
    return [args.num_experts > 1 and i % p == o for i in range(args.num_hidden_layers)]


def layer_windows(args: ModelArgs) -> list[Optional[int]]:
    """Jamba's attention is full (no window)."""
    return [None] * args.num_hidden_layers


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, kind: str, moe: bool):
        super().__init__()
        self.kind = kind
        self.is_mamba = kind == "mamba"
        H = args.hidden_size
        if self.is_mamba:
            self.mamba = Mamba1Mixer(
                H,
                args.mamba_expand * H,
                args.mamba_d_state,
                args.mamba_d_conv,
                args.dt_rank,
                use_conv_bias=args.mamba_conv_bias,
                use_bias=args.mamba_proj_bias,
                bcdt_norm="weighted",
                bcdt_eps=args.rms_norm_eps,
            )
        else:
            d = args.head_dim or H // args.num_attention_heads
            self.self_attn = Attention(H, args.num_attention_heads, args.num_key_value_heads, d, rope=None)
        if moe:
            self.feed_forward = MoEBlock(
                H,
                args.intermediate_size,
                args.num_experts,
                args.num_experts_per_tok,
                routing={"score": "softmax", "norm_topk": False},
                router="router",
                experts="switch_mlp",
            )
        else:
            self.feed_forward = MLP(H, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(H, eps=args.rms_norm_eps)
        self.pre_ff_layernorm = nn.RMSNorm(H, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        mixer = self.mamba if self.is_mamba else self.self_attn
        h = x + mixer(self.input_layernorm(x), cache=cache)
        return h + self.feed_forward(self.pre_ff_layernorm(h))


class Model(CausalLM):
    """Jamba for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``."""

    norm_name = "final_layernorm"

    def __init__(self, args: ModelArgs):
        super().__init__(
            args,
            layers=[DecoderLayer(args, kind, moe) for kind, moe in zip(layer_schedule(args), expert_layers(args))],
            norm=nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps),
        )
