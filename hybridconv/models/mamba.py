"""Mamba (Mamba-1): a stack of selective state-space blocks, no attention.

Gu & Dao, 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces", arXiv:2312.00752. transformers' ``MambaForCausalLM``; Falcon-Mamba
(:mod:`hybridconv.models.falcon_mamba`) is this model plus three weightless
norms, selected here by ``model_type``.

Architecture and schedule
=========================
``num_hidden_layers`` identical pre-norm residual blocks, every one a Mamba
mixer (the schedule is ``["mamba"] * n``; no attention, no MLP)::

    x = x + mixer(rmsnorm(x))             rmsnorm: weight · x / rms(x), eps layer_norm_epsilon

then ``norm_f`` and the head (tied to ``embeddings`` unless
``tie_word_embeddings`` is false). Parameter names are transformers' and
mlx-lm's: ``backbone.embeddings``, ``backbone.layers.N.{norm, mixer.*}``,
``backbone.norm_f``, ``lm_head``.

``residual_in_fp32`` (true in every published config): transformers keeps the
residual stream in float32 and casts each block's input back to the model's
dtype. It only matters below float32; it is honoured here so that a bf16
conversion tracks the bf16 reference. (mlx-lm keeps the stream in the model
dtype.)

The mixer (computed by :class:`hybridconv.models.ssm.Mamba1Mixer`)
=================================================================
With ``I = intermediate_size`` channels (``expand · hidden_size``),
``N = state_size``, ``R = time_step_rank`` (``"auto"`` = ``ceil(hidden/16)``)::

    [x | z] = in_proj(u)                           2·I features
    x = silu(conv1d(x))                            causal depthwise, width conv_kernel, bias
    [δ | B | C] = x_proj(x)                        R + N + N, no bias
    Δ = softplus(dt_proj(δ))                       low-rank Δ per channel (dt_proj has the bias)
    h_t = exp(Δ_t ⊙ A) ⊙ h_{t-1} + (Δ_t ⊙ x_t) ⊗ B_t,   A = -exp(A_log)  [I, N]
    y_t = h_t · C_t + D ⊙ x_t
    out = out_proj(y ⊙ silu(z))

Falcon-Mamba adds RMS norms *without weights* (eps ``mixer_rms_eps``) on δ, B
and C before they are used; they stabilise training at scale. Prefill runs the
chunked parallel scan of :func:`hybridconv.models.ssm.selective_scan` (no loop
over time steps); decoding runs the same code on one step through a
:class:`~hybridconv.models.common.StateCache` (``[conv state, SSM state]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .common import BaseModelArgs, CausalLM
from .ssm import Mamba1Mixer


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "mamba"
    vocab_size: int = 50280
    hidden_size: int = 768
    intermediate_size: int = 1536
    state_size: int = 16
    num_hidden_layers: int = 32
    conv_kernel: int = 4
    use_bias: bool = False
    use_conv_bias: bool = True
    time_step_rank: int | str = "auto"
    tie_word_embeddings: bool = True
    layer_norm_epsilon: float = 1e-5
    mixer_rms_eps: float = 1e-6
    use_bcdt_rms: bool = False
    residual_in_fp32: bool = True

    def __post_init__(self):
        if self.time_step_rank == "auto":
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        if self.model_type == "falcon_mamba":
            self.use_bcdt_rms = True


def layer_schedule(args: ModelArgs) -> list[str]:
    return ["mamba"] * args.num_hidden_layers


def layer_windows(args: ModelArgs) -> list[Optional[int]]:
    return [None] * args.num_hidden_layers


def rms_norm(norm: nn.RMSNorm, x: mx.array) -> mx.array:
    """``norm`` applied in ``x``'s dtype (a float32 norm weight, as quantized
    models store it, must not promote bf16 activations)."""
    return mx.fast.rms_norm(x, norm.weight.astype(x.dtype), norm.eps)


class ResidualBlock(nn.Module):
    """``x + mixer(rmsnorm(x))`` around a Mamba-1 or Mamba-2 mixer (``mixer``;
    :mod:`hybridconv.models.mamba2` reuses this block and :class:`Model`)."""

    def __init__(self, args, mixer: nn.Module):
        super().__init__()
        self.kind = "mamba"
        self.residual_in_fp32 = args.residual_in_fp32
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.layer_norm_epsilon)
        self.mixer = mixer

    def __call__(self, x: mx.array, cache=None, dtype=None) -> mx.array:
        dtype = dtype or x.dtype
        residual = x.astype(mx.float32) if self.residual_in_fp32 else x
        return residual + self.mixer(rms_norm(self.norm, x.astype(dtype)), cache=cache)


class Model(CausalLM):
    """Mamba / Falcon-Mamba for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``."""

    trunk_name, embedding_name, norm_name = "backbone", "embeddings", "norm_f"

    def __init__(self, args: ModelArgs):
        super().__init__(
            args,
            layers=[ResidualBlock(args, self.build_mixer(args)) for _ in range(args.num_hidden_layers)],
            norm=nn.RMSNorm(args.hidden_size, eps=args.layer_norm_epsilon),
        )

    @staticmethod
    def build_mixer(args: ModelArgs) -> nn.Module:
        return Mamba1Mixer(
            args.hidden_size,
            args.intermediate_size,
            args.state_size,
            args.conv_kernel,
            int(args.time_step_rank),
            use_conv_bias=args.use_conv_bias,
            use_bias=args.use_bias,
            bcdt_norm="weightless" if args.use_bcdt_rms else None,
            bcdt_eps=args.mixer_rms_eps,
        )

    def call_layer(self, layer: ResidualBlock, h: mx.array, cache, x0: mx.array) -> mx.array:
        # The residual stream may run in float32; each block casts its input
        # back to the activations' dtype (the embedding output's).
        return layer(h, cache=cache, dtype=x0.dtype)

    def final_norm(self, h: mx.array, dtype=None) -> mx.array:
        # transformers normalises the (float32) residual stream, then casts.
        return rms_norm(self.backbone.norm_f, h).astype(dtype or h.dtype)
