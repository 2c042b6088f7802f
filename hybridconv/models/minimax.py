"""MiniMax-Text-01 (MiniMax, 2025): lightning attention + softmax attention, MoE, α/β residual factors.

References: MiniMax, "MiniMax-01: Scaling Foundation Models with Lightning
Attention" (2025, arXiv:2501.08313) for the model; Qin et al., "Various
Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention"
(2024, arXiv:2405.17381) and "TransNormerLLM" (2023, arXiv:2307.14995) for
lightning attention; Wang et al., "DeepNet: Scaling Transformers to 1,000
Layers" (2022, arXiv:2203.00555) for the scaled residuals; Jiang et al.,
"Mixtral of Experts" (2024, arXiv:2401.04088) for the MoE. The reference
implementation is transformers' ``MiniMaxForCausalLM``.

Architecture
============
A decoder of ``num_hidden_layers`` layers, each (note the residual is taken
*after* the norm, DeepNet-style, and scaled)::

    h = input_layernorm(x)
    h = α_attn · h + β_attn · mixer(h)
    h = post_attention_layernorm(h)
    y = α_mlp · h + β_mlp · moe(h)

with ``(α_attn, β_attn)`` = ``(linear_attn_alpha_factor,
linear_attn_beta_factor)`` after lightning attention and ``(full_attn_alpha_factor,
full_attn_beta_factor)`` after softmax attention, ``(α_mlp, β_mlp)`` =
``(mlp_alpha_factor, mlp_beta_factor)`` (the released model: α = 3.56, β = 1
everywhere), then a final RMSNorm and the (untied) head. RMSNorms are plain
``x / rms(x) · w`` (eps ``rms_norm_eps``).

Layer schedule
--------------
``layer_types[i]`` is ``"linear_attention"`` (lightning) or
``"full_attention"`` (softmax). transformers' default when the list is absent
alternates, softmax first (``i`` even); the released model has one softmax
layer after every seven lightning layers. The original remote-code config
spells it ``attn_type_list`` (0 = lightning, 1 = softmax), read as an alias.

Lightning attention
-------------------
With ``H = num_attention_heads`` heads of ``D = head_dim``:

1. ``[q | k | v] = silu(qkv_proj(x))`` laid out *per head* (``[H, 3D]``, each
   head's ``q``, ``k``, ``v`` side by side); no normalisation of q or k, no
   ``D^-1/2`` scale, no position embedding;
2. per head a ``D × D`` memory with a fixed decay ``λ_h = exp(−slope_h)``::

       S_t = λ_h · S_{t−1} + k_t v_tᵀ,      o_t = S_tᵀ q_t

   (a linear recurrence without the delta rule: :mod:`.gated_delta`'s
   :func:`~.gated_delta.gated_linear_attention` with ``g = −slope_h`` at every step
   and scale 1: chunked for prefill — transformers' block-wise form, intra-block
   ``(q kᵀ ⊙ λ^{i−j}) v`` plus the decayed inter-block state, is the same
   chunked algebra — one step at a time for decode);
3. ``out_proj(σ(output_gate(x)) ⊙ RMSNorm_{H·D}(o))``: one RMSNorm over all
   heads together, eps ``1e-6`` (transformers builds it with its default eps,
   not ``rms_norm_eps``).

``slope_h = 2^{−8h/H} · (1 − l / (L − 1 + 1e−5) + 1e−5)`` for head ``h = 1..H``
of layer ``l`` of ``L`` (ALiBi's slopes, weaker in deeper layers). The
checkpoint stores it as ``self_attn.slope_rate [H, 1, 1]`` together with three
buffers derived from it and ``block_size`` (``query_decay``, ``key_decay``,
``diagonal_decay``); transformers *reads* all four from the checkpoint (measured:
an edited ``slope_rate`` in the file changes its model). Here ``slope_rate`` is
the parameter (kept float32) and the derived decays are recomputed from it by
the chunked core, which needs no block length of its own (chunks of 64,
whatever ``block_size`` says: the result does not depend on it beyond float
rounding).

Softmax attention
-----------------
Mixtral's: grouped-query attention, RoPE over the whole head (``rope_theta``,
default 1e6; transformers 5 rotates the whole head whatever a
``partial_rotary_factor`` says, and it is the reference), scale
``head_dim^-1/2``, no biases, causal — within ``sliding_window`` when the
config sets one (transformers then uses the sliding mask for every softmax layer).

Mixture of experts (Mixtral's)
------------------------------
Router logits ``gate(x)``, softmax over ``num_local_experts`` in float32, the
top ``num_experts_per_tok`` renormalised to sum to one; SwiGLU experts
(``w1`` gate, ``w3`` up, ``w2`` down) of ``intermediate_size``. No shared expert.

Cache
-----
Lightning layer: :class:`~.common.StateCache` whose slot 1 holds the memory
``[B, H, D, D]`` float32 — constant size whatever the length (``H·D²·4`` bytes
per sequence: 4 MiB per layer for the released 64 heads of 128); slot 0 (a conv
state elsewhere) stays empty. Softmax layer: a :class:`~.common.KVCache`
(a :class:`~.common.WindowKVCache` with a sliding window).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .common import Attention, BaseModelArgs, CausalLM, KVCache, StateCache, WindowKVCache
from .gated_delta import gated_linear_attention
from .moe import MoEBlock

CHUNK_SIZE = 64  # chunks of the shared linear-recurrence core (any length gives the same result)
LIGHTNING_NORM_EPS = 1e-6  # transformers builds the lightning output norm with its default eps


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "minimax"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: Optional[int] = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    tie_word_embeddings: bool = False
    layer_types: list[str] = field(default_factory=list)
    full_attn_alpha_factor: float = 1.0
    full_attn_beta_factor: float = 1.0
    linear_attn_alpha_factor: float = 1.0
    linear_attn_beta_factor: float = 1.0
    mlp_alpha_factor: float = 1.0
    mlp_beta_factor: float = 1.0

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def types(self) -> list[str]:
        return self.layer_types or [
            "full_attention" if i % 2 == 0 else "linear_attention" for i in range(self.num_hidden_layers)
        ]


def layer_schedule(args: ModelArgs) -> list[str]:
    """``"lightning"`` or ``"attention"`` (softmax) for every layer."""
    return ["lightning" if t == "linear_attention" else "attention" for t in args.types]


def layer_windows(args: ModelArgs) -> list[Optional[int]]:
    """``sliding_window`` on every softmax layer (None: full causal attention)."""
    return [args.sliding_window if k == "attention" else None for k in layer_schedule(args)]


class LightningAttention(nn.Module):
    """Lightning attention (module docstring), with the checkpoint's names."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.head_dim = H, D = args.num_attention_heads, args.head_size
        self.qkv_proj = nn.Linear(args.hidden_size, 3 * H * D, bias=False)
        self.output_gate = nn.Linear(args.hidden_size, H * D, bias=False)
        self.out_proj = nn.Linear(H * D, args.hidden_size, bias=False)
        self.norm = nn.RMSNorm(H * D, eps=LIGHTNING_NORM_EPS)
        self.slope_rate = mx.zeros((H, 1, 1))  # the checkpoint's shape

    def __call__(self, x: mx.array, cache: Optional[StateCache] = None) -> mx.array:
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        qkv = nn.silu(self.qkv_proj(x)).reshape(B, T, H, 3 * D)  # per head: [q | k | v]
        q, k, v = mx.split(qkv, 3, axis=-1)
        g = mx.broadcast_to(-self.slope_rate.astype(mx.float32).reshape(H), (B, T, H))
        o, state = gated_linear_attention(q, k, v, g, cache[1] if cache is not None else None, CHUNK_SIZE, scale=1.0)
        if cache is not None:
            cache[1] = state
        o = self.norm(o.astype(x.dtype).reshape(B, T, H * D))
        return self.out_proj(mx.sigmoid(self.output_gate(x)) * o)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, kind: str, window: Optional[int]):
        super().__init__()
        self.kind, self.window = kind, window
        if kind == "lightning":
            self.self_attn = LightningAttention(args)
            self.attn_alpha, self.attn_beta = args.linear_attn_alpha_factor, args.linear_attn_beta_factor
        else:
            d = args.head_size
            self.self_attn = Attention(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, d,
                                       rope=nn.RoPE(d, traditional=False, base=args.rope_theta), window=window)
            self.attn_alpha, self.attn_beta = args.full_attn_alpha_factor, args.full_attn_beta_factor
        self.mlp_alpha, self.mlp_beta = args.mlp_alpha_factor, args.mlp_beta_factor
        self.block_sparse_moe = MoEBlock(
            args.hidden_size, args.intermediate_size, args.num_local_experts, args.num_experts_per_tok,
            routing={"score": "softmax", "norm_topk": True},
        )
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        h = self.input_layernorm(x)  # the residual is the normalised input (DeepNet)
        h = h * self.attn_alpha + self.self_attn(h, cache=cache) * self.attn_beta
        h = self.post_attention_layernorm(h)
        return h * self.mlp_alpha + self.block_sparse_moe(h) * self.mlp_beta


class Model(CausalLM):
    """MiniMax-Text-01 for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``."""

    def __init__(self, args: ModelArgs):
        super().__init__(
            args,
            layers=[DecoderLayer(args, k, w) for k, w in zip(layer_schedule(args), layer_windows(args))],
            norm=nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps),
        )

    def layer_cache(self, layer):
        if layer.kind == "lightning":
            return StateCache()
        return WindowKVCache(layer.window) if layer.window is not None else KVCache()
