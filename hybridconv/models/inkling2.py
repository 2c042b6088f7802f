"""Inkling-2 (Thinking Machines, ``inkling2_text``): Inkling's convolutional,
RoPE-free attention with clipped q/k, per-token attention sinks, gated outputs,
dynamic short convolutions on the full layers' keys and values, and *attention
residuals*: each sublayer reads a learned softmax mix of the earlier blocks'
states instead of the plain residual stream.

The reference is transformers' ``modeling_inkling2.py``; the shared pieces come
from :mod:`hybridconv.models.inkling` (residual short convolutions, relative
position bias, log scaling). Inkling-2-Mini's looped layers:
:mod:`hybridconv.models.inkling2_loop`.

Attention residuals (the residual stream)
-----------------------------------------
Layers are grouped into blocks of ``n_layers_per_attn_res_block``. The stream
between layers is a *partial block sum* ``p`` (what the current block has
added) and the list ``B = [b_0, b_1, …]`` of finished block sums (``b_0``: the
normed embedding). A sublayer's input is an attention over the sources
``[b_0 … b_k, p]`` with a learned query per input (``attention_input.query``,
``mlp_input.query``; one for a sliding layer's attention, three — q, k, v — for a
full layer's)::

    n_s  = rmsnorm(source_s)                       (no weight, ε = 1e-6, float32)
    in   = Σ_s softmax_s(query · n_s / √D) · n_s

At a layer whose index is a multiple of ``n_layers_per_attn_res_block`` (a block
boundary) the incoming ``p`` is appended to ``B`` and the layer's attention
output starts a new ``p``; elsewhere it is added to ``p``. Per layer::

    a  = post_attention_convolution(attention(norm(AttnRes_attn(B, p))))
    p' = a                      (boundary: B ← B + [p])   or   p + a
    p''= p' + post_mlp_convolution(moe(post_attention_layernorm(AttnRes_mlp(B, p'))))

and after the last layer ``logits = softcap(lm_head(norm(AttnRes_final(B, p))),
final_logit_softcapping)`` (``cap · tanh(x / cap)``), cut to
``unpadded_vocab_size`` (the checkpoints pad the unembedding to ``vocab_size``
with zero rows; they are kept and the logits cut). Layer 0 reads ``p`` (the
embedding) directly.

What passes between blocks: the pair ``(p, B)``, as one array ``[B, T, 1 + k,
D]`` (``p`` first; layer 0 takes ``[B, T, D]``). transformers' decoder layer
returns ``p''``: :meth:`Model.block_output` is ``[..., 0, :]``, and
:meth:`Model.block_input` rebuilds a block's input from the reference's ``p``
and this model's own ``B``.

Attention
---------
Sliding layers (``hybrid_sliding``: ``swa_*`` shapes, window
``sliding_window_size``) and full layers (``hybrid``) share:

* queries ``q_proj.linear(x)`` per head times a learned ``q_proj.norm.scale``,
  clipped to L2 norm ``qk_l2_clip_threshold`` (``x · min(1, θ / (‖x‖ + 1e-6))``);
  keys clipped the same way without a scale; values RMS-normalised per head
  (no weight); scale ``head_dim^(−1/2)``;
* keys and values pass a residual short convolution before their norms:
  ``(x + conv(x)) / √(K + 1)`` on sliding layers, and on full layers a *dynamic*
  one whose taps (per KV head) are ``static_weight + weight_proj(input)``, a
  fresh kernel per token: ``(x + Σ_lag w_lag(t) ⊙ x_{t−lag}) / √(2K + 1)``;
* a relative position bias as Inkling's (:func:`~hybridconv.models.inkling.relative_bias`)
  from relative states ``relative_position_bias.linear(x)`` with their own scale
  and clip (``rel_l2_clip_threshold``);
* a per-token, per-head sink logit ``sink_proj(x)`` in the softmax (it takes
  probability mass, adds no value);
* the output gated before its projection: ``o_proj.linear(attn ⊙ σ(o_proj.gate_proj(x)))``.

Full layers take their queries, keys and values from three different attention
residual mixes (each with its own RMSNorm), the dynamic convolutions' taps from
the key / value inputs, and multiply queries and relative states by the log
scale ``τ(p) = 1 + α · log(max((p + 1) / log_scaling_n_floor, 1))``.

Mixture of experts
------------------
``n_routed_experts`` experts, ``num_experts_per_tok`` per token, sigmoid scores
chosen with ``e_score_correction_bias`` and renormalised (ε = 1e-20), times
``route_scale`` (DeepSeek-V4's router, float32). Each expert is a soft-capped
SwiGLU, ``down(cap_g(g) · σ(g) · cap_u(u))`` with ``cap_c(x) = c · tanh(x / c)``
(``mlp_gate_softcap``, ``mlp_up_softcap``) in float32; the checkpoints store
gate and up rows interleaved (``w13``: row ``2i`` gate, ``2i + 1`` up), kept so
and run as one fused matmul. Expert outputs are summed in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .common import BaseModelArgs, CausalLM, KVCache, StateCache, WindowKVCache, attend_biased, soft_cap
from .inkling import ResidualShortConv, attention_shape, layer_windows, log_scale, relative_bias  # noqa: F401
from .moe import SwitchLinear, _run_experts, route

LAYER_TYPES = ("hybrid", "hybrid_sliding")
ATTN_RES_EPS = 1e-6  # Inkling2UnweightedRMSNorm's default, used by the attention residuals
CLIP_EPS = 1e-6  # Inkling2L2Clip: threshold / (norm + 1e-6)
ROUTER_NORM_EPS = 1e-20  # DeepseekV4TopKRouter


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "inkling2_text"
    vocab_size: int = 201024
    unpadded_vocab_size: Optional[int] = 200058
    hidden_size: int = 4608
    num_hidden_layers: int = 48
    num_attention_heads: int = 48
    num_key_value_heads: int = 8
    head_dim: int = 128
    swa_num_attention_heads: int = 48
    swa_num_key_value_heads: int = 8
    swa_head_dim: int = 128
    sliding_window_size: int = 1024
    d_rel: int = 16
    rel_extent: int = 1024
    log_scaling_n_floor: Optional[int] = 128000
    log_scaling_alpha: float = 0.1
    layer_types: list[str] = field(default_factory=list)
    rms_norm_eps: float = 1e-6
    conv_kernel_size: int = 4
    moe_intermediate_size: int = 2304
    n_routed_experts: int = 384
    num_experts_per_tok: int = 8
    route_scale: float = 8.0
    qk_l2_clip_threshold: float = 22.627416997969522
    rel_l2_clip_threshold: float = 8.0
    n_layers_per_attn_res_block: int = 6
    mlp_gate_softcap: float = 4.0
    mlp_up_softcap: float = 25.0
    final_logit_softcapping: float = 30.0
    max_position_embeddings: int = 1048576
    tie_word_embeddings: bool = False


def layer_schedule(args) -> list[str]:
    return ["attention"] * args.num_hidden_layers


# --- per-head norms ----------------------------------------------------------------


def l2_clip(x: mx.array, threshold: float) -> mx.array:
    """``x · min(1, threshold / (‖x‖ + 1e-6))`` over the last axis, float32."""
    x = x.astype(mx.float32)
    norm = mx.sqrt((x * x).sum(axis=-1, keepdims=True))
    return x * mx.minimum(threshold / (norm + CLIP_EPS), 1.0)


def unweighted_rms_norm(x: mx.array, eps: float) -> mx.array:
    """``x / rms(x)`` over the last axis, float32."""
    x = x.astype(mx.float32)
    return x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + eps)


def weighted_rms_norm(norm: nn.RMSNorm, x: mx.array) -> mx.array:
    """Inkling-2's RMSNorm (OLMo-2's): ``weight · x / rms(x)``, all in float32."""
    return norm.weight.astype(mx.float32) * unweighted_rms_norm(x, norm.eps)


class ScaledL2Clip(nn.Module):
    """A learned per-head ``scale`` ([heads, dims]), then :func:`l2_clip`; with
    ``log_scaling``, then times :func:`~hybridconv.models.inkling.log_scale` of
    the positions (each step rounded to the input dtype, as the reference)."""

    def __init__(self, heads: int, dims: int, threshold: float, log_scaling: Optional[tuple] = None):
        super().__init__()
        self.scale = mx.ones((heads, dims))
        self.threshold = threshold
        self.log_scaling = log_scaling  # (alpha, n_floor) or None

    def __call__(self, x: mx.array, positions: mx.array) -> mx.array:
        y = l2_clip(x.astype(mx.float32) * self.scale.astype(mx.float32), self.threshold).astype(x.dtype)
        if self.log_scaling is not None:
            tau = log_scale(positions, *self.log_scaling)
            if tau is not None:
                y = (y.astype(mx.float32) * tau[:, None, None]).astype(x.dtype)
        return y


# --- convolutions ------------------------------------------------------------------


class DynamicShortConv(nn.Module):
    """Residual causal convolution with per-token taps: ``static_weight`` ([K, C];
    tap 0 the current token) plus ``weight_proj(input)`` (K taps per head, shared
    by the head's channels); ``(x + Σ_lag w_lag ⊙ x_{t−lag}) / √(2K + 1)`` in
    float32. ``cache[slot]`` keeps the last ``K − 1`` inputs."""

    def __init__(self, channels: int, input_size: int, heads: int, kernel: int, slot: int):
        super().__init__()
        self.heads, self.kernel, self.slot = heads, kernel, slot
        self.static_weight = mx.zeros((kernel, channels))
        self.weight_proj = nn.Linear(input_size, heads * kernel, bias=False)

    def __call__(self, x: mx.array, dynamic_input: mx.array, cache: Optional[StateCache] = None) -> mx.array:
        B, T, C = x.shape
        K, H = self.kernel, self.heads
        dyn = self.weight_proj(dynamic_input).astype(mx.float32).reshape(B, T, H, 1, K)
        w = (self.static_weight.astype(mx.float32).T.reshape(H, C // H, K) + dyn).reshape(B, T, C, K)
        xf = x.astype(mx.float32)
        state = cache[self.slot] if cache is not None else None
        if K == 1:
            padded = xf
        elif state is None:
            padded = mx.pad(xf, [(0, 0), (K - 1, 0), (0, 0)])
        else:
            padded = mx.concatenate([state.astype(mx.float32), xf], axis=1)
        y = xf * w[..., 0]
        for lag in range(1, K):  # a loop over taps, not time
            y = y + padded[:, K - 1 - lag : K - 1 - lag + T] * w[..., lag]
        if cache is not None and K > 1:
            cache[self.slot] = padded[:, padded.shape[1] - (K - 1) :]
        return ((y + xf) / math.sqrt(2 * K + 1)).astype(x.dtype)


# --- attention ---------------------------------------------------------------------


class QueryProjection(nn.Module):
    def __init__(self, args: ModelArgs, heads: int, head_dim: int, log_scaling: bool):
        super().__init__()
        self.head_dim = head_dim
        self.linear = nn.Linear(args.hidden_size, heads * head_dim, bias=False)
        self.norm = ScaledL2Clip(heads, head_dim, args.qk_l2_clip_threshold,
                                 (args.log_scaling_alpha, args.log_scaling_n_floor) if log_scaling else None)

    def __call__(self, x: mx.array, positions: mx.array) -> mx.array:
        B, T, _ = x.shape
        return self.norm(self.linear(x).reshape(B, T, -1, self.head_dim), positions).transpose(0, 2, 1, 3)


class KeyValueProjection(nn.Module):
    def __init__(self, args: ModelArgs, heads: int, head_dim: int, slot: int, is_key: bool, dynamic: bool):
        super().__init__()
        C, K = heads * head_dim, args.conv_kernel_size
        self.head_dim, self.is_key = head_dim, is_key
        self.threshold, self.eps = args.qk_l2_clip_threshold, args.rms_norm_eps
        self.linear = nn.Linear(args.hidden_size, C, bias=False)
        self.dynamic = dynamic
        if dynamic:
            self.sconv = DynamicShortConv(C, args.hidden_size, heads, K, slot)
        else:
            self.sconv = ResidualShortConv(C, K, slot, out_scale=math.sqrt(K + 1))

    def __call__(self, x: mx.array, cache: Optional[StateCache]) -> mx.array:
        B, T, _ = x.shape
        s = self.linear(x)
        s = self.sconv(s, x, cache) if self.dynamic else self.sconv(s, cache)
        s = s.reshape(B, T, -1, self.head_dim)
        s = l2_clip(s, self.threshold) if self.is_key else unweighted_rms_norm(s, self.eps)
        return s.astype(x.dtype).transpose(0, 2, 1, 3)


class RelativePositionBias(nn.Module):
    def __init__(self, args: ModelArgs, heads: int, extent: int, log_scaling: bool):
        super().__init__()
        self.heads, self.extent = heads, extent
        self.linear = nn.Linear(args.hidden_size, heads * args.d_rel, bias=False)
        self.norm = ScaledL2Clip(heads, args.d_rel, args.rel_l2_clip_threshold,
                                 (args.log_scaling_alpha, args.log_scaling_n_floor) if log_scaling else None)
        self.proj = mx.zeros((args.d_rel, extent))

    def __call__(self, x: mx.array, positions: mx.array, offset: int):
        B, T, _ = x.shape
        r = self.norm(self.linear(x).reshape(B, T, self.heads, -1), positions)
        rel = (r @ self.proj.astype(r.dtype)).transpose(0, 2, 1, 3)  # [B, H, T, extent]
        return relative_bias(rel, offset, self.extent)


class GatedOutputProjection(nn.Module):
    def __init__(self, args: ModelArgs, heads: int, head_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, heads * head_dim, bias=False)
        self.linear = nn.Linear(heads * head_dim, args.hidden_size, bias=False)

    def __call__(self, out: mx.array, x: mx.array) -> mx.array:
        gate = mx.sigmoid(self.gate_proj(x).astype(mx.float32))
        return self.linear((out.astype(mx.float32) * gate).astype(out.dtype))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        sliding = layer_type == "hybrid_sliding"
        self.n_q, self.n_kv, self.head_dim = attention_shape(args, layer_type)
        self.window = args.sliding_window_size if sliding else None
        extent = args.sliding_window_size if sliding else args.rel_extent
        self.q_proj = QueryProjection(args, self.n_q, self.head_dim, log_scaling=not sliding)
        self.k_proj = KeyValueProjection(args, self.n_kv, self.head_dim, 0, is_key=True, dynamic=not sliding)
        self.v_proj = KeyValueProjection(args, self.n_kv, self.head_dim, 1, is_key=False, dynamic=not sliding)
        self.relative_position_bias = RelativePositionBias(args, self.n_q, extent, log_scaling=not sliding)
        self.sink_proj = nn.Linear(args.hidden_size, self.n_q, bias=False)
        self.o_proj = GatedOutputProjection(args, self.n_q, self.head_dim)

    def __call__(self, x: mx.array, xk: mx.array, xv: mx.array, conv_cache, kv_cache) -> mx.array:
        T = x.shape[1]
        offset = kv_cache.offset if kv_cache is not None else 0
        positions = mx.arange(offset, offset + T)
        q = self.q_proj(x, positions)
        k = self.k_proj(xk, conv_cache)
        v = self.v_proj(xv, conv_cache)
        bias = self.relative_position_bias(x, positions, offset)
        sinks = self.sink_proj(x).transpose(0, 2, 1)  # [B, H, T]
        out = attend_biased(q, k, v, kv_cache, self.window, self.head_dim**-0.5, bias, sinks)
        return self.o_proj(out, x)


# --- attention residuals -------------------------------------------------------------


def attention_residual(query: mx.array, blocks: Optional[mx.array], partial: mx.array) -> mx.array:
    """Learned ``query`` ([D] or [n, D]) over the sources ``[b_0 … b_k, p]``
    (module docstring): ``[B, T, n, D]`` float32, one mix per query."""
    p = partial.astype(mx.float32)[..., None, :]
    src = p if blocks is None else mx.concatenate([blocks.astype(mx.float32), p], axis=-2)
    n = unweighted_rms_norm(src, ATTN_RES_EPS)  # [B, T, S, D]
    D = query.shape[-1]
    q = query.astype(mx.float32).reshape(-1, D)
    scores = (n @ q.T) * (D**-0.5)  # [B, T, S, n_q]
    w = mx.softmax(scores, axis=-2, precise=True)
    return w.swapaxes(-1, -2) @ n  # [B, T, n_q, D]


class AttentionResidual(nn.Module):
    """:func:`attention_residual` with the learned ``query`` ([D], or [n, D] for ``queries`` > 1)."""

    def __init__(self, hidden: int, queries: int = 1):
        super().__init__()
        self.query = mx.zeros((hidden,) if queries == 1 else (queries, hidden))

    def __call__(self, blocks: Optional[mx.array], partial: mx.array) -> mx.array:
        return attention_residual(self.query, blocks, partial)


def unpack(x: mx.array):
    """``(p, B or None)`` from a block input (``[B, T, D]`` or ``[B, T, 1 + k, D]``)."""
    return (x, None) if x.ndim == 3 else (x[..., 0, :], x[..., 1:, :])


def pack(partial: mx.array, blocks: Optional[mx.array]) -> mx.array:
    return partial if blocks is None else mx.concatenate([partial[..., None, :], blocks.astype(partial.dtype)], axis=-2)


# --- experts -----------------------------------------------------------------------


class SoftcappedSwitchGLU(nn.Module):
    """Experts ``down(cap_g(g) · σ(g) · cap_u(u))`` with gate and up rows
    interleaved in one ``gate_up_proj [E, 2I, D]`` (the checkpoints' w13 layout)."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, gate_cap: float, up_cap: float):
        super().__init__()
        self.gate_up_proj = SwitchLinear(hidden, 2 * intermediate, num_experts)
        self.down_proj = SwitchLinear(intermediate, hidden, num_experts)
        self.gate_cap, self.up_cap = gate_cap, up_cap

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        def body(h, idx, s):
            gu = self.gate_up_proj(h, idx, s).astype(mx.float32)
            g, u = gu[..., 0::2], gu[..., 1::2]
            a = soft_cap(g, self.gate_cap) * mx.sigmoid(g) * soft_cap(u, self.up_cap)
            return self.down_proj(a.astype(h.dtype), idx, s)

        return _run_experts(x, indices, body)


class Router(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size), dtype=mx.float32)
        self.e_score_correction_bias = mx.zeros((args.n_routed_experts,), dtype=mx.float32)
        self.top_k, self.scale = args.num_experts_per_tok, args.route_scale

    def __call__(self, x: mx.array):
        logits = x.astype(mx.float32) @ self.weight.astype(mx.float32).T
        return route(logits, self.top_k, score="sigmoid", norm_topk=True, norm_eps=ROUTER_NORM_EPS,
                     routed_scaling=self.scale, correction_bias=self.e_score_correction_bias)


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = Router(args)
        self.switch_mlp = SoftcappedSwitchGLU(args.hidden_size, args.moe_intermediate_size, args.n_routed_experts,
                                              args.mlp_gate_softcap, args.mlp_up_softcap)

    def __call__(self, x: mx.array) -> mx.array:
        inds, w = self.gate(x)
        y = self.switch_mlp(x, inds).astype(mx.float32)  # summed in float32, as the reference
        return (y * w[..., None]).sum(axis=-2).astype(x.dtype)


# --- layers ------------------------------------------------------------------------


class DecoderLayer(nn.Module):
    """One Inkling-2 layer on the stream ``(p, B)`` (module docstring).
    :meth:`message` is where Inkling-2-Mini's loop layers mix in their messages
    (identity here)."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.kind = "attention"
        self.layer_type = args.layer_types[layer]
        self.sliding = self.layer_type == "hybrid_sliding"
        self.window = args.sliding_window_size if self.sliding else None
        self.is_block_boundary = layer % args.n_layers_per_attn_res_block == 0
        D, eps, K = args.hidden_size, args.rms_norm_eps, args.conv_kernel_size
        if layer > 0:
            self.attention_input = AttentionResidual(D, 1 if self.sliding else 3)
        self.mlp_input = AttentionResidual(D)
        self.self_attn = Attention(args, self.layer_type)
        self.mlp = SparseMoeBlock(args)
        if self.sliding:
            self.input_layernorm = nn.RMSNorm(D, eps=eps)
        else:
            self.q_input_layernorm = nn.RMSNorm(D, eps=eps)
            self.k_input_layernorm = nn.RMSNorm(D, eps=eps)
            self.v_input_layernorm = nn.RMSNorm(D, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(D, eps=eps)
        self.post_attention_convolution = ResidualShortConv(D, K, 0, out_scale=math.sqrt(K + 1))
        self.post_mlp_convolution = ResidualShortConv(D, K, 1, out_scale=math.sqrt(K + 1))

    def message(self, name: str, h: mx.array, messages: Optional[mx.array]) -> mx.array:
        return h

    def step(self, partial: mx.array, blocks: Optional[mx.array], cache, messages: Optional[mx.array] = None):
        """``(p, B)`` -> ``(p'', B')``; ``cache``: (attention conv history, branch conv
        history, key/value cache) or None."""
        dtype = partial.dtype
        conv_cache, branch_cache, kv_cache = cache if cache is not None else (None, None, None)
        block_residual = partial
        mixes = self.attention_input(blocks, partial) if "attention_input" in self else None
        if self.sliding:
            h = partial if mixes is None else mixes[..., 0, :]
            if messages is None:
                xq = xk = xv = weighted_rms_norm(self.input_layernorm, h).astype(dtype)
            else:
                xq, xk, xv = (weighted_rms_norm(self.input_layernorm, self.message(m, h, messages)).astype(dtype)
                              for m in ("q", "k", "v"))
        else:
            hq, hk, hv = (partial,) * 3 if mixes is None else (mixes[..., 0, :], mixes[..., 1, :], mixes[..., 2, :])
            xq = weighted_rms_norm(self.q_input_layernorm, self.message("q", hq, messages)).astype(dtype)
            xk = weighted_rms_norm(self.k_input_layernorm, self.message("k", hk, messages)).astype(dtype)
            xv = weighted_rms_norm(self.v_input_layernorm, self.message("v", hv, messages)).astype(dtype)
        a = self.self_attn(xq, xk, xv, conv_cache, kv_cache)
        a = self.post_attention_convolution(a, branch_cache).astype(mx.float32)
        if self.is_block_boundary:
            blocks = block_residual[..., None, :] if blocks is None else \
                mx.concatenate([blocks, block_residual[..., None, :]], axis=-2)
            residual = a
        else:
            residual = block_residual.astype(mx.float32) + a
        h = self.message("mlp", self.mlp_input(blocks, residual)[..., 0, :], messages)
        m = self.mlp(weighted_rms_norm(self.post_attention_layernorm, h).astype(dtype))
        m = self.post_mlp_convolution(m, branch_cache)
        return (residual + m.astype(mx.float32)).astype(dtype), blocks

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        return pack(*self.step(*unpack(x), cache))


class Model(CausalLM):
    """Inkling-2 (text) for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V']``
    (``V'`` = ``unpadded_vocab_size``)."""

    def __init__(self, args: ModelArgs):
        super().__init__(
            args,
            layers=[self.build_layer(args, i) for i in range(args.num_hidden_layers)],
            norm=nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps),
        )
        self.model.embed_norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.model.final_input = AttentionResidual(args.hidden_size)

    @staticmethod
    def build_layer(args: ModelArgs, layer: int) -> DecoderLayer:
        return DecoderLayer(args, layer)

    def scale_embeddings(self, h: mx.array) -> mx.array:
        return self.model.embed_norm(h)

    def layer_cache(self, layer: DecoderLayer):
        # (k/v conv history, post-attention/post-MLP conv history, key/value history)
        kv = KVCache() if layer.window is None else WindowKVCache(layer.window)
        return (StateCache(), StateCache(), kv)

    def block_output(self, h: mx.array) -> mx.array:
        return unpack(h)[0]

    def block_input(self, reference: mx.array, own: mx.array) -> mx.array:
        return pack(reference.astype(own.dtype), unpack(own)[1])

    def final_norm(self, h: mx.array, dtype=None) -> mx.array:
        partial, blocks = unpack(h)
        x = self.model.final_input(blocks, partial)[..., 0, :]
        norm = self.model.norm  # Inkling's RMSNorm on the float32 mix, then the activations' dtype
        return (norm.weight.astype(mx.float32) * unweighted_rms_norm(x, norm.eps)).astype(dtype or partial.dtype)

    def scale_logits(self, logits: mx.array) -> mx.array:
        logits = soft_cap(logits.astype(mx.float32), self.args.final_logit_softcapping)
        n = self.args.unpadded_vocab_size
        return logits[..., :n] if n is not None and n < logits.shape[-1] else logits
