"""OLMo-Hybrid (Ai2, 2026): gated DeltaNet layers with negative eigenvalues, and OLMo-3 attention.

Architecture
============
A decoder-only stack with two kinds of layer, following ``layer_types``
(default: attention at every fourth layer, ``i % 4 == 3``; at least one
attention layer)::

    DeltaNet layer  (pre-norm):   h = x + linear_attn(input_layernorm(x))
                                  y = h + mlp(post_attention_layernorm(h))
    attention layer (post-norm):  h = x + post_attention_layernorm(self_attn(x))
                                  y = h + post_feedforward_layernorm(mlp(h))

(the attention layers are OLMo-2/3's "reordered" norms, applied to what each
sub-block adds, with no norm on the input), then a final RMSNorm and the
(untied) head. RMSNorms are plain ``x/rms(x) · w``. The MLP is SwiGLU.

Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025, "Gated Delta Networks",
arXiv:2412.06464) with negative eigenvalues (Grazzi et al. 2024, "Unlocking
State-Tracking in Linear RNNs Through Negative Eigenvalues", arXiv:2411.12537)
------------------------------------------------------------------------------
Separate projections ``q_proj``, ``k_proj`` (``Hk·Dk``), ``v_proj`` (``Hv·Dv``),
``a_proj``, ``b_proj`` (one per value head) and ``g_proj`` (the output gate,
``Hv·Dv``):

1. q, k and v each through their own causal depthwise conv1d
   (``q_conv1d``, ``k_conv1d``, ``v_conv1d``; width ``linear_conv_kernel_dim``,
   no bias) and SiLU — run here as one conv over ``[q | k | v]`` with the three
   kernels concatenated, so the cache holds one conv state;
2. q, k L2-normalised per head; ``g = −exp(A_log)·softplus(a + dt_bias)``;
   ``β = σ(b)``, doubled when ``linear_allow_neg_eigval`` (``β ∈ (0, 2)``: the
   transition ``I − β k kᵀ`` then has eigenvalue ``1 − β ∈ (−1, 1)`` along
   ``k``, which lets the state flip sign — state tracking such as parity that
   ``β ∈ (0, 1)`` cannot express);
3. the gated delta rule (:mod:`.gated_delta`, chunked for prefill, one step for
   decode): ``S_t = exp(g_t)(I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``,
   ``o_t = S_tᵀ q_t / √Dk``;
4. ``o_proj(RMSNorm(o) · o_norm.weight · silu(g_proj(x)))`` per value head,
   with eps ``1e-5`` whatever ``rms_norm_eps`` says (transformers hard-codes
   FLA's ``FusedRMSNormGated`` default; mlx-lm's ``layer_norm_epsilon``).

Attention (OLMo-3)
------------------
Grouped-query attention whose q and k are RMS-normalised over the *whole*
projection (``q_norm``: ``heads·head_dim``, not per head), rotary embeddings
over the full head with ``rope_theta`` — or none at all when the config has no
``rope_theta`` (the released checkpoints: "NoPE") — and no output gate.

Cache: :class:`~.common.StateCache` ``[conv state [B, K−1, 2·Hk·Dk + Hv·Dv],
recurrent state [B, Hv, Dk, Dv]]`` per DeltaNet layer, a KV cache per
attention layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .common import MLP, BaseModelArgs, CausalLM, StateCache, attend, causal_depthwise_conv
from .gated_delta import RMSNormGated, gated_delta, gdn_decay, l2norm

CHUNK_SIZE = 64
O_NORM_EPS = 1e-5  # transformers/FLA: the gated output norm's eps is fixed


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "olmo_hybrid"
    hidden_size: int = 3840
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 30
    num_key_value_heads: int = 30
    head_dim: int = 128
    linear_num_key_heads: int = 30
    linear_num_value_heads: int = 30
    linear_key_head_dim: int = 96
    linear_value_head_dim: int = 192
    linear_conv_kernel_dim: int = 4
    linear_allow_neg_eigval: bool = True
    layer_types: list[str] = field(default_factory=list)
    rms_norm_eps: float = 1e-6
    layer_norm_epsilon: float = O_NORM_EPS
    vocab_size: int = 100352
    rope_theta: Optional[float] = None
    max_position_embeddings: int = 65536
    tie_word_embeddings: bool = False
    attention_bias: bool = False


def layer_schedule(args: ModelArgs) -> list[str]:
    """``"delta"`` (gated DeltaNet) or ``"attention"`` for every layer."""
    return ["attention" if t == "full_attention" else "delta" for t in args.layer_types]


def layer_windows(args: ModelArgs) -> list[Optional[int]]:
    """No sliding windows: attention layers see the whole history."""
    return [None] * args.num_hidden_layers


class GatedDeltaNet(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.nk, self.nv = args.linear_num_key_heads, args.linear_num_value_heads
        self.dk, self.dv = args.linear_key_head_dim, args.linear_value_head_dim
        if self.nv % self.nk:
            raise ValueError(f"linear_num_value_heads ({self.nv}) is not a multiple of linear_num_key_heads ({self.nk})")
        self.key_dim, self.value_dim = self.nk * self.dk, self.nv * self.dv
        self.neg_eigval = args.linear_allow_neg_eigval
        h, K = args.hidden_size, args.linear_conv_kernel_dim
        self.q_proj = nn.Linear(h, self.key_dim, bias=False)
        self.k_proj = nn.Linear(h, self.key_dim, bias=False)
        self.v_proj = nn.Linear(h, self.value_dim, bias=False)
        self.a_proj = nn.Linear(h, self.nv, bias=False)
        self.b_proj = nn.Linear(h, self.nv, bias=False)
        self.g_proj = nn.Linear(h, self.value_dim, bias=False)
        self.o_proj = nn.Linear(self.value_dim, h, bias=False)
        self.q_conv1d = nn.Conv1d(self.key_dim, self.key_dim, K, groups=self.key_dim, bias=False)
        self.k_conv1d = nn.Conv1d(self.key_dim, self.key_dim, K, groups=self.key_dim, bias=False)
        self.v_conv1d = nn.Conv1d(self.value_dim, self.value_dim, K, groups=self.value_dim, bias=False)
        self.A_log = mx.zeros((self.nv,))
        self.dt_bias = mx.zeros((self.nv,))
        self.o_norm = RMSNormGated(self.dv, args.layer_norm_epsilon)

    def __call__(self, x: mx.array, cache: Optional[StateCache] = None) -> mx.array:
        B, T, _ = x.shape
        qkv = mx.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)
        # Three depthwise convs are one depthwise conv over the concatenated channels.
        weight = mx.concatenate([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight], axis=0)
        qkv, conv_state = causal_depthwise_conv(qkv, weight, None, cache[0] if cache else None)
        q, k, v = mx.split(nn.silu(qkv), [self.key_dim, 2 * self.key_dim], axis=-1)
        q = l2norm(q.reshape(B, T, self.nk, self.dk))
        k = l2norm(k.reshape(B, T, self.nk, self.dk))
        v = v.reshape(B, T, self.nv, self.dv)
        beta = mx.sigmoid(self.b_proj(x).astype(mx.float32))
        if self.neg_eigval:
            beta = 2.0 * beta
        o, state = gated_delta(
            q, k, v, gdn_decay(self.a_proj(x), self.A_log, self.dt_bias), beta,
            cache[1] if cache else None, CHUNK_SIZE,
        )
        if cache is not None:
            cache[0], cache[1] = conv_state, state
        gate = self.g_proj(x).reshape(B, T, self.nv, self.dv)
        o = self.o_norm(o.astype(x.dtype), gate)
        return self.o_proj(o.reshape(B, T, -1))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d = args.head_dim
        self.n_q, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, d
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_q * d, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv * d, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv * d, bias=bias)
        self.o_proj = nn.Linear(self.n_q * d, args.hidden_size, bias=bias)
        self.q_norm = nn.RMSNorm(self.n_q * d, eps=args.rms_norm_eps)  # over all heads at once
        self.k_norm = nn.RMSNorm(self.n_kv * d, eps=args.rms_norm_eps)
        self.rope = None if args.rope_theta is None else nn.RoPE(d, traditional=False, base=args.rope_theta)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        B, T, _ = x.shape
        d = self.head_dim
        q = self.q_norm(self.q_proj(x)).reshape(B, T, self.n_q, d).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x)).reshape(B, T, self.n_kv, d).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.n_kv, d).transpose(0, 2, 1, 3)
        return self.o_proj(attend(q, k, v, self.rope, cache, None, d**-0.5))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, kind: str):
        super().__init__()
        self.kind = kind
        self.is_delta = kind == "delta"
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        eps = args.rms_norm_eps
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=eps)
        if self.is_delta:
            self.linear_attn = GatedDeltaNet(args)
            self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=eps)
        else:
            self.self_attn = Attention(args)
            self.post_feedforward_layernorm = nn.RMSNorm(args.hidden_size, eps=eps)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        if self.is_delta:
            h = x + self.linear_attn(self.input_layernorm(x), cache=cache)
            return h + self.mlp(self.post_attention_layernorm(h))
        h = x + self.post_attention_layernorm(self.self_attn(x, cache=cache))
        return h + self.post_feedforward_layernorm(self.mlp(h))


class Model(CausalLM):
    """OLMo-Hybrid for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``."""

    def __init__(self, args: ModelArgs):
        super().__init__(
            args,
            layers=[DecoderLayer(args, kind) for kind in layer_schedule(args)],
            norm=nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps),
        )
