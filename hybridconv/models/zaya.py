"""ZAYA1 (Zyphra): Compressed Convolutional Attention, an MLP router with a skip
expert and depth-mixed router states, learned residual scaling.

References: Figliolia et al. 2025, "Compressed Convolutional Attention: Efficient
Attention in a Compressed Latent Space" (arXiv:2510.04476, CCA); Zyphra 2025,
"ZAYA1 technical report" (arXiv:2511.17127, the router and residual scaling).
transformers' ``modeling_zaya.py`` is the reference implementation followed here.

Architecture
============
``num_hidden_layers`` layers, each an attention block followed by a mixture of
experts. The residual stream runs in float32 (the original's
``residual_in_fp32``); each branch computes in the activations' dtype::

    h_0 = float32((embed(ids) + b_in) ⊙ s_in)
    a   = CCA(input_layernorm(h))
    h'  = (a + b_a) ⊙ s_a + (h + c_a) ⊙ t_a               # post_attention_residual_scale
    m, r_l = MoE(post_attention_layernorm(h'), r_{l-1})
    h   = (m + b_m) ⊙ s_m + (h' + c_m) ⊙ t_m              # post_mlp_residual_scale

then the final RMSNorm ``model.norm`` and the head (tied unless
``tie_word_embeddings`` is false; a bias with ``lm_head_bias``). Each residual
scaling has four learned vectors (``hidden_states_{scale,bias}``,
``residual_{scale,bias}``): the model controls per channel how much of the
stream it keeps and how much of the branch it adds. All norms are RMSNorms with
``rms_norm_eps``.

Layer schedule
--------------
``layer_types[i]`` is ``"hybrid"`` (full causal attention) or ``"hybrid_sliding"``
(a window of ``sliding_window`` positions, the query's own included). Each type
has its RoPE table in ``rope_parameters`` (``default`` RoPE over the first
``partial_rotary_factor · head_dim`` channels of each head; ZAYA1-8B: θ = 5·10⁶
full, 10⁴ sliding, factor 0.5). Every block is of kind ``"attention"``.

Compressed Convolutional Attention (the q/k/v path)
---------------------------------------------------
With ``Hq`` query heads, ``Hkv`` key/value heads, head size ``d`` and
``g = Hq / Hkv``::

    q̃ = q_proj(x)  [Hq·d],   k̃ = k_proj(x)  [Hkv·d]
    ρ_q = (q̃_h + k̃_{⌊h/g⌋}) / 2           per query head h  (query residual)
    ρ_k = mean of ρ_q over each group of g query heads       (key residual)
    c  = grouped_conv(depthwise_conv([q̃, k̃]))                causal, over time
    q  = c[:Hq·d] + ρ_q,   k = c[Hq·d:] + ρ_k

The depthwise convolution has ``cca_time0`` taps per channel; the grouped one
``cca_time1`` taps and one group per head (it mixes the ``d`` channels of a head:
weight ``[C, d, cca_time1]``); both have biases. transformers pads the raw
``[q̃, k̃]`` with ``K = (cca_time0 − 1) + (cca_time1 − 1)`` zeros before the
sequence and applies both convolutions without padding, so the grouped
convolution sees the depthwise *bias* at the first positions, not zeros; the
same is done here, and the decoding state is the last ``K`` raw ``[q̃, k̃]`` rows
(:class:`~hybridconv.models.common.StateCache` slot 0). The grouped kernel is
kept in PyTorch's ``[C, d, K]`` layout: when ``head_dim`` equals ``cca_time1``
the MLX layout ``[C, K, d]`` has the same shape, so a second conversion could not
tell which one it holds.

Values are "half delayed": of the ``Hkv·d`` value channels, the first half is
``v_proj_current(x_t)`` and the second ``v_proj_delayed(x_{t−1})`` (with
``x_{−1} = 0``, i.e. the projection's bias), concatenated and then cut into
heads. The decoding state is the last token's delayed projection (slot 1).

Then an L2 norm of every query and key head to length ``√d`` (divided by
``max(‖·‖, ε)``, ε the dtype's machine epsilon), keys times a learned
per-KV-head scale ``qk_norm.temp``, RoPE, causal (windowed) attention with scale
``d^(−1/2)``, and ``o_proj``.

The router (mixture of experts with a skip expert)
--------------------------------------------------
``E = num_experts`` SwiGLU experts (width ``moe_intermediate_size``), one per
token (``num_experts_per_tok`` must be 1, as transformers requires), chosen by
an MLP over a depth-mixed router state of ``R = router_hidden_size`` channels::

    r_l = down_proj(x) + router_states_scale ⊙ r_{l−1}     (layer 0: no r_{l−1})
    p   = softmax(out_proj(gelu(fc2(gelu(fc1(rmsnorm(r_l))))))   over E + 1 classes
    e   = argmax(p + balancing_biases);   y = p_e · expert_e(x)

Class ``E`` is the skip expert: a token routed there gets no MoE output
(:func:`hybridconv.models.moe.route` with ``skip_experts=1``).
``balancing_biases`` (a load-balancing bias, initialised to −1 for the skip
class) only decides the choice; routing runs in float32.

What passes between blocks
--------------------------
The router state ``r_l`` [B, T, R] goes from each layer to the next, beside the
residual stream. To keep a block a function of its input, its cache and the
embedding output, a block's output is ``[h | r_l]`` (``D + R`` channels,
float32); layer 0 takes ``h_0`` alone. transformers' decoder layer returns
``h`` (and the router state as its second output): :meth:`Model.block_output`
is the first ``D`` channels, which verify compares, and
:meth:`Model.block_input` gives a block the reference's ``h`` with this model's
own router state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .common import BaseModelArgs, CausalLM, KVCache, StateCache, WindowKVCache, attend
from .moe import SwitchGLU, combine, route

LAYER_TYPES = ("hybrid", "hybrid_sliding")


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "zaya"
    vocab_size: int = 262272
    hidden_size: int = 2048
    num_hidden_layers: int = 40
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    lm_head_bias: bool = False
    moe_intermediate_size: int = 2048
    num_experts: int = 16
    num_experts_per_tok: int = 1
    router_hidden_size: int = 256
    cca_time0: int = 2
    cca_time1: int = 2
    layer_types: list[str] = field(default_factory=list)
    sliding_window: Optional[int] = None
    # Per layer type: {"rope_type": "default", "rope_theta", "partial_rotary_factor"}.
    rope_parameters: dict = field(default_factory=dict)
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True


def layer_schedule(args: ModelArgs) -> list[str]:
    return ["attention"] * args.num_hidden_layers


def layer_windows(args: ModelArgs) -> list[Optional[int]]:
    return [args.sliding_window if t == "hybrid_sliding" else None for t in args.layer_types]


def rms_norm(norm: nn.RMSNorm, x: mx.array) -> mx.array:
    """``norm`` in ``x``'s dtype (a float32 weight must not promote bf16 activations)."""
    return mx.fast.rms_norm(x, norm.weight.astype(x.dtype), norm.eps)


def cca_conv(x: mx.array, state: Optional[mx.array], dw_weight: mx.array, dw_bias: mx.array,
             g_weight: mx.array, g_bias: mx.array) -> tuple[mx.array, Optional[mx.array]]:
    """The CCA convolutions over ``x [B, T, C]`` (module docstring): depthwise
    (``dw_weight`` MLX ``[C, K0, 1]``) then grouped per head (``g_weight`` PyTorch
    ``[C, d, K1]``), both without padding after ``K0 + K1 − 2`` rows of history
    (``state``; zeros at the start). Returns the output ``[B, T, C]`` and the new
    state. A loop over the kernel taps, not over time."""
    B, T, C = x.shape
    k0, k1 = dw_weight.shape[1], g_weight.shape[2]
    K = (k0 - 1) + (k1 - 1)
    if K == 0:
        padded = x
    elif state is None:
        padded = mx.pad(x, [(0, 0), (K, 0), (0, 0)])
    else:
        padded = mx.concatenate([state.astype(x.dtype), x], axis=1)
    L = T + k1 - 1
    taps = dw_weight[:, :, 0].T.astype(x.dtype)  # [K0, C]
    y = padded[:, :L] * taps[0]
    for j in range(1, k0):
        y = y + padded[:, j : j + L] * taps[j]
    y = y + dw_bias.astype(x.dtype)
    d = g_weight.shape[1]
    yg = y.reshape(B, L, C // d, d)
    w = g_weight.reshape(C // d, d, d, k1).astype(x.dtype)  # [groups, out, in, K1]
    out = mx.einsum("btgi,goi->btgo", yg[:, :T], w[..., 0])
    for j in range(1, k1):
        out = out + mx.einsum("btgi,goi->btgo", yg[:, j : j + T], w[..., j])
    out = out.reshape(B, T, C) + g_bias.astype(x.dtype)
    return out, (padded[:, padded.shape[1] - K :] if K else None)


class CCAProjection(nn.Module):
    """q/k/v of Compressed Convolutional Attention (module docstring)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        D, d, bias = args.hidden_size, args.head_dim, args.attention_bias
        self.n_q, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, d
        self.q_proj = nn.Linear(D, self.n_q * d, bias=bias)
        self.k_proj = nn.Linear(D, self.n_kv * d, bias=bias)
        self.v_proj_current = nn.Linear(D, self.n_kv * d // 2, bias=bias)
        self.v_proj_delayed = nn.Linear(D, self.n_kv * d // 2, bias=bias)
        C = (self.n_q + self.n_kv) * d
        self.conv_qk_depthwise = nn.Module()
        self.conv_qk_depthwise.weight = mx.zeros((C, args.cca_time0, 1))
        self.conv_qk_depthwise.bias = mx.zeros((C,))
        self.conv_qk_grouped = nn.Module()
        self.conv_qk_grouped.weight = mx.zeros((C, d, args.cca_time1))
        self.conv_qk_grouped.bias = mx.zeros((C,))

    def __call__(self, x: mx.array, cache: Optional[StateCache]):
        B, T, _ = x.shape
        d, g = self.head_dim, self.n_q // self.n_kv
        q = self.q_proj(x)
        k = self.k_proj(x)
        q_res = (q.reshape(B, T, self.n_q, d) + mx.repeat(k.reshape(B, T, self.n_kv, d), g, axis=2)) * 0.5
        k_res = q_res.reshape(B, T, self.n_kv, g, d).mean(axis=-2)
        dw, gw = self.conv_qk_depthwise, self.conv_qk_grouped
        c, state = cca_conv(mx.concatenate([q, k], axis=-1), cache[0] if cache is not None else None,
                            dw.weight, dw.bias, gw.weight, gw.bias)
        query = c[..., : self.n_q * d].reshape(B, T, self.n_q, d) + q_res
        key = c[..., self.n_q * d :].reshape(B, T, self.n_kv, d) + k_res

        current = self.v_proj_current(x)
        delayed = self.v_proj_delayed(x)
        prev = cache[1] if cache is not None else None
        if prev is None:  # x_{-1} = 0: the delayed projection's bias (or zeros)
            prev = self.v_proj_delayed(mx.zeros((B, 1, x.shape[-1]), dtype=x.dtype))
        value = mx.concatenate([current, mx.concatenate([prev.astype(x.dtype), delayed[:, :-1]], axis=1)], axis=-1)
        if cache is not None:
            cache[0], cache[1] = state, delayed[:, -1:]
        return query, key, value.reshape(B, T, self.n_kv, d)


class QKNorm(nn.Module):
    """Queries and keys L2-normalised to length √d, keys times ``temp`` per KV head."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.scale = args.head_dim**0.5
        self.temp = mx.zeros((args.num_key_value_heads,))

    def __call__(self, q: mx.array, k: mx.array):
        eps = mx.finfo(q.dtype).eps  # transformers: torch.finfo(dtype).eps

        def unit(x):
            n = mx.sqrt((x.astype(mx.float32) ** 2).sum(axis=-1, keepdims=True))
            return (x.astype(mx.float32) * (self.scale / mx.maximum(n, eps))).astype(x.dtype)

        return unit(q), unit(k) * self.temp.astype(k.dtype)[:, None]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        d = args.head_dim
        self.n_q, self.head_dim = args.num_attention_heads, d
        self.qkv_proj = CCAProjection(args)
        self.qk_norm = QKNorm(args)
        self.o_proj = nn.Linear(self.n_q * d, args.hidden_size, bias=args.attention_bias)
        params = args.rope_parameters[layer_type]
        self.rope = nn.RoPE(int(d * params.get("partial_rotary_factor", 1.0)), traditional=False,
                            base=params["rope_theta"])
        self.window = args.sliding_window if layer_type == "hybrid_sliding" else None
        self.scale = d**-0.5

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        conv_cache, kv_cache = cache if cache is not None else (None, None)
        q, k, v = self.qkv_proj(x, conv_cache)
        q, k = self.qk_norm(q, k)
        out = attend(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                     self.rope, kv_cache, self.window, self.scale)
        return self.o_proj(out)


class RouterMLP(nn.Module):
    def __init__(self, width: int, classes: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, width, bias=True)
        self.fc2 = nn.Linear(width, width, bias=True)
        self.out_proj = nn.Linear(width, classes, bias=False)

    def __call__(self, r: mx.array) -> mx.array:
        r = rms_norm(self.norm, r)
        return self.out_proj(nn.gelu(self.fc2(nn.gelu(self.fc1(r)))))


class Router(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        R, E = args.router_hidden_size, args.num_experts
        self.top_k = args.num_experts_per_tok
        self.down_proj = nn.Linear(args.hidden_size, R, bias=True)
        self.use_eda = layer != 0  # depth mixing of the router states from layer 1 on
        if self.use_eda:
            self.router_states_scale = mx.ones((R,))
        self.router_mlp = RouterMLP(R, E + 1, args.rms_norm_eps)
        self.balancing_biases = mx.zeros((E + 1,), dtype=mx.float32)

    def __call__(self, x: mx.array, prev: Optional[mx.array]):
        r = self.down_proj(x)
        if self.use_eda and prev is not None:
            r = r + prev.astype(r.dtype) * self.router_states_scale.astype(r.dtype)
        inds, weights = route(self.router_mlp(r), self.top_k, score="softmax",
                              correction_bias=self.balancing_biases, skip_experts=1)
        return inds, weights, r


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.gate = Router(args, layer)
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.num_experts)

    def __call__(self, x: mx.array, prev: Optional[mx.array]):
        inds, weights, r = self.gate(x, prev)
        return combine(self.switch_mlp(x, inds), weights), r


class ResidualScaling(nn.Module):
    """``(branch + hidden_states_bias) ⊙ hidden_states_scale + (residual + residual_bias) ⊙ residual_scale``;
    the branch term in the branch's dtype, the sum in the residual's (float32)."""

    def __init__(self, dims: int):
        super().__init__()
        self.hidden_states_scale = mx.ones((dims,))
        self.hidden_states_bias = mx.zeros((dims,))
        self.residual_scale = mx.ones((dims,))
        self.residual_bias = mx.zeros((dims,))

    def __call__(self, branch: mx.array, residual: mx.array) -> mx.array:
        dt = branch.dtype
        b = (branch + self.hidden_states_bias.astype(dt)) * self.hidden_states_scale.astype(dt)
        return b + (residual + self.residual_bias) * self.residual_scale


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.kind = "attention"
        self.layer_type = args.layer_types[layer]
        self.window = args.sliding_window if self.layer_type == "hybrid_sliding" else None
        self.hidden_size = args.hidden_size
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_attn = Attention(args, self.layer_type)
        self.post_attention_residual_scale = ResidualScaling(args.hidden_size)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.mlp = SparseMoeBlock(args, layer)
        self.post_mlp_residual_scale = ResidualScaling(args.hidden_size)

    def __call__(self, x: mx.array, cache=None, dtype=None) -> mx.array:
        """``x``: ``h`` (layer 0) or ``[h | r]``; returns ``[h' | r']`` in float32."""
        dtype = dtype or x.dtype
        D = self.hidden_size
        h = x[..., :D].astype(mx.float32)
        prev = x[..., D:] if x.shape[-1] > D else None
        a = self.self_attn(rms_norm(self.input_layernorm, h.astype(dtype)), cache=cache)
        h = self.post_attention_residual_scale(a, h)
        m, r = self.mlp(rms_norm(self.post_attention_layernorm, h.astype(dtype)), prev)
        h = self.post_mlp_residual_scale(m, h)
        return mx.concatenate([h, r.astype(mx.float32)], axis=-1)


class Model(CausalLM):
    """ZAYA1 for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``."""

    def __init__(self, args: ModelArgs):
        super().__init__(
            args,
            layers=[DecoderLayer(args, i) for i in range(args.num_hidden_layers)],
            norm=nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps),
        )
        self.model.input_hidden_states_scale = mx.ones((args.hidden_size,))
        self.model.input_hidden_states_bias = mx.zeros((args.hidden_size,))
        if args.lm_head_bias:
            if self.tied:  # the head's weight is the embedding; its bias is its own
                self.lm_head = nn.Module()
                self.lm_head.bias = mx.zeros((args.vocab_size,))
            else:
                self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=True)

    def scale_embeddings(self, h: mx.array) -> mx.array:
        # In the activations' dtype, as transformers computes it before the
        # float32 cast (the first block casts).
        m = self.model
        return (h + m.input_hidden_states_bias.astype(h.dtype)) * m.input_hidden_states_scale.astype(h.dtype)

    def layer_cache(self, layer: DecoderLayer):
        # (CCA conv rows + delayed value, key/value history)
        return (StateCache(), KVCache() if layer.window is None else WindowKVCache(layer.window))

    def call_layer(self, layer: DecoderLayer, h: mx.array, cache, x0: mx.array) -> mx.array:
        return layer(h, cache=cache, dtype=x0.dtype)

    def block_output(self, h: mx.array) -> mx.array:
        return h[..., : self.args.hidden_size]

    def block_input(self, reference: mx.array, own: mx.array) -> mx.array:
        D = self.args.hidden_size
        return mx.concatenate([reference.astype(own.dtype), own[..., D:]], axis=-1)

    def final_norm(self, h: mx.array, dtype=None) -> mx.array:
        dtype = dtype or h.dtype
        return rms_norm(self.model.norm, h[..., : self.args.hidden_size].astype(dtype))

    def head(self, h: mx.array, dtype=None) -> mx.array:
        logits = super().head(h, dtype)
        if self.args.lm_head_bias and self.tied:
            logits = logits + self.lm_head.bias.astype(logits.dtype)
        return logits
