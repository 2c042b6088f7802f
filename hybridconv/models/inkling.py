"""Inkling (Thinking Machines, ``inkling_text``): attention without rotary
embeddings — positions come from short convolutions on keys and values and a
relative position bias — with residual short convolutions on both branches, and
a sigmoid MoE whose shared experts act as a routing sink.

The reference is transformers' ``modeling_inkling.py`` (ported from the authors'
SGLang code); its names are kept. The pieces Inkling-2
(:mod:`hybridconv.models.inkling2`) shares with it live here:
:class:`ResidualShortConv`, :func:`relative_bias`, :func:`log_scale`.

Architecture
============
::

    h_0 = rmsnorm(embed(ids))                                  # embed_norm
    a   = attn_sconv(attention(input_layernorm(h)))
    h   = h + a
    m   = mlp_sconv(mlp(post_attention_layernorm(h)))
    h   = h + m
    logits = lm_head(norm(h) / logits_mup_width_multiplier)[..., :unpadded_vocab_size]

The head is never tied (separate ``embed`` / ``unembed`` tensors). Norms are
RMSNorms with ``rms_norm_eps``.

Residual short convolutions
---------------------------
``sconv(x) = x + Σ_{j<K} w_j ⊙ x_{t−K+1+j}``: a causal depthwise convolution of
``conv_kernel_size`` taps (no bias) added to its own input, computed in float32
(transformers keeps these kernels in float32 even in a bf16 model). Four per
layer: on the keys (``k_sconv``) and values (``v_sconv``) after their
projections, on the attention output (``attn_sconv``) and on the MLP output
(``mlp_sconv``). Each keeps its last ``K − 1`` inputs for decoding (two
:class:`~hybridconv.models.common.StateCache` s of two slots each: keys/values,
attention/MLP outputs).

Attention
---------
Layer types: ``"hybrid"`` (full causal attention: ``num_attention_heads``,
``num_key_value_heads``, ``head_dim``) and ``"hybrid_sliding"`` (a window of
``sliding_window_size`` positions with the ``swa_*`` head counts and size).
Queries ``q_proj(x)``, keys ``k_sconv(k_proj(x))``, values ``v_sconv(v_proj(x))``;
queries and keys RMS-normalised per head (``q_norm``, ``k_norm``), hence the
logit scale ``1 / head_dim`` rather than its square root. No rotary embedding.

Relative position bias: a token's ``relative_states = r_proj(x)`` (``d_rel`` per
head) mix a learned bank of bias-vs-distance profiles ``proj`` (``[d_rel,
extent]``) into one bias per backward distance::

    score(q, k) = (q·k) / d + (r_q · proj)[q − k]     for 0 ≤ q − k < extent, else + 0

with ``extent = sliding_window_size`` on sliding layers and ``rel_extent`` on full
ones (T5's relative bias, Raffel et al. 2020, with the profile chosen per token).
On full layers with ``log_scaling_n_floor`` set, each query position ``p``'s
scores (dot products and bias) are multiplied by
``τ(p) = 1 + log_scaling_alpha · log(max((p + 1) / n_floor, 1))`` (logit
scaling with the log of the context length, as in Chiang & Cholak 2022), computed
in float32.

Mixture of experts with a shared-expert sink
--------------------------------------------
``mlp_layer_types[i]`` is ``"dense"`` (a SwiGLU of ``intermediate_size`` times a
learned ``global_scale``) or ``"sparse"``: ``n_routed_experts`` SwiGLU experts of
``moe_intermediate_size``, ``num_experts_per_tok`` per token, plus
``n_shared_experts`` always-on experts. The router ``gate.weight`` scores routed
and shared experts together; the routed ones are chosen by sigmoid score plus
``e_score_correction_bias``, and the chosen and shared ones are weighted by
``σ(l_i) / Σ σ(l_j)`` over both, times ``route_scale · gate.global_scale``
(:func:`hybridconv.models.moe.route_sigmoid_sink`). Routing runs in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .common import BaseModelArgs, CausalLM, KVCache, StateCache, WindowKVCache, attend_biased, causal_depthwise_conv
from .moe import SwitchGLU, combine, route_sigmoid_sink

LAYER_TYPES = ("hybrid", "hybrid_sliding")


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "inkling_text"
    vocab_size: int = 201024
    unpadded_vocab_size: Optional[int] = None
    hidden_size: int = 6144
    num_hidden_layers: int = 66
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 128
    swa_num_attention_heads: int = 64
    swa_num_key_value_heads: int = 16
    swa_head_dim: int = 128
    sliding_window_size: int = 512
    d_rel: int = 16
    rel_extent: int = 1024
    log_scaling_n_floor: Optional[int] = None
    log_scaling_alpha: float = 0.1
    layer_types: list[str] = field(default_factory=list)
    mlp_layer_types: list[str] = field(default_factory=list)
    rms_norm_eps: float = 1e-6
    conv_kernel_size: int = 4
    intermediate_size: int = 24576
    moe_intermediate_size: int = 3072
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    n_shared_experts: int = 2
    route_scale: float = 8.0
    logits_mup_width_multiplier: float = 24.0
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False


def layer_schedule(args) -> list[str]:
    return ["attention"] * args.num_hidden_layers


def layer_windows(args) -> list[Optional[int]]:
    return [args.sliding_window_size if t == "hybrid_sliding" else None for t in args.layer_types]


def attention_shape(args, layer_type: str) -> tuple[int, int, int]:
    """(heads, KV heads, head size) of a layer type."""
    if layer_type == "hybrid_sliding":
        return args.swa_num_attention_heads, args.swa_num_key_value_heads, args.swa_head_dim
    return args.num_attention_heads, args.num_key_value_heads, args.head_dim


class ResidualShortConv(nn.Module):
    """``(x + causal_depthwise_conv(x)) / out_scale`` in float32, returned in
    ``x``'s dtype (Inkling: ``out_scale`` 1; Inkling-2: ``√(K + 1)``). The kernel
    is ``conv1d.weight`` (MLX ``[C, K, 1]``); ``cache[slot]`` keeps its history."""

    def __init__(self, channels: int, kernel: int, slot: int, out_scale: float = 1.0):
        super().__init__()
        self.conv1d = nn.Conv1d(channels, channels, kernel_size=kernel, groups=channels, bias=False)
        self.slot = slot
        self.out_scale = out_scale

    def __call__(self, x: mx.array, cache: Optional[StateCache] = None) -> mx.array:
        xf = x.astype(mx.float32)
        state = cache[self.slot] if cache is not None else None
        y, new_state = causal_depthwise_conv(xf, self.conv1d.weight.astype(mx.float32), None, state)
        if cache is not None:
            cache[self.slot] = new_state
        y = y + xf
        if self.out_scale != 1.0:
            y = y / self.out_scale
        return y.astype(x.dtype)


def log_scale(positions: mx.array, alpha: float, n_floor: Optional[int]) -> Optional[mx.array]:
    """``τ(p) = 1 + alpha · log(max((p + 1) / n_floor, 1))`` (float32), or None without ``n_floor``."""
    if n_floor is None:
        return None
    return 1.0 + alpha * mx.log(mx.maximum((positions + 1).astype(mx.float32) / n_floor, 1.0))


def relative_bias(rel_logits: mx.array, offset: int, extent: int):
    """The ``bias(q0, q1, k0, k1)`` of :func:`~hybridconv.models.common.attend_biased`
    from ``rel_logits [B, H, T, extent]`` (the per-token profiles of the queries at
    positions ``offset .. offset + T − 1``): ``rel_logits[q, q − k]`` for
    ``0 ≤ q − k < extent``, 0 elsewhere."""
    B, H = rel_logits.shape[:2]

    def bias(q0: int, q1: int, k0: int, k1: int) -> mx.array:
        dist = mx.arange(q0, q1)[:, None] - mx.arange(k0, k1)[None, :]
        idx = mx.broadcast_to(mx.clip(dist, 0, extent - 1), (B, H, q1 - q0, k1 - k0))
        rows = rel_logits[:, :, q0 - offset : q1 - offset]
        out = mx.take_along_axis(rows, idx, axis=-1)
        return mx.where((dist >= 0) & (dist < extent), out, mx.array(0.0, out.dtype))

    return bias


class RelativeLogits(nn.Module):
    def __init__(self, d_rel: int, extent: int):
        super().__init__()
        self.proj = mx.zeros((d_rel, extent))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        D = args.hidden_size
        self.n_q, self.n_kv, self.head_dim = attention_shape(args, layer_type)
        d = self.head_dim
        self.is_sliding = layer_type == "hybrid_sliding"
        self.window = args.sliding_window_size if self.is_sliding else None
        self.extent = args.sliding_window_size if self.is_sliding else args.rel_extent
        self.n_floor = None if self.is_sliding else args.log_scaling_n_floor
        self.alpha = args.log_scaling_alpha
        self.q_proj = nn.Linear(D, self.n_q * d, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv * d, bias=False)
        self.r_proj = nn.Linear(D, self.n_q * args.d_rel, bias=False)
        self.o_proj = nn.Linear(self.n_q * d, D, bias=False)
        self.k_sconv = ResidualShortConv(self.n_kv * d, args.conv_kernel_size, slot=0)
        self.v_sconv = ResidualShortConv(self.n_kv * d, args.conv_kernel_size, slot=1)
        self.q_norm = nn.RMSNorm(d, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(d, eps=args.rms_norm_eps)
        self.rel_logits_proj = RelativeLogits(args.d_rel, self.extent)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        conv_cache, kv_cache = cache if cache is not None else (None, None)
        B, T, _ = x.shape
        d = self.head_dim
        q = self.q_norm(self.q_proj(x).reshape(B, T, self.n_q, d)).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_sconv(self.k_proj(x), conv_cache).reshape(B, T, self.n_kv, d)).transpose(0, 2, 1, 3)
        v = self.v_sconv(self.v_proj(x), conv_cache).reshape(B, T, self.n_kv, d).transpose(0, 2, 1, 3)
        r = self.r_proj(x).reshape(B, T, self.n_q, -1)
        rel = (r @ self.rel_logits_proj.proj.astype(r.dtype)).transpose(0, 2, 1, 3)  # [B, H, T, extent]
        offset = kv_cache.offset if kv_cache is not None else 0
        tau = log_scale(mx.arange(offset, offset + T), self.alpha, self.n_floor)
        if tau is not None:  # float32, then back, as the reference scales
            q = (q.astype(mx.float32) * tau[:, None]).astype(q.dtype)
            rel = (rel.astype(mx.float32) * tau[:, None]).astype(rel.dtype)
        out = attend_biased(q, k, v, kv_cache, self.window, 1.0 / d, relative_bias(rel, offset, self.extent))
        return self.o_proj(out)


class MLP(nn.Module):
    """Dense SwiGLU times a learned scalar ``global_scale``."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.global_scale = mx.ones((1,))

    def __call__(self, x: mx.array) -> mx.array:
        y = self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))
        return y * self.global_scale.astype(y.dtype)


class Router(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        E, S = args.n_routed_experts, args.n_shared_experts
        self.weight = mx.zeros((E + S, args.hidden_size))
        self.global_scale = mx.ones((1,))
        self.e_score_correction_bias = mx.zeros((E,))
        self.top_k, self.n_shared, self.route_scale = args.num_experts_per_tok, S, args.route_scale

    def __call__(self, x: mx.array):
        logits = x.astype(mx.float32) @ self.weight.astype(mx.float32).T
        inds, w, shared = route_sigmoid_sink(logits, self.top_k, self.n_shared,
                                             correction_bias=self.e_score_correction_bias, scale=self.route_scale)
        g = self.global_scale.astype(mx.float32)
        return inds, w * g, shared * g


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, I = args.hidden_size, args.moe_intermediate_size
        self.gate = Router(args)
        self.switch_mlp = SwitchGLU(D, I, args.n_routed_experts)
        self.shared_experts = SwitchGLU(D, I, args.n_shared_experts)

    def __call__(self, x: mx.array) -> mx.array:
        inds, w, shared = self.gate(x)
        y = combine(self.switch_mlp(x, inds), w.astype(x.dtype))
        every = mx.broadcast_to(mx.arange(shared.shape[-1], dtype=mx.uint32), shared.shape)
        # the shared experts' outputs are summed in float32 (InklingSharedExperts)
        s = (self.shared_experts(x, every).astype(mx.float32) * shared[..., None]).sum(axis=-2)
        return y + s.astype(y.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.kind = "attention"
        self.layer_type = args.layer_types[layer]
        self.window = args.sliding_window_size if self.layer_type == "hybrid_sliding" else None
        D, eps, K = args.hidden_size, args.rms_norm_eps, args.conv_kernel_size
        self.self_attn = Attention(args, self.layer_type)
        self.mlp = MoE(args) if args.mlp_layer_types[layer] == "sparse" else MLP(D, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(D, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(D, eps=eps)
        self.attn_sconv = ResidualShortConv(D, K, slot=0)
        self.mlp_sconv = ResidualShortConv(D, K, slot=1)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        attn_cache, branch_cache = ((cache[0], cache[2]), cache[1]) if cache is not None else (None, None)
        h = x + self.attn_sconv(self.self_attn(self.input_layernorm(x), attn_cache), branch_cache)
        return h + self.mlp_sconv(self.mlp(self.post_attention_layernorm(h)), branch_cache)


class Model(CausalLM):
    """Inkling (text) for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V']``
    (``V'`` = ``unpadded_vocab_size`` when set)."""

    def __init__(self, args: ModelArgs):
        super().__init__(
            args,
            layers=[DecoderLayer(args, i) for i in range(args.num_hidden_layers)],
            norm=nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps),
        )
        self.model.embed_norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def scale_embeddings(self, h: mx.array) -> mx.array:
        return self.model.embed_norm(h)

    def layer_cache(self, layer: DecoderLayer):
        # (k/v conv history, attention/MLP output conv history, key/value history)
        kv = KVCache() if layer.window is None else WindowKVCache(layer.window)
        return (StateCache(), StateCache(), kv)

    def scale_logits(self, logits: mx.array) -> mx.array:
        logits = logits / self.args.logits_mup_width_multiplier
        n = self.args.unpadded_vocab_size
        return logits[..., :n] if n is not None and n < logits.shape[-1] else logits

