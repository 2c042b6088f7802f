"""Bamba (IBM): Mamba-2 layers with a few attention layers at listed indices.

Architecture
============
A decoder-only stack of ``num_hidden_layers`` pre-norm residual layers, each a
mixer followed by a gated MLP (as in Jamba, from which transformers derives
it, but without experts)::

    h = x + mixer(input_layernorm(x))          mixer: Mamba-2 or attention
    y = h + mlp(pre_ff_layernorm(h))           mlp: down(silu(gate(.)) ⊙ up(.))

then ``final_layernorm`` and an (untied by default) ``lm_head``. Norms are
plain RMSNorms (``weight · x / rms(x)``, no offset).

Layer schedule (``attn_layer_indices``)
---------------------------------------
Layer ``i`` is attention when ``i`` is listed in ``attn_layer_indices`` and
Mamba-2 otherwise (Bamba-9B: attention at 9, 18, 27 of 32). transformers 5
exposes the same as ``layers_block_type`` / ``layer_types``
(``full_attention`` / ``linear_attention``); the converter accepts either and
writes the index list.

The Mamba-2 mixer (Dao & Gu, 2024, arXiv:2405.21060)
----------------------------------------------------
transformers' ``Mamba2Mixer`` layout, computed by
:class:`hybridconv.models.ssm.Mamba2Mixer` (the math is in
:mod:`hybridconv.models.ssm`): ``in_proj → [z | xBC | dt]``, causal depthwise
conv1d + SiLU over ``xBC``, ``H = mamba_n_heads`` heads of
``P = mamba_d_head`` channels, ``B``/``C`` shared by the heads of each of
``mamba_n_groups`` groups, state size ``N = mamba_d_state``;
``Δ = clamp(softplus(dt + dt_bias), *time_step_limit)`` (transformers'
default ``(0, inf)``: no clamp), ``A = -exp(A_log)``::

    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t ⊗ B_t,     y_t = h_t C_t + D x_t

and the output ``out_proj(rmsnorm_g(y ⊙ silu(z)) · w)``, the RMS statistics
taken per group of ``H·P / n_groups`` channels. Prefill uses the chunked SSD
form (``mamba_chunk_size``); decoding runs the same code one step at a time,
clamp included. (transformers' one-token cached path,
``mamba2_selective_state_update``, skips the ``time_step_limit`` clamp that its
prefill applies, so with a limit other than ``(0, inf)`` its own cached decode
departs from its prefill; the reference used by ``verify`` is the prefill,
``use_cache=False``, and hybridconv keeps prefill = decode.)

Attention
---------
Grouped-query attention (``q_proj``/``k_proj``/``v_proj``/``o_proj``, biases
if ``attention_bias``), ``head_dim = hidden_size / num_attention_heads``,
scale ``head_dim^-1/2``, full causal (no window). Rotary embeddings over the
*first half* of each head only: transformers hard-codes
``partial_rotary_factor = 0.5`` for Bamba whatever the config says (the
published configs state it as ``attn_rotary_emb = head_dim / 2``); the other
half carries no position. ``rope_theta`` at the top level (published) or in
``rope_parameters`` (transformers 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .common import MLP, Attention, BaseModelArgs, CausalLM
from .ssm import Mamba2Mixer


@dataclass
class Mamba2Keys(BaseModelArgs):
    """The Mamba-2 keys of a Bamba-style config (read by :func:`mamba2_mixer_args`;
    GraniteMoeHybrid's too)."""

    mamba_n_heads: int = 128
    mamba_d_head: int = 64
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_conv: int = 4
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    # [low, high]; ``None`` for high means no upper limit (JSON has no infinity)
    time_step_limit: list = field(default_factory=lambda: [0.0, None])


@dataclass
class ModelArgs(Mamba2Keys):
    model_type: str = "bamba"
    vocab_size: int = 128000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: Optional[int] = None
    attn_layer_indices: list[int] = field(default_factory=list)
    attention_bias: bool = False
    mlp_bias: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    tie_word_embeddings: bool = False

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


def layer_schedule(args: ModelArgs) -> list[str]:
    """``"mamba"`` or ``"attention"`` for every layer (see module docstring)."""
    attn = set(args.attn_layer_indices or [])
    return ["attention" if i in attn else "mamba" for i in range(args.num_hidden_layers)]


def layer_windows(args: ModelArgs) -> list[Optional[int]]:
    """No attention layer of Bamba has a window."""
    return [None] * args.num_hidden_layers


def time_step_limit(value) -> tuple[float, float]:
    """``[low, high]`` from the normalised config (``None`` high: no limit)."""
    lo, hi = value
    return float(lo), math.inf if hi is None else float(hi)


def mamba2_mixer_args(args) -> dict:
    """:class:`~hybridconv.models.ssm.Mamba2Mixer`'s arguments from a Bamba-style
    config (``mamba_*`` keys; also Granite-4.0-H's and Falcon-H1's)."""
    return dict(
        hidden_size=args.hidden_size,
        num_heads=args.mamba_n_heads,
        head_dim=args.mamba_d_head,
        n_groups=args.mamba_n_groups,
        d_state=args.mamba_d_state,
        d_conv=args.mamba_d_conv,
        chunk_size=args.mamba_chunk_size,
        use_conv_bias=args.mamba_conv_bias,
        use_bias=args.mamba_proj_bias,
        norm_eps=args.rms_norm_eps,
        time_step_limit=time_step_limit(args.time_step_limit),
    )


def mamba2_mixer(args, **extra) -> Mamba2Mixer:
    """The Mamba-2 mixer of a Bamba-style config (also Granite-4.0-H's)."""
    return Mamba2Mixer(**mamba2_mixer_args(args), **extra)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, kind: str):
        super().__init__()
        self.kind = kind
        self.is_mamba = kind == "mamba"
        if self.is_mamba:
            self.mamba = mamba2_mixer(args)
        else:
            d = args.attention_head_dim
            self.self_attn = Attention(
                args.hidden_size,
                args.num_attention_heads,
                args.num_key_value_heads,
                d,
                bias=args.attention_bias,
                rope=nn.RoPE(int(d * args.partial_rotary_factor), traditional=False, base=args.rope_theta),
            )
        self.feed_forward = MLP(args.hidden_size, args.intermediate_size, args.mlp_bias)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.pre_ff_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        mixer = self.mamba if self.is_mamba else self.self_attn
        h = x + mixer(self.input_layernorm(x), cache=cache)
        return h + self.feed_forward(self.pre_ff_layernorm(h))


class Model(CausalLM):
    """Bamba for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``."""

    norm_name = "final_layernorm"

    def __init__(self, args: ModelArgs):
        super().__init__(
            args,
            layers=[DecoderLayer(args, kind) for kind in layer_schedule(args)],
            norm=nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps),
        )
