"""Kimi-Linear (Moonshot AI): Kimi Delta Attention interleaved with MLA, MoE.

References: Kimi Team, "Kimi Linear: An Expressive, Efficient Attention
Architecture" (technical report, 2025, arXiv:2510.26692) for KDA and the model;
Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta
Rule" (2024, arXiv:2412.06464) and Yang et al., "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length" (2024, arXiv:2406.06484)
for the gated delta rule and its chunked (WY / UT-transform) form; DeepSeek-AI,
"DeepSeek-V2" (2024, arXiv:2405.04434) for multi-head latent attention (MLA).
The reference implementation is transformers' ``KimiLinearForCausalLM``.
The KDA computation (:class:`DeltaAttention`) and MLA (:class:`MLAttention`,
with optional interleaved RoPE and a per-head output gate) are shared with
Ling-3 (:mod:`.bailing_hybrid`).

Architecture
============
A pre-norm decoder of ``num_hidden_layers`` layers; every layer is
``h = x + mixer(input_layernorm(x))`` then ``h + ffn(post_attention_layernorm(h))``
with plain RMSNorms (scale = weight, no offset). The mixer is KDA or MLA, the
feed-forward a dense SwiGLU MLP or a mixture of experts. The output head is
its own matrix (transformers' Kimi-Linear never ties it, whatever
``tie_word_embeddings`` says).

Layer schedule
--------------
Mixers: ``layer_types`` (transformers 5: ``"linear_attention"`` = KDA,
``"full_attention"`` = MLA), or in the published remote-code config
``linear_attn_config.kda_layers`` / ``full_attn_layers`` — *1-based* layer
numbers (the published 48B model: MLA at layers 4, 8, …, i.e. 3 KDA : 1 MLA).
Feed-forward: ``mlp_layer_types`` (``"dense"`` / ``"sparse"``), or the published
``first_k_dense_replace``: the first ``k`` layers dense, the rest MoE. The
converter normalises both layouts to both spellings (see
:mod:`hybridconv.converters.kimi_linear`).

Kimi Delta Attention (KDA)
--------------------------
With ``H = linear_attn_config.num_heads`` heads of ``D = head_dim`` channels:

1. ``q, k, v = q_proj(x), k_proj(x), v_proj(x)`` (``H·D`` each), each through
   its own causal depthwise conv of width ``short_conv_kernel_size`` (no bias)
   and SiLU. Decoding keeps the last ``K - 1`` inputs of the three convs (stored
   side by side as one ``[b, K-1, 3·H·D]`` conv state).
2. ``q`` and ``k`` are L2-normalised per head (``x / sqrt(Σx² + 1e-6)``, FLA's
   form) and ``q`` is scaled by ``D^-1/2``.
3. Fine-grained (per-channel) forget gate, a low-rank projection::

       log α_t = -exp(A_log_h) · softplus(f_b(f_a(x_t)) + dt_bias)   ∈ R^{H×D}

   (``A_log``: one number per head; ``dt_bias``: one per channel). This is the
   difference from Gated DeltaNet, whose decay is one scalar per head and step.
4. ``β_t = sigmoid(b_proj(x_t))`` per head. Per head, with the memory
   ``S ∈ R^{D×D}`` (key channel × value channel)::

       S_t = (I - β_t k_t k_tᵀ) · Diag(α_t) · S_{t-1} + β_t k_t v_tᵀ
       o_t = S_tᵀ q_t

   i.e. decay each key row of the memory by its own gate, then the delta rule
   (replace the value stored under ``k_t`` by ``v_t`` at rate ``β_t``).
5. Output: ``o_proj(RMSNorm_D(o) · w · sigmoid(g_b(g_a(x))))`` — a per-head
   RMSNorm (float32) gated by a low-rank sigmoid gate.

Prefill evaluates the recurrence chunk-wise (64 steps per chunk, vectorised
within a chunk, the state carried across chunks) in
:mod:`hybridconv.models.gated_delta`; decoding runs one step of the same
recurrence. The memory and the recurrence are float32 whatever the weights'
dtype (as in transformers' and FLA's kernels).

MLA without RoPE
----------------
Queries ``q_proj(x)`` (or ``q_b_proj(q_a_layernorm(q_a_proj(x)))`` when
``q_lora_rank`` is set): ``H`` heads of ``nope + rope`` channels. Keys and
values come from a shared latent: ``kv_a_proj_with_mqa(x) = [c | k_r]`` with
``c`` of ``kv_lora_rank`` channels (RMS-normalised by ``kv_a_layernorm``, eps
``1e-6``: transformers builds that norm with its default eps, not
``rms_norm_eps``) and one shared ``k_r`` of ``qk_rope_head_dim`` channels.
``kv_b_proj(c)`` gives per head ``k_nope`` and ``v``; the key is
``[k_nope | k_r]``. Kimi-Linear applies **no rotary embedding** (``mla_use_nope``:
position information comes from the KDA layers), so the ``k_r`` part is simply
a key slice shared by all heads. Scale ``(nope + rope)^-1/2``, causal.
The cache stores the latents ``c`` and ``k_r`` (``kv_lora_rank + rope``
numbers per token instead of ``H·(nope + rope + v)``); a decode step attends
in latent space ("absorbed" form: ``q_nope`` is mapped through the key half
of ``kv_b_proj`` and the result through its value half), prefill expands the
latents through ``kv_b_proj`` as transformers does. Both are the same
arithmetic reassociated.

Mixture of experts (as DeepSeek-V3)
-----------------------------------
Router logits ``x·W_gateᵀ`` in float32, scores ``sigmoid``; experts are chosen
by ``score + e_score_correction_bias`` (a load-balancing bias that only
affects *which* experts, within the best ``topk_group`` of ``num_expert_group``
groups), weighted by their un-biased scores, renormalised over the top-k when
``moe_renormalize``, times ``routed_scaling_factor``. Experts are SwiGLU MLPs of
``moe_intermediate_size``; ``num_shared_experts`` are one SwiGLU MLP of
``num_shared_experts · moe_intermediate_size`` added for every token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .common import (MLP, BaseModelArgs, CausalLM, KVCache, StateCache, attention_mask, causal_depthwise_conv,
                     is_batch_cache)
from .gated_delta import gated_delta, l2norm
from .moe import MoEBlock

# Chunk length of the chunked delta rule in prefill (transformers' and FLA's).
CHUNK_SIZE = 64
# transformers builds kv_a_layernorm / q_a_layernorm with its RMSNorm's default eps.
LATENT_NORM_EPS = 1e-6


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "kimi_linear"
    vocab_size: int = 163840
    hidden_size: int = 2304
    intermediate_size: int = 9216
    moe_intermediate_size: int = 1024
    num_hidden_layers: int = 27
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    kv_lora_rank: int = 512
    q_lora_rank: Optional[int] = None
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    linear_attn_config: dict = field(default_factory=dict)
    layer_types: list[str] = field(default_factory=list)
    mlp_layer_types: list[str] = field(default_factory=list)
    num_experts: int = 256
    num_experts_per_token: int = 8
    num_shared_experts: int = 1
    moe_renormalize: bool = True
    routed_scaling_factor: float = 2.446
    num_expert_group: int = 1
    topk_group: int = 1

    @property
    def linear_num_heads(self) -> int:
        return self.linear_attn_config.get("num_heads", 32)

    @property
    def linear_head_dim(self) -> int:
        return self.linear_attn_config.get("head_dim", 128)

    @property
    def conv_kernel(self) -> int:
        return self.linear_attn_config.get("short_conv_kernel_size", 4)


def layer_schedule(args: ModelArgs) -> list[str]:
    """``"kda"`` or ``"attention"`` (MLA) for every layer."""
    if args.layer_types:
        return ["attention" if t == "full_attention" else "kda" for t in args.layer_types]
    n = args.num_hidden_layers
    if "kda_layers" in args.linear_attn_config:
        kda = set(args.linear_attn_config["kda_layers"])  # 1-based
        return ["kda" if i + 1 in kda else "attention" for i in range(n)]
    return ["attention" if i and i % 4 == 0 else "kda" for i in range(n)]  # transformers' default


def layer_windows(args: ModelArgs) -> list[int | None]:
    """No attention window: MLA layers attend to the whole history."""
    return [None] * args.num_hidden_layers


def mlp_schedule(args: ModelArgs) -> list[str]:
    """``"dense"`` or ``"sparse"`` (MoE) for every layer (default: the first dense)."""
    if args.mlp_layer_types:
        return list(args.mlp_layer_types)
    return ["dense"] + ["sparse"] * (args.num_hidden_layers - 1)


class ShortConv(nn.Module):
    """Holds one depthwise conv kernel under mlx-lm's parameter name
    (``q_conv.conv.weight``, MLX layout ``[C, K, 1]``)."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel, groups=channels, bias=False)


class DeltaAttention(nn.Module):
    """The KDA computation (module docstring, steps 1-5), shared by Kimi-Linear
    and Ling-3 (:mod:`.bailing_hybrid`), which differ only in how the forget and
    output gates are parametrised and in parameter names. A subclass creates
    ``q_proj``, ``k_proj``, ``v_proj``, ``b_proj``, ``o_norm``, its output
    projection, ``num_heads``, ``head_dim``, and defines :meth:`conv_weights`
    (the three ``[C, K, 1]`` kernels), :meth:`forget_gate` (``log α``, float32
    ``[b, T, H, D]``), :meth:`output_gate` (pre-sigmoid, ``[b, T, H·D]``) and
    :meth:`out_proj`."""

    def conv_weights(self) -> list[mx.array]:  # pragma: no cover - interface
        raise NotImplementedError

    def forget_gate(self, x: mx.array) -> mx.array:  # pragma: no cover - interface
        raise NotImplementedError

    def output_gate(self, x: mx.array) -> mx.array:  # pragma: no cover - interface
        raise NotImplementedError

    def out_proj(self, o: mx.array) -> mx.array:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, x: mx.array, cache: Optional[StateCache] = None) -> mx.array:
        b, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        # The three short convs run as one depthwise conv over [q | k | v]: one
        # conv state per layer, as in the other state caches.
        qkv = mx.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)
        weight = mx.concatenate(self.conv_weights(), axis=0)
        qkv, conv_state = causal_depthwise_conv(
            qkv, weight, None, cache[0] if cache is not None else None
        )
        qkv = nn.silu(qkv).astype(mx.float32)
        q, k, v = (t.reshape(b, T, H, D) for t in mx.split(qkv, 3, axis=-1))
        q, k = l2norm(q), l2norm(k)  # the core applies the D^-1/2 read-out scale

        g = self.forget_gate(x)
        beta = mx.sigmoid(self.b_proj(x).astype(mx.float32))

        state = cache[1] if cache is not None else None
        o, state = gated_delta(q, k, v, g, beta, state, CHUNK_SIZE)
        if cache is not None:
            cache[0], cache[1] = conv_state, state

        out_gate = self.output_gate(x).astype(mx.float32).reshape(b, T, H, D)
        o = mx.fast.rms_norm(o, self.o_norm.weight.astype(mx.float32), self.o_norm.eps)
        o = (o * mx.sigmoid(out_gate)).astype(x.dtype)
        return self.out_proj(o.reshape(b, T, H * D))


class KimiDeltaAttention(DeltaAttention):
    """Kimi's KDA: low-rank forget and output gates, mlx-lm's parameter names."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads = H = args.linear_num_heads
        self.head_dim = D = args.linear_head_dim
        self.kernel = args.conv_kernel
        hidden, proj = args.hidden_size, H * D
        self.q_proj = nn.Linear(hidden, proj, bias=False)
        self.k_proj = nn.Linear(hidden, proj, bias=False)
        self.v_proj = nn.Linear(hidden, proj, bias=False)
        self.q_conv = ShortConv(proj, self.kernel)
        self.k_conv = ShortConv(proj, self.kernel)
        self.v_conv = ShortConv(proj, self.kernel)
        self.f_a_proj = nn.Linear(hidden, D, bias=False)
        self.f_b_proj = nn.Linear(D, proj, bias=False)
        self.b_proj = nn.Linear(hidden, H, bias=False)
        self.g_a_proj = nn.Linear(hidden, D, bias=False)
        self.g_b_proj = nn.Linear(D, proj, bias=False)
        self.A_log = mx.zeros((1, 1, H, 1))  # the checkpoint's shape
        self.dt_bias = mx.zeros((proj,))
        self.o_norm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.o_proj = nn.Linear(proj, hidden, bias=False)

    def conv_weights(self) -> list[mx.array]:
        return [self.q_conv.conv.weight, self.k_conv.conv.weight, self.v_conv.conv.weight]

    def forget_gate(self, x: mx.array) -> mx.array:
        b, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        gate_in = self.f_b_proj(self.f_a_proj(x)).astype(mx.float32)
        gate_in = gate_in + self.dt_bias.astype(mx.float32)
        return -mx.exp(self.A_log.astype(mx.float32).reshape(H, 1)) * nn.softplus(gate_in.reshape(b, T, H, D))

    def output_gate(self, x: mx.array) -> mx.array:
        return self.g_b_proj(self.g_a_proj(x))

    def out_proj(self, o: mx.array) -> mx.array:
        return self.o_proj(o)


def dense_weight(linear) -> mx.array:
    """A Linear's weight as a float matrix (dequantized if the layer is quantized)."""
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(
            linear.weight, linear.scales, linear.get("biases"), linear.group_size, linear.bits,
            mode=getattr(linear, "mode", "affine"),
        )
    return linear.weight


class MLAttention(nn.Module):
    """Multi-head latent attention (module docstring), without rotary embeddings
    for Kimi-Linear. Ling-3 (:mod:`.bailing_hybrid`) uses the same with
    ``rope`` (an ``nn.RoPE`` over the ``qk_rope_head_dim`` channels, applied to
    ``q_r`` and the shared ``k_r`` before caching), ``head_gate`` (the output of
    each head times ``σ(g_proj(x))_h``, one logit per head, computed in float32)
    and its output projection named ``out_name``. GLM-5.3-Flash (:mod:`.glm5_next`)
    uses it without RoPE (``qk_rope_head_dim`` 0), its latent norms at
    ``latent_eps = rms_norm_eps``, and a ``select`` mask (DSA) in ``__call__``."""

    def __init__(self, args, *, rope=None, head_gate: bool = False, out_name: str = "o_proj",
                 latent_eps: float = LATENT_NORM_EPS):
        super().__init__()
        self.num_heads = args.num_attention_heads
        self.nope, self.rope, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.rank = args.kv_lora_rank
        self.q_lora_rank = args.q_lora_rank
        self.scale = (self.nope + self.rope) ** -0.5
        hidden, H = args.hidden_size, self.num_heads
        bias = args.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, H * (self.nope + self.rope), bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = nn.RMSNorm(self.q_lora_rank, eps=latent_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * (self.nope + self.rope), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.rank + self.rope, bias=bias)
        self.kv_a_layernorm = nn.RMSNorm(self.rank, eps=latent_eps)
        self.kv_b_proj = nn.Linear(self.rank, H * (self.nope + self.v_dim), bias=False)
        self.out_name = out_name
        setattr(self, out_name, nn.Linear(H * self.v_dim, hidden, bias=bias))
        self.rotary = rope
        if head_gate:
            self.g_proj = nn.Linear(hidden, H, bias=False)

    def __call__(self, x: mx.array, cache: Optional[KVCache] = None, select=None) -> mx.array:
        """``select(x, q_latent, offset, n_keys) -> mask [b, 1, T, n_keys]``, when
        given, replaces the causal mask (GLM-5.3-Flash's DSA: ``q_latent`` is the
        normalised query latent, ``offset`` the queries' first position)."""
        b, T, _ = x.shape
        H = self.num_heads
        q_latent = None
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q_latent = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_latent)
        q = q.reshape(b, T, H, self.nope + self.rope).transpose(0, 2, 1, 3)
        q_nope, q_r = q[..., : self.nope], q[..., self.nope :]

        ckv = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(ckv[..., : self.rank])[:, None]  # [b, 1, T, rank]
        k_r = ckv[..., self.rank :][:, None]  # [b, 1, T, rope], shared by the heads
        offset = cache.offset if cache is not None else 0  # one per sequence for a batch cache
        if self.rotary is not None:
            q_r, k_r = self.rotary(q_r, offset=offset), self.rotary(k_r, offset=offset)
            q = mx.concatenate([q_nope, q_r], axis=-1)
        if is_batch_cache(cache):  # mlx-lm's BatchGenerator: its mask, made before the update
            mask = cache.make_mask(T, return_array=True)
            latent, k_r = cache.update_and_fetch(latent, k_r)
        else:
            if cache is not None:
                latent, k_r = cache.update_and_fetch(latent, k_r)
            mask = attention_mask(T, latent.shape[2], offset, None)
        if select is not None:  # indexed attention (DSA): the selection is the mask
            mask = select(x, q_latent, offset, latent.shape[2])
        if T == 1:
            # Absorbed (attention in latent space, one shared key/value head):
            # q_nope·(W_k c) = (W_kᵀ q_nope)·c and Σ p (W_v c) = W_v (Σ p c).
            w = dense_weight(self.kv_b_proj).reshape(H, self.nope + self.v_dim, self.rank)
            w = w.astype(q.dtype)
            q = mx.concatenate([q_nope @ w[:, : self.nope], q_r], axis=-1)  # [b, H, 1, rank + rope]
            k = mx.concatenate([latent, k_r], axis=-1)  # [b, 1, S, rank + rope]
            out = mx.fast.scaled_dot_product_attention(q, k, latent, scale=self.scale, mask=mask)
            out = out @ w[:, self.nope :].swapaxes(-1, -2)  # [b, H, 1, v]
        else:
            # Expanded, as transformers: k = [k_nope | k_r], v per head.
            kv = self.kv_b_proj(latent[:, 0]).reshape(b, -1, H, self.nope + self.v_dim)
            kv = kv.transpose(0, 2, 1, 3)
            k_nope, v = kv[..., : self.nope], kv[..., self.nope :]
            k = mx.concatenate([k_nope, mx.broadcast_to(k_r, (*k_nope.shape[:3], self.rope))], axis=-1)
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        if "g_proj" in self:  # one gate per head: [b, T, H] -> [b, H, T, 1]
            gate = mx.sigmoid(self.g_proj(x).astype(mx.float32)).astype(out.dtype)
            out = out * gate.transpose(0, 2, 1)[..., None]
        out = out.transpose(0, 2, 1, 3).reshape(b, T, H * self.v_dim)
        return getattr(self, self.out_name)(out)


def sparse_moe(args: ModelArgs) -> MoEBlock:
    """DeepSeek-V3 routing over SwiGLU experts plus shared experts, with
    mlx-lm's parameter names (``gate``, ``switch_mlp``, ``e_score_correction_bias``
    on the block, ``shared_experts``)."""
    shared = None
    if args.num_shared_experts:
        shared = MLP(args.hidden_size, args.moe_intermediate_size * args.num_shared_experts)
    return MoEBlock(
        args.hidden_size,
        args.moe_intermediate_size,
        args.num_experts,
        args.num_experts_per_token,
        routing=dict(
            score="sigmoid",
            norm_topk=args.moe_renormalize,
            norm_eps=1e-20,  # transformers' DeepSeek-V3 router
            routed_scaling=args.routed_scaling_factor,
            n_group=args.num_expert_group,
            topk_group=args.topk_group,
        ),
        correction_bias="e_score_correction_bias",
        shared=shared,
        shared_name="shared_experts",
    )


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, kind: str, mlp_kind: str):
        super().__init__()
        self.kind = kind
        self.is_linear = kind == "kda"
        self.self_attn = KimiDeltaAttention(args) if self.is_linear else MLAttention(args)
        self.mlp = (
            sparse_moe(args) if mlp_kind == "sparse" else MLP(args.hidden_size, args.intermediate_size)
        )
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache=cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Model(CausalLM):
    """Kimi-Linear for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``."""

    def __init__(self, args: ModelArgs):
        super().__init__(
            args,
            layers=[DecoderLayer(args, kind, mlp) for kind, mlp in zip(layer_schedule(args), mlp_schedule(args))],
            norm=nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps),
        )
