"""Ling-3 (inclusionAI, ``bailing_hybrid``): Kimi Delta Attention + gated MLA with interleaved RoPE, group-limited MoE.

References: Kimi Team, "Kimi Linear: An Expressive, Efficient Attention
Architecture" (2025, arXiv:2510.26692) for Kimi Delta Attention (KDA); Yang,
Kautz & Hatamizadeh, "Gated Delta Networks" (2024, arXiv:2412.06464) for the
gated delta rule; DeepSeek-AI, "DeepSeek-V2" (2024, arXiv:2405.04434) and
"DeepSeek-V3 Technical Report" (2024, arXiv:2412.19437) for multi-head latent
attention (MLA) and the group-limited sigmoid router; Qiu et al., "Gated
Attention for Large Language Models" (2025, arXiv:2505.06708) for the output
gate. The reference implementation is transformers' ``BailingHybridForCausalLM``
(modular: DeepSeek-V3's MLA and MoE, GLM-5-Next's KDA, Kimi-Linear's layer).

Architecture
============
A pre-norm decoder: ``h = x + mixer(input_layernorm(x))``, ``y = h +
ffn(post_attention_layernorm(h))``, plain RMSNorms; then a final norm and the
head (never tied: transformers' class ties nothing whatever the config says).

Layer schedule
--------------
Mixers: ``layer_types`` (``"linear_attention"`` = KDA, ``"full_attention"`` =
MLA); without it (the released configs) the last layer of every group of
``layer_group_size`` is MLA: layer ``i`` is MLA when ``(i + 1) %
layer_group_size == 0`` (transformers' rule; mlx-lm also makes MLA every layer
after the last whole group). Feed-forward: ``mlp_layer_types`` (``"dense"`` /
``"sparse"``) or the first ``first_k_dense_replace`` layers dense, the rest MoE.

Sizes: the KDA heads are ``linear_num_heads × linear_head_dim``; the released
configs have neither key and mean ``num_attention_heads × head_dim``, while
transformers 5 writes both keys and sets ``head_dim`` to the MLA rotary size
``qk_rope_head_dim`` (DeepSeek-V3's config does that). The converter writes
``linear_*`` and ``head_dim = linear_head_dim`` (mlx-lm's reading).

Kimi Delta Attention
--------------------
As in Kimi-Linear (:mod:`.kimi_linear` explains it; the computation is its
:class:`~.kimi_linear.DeltaAttention`): ``q, k, v`` projections through their
own short causal convs (``q_conv1d`` ...) and SiLU, q/k L2-normalised, the
per-channel gated delta rule (:mod:`.gated_delta`) with ``β = σ(b_proj(x))``,
and ``o_proj(RMSNorm_D(o) · w · σ(g_proj(x)))`` per head. Ling-3's gates differ
from Kimi's: no low-rank factors (``f_proj`` and ``g_proj`` are full ``H·D``
projections), and the *safe* forget gate (``kda_safe_gate``, the default)::

    log α_t = lower_bound · σ(exp(A_log_h) · (f_proj(x_t) + dt_bias))   ∈ (lower_bound, 0)

(``kda_lower_bound``, −5: the decay per step stays in ``(e^{−5}, 1)``, which
bounds the pairwise decays of the chunked form); with ``kda_safe_gate:
false`` Kimi's ``−exp(A_log)·softplus(f + dt_bias)``.

Gated MLA
---------
Kimi-Linear's MLA (:class:`~.kimi_linear.MLAttention`: queries through
``q_proj`` or the ``q_a``/``q_b`` LoRA, one latent ``c`` of ``kv_lora_rank``
plus one shared rotary key ``k_r`` per token, ``kv_b_proj`` expanding ``c``
into per-head ``k_nope`` and ``v``, the cache holding only ``c`` and ``k_r``,
absorbed decode) with two additions:

* rotary embeddings on ``q_r`` and ``k_r`` (``qk_rope_head_dim`` channels,
  ``rope_theta``) in DeepSeek's *interleaved* layout — consecutive pairs
  ``(x0, x1), (x2, x3), …`` rotated together (transformers rotates the even
  and odd channels and writes them out de-interleaved, a permutation applied
  to q and k alike, so the scores are those of MLX's ``traditional`` RoPE);
* an output gate per head: ``out_h · σ(g_proj(x)_h)`` before the output
  projection ``dense``.

Scale ``(qk_nope_head_dim + qk_rope_head_dim)^-1/2``; the latent norms use eps
``1e-6`` (transformers' default; mlx-lm uses ``rms_norm_eps``).

Mixture of experts (DeepSeek-V3's router)
-----------------------------------------
Sigmoid scores in float32; experts chosen by ``score + expert_bias`` among the
``topk_group`` best of ``n_group`` groups (a group's score: its two best), weighted
by the unbiased scores renormalised over the chosen (``+1e-20``) when
``norm_topk_prob``, times ``routed_scaling_factor``; SwiGLU experts of
``moe_intermediate_size`` plus a shared SwiGLU of ``num_shared_experts ×
moe_intermediate_size`` added for every token. Dense layers: SwiGLU of
``intermediate_size``.

Cache
-----
KDA layer: :class:`~.common.StateCache` ``[conv state [B, K−1, 3·H·D],
recurrent state [B, H, D, D] float32]`` (bounded); MLA layer: a
:class:`~.common.KVCache` of the latents ``[B, 1, T, kv_lora_rank]`` and rotated
``k_r`` ``[B, 1, T, qk_rope_head_dim]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .common import MLP, BaseModelArgs, CausalLM
from .kimi_linear import DeltaAttention, MLAttention
from .moe import MoEBlock


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "bailing_hybrid"
    vocab_size: int = 157184
    hidden_size: int = 2560
    intermediate_size: int = 6144
    moe_intermediate_size: int = 768
    num_hidden_layers: int = 42
    num_attention_heads: int = 32
    num_experts: int = 512
    num_experts_per_tok: int = 8
    num_shared_experts: int = 1
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    kv_lora_rank: int = 512
    q_lora_rank: Optional[int] = None
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 6_000_000.0
    linear_num_heads: int = 32
    linear_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    kda_safe_gate: bool = True
    kda_lower_bound: float = -5.0
    layer_types: list[str] = field(default_factory=list)
    mlp_layer_types: list[str] = field(default_factory=list)
    tie_word_embeddings: bool = False


def layer_schedule(args: ModelArgs) -> list[str]:
    """``"kda"`` or ``"attention"`` (gated MLA) for every layer (the converter
    writes ``layer_types``)."""
    return ["attention" if t == "full_attention" else "kda" for t in args.layer_types]


def layer_windows(args: ModelArgs) -> list[Optional[int]]:
    """No attention window: MLA layers attend to the whole history."""
    return [None] * args.num_hidden_layers


class LingDeltaAttention(DeltaAttention):
    """Ling-3's KDA: full-rank forget and output gates, the safe forget gate,
    the checkpoint's (and mlx-lm's) parameter names."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads = H = args.linear_num_heads
        self.head_dim = D = args.linear_head_dim
        hidden, proj, K = args.hidden_size, H * D, args.linear_conv_kernel_dim
        self.safe_gate, self.lower_bound = args.kda_safe_gate, args.kda_lower_bound
        self.q_proj = nn.Linear(hidden, proj, bias=False)
        self.k_proj = nn.Linear(hidden, proj, bias=False)
        self.v_proj = nn.Linear(hidden, proj, bias=False)
        self.q_conv1d = nn.Conv1d(proj, proj, K, groups=proj, bias=False)
        self.k_conv1d = nn.Conv1d(proj, proj, K, groups=proj, bias=False)
        self.v_conv1d = nn.Conv1d(proj, proj, K, groups=proj, bias=False)
        self.f_proj = nn.Linear(hidden, proj, bias=False)
        self.A_log = mx.zeros((H,))
        self.dt_bias = mx.zeros((proj,))
        self.b_proj = nn.Linear(hidden, H, bias=False)
        self.g_proj = nn.Linear(hidden, proj, bias=False)
        self.o_norm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.o_proj = nn.Linear(proj, hidden, bias=False)

    def conv_weights(self) -> list[mx.array]:
        return [self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight]

    def forget_gate(self, x: mx.array) -> mx.array:
        b, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        f = (self.f_proj(x).astype(mx.float32) + self.dt_bias.astype(mx.float32)).reshape(b, T, H, D)
        rate = mx.exp(self.A_log.astype(mx.float32)).reshape(H, 1)
        if self.safe_gate:
            return self.lower_bound * mx.sigmoid(rate * f)
        return -rate * nn.softplus(f)

    def output_gate(self, x: mx.array) -> mx.array:
        return self.g_proj(x)

    def out_proj(self, o: mx.array) -> mx.array:
        return self.o_proj(o)


def sparse_moe(args: ModelArgs) -> MoEBlock:
    """DeepSeek-V3 routing, the checkpoint's names: ``gate`` (with
    ``gate.expert_bias``), ``switch_mlp``, ``shared_experts``."""
    return MoEBlock(
        args.hidden_size, args.moe_intermediate_size, args.num_experts, args.num_experts_per_tok,
        routing=dict(score="sigmoid", norm_topk=args.norm_topk_prob, norm_eps=1e-20,
                     routed_scaling=args.routed_scaling_factor, n_group=args.n_group, topk_group=args.topk_group),
        correction_bias="expert_bias", correction_bias_in_router=True,
        shared=MLP(args.hidden_size, args.moe_intermediate_size * args.num_shared_experts),
        shared_name="shared_experts",
    )


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, kind: str, mlp_kind: str):
        super().__init__()
        self.kind = kind
        if kind == "kda":
            self.attention = LingDeltaAttention(args)
        else:
            rope = nn.RoPE(args.qk_rope_head_dim, traditional=True, base=args.rope_theta)
            self.attention = MLAttention(args, rope=rope, head_gate=True, out_name="dense")
        self.mlp = sparse_moe(args) if mlp_kind == "sparse" else MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        h = x + self.attention(self.input_layernorm(x), cache=cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Model(CausalLM):
    """Ling-3 for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``."""

    embedding_name = "word_embeddings"

    def __init__(self, args: ModelArgs):
        super().__init__(
            args,
            layers=[DecoderLayer(args, k, m) for k, m in zip(layer_schedule(args), args.mlp_layer_types)],
            norm=nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps),
        )
