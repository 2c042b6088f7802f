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

from .common import StateCache
from .ssm import Mamba1Mixer


@dataclass
class ModelArgs:
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

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelArgs":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in cfg.items() if k in names})


def layer_schedule(args: ModelArgs) -> list[str]:
    return ["mamba"] * args.num_hidden_layers


def layer_windows(args: ModelArgs) -> list[Optional[int]]:
    return [None] * args.num_hidden_layers


def rms_norm(norm: nn.RMSNorm, x: mx.array) -> mx.array:
    """``norm`` applied in ``x``'s dtype (a float32 norm weight, as quantized
    models store it, must not promote bf16 activations)."""
    return mx.fast.rms_norm(x, norm.weight.astype(x.dtype), norm.eps)


class ResidualBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.kind = "mamba"
        self.residual_in_fp32 = args.residual_in_fp32
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.layer_norm_epsilon)
        self.mixer = Mamba1Mixer(
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

    def __call__(self, x: mx.array, cache=None, dtype=None) -> mx.array:
        dtype = dtype or x.dtype
        residual = x.astype(mx.float32) if self.residual_in_fp32 else x
        return residual + self.mixer(rms_norm(self.norm, x.astype(dtype)), cache=cache)


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [ResidualBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm_f = nn.RMSNorm(args.hidden_size, eps=args.layer_norm_epsilon)


class Model(nn.Module):
    """Mamba / Falcon-Mamba for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.backbone = Backbone(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def layers(self) -> list[ResidualBlock]:
        return self.backbone.layers

    def block_kinds(self) -> list[str]:
        return [layer.kind for layer in self.layers]

    # Activations dtype: the checkpoint's float dtype (set by the loader).
    activation_dtype = None

    def embed(self, inputs: mx.array) -> mx.array:
        h = self.backbone.embeddings(inputs)
        return h.astype(self.activation_dtype) if self.activation_dtype is not None else h

    def head(self, h: mx.array, dtype=None) -> mx.array:
        # transformers normalises the (float32) residual stream, then casts.
        h = rms_norm(self.backbone.norm_f, h).astype(dtype or h.dtype)
        if self.args.tie_word_embeddings:
            return self.backbone.embeddings.as_linear(h)
        return self.lm_head(h)

    def __call__(self, inputs: mx.array, cache=None, hidden_states=None) -> mx.array:
        """Logits for ``inputs``; if ``hidden_states`` is a list, the output of
        every block is appended to it (used to localise divergence)."""
        h = self.embed(inputs)
        dtype = h.dtype
        caches = cache if cache is not None else [None] * len(self.layers)
        for layer, c in zip(self.layers, caches):
            h = layer(h, cache=c, dtype=dtype)
            if hidden_states is not None:
                hidden_states.append(h)
        return self.head(h, dtype)

    def make_cache(self) -> list:
        return [StateCache() for _ in self.layers]  # [conv state, SSM state]
