"""Falcon-H1 (TII): attention and Mamba-2 side by side in every layer, with µP multipliers.

Architecture
============
A decoder-only stack of ``num_hidden_layers`` identical *parallel hybrid*
layers (Falcon-H1 technical report, TII 2025, arXiv:2507.22448). In each, the
attention and the SSM read the same normalised input and their (scaled)
outputs are summed into the residual stream, then a gated MLP follows::

    u = input_layernorm(x)
    x = x + m_ssm_out · mamba(u) + m_attn_out · attn(m_attn_in · u)
    x = x + mlp(pre_ff_layernorm(x))

then ``final_layernorm`` and the head. Norms are plain RMSNorms
(``w · x / rms(x)``, ``rms_norm_eps``).

Layer schedule
--------------
Every layer is ``"hybrid"`` (attention ∥ Mamba-2); transformers 5 reports the
same as ``layers_block_type``. There is no schedule key to normalise; each
layer has both a key/value cache and an SSM state.

µP multipliers (data in the config, applied where the reference applies them)
----------------------------------------------------------------------------
Falcon-H1 was trained with maximal-update parametrisation (Yang et al. 2022,
"Tensor Programs V", arXiv:2203.03466): fixed constants rescale activations at
chosen points, and the checkpoint's weights are only right *with* them. All are
read from config.json (default 1) and applied exactly where transformers'
``FalconH1*`` classes apply them:

=============================  ==============================================
``embedding_multiplier``       ``h0 = embed(ids) · m``
``attention_in_multiplier``    input of q/k/v: ``attn(m · u)``
``key_multiplier``             ``k = k_proj(·) · m`` (before RoPE)
``attention_out_multiplier``   ``attn(·) · m``
``ssm_in_multiplier``          input of ``in_proj``: ``in_proj(m · u)``
``ssm_multipliers`` (5)        per segment of ``in_proj``'s output
                               ``[z | x | B | C | dt]`` (transformers'
                               ``mup_vector``)
``ssm_out_multiplier``         ``mamba(·) · m``
``mlp_multipliers`` (2)        ``down(silu(m_g · gate(v)) ⊙ up(v)) · m_d``
``lm_head_multiplier``         ``logits = head(h) · m``
=============================  ==============================================

Since RoPE and the dot product are linear in ``k``, the key multiplier is the
same as multiplying the attention logit scale by it; it is applied that way
(``scale = head_dim^-1/2 · key_multiplier``), which is exact up to float
rounding.

Folded multipliers (``multipliers_folded``). Every multiplier scales the input
or output of one linear map, so it can be folded into that map's weight (and
bias), exactly up to float rounding; the converter does so (see
:mod:`hybridconv.converters.falcon_h1`) and writes ``multipliers_folded:
true`` with the multipliers kept in the config as data. The model then applies
none of them (:func:`applied`), except that with tied embeddings the shared
matrix carries ``embedding_multiplier``, so the head multiplies by
``lm_head_multiplier / embedding_multiplier`` — which is what mlx-lm's
Falcon-H1 computes for a tied head, and the reason a folded output runs right
in mlx-lm too.

The Mamba-2 mixer (Dao & Gu, 2024, arXiv:2405.21060)
----------------------------------------------------
transformers' Mamba2Mixer layout (:class:`hybridconv.models.ssm.Mamba2Mixer`;
the recurrence and the SSD chunked form are documented there):
``in_proj → [z | xBC | dt]`` with ``I = mamba_d_ssm = H·P`` (``H =
mamba_n_heads``, ``P = mamba_d_head``), causal depthwise conv1d + SiLU over
``xBC`` (``mamba_conv_bias``), ``B``/``C`` per group (``mamba_n_groups``),
``Δ = clamp(softplus(dt + dt_bias), *time_step_limit)`` (config; default
``(0, inf)``), ``A = -exp(A_log)``::

    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t ⊗ B_t,    y_t = h_t C_t + D x_t

Output: with ``mamba_rms_norm`` the grouped gated RMSNorm
(``mamba_norm_before_gate`` chooses ``rms(y)·w ⊙ silu(z)`` or
``rms(y ⊙ silu(z))·w``), otherwise plainly ``y ⊙ silu(z)``; then ``out_proj``
(bias: ``projectors_bias``; ``in_proj``'s bias: ``mamba_proj_bias``).

Attention
---------
Grouped-query attention in the Llama layout (``head_dim`` from the config,
else ``hidden_size / num_attention_heads``; biases if ``attention_bias``),
full causal, rotary embeddings over the whole head (``rope_theta``, 1e11 in
the published models; only the default rope type exists for Falcon-H1).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .bamba import mamba2_mixer_args
from .common import Attention, BaseModelArgs, CausalLM, KVCache, StateCache
from .ssm import Mamba2Mixer


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "falcon_h1"
    hidden_size: int = 1024
    num_hidden_layers: int = 36
    vocab_size: int = 32784
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    rope_theta: float = 1e11
    max_position_embeddings: int = 131072
    attention_bias: bool = False
    mlp_bias: bool = False
    mamba_d_ssm: int = 1536
    mamba_n_heads: int = 24
    mamba_d_head: int = 64
    mamba_n_groups: int = 1
    mamba_d_state: int = 128
    mamba_d_conv: int = 4
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    projectors_bias: bool = False
    mamba_rms_norm: bool = False
    mamba_norm_before_gate: bool = False
    time_step_limit: list = field(default_factory=lambda: [0.0, float("inf")])
    embedding_multiplier: float = 1.0
    lm_head_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    key_multiplier: float = 1.0
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    ssm_multipliers: list = field(default_factory=lambda: [1.0] * 5)
    mlp_multipliers: list = field(default_factory=lambda: [1.0, 1.0])
    multipliers_folded: bool = False  # the weights already carry the multipliers


def applied(args: ModelArgs) -> ModelArgs:
    """The multipliers still to apply at run time: all of them, or, when the
    converter folded them into the weights (``multipliers_folded``), none but
    the tied head's ``lm_head_multiplier / embedding_multiplier`` (the shared
    matrix carries ``embedding_multiplier``)."""
    if not args.multipliers_folded:
        return args
    one = {k: 1.0 for k in ("embedding_multiplier", "attention_in_multiplier", "attention_out_multiplier",
                            "key_multiplier", "ssm_in_multiplier", "ssm_out_multiplier")}
    head = args.lm_head_multiplier / args.embedding_multiplier if args.tie_word_embeddings else 1.0
    return replace(args, **one, lm_head_multiplier=head, ssm_multipliers=[1.0] * 5, mlp_multipliers=[1.0, 1.0],
                   multipliers_folded=False)


def layer_schedule(args: ModelArgs) -> list[str]:
    """Every layer is attention ∥ Mamba-2."""
    return ["hybrid"] * args.num_hidden_layers


def layer_windows(args: ModelArgs) -> list[Optional[int]]:
    return [None] * args.num_hidden_layers  # full causal attention everywhere


class Mixer(Mamba2Mixer):
    """Mamba-2 with Falcon-H1's input multiplier, segment multipliers and a
    separately biased ``out_proj`` (``projectors_bias``)."""

    def __init__(self, args: ModelArgs):
        super().__init__(
            **mamba2_mixer_args(args),  # Bamba's keys (time_step_limit's null high: no limit)
            norm_before_gate=args.mamba_norm_before_gate,
            use_norm=args.mamba_rms_norm,
            in_multiplier=args.ssm_in_multiplier,
            segment_multipliers=None if all(m == 1.0 for m in args.ssm_multipliers) else args.ssm_multipliers,
        )
        self.out_proj = nn.Linear(self.intermediate_size, args.hidden_size, bias=args.projectors_bias)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, i, b = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)
        self.gate_multiplier, self.down_multiplier = (float(m) for m in args.mlp_multipliers)

    def __call__(self, x: mx.array) -> mx.array:
        y = nn.silu(self.gate_proj(x) * self.gate_multiplier) * self.up_proj(x)
        return self.down_proj(y) * self.down_multiplier


class DecoderLayer(nn.Module):
    kind = "hybrid"

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.mamba = Mixer(args)
        rope = nn.RoPE(args.head_dim, traditional=False, base=args.rope_theta)
        self.self_attn = Attention(
            args.hidden_size,
            args.num_attention_heads,
            args.num_key_value_heads,
            args.head_dim,
            bias=args.attention_bias,
            rope=rope,
            # k·key_multiplier, then RoPE and q·k: the same as scaling the logits
            scale=args.head_dim**-0.5 * args.key_multiplier,
        )
        self.feed_forward = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.pre_ff_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.attn_in = args.attention_in_multiplier
        self.attn_out = args.attention_out_multiplier
        self.ssm_out = args.ssm_out_multiplier

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        ssm_cache, kv_cache = cache if cache is not None else (None, None)
        u = self.input_layernorm(x)
        m = self.mamba(u, cache=ssm_cache) * self.ssm_out
        a = self.self_attn(u * self.attn_in, cache=kv_cache) * self.attn_out
        x = x + (m + a)
        return x + self.feed_forward(self.pre_ff_layernorm(x))


class Model(CausalLM):
    """Falcon-H1 for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``."""

    norm_name = "final_layernorm"

    def __init__(self, args: ModelArgs):
        args = applied(args)
        super().__init__(
            args,
            layers=[DecoderLayer(args) for _ in range(args.num_hidden_layers)],
            norm=nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps),
        )

    def scale_embeddings(self, h: mx.array) -> mx.array:
        m = self.args.embedding_multiplier
        return h * m if m != 1.0 else h

    def scale_logits(self, logits: mx.array) -> mx.array:
        m = self.args.lm_head_multiplier
        return logits * m if m != 1.0 else logits

    def layer_cache(self, layer: DecoderLayer):
        # Per layer: (Mamba [conv, SSM] state, attention key/value history).
        return (StateCache(), KVCache())
