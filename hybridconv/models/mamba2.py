"""Mamba-2: a stack of SSD (state-space duality) blocks, no attention.

Dao & Gu, 2024, "Transformers are SSMs: Generalized Models and Efficient
Algorithms Through Structured State Space Duality", arXiv:2405.21060.
transformers' ``Mamba2ForCausalLM`` (e.g. Mamba-Codestral).

Architecture and schedule
=========================
``num_hidden_layers`` identical pre-norm residual blocks, every one a Mamba-2
mixer (schedule ``["mamba"] * n``)::

    x = x + mixer(rmsnorm(x))            rmsnorm eps: layer_norm_epsilon

then ``norm_f`` and ``lm_head`` (untied by default). ``residual_in_fp32``
keeps the residual stream in float32 as transformers does (it matters only
below float32). Parameter names are transformers' and mlx-lm's
(``backbone.embeddings``, ``backbone.layers.N.{norm, mixer.*}``,
``backbone.norm_f``, ``lm_head``).

The mixer (computed by :class:`hybridconv.models.ssm.Mamba2Mixer`)
=================================================================
``H = num_heads`` heads of ``P = head_dim`` channels (``H·P = expand ·
hidden_size``), ``G = n_groups``, ``N = state_size``::

    [z | xBC | dt] = in_proj(u)                 H·P + (H·P + 2·G·N) + H
    [x | B | C] = silu(conv1d(xBC))             causal depthwise, width conv_kernel
    Δ = clamp(softplus(dt + dt_bias), *time_step_limit),   A = -exp(A_log)  (scalar per head)
    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t ⊗ B_t      head h reads B, C of group h // (H/G)
    y_t = h_t C_t + D x_t
    out = out_proj(rmsnorm_G(y ⊙ silu(z)) · w)  RMS statistics per group of H·P/G channels

``time_step_limit`` defaults to ``(0, inf)`` in transformers (no clamp); a
config that sets it is honoured, in prefill and in decoding alike (transformers'
PyTorch path clamps in its chunked prefill but not in its one-step decode, so
with a non-default limit its own decode departs from its prefill). ``time_step_rank`` is in the config but
unused by Mamba-2 (Δ comes straight from ``in_proj``). Prefill is the chunked
SSD form of :func:`hybridconv.models.ssm.ssd_scan` (``chunk_size`` steps per
chunk, a loop over chunks only); decoding runs the same code on one step
through a :class:`~hybridconv.models.common.StateCache`.

What mlx-lm does differently: its gated norm takes the statistics over the
whole ``H·P`` vector, ignoring ``n_groups`` (a different function whenever
``n_groups > 1``), and its ``ModelArgs`` requires ``intermediate_size``, which
transformers 5 does not write (the converter adds it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.nn as nn

from . import mamba
from .common import BaseModelArgs
from .ssm import Mamba2Mixer


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "mamba2"
    num_heads: int = 128
    head_dim: int = 64
    vocab_size: int = 32768
    hidden_size: int = 4096
    intermediate_size: Optional[int] = None
    state_size: int = 128
    num_hidden_layers: int = 64
    layer_norm_epsilon: float = 1e-5
    conv_kernel: int = 4
    n_groups: int = 8
    use_bias: bool = False
    use_conv_bias: bool = True
    tie_word_embeddings: bool = False
    time_step_limit: Sequence[float] = (0.0, math.inf)
    time_step_rank: int | str = "auto"
    chunk_size: int = 256
    residual_in_fp32: bool = True

    def __post_init__(self):
        if self.intermediate_size is None:
            self.intermediate_size = self.num_heads * self.head_dim


def layer_schedule(args: ModelArgs) -> list[str]:
    return ["mamba"] * args.num_hidden_layers


def layer_windows(args: ModelArgs) -> list[Optional[int]]:
    return [None] * args.num_hidden_layers


class Model(mamba.Model):
    """Mamba-2 for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``.

    :class:`hybridconv.models.mamba.Model` (same blocks, residual handling,
    parameter names and caches) with the Mamba-2 mixer."""

    @staticmethod
    def build_mixer(args: ModelArgs) -> nn.Module:
        return Mamba2Mixer(
            args.hidden_size,
            args.num_heads,
            args.head_dim,
            args.n_groups,
            args.state_size,
            args.conv_kernel,
            chunk_size=args.chunk_size,
            use_conv_bias=args.use_conv_bias,
            use_bias=args.use_bias,
            norm_eps=args.layer_norm_epsilon,
            time_step_limit=tuple(args.time_step_limit),
        )
