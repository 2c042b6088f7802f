"""RecurrentGemma (Griffin): RG-LRU recurrent blocks mixed with local attention.

References: De et al., 2024, "Griffin: Mixing Gated Linear Recurrences with
Local Attention for Efficient Language Models" (arXiv:2402.19427), and Botev et
al., 2024, "RecurrentGemma: Moving Past Transformers for Efficient Open
Language Models" (arXiv:2404.07839).

Architecture
============
Token embeddings are multiplied by ``sqrt(hidden_size)`` — rounded to bfloat16
first, exactly as the reference implementation stores that constant (for 2560
that is 50.5, not 50.596; the difference would show in every logit). Then
``num_hidden_layers`` residual blocks::

    x = x + temporal_block(temporal_pre_norm(x))     # recurrent or local attention
    x = x + mlp_block(channel_pre_norm(x))           # gelu(gate) * up, with biases

a final norm, the output head (tied to the embeddings unless ``lm_head`` is
stored) and logit soft-capping ``logits = c · tanh(logits / c)`` with
``c = logits_soft_cap`` (30). (On the CPU in float32 the tanh of the soft-cap
and of the GELUs is ``models/common.py``'s vectorised rational approximation,
within 4e-7 of tanh: MLX's own is scalar libm there, and over 2048 × 256000
logits that alone would take seconds.)

Norms: RMSNorm with scale ``1 + weight`` (Gemma convention; the stored weight
is the difference from 1).

Layer schedule: ``block_types`` (written ``_block_types`` in some published
configs) is cycled over the layers: layer ``i`` has kind
``block_types[i % len(block_types)]``, each ``"recurrent"`` or ``"attention"``.
The 2B model uses (recurrent, recurrent, attention).

Recurrent block
---------------
Two branches from the normalised input, of width ``lru_width`` (which may
differ from ``hidden_size``)::

    y = gelu_tanh(linear_y(x))
    u = rg_lru(conv_1d(linear_x(x)))     # causal depthwise conv, width conv1d_width, bias
    out = linear_out(u * y)

The RG-LRU (Real-Gated Linear Recurrent Unit), per channel, with block-diagonal
gates (``num_attention_heads`` blocks of ``lru_width / heads``)::

    r_t = sigmoid(W_a u_t + b_a)               recurrence gate
    i_t = sigmoid(W_x u_t + b_x)               input gate
    log a_t = -c · softplus(Λ) · r_t           c = 8, Λ = recurrent_param
    h_t = a_t ⊙ h_{t-1} + sqrt(1 - a_t²) ⊙ (i_t ⊙ u_t)

The paper writes ``a_t = sigmoid(Λ)^(c·r_t)``; since ``log sigmoid(-p) =
-softplus(p)``, the stored ``recurrent_param`` is ``p = -Λ`` and the log form
above avoids computing a power. The ``sqrt(1 - a²)`` factor keeps the state's
variance bounded whatever ``a`` is. At the start of a sequence (no previous
state) the state is reset: ``a_0`` is irrelevant and the first input is *not*
normalised (multiplier 1), as in the reference.

Prefill computes the linear recurrence ``h_t = a_t h_{t-1} + x_t`` with a
blocked parallel scan of the associative combine ``(a1, x1)∘(a2, x2) = (a1 a2,
a2 x1 + x2)``, in float32: within blocks of 4 steps (Hillis–Steele, 2
vectorised steps), then the same scan over the blocks' end states
(recursively), then each block's states corrected by the state entering it.
Decoding uses the same code on one step with the cached state.

Local attention block
---------------------
Multi-query (``num_key_value_heads``, 1 in the published models) attention with
head dim ``hidden_size / num_attention_heads``; rotary embeddings on the first
``partial_rotary_factor`` (½) of each head (non-interleaved halves,
``rope_theta``); a sliding window of ``attention_window_size`` tokens (a query
sees itself and the ``window - 1`` tokens before it); ``o_proj`` has a bias.
The decoding cache keeps the last ``window - 1`` keys and values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .common import (
    BaseModelArgs,
    CausalLM,
    OffsetRMSNorm,
    StateCache,
    WindowKVCache,
    attend,
    causal_depthwise_conv,
    gelu_tanh,
    soft_cap,
)

RG_LRU_C = 8.0  # the constant c of the RG-LRU (Griffin, section 2.4)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "recurrent_gemma"
    hidden_size: int = 2560
    intermediate_size: int = 15360
    num_hidden_layers: int = 26
    vocab_size: int = 256000
    num_attention_heads: int = 10
    num_key_value_heads: int = 1
    lru_width: int = 2560
    attention_window_size: int = 2048
    conv1d_width: int = 4
    logits_soft_cap: float = 30.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    block_types: list[str] = field(
        default_factory=lambda: ["recurrent", "recurrent", "attention"]
    )
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    embeddings_scale_by_sqrt_dim: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def layer_schedule(args: ModelArgs) -> list[str]:
    """``"recurrent"`` or ``"attention"`` for every layer: block_types, cycled."""
    bt = args.block_types
    return [bt[i % len(bt)] for i in range(args.num_hidden_layers)]


def layer_windows(args: ModelArgs) -> list[int | None]:
    """Attention window per layer (``None`` for recurrent layers)."""
    return [
        args.attention_window_size if kind == "attention" else None
        for kind in layer_schedule(args)
    ]


def bf16_round(x: float) -> float:
    """Round a Python float to the nearest bfloat16 value."""
    return mx.array(x, dtype=mx.bfloat16).astype(mx.float32).item()


SCAN_BLOCK = 4  # steps per block of linear_scan


def _hillis_steele(a: mx.array, x: mx.array, axis: int) -> tuple[mx.array, mx.array]:
    """Products of ``a`` and states from a zero state along ``axis``. After the
    step with shift ``k``, position ``t`` holds the combination of the ``2k``
    inputs ending at ``t``: ``log2(n)`` steps."""
    n = x.shape[axis]
    widths = [(0, 0)] * x.ndim
    head = [slice(None)] * x.ndim
    k = 1
    while k < n:
        widths[axis], head[axis] = (k, 0), slice(0, n - k)
        x = x + a * mx.pad(x[tuple(head)], widths)
        a = a * mx.pad(a[tuple(head)], widths, constant_values=1.0)
        k *= 2
    return a, x


def linear_scan(a: mx.array, x: mx.array, h0: Optional[mx.array]) -> mx.array:
    """``h_t = a_t * h_{t-1} + x_t`` over axis 1 (``[B, T, D]``), all states.

    Blocked: the scan within blocks of ``SCAN_BLOCK`` steps, this function on
    the blocks' end states (``T / SCAN_BLOCK`` of them, and so on down), then
    ``h = h_block + a_block_product · h_entering``. About 15 passes over the
    ``[B, T, D]`` arrays where one Hillis–Steele scan over T makes 5 per step,
    55 at T = 2048 (CPU, 2048 × 512: 6 ms instead of 42); the same sums, in
    another order.
    """
    if h0 is not None:
        # Fold the carried state into the first input: x_0 <- a_0 h0 + x_0.
        x = mx.concatenate([x[:, :1] + a[:, :1] * h0[:, None], x[:, 1:]], axis=1)
    B, T, D = x.shape
    if T <= SCAN_BLOCK:
        return _hillis_steele(a, x, 1)[1]
    n = -(-T // SCAN_BLOCK)
    if n * SCAN_BLOCK != T:  # pad the end (a = 1, x = 0): earlier states are unchanged
        tail = [(0, 0), (0, n * SCAN_BLOCK - T), (0, 0)]
        a, x = mx.pad(a, tail, constant_values=1.0), mx.pad(x, tail)
    shape = (B, n, SCAN_BLOCK, D)
    a_blk, h_blk = _hillis_steele(a.reshape(shape), x.reshape(shape), 2)
    ends = linear_scan(a_blk[:, :, -1], h_blk[:, :, -1], None)  # state at each block's end
    entering = mx.pad(ends[:, :-1], [(0, 0), (1, 0), (0, 0)])
    h = h_blk + a_blk * entering[:, :, None]
    return h.reshape(B, n * SCAN_BLOCK, D)[:, :T]


class Conv1d(nn.Module):
    """Depthwise temporal convolution, weight ``[C, K, 1]`` (MLX layout) + bias."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.weight = mx.zeros((channels, kernel_size, 1))
        self.bias = mx.zeros((channels,))

    def __call__(self, x: mx.array, state: Optional[mx.array]):
        return causal_depthwise_conv(x, self.weight, self.bias, state)


class RGLRU(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.block_width = width // num_heads
        self.recurrent_param = mx.zeros((width,))
        self.input_gate_weight = mx.zeros((num_heads, self.block_width, self.block_width))
        self.input_gate_bias = mx.zeros((num_heads, self.block_width))
        self.recurrent_gate_weight = mx.zeros(
            (num_heads, self.block_width, self.block_width)
        )
        self.recurrent_gate_bias = mx.zeros((num_heads, self.block_width))

    def _gate(self, u: mx.array, w: mx.array, b: mx.array) -> mx.array:
        B, T, _ = u.shape
        h = u.reshape(B, T, self.num_heads, self.block_width).transpose(2, 0, 1, 3)
        h = h.reshape(self.num_heads, B * T, self.block_width) @ w  # per-block u @ W
        h = h.reshape(self.num_heads, B, T, self.block_width).transpose(1, 2, 0, 3)
        return mx.sigmoid(h.reshape(B, T, -1) + b.reshape(-1))

    def __call__(self, u: mx.array, state: Optional[mx.array]):
        gate_x = self._gate(u, self.input_gate_weight, self.input_gate_bias)
        gate_a = self._gate(u, self.recurrent_gate_weight, self.recurrent_gate_bias)
        log_a = -RG_LRU_C * gate_a * nn.softplus(self.recurrent_param)
        a = mx.exp(log_a).astype(mx.float32)
        multiplier = mx.sqrt(1 - mx.exp(2 * log_a))
        if state is None:
            # Sequence start: reset, the first input enters un-normalised.
            first = mx.arange(u.shape[1])[None, :, None] == 0
            multiplier = mx.where(first, 1.0, multiplier)
        x = (u * gate_x) * multiplier.astype(u.dtype)
        h = linear_scan(a, x.astype(mx.float32), state)
        return h.astype(u.dtype), h[:, -1]


class RecurrentBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        w, lru = args.hidden_size, args.lru_width
        self.linear_y = nn.Linear(w, lru)
        self.linear_x = nn.Linear(w, lru)
        self.linear_out = nn.Linear(lru, w)
        self.conv_1d = Conv1d(lru, args.conv1d_width)
        self.rg_lru = RGLRU(lru, args.num_attention_heads)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        y = gelu_tanh(self.linear_y(x))
        u = self.linear_x(x)
        conv_state = cache[0] if cache is not None else None
        lru_state = cache[1] if cache is not None else None
        u, conv_state = self.conv_1d(u, conv_state)
        u, lru_state = self.rg_lru(u, lru_state)
        if cache is not None:
            cache[0], cache[1] = conv_state, lru_state
        return self.linear_out(u * y)


class LocalAttentionBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_q, self.n_kv, self.head_dim = (
            args.num_attention_heads,
            args.num_key_value_heads,
            args.head_dim,
        )
        self.window = args.attention_window_size
        self.scale = self.head_dim**-0.5
        bias = args.attention_bias
        w = args.hidden_size
        self.q_proj = nn.Linear(w, self.n_q * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(w, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(w, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_q * self.head_dim, w, bias=True)
        rotary = int(self.head_dim * args.partial_rotary_factor)
        self.rope = nn.RoPE(rotary, traditional=False, base=args.rope_theta)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.n_q, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, T, self.n_kv, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.n_kv, -1).transpose(0, 2, 1, 3)
        return self.o_proj(attend(q, k, v, self.rope, cache, self.window, self.scale))


class MLPBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        half = args.intermediate_size // 2
        self.gate_proj = nn.Linear(args.hidden_size, half)
        self.up_proj = nn.Linear(args.hidden_size, half)
        self.down_proj = nn.Linear(half, args.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class ResidualBlock(nn.Module):
    def __init__(self, args: ModelArgs, kind: str):
        super().__init__()
        self.kind = self.temporal_block_type = kind
        eps = args.rms_norm_eps
        self.temporal_pre_norm = OffsetRMSNorm(args.hidden_size, eps, offset=1.0)
        self.temporal_block = (
            RecurrentBlock(args) if kind == "recurrent" else LocalAttentionBlock(args)
        )
        self.channel_pre_norm = OffsetRMSNorm(args.hidden_size, eps, offset=1.0)
        self.mlp_block = MLPBlock(args)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        x = x + self.temporal_block(self.temporal_pre_norm(x), cache=cache)
        return x + self.mlp_block(self.channel_pre_norm(x))


class Griffin(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [ResidualBlock(args, kind) for kind in layer_schedule(args)]
        self.final_norm = OffsetRMSNorm(args.hidden_size, args.rms_norm_eps, offset=1.0)


class Model(CausalLM):
    """RecurrentGemma for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``."""

    norm_name = "final_norm"

    def __init__(self, args: ModelArgs):
        super().__init__(args, Griffin(args))
        self.embed_scale = (
            bf16_round(math.sqrt(args.hidden_size))
            if args.embeddings_scale_by_sqrt_dim
            else 1.0
        )

    def scale_embeddings(self, h: mx.array) -> mx.array:
        return h * mx.array(self.embed_scale, dtype=h.dtype)

    def scale_logits(self, logits: mx.array) -> mx.array:
        c = self.args.logits_soft_cap
        return soft_cap(logits, c) if c else logits

    def layer_cache(self, layer: ResidualBlock):
        if layer.kind == "recurrent":
            return StateCache()  # [conv state, RG-LRU state]
        return WindowKVCache(self.args.attention_window_size)
