"""LFM3 (Liquid AI): LFM2's gated short convolutions with full and sliding-window
attention, sandwich norms and a per-head attention gate.

Architecture
============
A decoder-only stack of ``num_hidden_layers`` layers, each (with
``use_sandwich_norm``, the default)::

    h = x + post_operator_norm(operator(operator_norm(x)))   # short conv or attention
    y = h + post_ffn_norm(feed_forward(ffn_norm(h)))          # SwiGLU w2(silu(w1·) ⊙ w3·)

then the final RMSNorm ``embedding_norm`` (applied after the last layer, named as
in LFM2) and the head, tied to the embeddings unless ``tie_word_embeddings`` is
false. The two ``post_*`` norms ("sandwich" norms, as Gemma-2's; Riviere et al.
2024) rescale each branch before it joins the residual stream; without
``use_sandwich_norm`` they are absent (identity) and the layer is LFM2's. Every
norm is a plain RMSNorm ``weight · x / rms(x)`` with ``norm_eps``. The
feed-forward width is ``intermediate_size`` as stated (LFM2's auto-adjust rule is
gone in LFM3).

Layer schedule
--------------
``layer_types[i]`` is ``"conv"``, ``"full_attention"`` or ``"sliding_attention"``.
transformers' default (and LFM3-1.7B's pattern) is attention at ``i % 4 == 2``,
sliding attention at ``i % 4 == 0`` (``i > 0``), convolution elsewhere; any order
is accepted. Block kinds: ``"conv"`` and ``"attention"`` (a sliding layer is an
attention block with a window, see :func:`layer_windows`).

The gated short convolution
---------------------------
LFM2's operator unchanged (:class:`hybridconv.models.lfm2.ShortConv`; Liquid AI,
"Introducing LFM2", 2025): ``B, C, x̃ = split(in_proj(x))``, a causal depthwise
convolution of length ``conv_L_cache`` (7 in LFM3) over ``B ⊙ x̃``, gated by ``C``,
then ``out_proj``. Its decoding state is the last ``L − 1`` gated inputs.

Attention
---------
Grouped-query attention with per-head RMSNorm on queries and keys (``q_norm``,
``k_norm``, over ``head_dim``, before RoPE; Qwen3's QK-norm), RoPE per layer type
from ``rope_parameters[layer_type]``:

* ``full_attention``: by default *proportional* RoPE (transformers'
  ``proportional`` type, Gemma-4's) with ``partial_rotary_factor`` 0.5 and θ = 10⁶:
  of the ``head_dim / 2`` rotation pairs ``(i, i + head_dim/2)`` only the first
  ``int(factor · head_dim) / 2`` turn, at ``θ^(-2i / head_dim)`` — the exponent
  counts the whole head — and the rest carry no position
  (:class:`~hybridconv.models.common.ProportionalRoPE`);
* ``sliding_attention``: by default plain RoPE over the whole head, θ = 10⁴, and
  a window of ``sliding_window`` positions (the query's own included), kept in a
  :class:`~hybridconv.models.common.WindowKVCache`.

With ``use_attention_gate`` each head's output is scaled by a sigmoid gate
computed from the layer input before ``o_proj``::

    o_h = attention_h · σ(gate_proj(x))_h        # gate_proj: hidden -> num_heads

(a per-head form of the output gating of Qiu et al. 2025, "Gated Attention for
Large Language Models"). The original checkpoints name the gate
``self_attn.gate_proj``, which transformers' conversion mapping renames to
``g_proj`` on load and back on save; hybridconv keeps ``gate_proj``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import common
from .common import BaseModelArgs, CausalLM, KVCache, ProportionalRoPE, StateCache, WindowKVCache, attend
from .lfm2 import MLP, ShortConv

ATTENTION_TYPES = ("full_attention", "sliding_attention")


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "lfm3"
    vocab_size: int = 128000
    hidden_size: int = 2048
    intermediate_size: int = 7680
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 128
    max_position_embeddings: int = 128000
    norm_eps: float = 1e-5
    conv_bias: bool = False
    conv_L_cache: int = 7
    layer_types: list[str] = field(default_factory=list)
    sliding_window: Optional[int] = 256
    use_sandwich_norm: bool = True
    use_attention_gate: bool = True
    attention_bias: bool = False
    # Per attention type: {"rope_type": "default" | "proportional", "rope_theta",
    # "partial_rotary_factor", "factor"} (the normalised config states each one).
    rope_parameters: dict = field(default_factory=dict)
    tie_word_embeddings: bool = True


def layer_schedule(args: ModelArgs) -> list[str]:
    """``"conv"`` or ``"attention"`` for every layer."""
    return ["conv" if t == "conv" else "attention" for t in args.layer_types]


def layer_windows(args: ModelArgs) -> list[Optional[int]]:
    return [args.sliding_window if t == "sliding_attention" else None for t in args.layer_types]


def make_rope(params: dict, head_dim: int):
    """The rotary embedding of one attention type (module docstring)."""
    theta = float(params["rope_theta"])
    if params.get("rope_type", "default") == "proportional":
        rotated = 2 * int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
        return ProportionalRoPE(head_dim, rotated, base=theta, factor=float(params.get("factor", 1.0)))
    return nn.RoPE(head_dim, traditional=False, base=theta)  # "default" rotates the whole head


class Attention(common.Attention):
    """QK-normed grouped-query attention with a per-head sigmoid output gate."""

    def __init__(self, args: ModelArgs, layer_type: str):
        d = args.head_dim
        super().__init__(
            args.hidden_size, args.num_attention_heads, args.num_key_value_heads, d,
            bias=args.attention_bias, rope=make_rope(args.rope_parameters[layer_type], d),
            window=args.sliding_window if layer_type == "sliding_attention" else None,
        )
        self.q_norm = nn.RMSNorm(d, eps=args.norm_eps)
        self.k_norm = nn.RMSNorm(d, eps=args.norm_eps)
        self.use_gate = args.use_attention_gate
        if self.use_gate:
            self.gate_proj = nn.Linear(args.hidden_size, args.num_attention_heads, bias=False)

    def __call__(self, x: mx.array, cache: Optional[KVCache] = None) -> mx.array:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, T, self.n_q, self.head_dim)).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, T, self.n_kv, self.head_dim)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)
        out = attend(q, k, v, self.rope, cache, self.window, self.scale)
        if self.use_gate:
            gate = mx.sigmoid(self.gate_proj(x))[..., None]  # [B, T, heads, 1]
            out = (out.reshape(B, T, self.n_q, self.head_dim) * gate).reshape(B, T, -1)
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        self.kind = "conv" if layer_type == "conv" else "attention"
        self.window = args.sliding_window if layer_type == "sliding_attention" else None
        if self.kind == "attention":
            self.self_attn = Attention(args, layer_type)
        else:
            self.conv = ShortConv(args)
        self.feed_forward = MLP(args.hidden_size, args.intermediate_size)
        D, eps = args.hidden_size, args.norm_eps
        self.operator_norm = nn.RMSNorm(D, eps=eps)
        self.ffn_norm = nn.RMSNorm(D, eps=eps)
        self.sandwich = args.use_sandwich_norm
        if self.sandwich:
            self.post_operator_norm = nn.RMSNorm(D, eps=eps)
            self.post_ffn_norm = nn.RMSNorm(D, eps=eps)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        op = self.self_attn if self.kind == "attention" else self.conv
        y = op(self.operator_norm(x), cache=cache)
        h = x + (self.post_operator_norm(y) if self.sandwich else y)
        y = self.feed_forward(self.ffn_norm(h))
        return h + (self.post_ffn_norm(y) if self.sandwich else y)


class Model(CausalLM):
    """LFM3 for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``."""

    norm_name = "embedding_norm"

    def __init__(self, args: ModelArgs):
        super().__init__(
            args,
            layers=[DecoderLayer(args, t) for t in args.layer_types],
            norm=nn.RMSNorm(args.hidden_size, eps=args.norm_eps),
        )

    def layer_cache(self, layer: DecoderLayer):
        if layer.kind == "conv":
            return StateCache()
        return KVCache() if layer.window is None else WindowKVCache(layer.window)
