"""LFM2 (Liquid AI): gated short convolutions interleaved with attention.

Architecture
============
A decoder-only stack of ``num_hidden_layers`` pre-norm layers::

    h = x + operator(operator_norm(x))          # short conv or attention
    y = h + feed_forward(ffn_norm(h))            # SwiGLU

then a final RMSNorm (``embedding_norm``, named so in the checkpoint although
it is applied *after* the last layer) and the head, tied to the embeddings
unless ``tie_word_embeddings`` is false. All norms are plain RMSNorms
(``weight · x / rms(x)``, ``norm_eps``), computed in float32.

Layer schedule
--------------
``layer_types[i]`` is ``"conv"`` or ``"full_attention"`` (transformers 5); the
configs published with the checkpoints give ``full_attn_idxs`` (the attention
layers) instead. LFM2-1.2B has 16 layers, 10 convolution and 6 attention;
any order is accepted.

The gated short-convolution operator (Liquid AI, "Introducing LFM2", 2025; a
"Hyena"-style gated convolution, Poli et al. 2023, with a short kernel)
-------------------------------------------------------------------------
With ``D = hidden_size`` and kernel length ``L = conv_L_cache``::

    B, C, x̃ = split(in_proj(x), 3)             # three D-wide streams
    u_t     = B_t ⊙ x̃_t                          # input gate
    v_t     = Σ_{j=0}^{L-1} w_j ⊙ u_{t-L+1+j}     # causal depthwise conv (+ bias)
    out_t   = out_proj(C_t ⊙ v_t)                # output gate

``in_proj`` and ``out_proj`` carry a bias when ``conv_bias`` is true (so does the
convolution). The operator is a fixed-length FIR filter: the decoding state is
the last ``L − 1`` gated inputs ``u`` (zeros before the sequence start), kept
in :class:`~hybridconv.models.common.StateCache` slot 0. Prefill is one
depthwise convolution over the whole sequence (no loop over time); decoding
runs the same convolution on ``[state, u_t]``.

Attention
---------
Grouped-query attention (``num_key_value_heads`` KV heads, head size
``hidden_size / num_attention_heads``) with per-head RMSNorm on queries and keys
(``q_layernorm``, ``k_layernorm``: QK-norm, Dehghani et al. 2023) *before*
rotary embeddings (RoPE, Su et al. 2021, ``rope_theta``), causal, no window.

Feed-forward width
------------------
The SwiGLU width follows the config's rules (as transformers' ``Lfm2MLP``):
with ``block_auto_adjust_ff_dim`` the stated ``intermediate_size`` (published:
``block_ff_dim``) becomes ``int(2/3 · size)``, and when
``block_ffn_dim_multiplier`` is set, ``int(multiplier · that)`` rounded up to a
multiple of ``block_multiple_of``. The converter resolves this once
(:func:`ff_dim`) and writes the resulting width with auto-adjust off, so the
output config states the width the weights have (mlx-lm rounds to
``block_multiple_of`` even without a multiplier, which transformers does not).

LFM2-MoE (:mod:`hybridconv.models.lfm2_moe`) replaces the feed-forward of every
layer from ``num_dense_layers`` on by a sigmoid-routed mixture of experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .common import BaseModelArgs, CausalLM, KVCache, StateCache, attend, causal_depthwise_conv


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "lfm2"
    vocab_size: int = 65536
    hidden_size: int = 2048
    intermediate_size: int = 12288
    num_hidden_layers: int = 16
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: Optional[int] = None
    max_position_embeddings: int = 128000
    norm_eps: float = 1e-5
    conv_bias: bool = False
    conv_L_cache: int = 3
    block_multiple_of: int = 256
    block_ffn_dim_multiplier: Optional[float] = 1.0
    block_auto_adjust_ff_dim: bool = True
    layer_types: list[str] = field(default_factory=list)
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = True

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


def ff_dim(size: int, auto_adjust: bool, multiplier: Optional[float], multiple_of: int) -> int:
    """The SwiGLU width transformers' ``Lfm2MLP`` builds (module docstring)."""
    if not auto_adjust:
        return size
    size = int(2 * size / 3)
    if multiplier is not None:
        size = int(multiplier * size)
        size = multiple_of * ((size + multiple_of - 1) // multiple_of)
    return size


def layer_schedule(args: ModelArgs) -> list[str]:
    """``"conv"`` or ``"attention"`` for every layer."""
    return ["conv" if t == "conv" else "attention" for t in args.layer_types]


def layer_windows(args: ModelArgs) -> list[int | None]:
    return [None] * args.num_hidden_layers  # full causal attention only


class ShortConv(nn.Module):
    """The gated short convolution (module docstring)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        D, L = args.hidden_size, args.conv_L_cache
        self.conv = nn.Conv1d(D, D, kernel_size=L, groups=D, bias=args.conv_bias)  # weight [D, L, 1]
        self.in_proj = nn.Linear(D, 3 * D, bias=args.conv_bias)
        self.out_proj = nn.Linear(D, D, bias=args.conv_bias)

    def __call__(self, x: mx.array, cache: Optional[StateCache] = None) -> mx.array:
        B, C, xt = mx.split(self.in_proj(x), 3, axis=-1)
        u = B * xt
        state = cache[0] if cache is not None else None
        v, new_state = causal_depthwise_conv(u, self.conv.weight, self.conv.get("bias"), state)
        if cache is not None:
            cache[0] = new_state
        return self.out_proj(C * v)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, d = args.hidden_size, args.attn_head_dim
        self.n_q, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, d
        self.scale = d**-0.5
        self.q_proj = nn.Linear(D, self.n_q * d, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv * d, bias=False)
        self.out_proj = nn.Linear(self.n_q * d, D, bias=False)
        self.q_layernorm = nn.RMSNorm(d, eps=args.norm_eps)
        self.k_layernorm = nn.RMSNorm(d, eps=args.norm_eps)
        self.rope = nn.RoPE(d, traditional=False, base=args.rope_theta)

    def __call__(self, x: mx.array, cache: Optional[KVCache] = None) -> mx.array:
        b, T, _ = x.shape
        q = self.q_layernorm(self.q_proj(x).reshape(b, T, self.n_q, -1)).transpose(0, 2, 1, 3)
        k = self.k_layernorm(self.k_proj(x).reshape(b, T, self.n_kv, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, T, self.n_kv, -1).transpose(0, 2, 1, 3)
        return self.out_proj(attend(q, k, v, self.rope, cache, None, self.scale))


class MLP(nn.Module):
    """SwiGLU ``w2(silu(w1 x) ⊙ w3 x)``; ``names`` are (gate, down, up) — LFM2's
    ``w1, w2, w3``, or ``gate_proj, down_proj, up_proj`` where mlx-lm renames them
    (LFM2-MoE)."""

    def __init__(self, hidden: int, intermediate: int, names=("w1", "w2", "w3")):
        super().__init__()
        self._gate, self._down, self._up = names
        setattr(self, self._gate, nn.Linear(hidden, intermediate, bias=False))
        setattr(self, self._down, nn.Linear(intermediate, hidden, bias=False))
        setattr(self, self._up, nn.Linear(hidden, intermediate, bias=False))

    def __call__(self, x: mx.array) -> mx.array:
        g, d, u = getattr(self, self._gate), getattr(self, self._down), getattr(self, self._up)
        return d(nn.silu(g(x)) * u(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, kind: str, feed_forward: nn.Module):
        super().__init__()
        self.kind = kind
        self.is_attention = kind == "attention"
        if self.is_attention:
            self.self_attn = Attention(args)
        else:
            self.conv = ShortConv(args)
        self.feed_forward = feed_forward
        self.operator_norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)
        self.ffn_norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        op = self.self_attn if self.is_attention else self.conv
        h = x + op(self.operator_norm(x), cache=cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Lfm2Model(nn.Module):
    def __init__(self, args: ModelArgs, feed_forward):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [
            DecoderLayer(args, kind, feed_forward(args, i)) for i, kind in enumerate(layer_schedule(args))
        ]
        self.embedding_norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)


class Model(CausalLM):
    """LFM2 for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``."""

    norm_name = "embedding_norm"

    def __init__(self, args: ModelArgs):
        super().__init__(args, Lfm2Model(args, self.feed_forward))

    @staticmethod
    def feed_forward(args: ModelArgs, layer: int) -> nn.Module:
        width = ff_dim(
            args.intermediate_size, args.block_auto_adjust_ff_dim, args.block_ffn_dim_multiplier, args.block_multiple_of
        )
        return MLP(args.hidden_size, width)
