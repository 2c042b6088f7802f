"""Lara-Mini (Translated, 2026): gated DeltaNet + sliding and full attention, MoE in every layer.

References: Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2
with Delta Rule" (2024, arXiv:2412.06464) for the DeltaNet layers; Beltagy
et al., "Longformer" (2020, arXiv:2004.05150) for sliding-window attention;
Kazemnejad et al., "The Impact of Positional Encoding on Length Generalization
in Transformers" (2023, arXiv:2305.19466) for attention without position
embedding (NoPE); Shazeer et al. 2017 and the Qwen2-MoE report for the MoE
with a shared expert. The reference implementation is transformers'
``LaraMiniForCausalLM`` (modular: Qwen3.5's gated DeltaNet, Qwen3's attention,
Qwen3-Next's experts and router).

Architecture
============
A pre-norm decoder; every layer is::

    h = x + mixer(input_layernorm(x))
    y = h + moe(post_attention_layernorm(h))

then a final RMSNorm and the head (tied to the embedding by default). Every
RMSNorm here stores its scale directly (``x / rms(x) · w``, weight applied in
float32) — unlike Qwen3-Next, no ``1 + w`` offset.

Layer schedule
--------------
``layer_types[i]`` is ``"linear_attention"`` (gated DeltaNet),
``"sliding_attention"`` (attention over the last ``sliding_window`` positions,
the query's own included, with RoPE) or ``"full_attention"`` (causal attention
over the whole history **without any position embedding**: the full layers
get no rotary embedding in transformers' ``LaraMiniModel``, position comes
from the DeltaNet layers and the sliding layers). Without ``layer_types`` the
released pattern of period 5 repeats: DeltaNet, sliding, DeltaNet, full,
sliding.

Gated DeltaNet
--------------
Qwen3.5's (:mod:`.qwen3_next` carries the description, :mod:`.gated_delta`
the math): ``[q | k | v]`` through a causal depthwise conv and SiLU, q/k
L2-normalised, ``β = σ(b)``, ``g = −exp(A_log)·softplus(a + dt_bias)``,
``S_t = exp(g_t)(I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``,
``o_t = S_tᵀ q_t / √Dk``, then ``out_proj(RMSNorm(o) · w · silu(z))`` per
value head (eps ``rms_norm_eps``). The published checkpoints fuse the input
projections into one ``in_proj`` with rows ``[q | k | v | z | b | a]`` (flat,
not per key head) and call the gated norm ``out_norm``; the converter cuts
``in_proj`` into Qwen3.5's ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``,
``in_proj_a`` and renames the norm ``norm``.

Attention
---------
Qwen3's: grouped-query attention with a per-head RMSNorm on q and on k
(``q_norm``, ``k_norm`` over ``head_dim``) before the rotary embedding, RoPE
over the whole head (``rope_theta``; transformers' default rotary ignores any
``partial_rotary_factor`` here), scale ``head_dim^-1/2``, no biases by default,
no output gate.

Mixture of experts
------------------
Every layer: router logits in float32 (the router weight is cast to float32,
unlike Qwen3-Next), ``softmax`` over ``num_experts``, the top
``num_experts_per_tok`` chosen and renormalised over them when
``norm_topk_prob``; SwiGLU experts of ``moe_intermediate_size``; plus a shared
SwiGLU expert of ``shared_expert_intermediate_size`` added **in full** (no
sigmoid gate, unlike Qwen2-MoE / Qwen3-Next). The checkpoints store the experts
fused (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``); the
converter cuts them into mlx-lm's ``switch_mlp`` layout.

Cache
-----
DeltaNet layer: :class:`~.common.StateCache` ``[conv state [B, K−1, 2·Hk·Dk +
Hv·Dv], recurrent state [B, Hv, Dk, Dv] float32]`` (bounded); sliding layer:
:class:`~.common.WindowKVCache` keeping ``sliding_window − 1`` positions
(bounded); full layer: a :class:`~.common.KVCache` of the whole history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import qwen3_next
from .common import MLP, Attention, CausalLM, KVCache, StateCache, WindowKVCache, attend
from .moe import MoEBlock

RELEASED_PATTERN = ("linear_attention", "sliding_attention", "linear_attention", "full_attention", "sliding_attention")


@dataclass
class ModelArgs(qwen3_next.ModelArgs):
    model_type: str = "lara_mini"
    hidden_size: int = 1024
    num_hidden_layers: int = 34
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 128
    linear_num_key_heads: int = 8
    linear_num_value_heads: int = 16
    num_experts: int = 128
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    sliding_window: int = 512
    tie_word_embeddings: bool = True
    layer_types: list[str] = field(default_factory=list)

    @property
    def split_projections(self) -> bool:
        return True  # in_proj_qkv / z / b / a (the converter cuts the fused in_proj)

    @property
    def types(self) -> list[str]:
        return self.layer_types or [RELEASED_PATTERN[i % 5] for i in range(self.num_hidden_layers)]


def layer_schedule(args: ModelArgs) -> list[str]:
    """``"delta"`` (gated DeltaNet) or ``"attention"`` (sliding or full) for every layer."""
    return ["delta" if t == "linear_attention" else "attention" for t in args.types]


def layer_windows(args: ModelArgs) -> list[Optional[int]]:
    """``sliding_window`` for the sliding layers, None elsewhere."""
    return [args.sliding_window if t == "sliding_attention" else None for t in args.types]


class QKNormAttention(Attention):
    """:class:`~.common.Attention` with a per-head RMSNorm on q and k before RoPE (Qwen3's)."""

    def __init__(self, args: ModelArgs, window: Optional[int]):
        d = args.head_dim
        # Only the sliding layers are rotary: the full layers have no position embedding.
        rope = nn.RoPE(d, traditional=False, base=args.rope_theta) if window is not None else None
        super().__init__(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, d,
                         bias=args.attention_bias, rope=rope, window=window)
        self.q_norm = nn.RMSNorm(d, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(d, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        B, T, _ = x.shape
        d = self.head_dim
        q = self.q_norm(self.q_proj(x).reshape(B, T, self.n_q, d)).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, T, self.n_kv, d)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.n_kv, d).transpose(0, 2, 1, 3)
        return self.o_proj(attend(q, k, v, self.rope, cache, self.window, self.scale))


def sparse_moe(args: ModelArgs) -> MoEBlock:
    """Softmax top-k experts + an ungated shared expert (mlx-lm's names)."""
    return MoEBlock(
        args.hidden_size, args.moe_intermediate_size, args.num_experts, args.num_experts_per_tok,
        routing={"score": "softmax", "norm_topk": args.norm_topk_prob},
        shared=MLP(args.hidden_size, args.shared_expert_intermediate_size),
    )


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, kind: str, window: Optional[int]):
        super().__init__()
        self.kind = kind
        self.window = window
        if kind == "delta":
            self.linear_attn = qwen3_next.GatedDeltaNet(args)
        else:
            self.self_attn = QKNormAttention(args, window)
        self.mlp = sparse_moe(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        mixer = self.linear_attn if self.kind == "delta" else self.self_attn
        h = x + mixer(self.input_layernorm(x), cache=cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Model(CausalLM):
    """Lara-Mini for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``."""

    def __init__(self, args: ModelArgs):
        super().__init__(
            args,
            layers=[DecoderLayer(args, k, w) for k, w in zip(layer_schedule(args), layer_windows(args))],
            norm=nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps),
        )

    def layer_cache(self, layer):
        if layer.kind == "delta":
            return StateCache()
        return WindowKVCache(layer.window) if layer.window is not None else KVCache()
