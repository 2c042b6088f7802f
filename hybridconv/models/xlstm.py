"""xLSTM-7B (NX-AI): a stack of mLSTM blocks, no attention.

Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory" (arXiv:2405.04517)
introduces the mLSTM cell; Beck et al. 2025, "xLSTM 7B: A Recurrent LLM for
Fast and Efficient Inference" (arXiv:2503.13427) the block used here (the
``xlstm_large`` model of the ``xlstm`` package, transformers' ``xLSTMForCausalLM``).

Architecture and schedule
=========================
``num_hidden_layers`` (``num_blocks``) identical pre-norm blocks, every one an
mLSTM layer and a gated MLP (the schedule is ``["mlstm"] * n``)::

    x = x + mlstm_layer(norm_mlstm(x))
    x = x + ffn(norm_ffn(x))                   ffn: proj_down(silu(proj_up_gate(x)) ⊙ proj_up(x))

then ``out_norm`` and an untied ``lm_head`` whose logits are soft-capped:
``c · tanh(logits / c)`` with ``c = output_logit_soft_cap`` (30). Norms are
RMSNorms (``weight · x / rms(x)``, ``norm_eps``, float32 reductions, a bias
with ``use_bias``). The FFN width is ``hidden_size · ffn_proj_factor`` rounded
up to a multiple of ``ffn_round_up_to_multiple_of``.

The mLSTM layer
===============
With ``H = num_heads``, ``Dk = int(hidden · qk_dim_factor) / H`` and
``Dv = int(hidden · v_dim_factor) / H`` per head::

    q, k, v, o = q(x), k(x), v(x), ogate_preact(x)                  (per head)
    ĩ = c_g · tanh(igate_preact(x) / c_g)                            input gate pre-activation, one per head
    f̃ = logsigmoid(c_g · tanh(fgate_preact(x) / c_g))               log forget gate       (c_g = gate_soft_cap, 15)
    C_t = f_t C_{t-1} + exp(ĩ_t) k_t v_tᵀ,  n_t = f_t n_{t-1} + exp(ĩ_t) k_t
    h_t = C_tᵀ q̂_t / (max(|n_tᵀ q̂_t|, exp(−m_t)) + eps)             q̂ = q / √Dk, states stored ÷ e^{m_t}
    y = out_proj(sigmoid(o) ⊙ multihead_layernorm(h))

The soft caps bound the gate pre-activations to ``(−15, 15)``; the input gate
is exponential (``exp(ĩ)`` up to 3·10⁶), which is why the states are kept
scaled by the running maximum ``m_t = max(f̃_t + m_{t−1}, ĩ_t)`` (``m_0 = 0``).
The ``eps`` on the *stabilised* denominator makes ``m_t`` part of the function
(see :mod:`hybridconv.models.linear_attention`, which computes the recurrence:
chunked for prefill — chunks of ``chunk_size`` — and one step at a time for
decoding, both reproducing the reference's stabiliser). ``multihead_norm`` is a
LayerNorm per head without a weight of its own (statistics over each head's
``Dv`` channels, float32), then one ``weight`` (and ``bias``) over all heads.

Decoding keeps, per block, ``(C' = [C | n], m)`` in a
:class:`~hybridconv.models.common.StateCache` (slot 0: ``C'`` ``[b, H, Dk,
Dv+1]``, slot 1: ``m`` ``[b, H]``). Parameter names are transformers' with
``blocks`` renamed ``layers`` (``backbone.layers.N.mlstm_layer.q``,
``….ffn.proj_up_gate``, ``backbone.out_norm``, ``lm_head``); the fused
weight layout (``qkv_opreact``, ``ifgate_preact``, ``proj_up_gate_z``) is split
into these at conversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .common import BaseModelArgs, CausalLM, soft_cap
from .linear_attention import exp_gated, mlstm_readout


def round_up(x: float, multiple: int) -> int:
    """transformers' ``round_up_to_next_multiple_of``."""
    return int(((x + multiple - 1) // multiple) * multiple)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "xlstm"
    vocab_size: int = 50304
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_heads: int = 8
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    ffn_proj_factor: float = 2.667
    ffn_round_up_to_multiple_of: int = 64
    use_bias: bool = False
    norm_eps: float = 1e-6
    eps: float = 1e-6
    chunk_size: int = 64
    gate_soft_cap: Optional[float] = 15.0
    output_logit_soft_cap: Optional[float] = 30.0
    tie_word_embeddings: bool = False

    def __post_init__(self):
        # As transformers' xLSTMLayer / xLSTMFeedForward size them.
        self.qk_dim = int(self.hidden_size * self.qk_dim_factor)
        self.v_dim = int(self.hidden_size * self.v_dim_factor)
        self.ffn_dim = round_up(self.hidden_size * self.ffn_proj_factor, self.ffn_round_up_to_multiple_of)
        for name, width in (("qk", self.qk_dim), ("v", self.v_dim)):
            if width <= 0 or width % self.num_heads:
                raise ValueError(f"{name} width {width} is not a positive multiple of num_heads {self.num_heads}")


def layer_schedule(args: ModelArgs) -> list[str]:
    return ["mlstm"] * args.num_hidden_layers


def layer_windows(args: ModelArgs) -> list[Optional[int]]:
    return [None] * args.num_hidden_layers


class RMSNorm(nn.Module):
    """xLSTM's RMSNorm: normalised in float32, cast back, then ``· weight (+ bias)``."""

    def __init__(self, dims: int, eps: float, bias: bool = False):
        super().__init__()
        self.weight = mx.ones((dims,))
        if bias:
            self.bias = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.fast.rms_norm(x.astype(mx.float32), None, self.eps).astype(x.dtype) * self.weight.astype(x.dtype)
        return y + self.bias.astype(x.dtype) if "bias" in self else y


class MultiHeadLayerNorm(nn.Module):
    """LayerNorm over each head's channels (float32, no weight inside), then one
    ``weight`` (and ``bias``) over the concatenated heads."""

    def __init__(self, heads: int, head_dim: int, eps: float, bias: bool = False):
        super().__init__()
        self.weight = mx.ones((heads * head_dim,))
        if bias:
            self.bias = mx.zeros((heads * head_dim,))
        self.eps = eps

    def __call__(self, h: mx.array, dtype) -> mx.array:
        B, T = h.shape[:2]
        y = mx.fast.layer_norm(h.astype(mx.float32), None, None, self.eps).astype(dtype).reshape(B, T, -1)
        y = y * self.weight.astype(dtype)
        return y + self.bias.astype(dtype) if "bias" in self else y


def cap(x: mx.array, c: Optional[float]) -> mx.array:
    return soft_cap(x, c) if c else x


class MLSTMLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        H, bias = args.hidden_size, args.use_bias
        self.heads, self.eps, self.chunk_size, self.gate_cap = args.num_heads, args.eps, args.chunk_size, args.gate_soft_cap
        self.q = nn.Linear(H, args.qk_dim, bias=bias)
        self.k = nn.Linear(H, args.qk_dim, bias=bias)
        self.v = nn.Linear(H, args.v_dim, bias=bias)
        self.ogate_preact = nn.Linear(H, args.v_dim, bias=bias)
        self.igate_preact = nn.Linear(H, args.num_heads, bias=True)
        self.fgate_preact = nn.Linear(H, args.num_heads, bias=True)
        self.multihead_norm = MultiHeadLayerNorm(args.num_heads, args.v_dim // args.num_heads, args.norm_eps, bias)
        self.out_proj = nn.Linear(args.v_dim, H, bias=bias)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        B, T, _ = x.shape
        heads = lambda t: t.reshape(B, T, self.heads, -1)  # noqa: E731
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        f32 = mx.float32
        i_gate = cap(self.igate_preact(x).astype(f32), self.gate_cap)
        log_f = nn.log_sigmoid(cap(self.fgate_preact(x).astype(f32), self.gate_cap))
        state = None
        if cache is not None and cache[0] is not None:
            state = (cache[0], cache[1])
        num, den, m, state = exp_gated(q, k, v, log_f, i_gate, state, self.chunk_size)
        if cache is not None:
            cache[0], cache[1] = state
        h = mlstm_readout(num, den, m, self.eps)
        h = self.multihead_norm(h, x.dtype)
        return self.out_proj(mx.sigmoid(self.ogate_preact(x)) * h)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        H, bias = args.hidden_size, args.use_bias
        self.proj_up_gate = nn.Linear(H, args.ffn_dim, bias=bias)
        self.proj_up = nn.Linear(H, args.ffn_dim, bias=bias)
        self.proj_down = nn.Linear(args.ffn_dim, H, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj_down(nn.silu(self.proj_up_gate(x)) * self.proj_up(x))


class Block(nn.Module):
    kind = "mlstm"

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm_mlstm = RMSNorm(args.hidden_size, args.norm_eps, args.use_bias)
        self.mlstm_layer = MLSTMLayer(args)
        self.norm_ffn = RMSNorm(args.hidden_size, args.norm_eps, args.use_bias)
        self.ffn = FeedForward(args)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        x = x + self.mlstm_layer(self.norm_mlstm(x), cache=cache)
        return x + self.ffn(self.norm_ffn(x))


class Model(CausalLM):
    """xLSTM for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``
    (float32: soft-capped in float32, as transformers does)."""

    trunk_name, embedding_name, norm_name = "backbone", "embeddings", "out_norm"

    def __init__(self, args: ModelArgs):
        super().__init__(
            args,
            layers=[Block(args) for _ in range(args.num_hidden_layers)],
            norm=RMSNorm(args.hidden_size, args.norm_eps),  # transformers' out_norm: never a bias
        )

    def scale_logits(self, logits: mx.array) -> mx.array:
        return cap(logits.astype(mx.float32), self.args.output_logit_soft_cap)

