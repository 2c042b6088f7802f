"""RWKV-4: a recurrent network trained like a transformer; no attention layers.

Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era"
(arXiv:2305.13048). transformers' ``RwkvForCausalLM`` (checkpoints
RWKV/rwkv-4-*-pile, RWKV-4 "Raven").

Architecture and schedule
=========================
Embeddings, ``num_hidden_layers`` identical blocks (the schedule is
``["wkv"] * n``: every block's mixer is the WKV time mixing), ``ln_out`` and
the head (``head``, untied by default). Every norm is a LayerNorm with a bias
(``layer_norm_epsilon``; ``ln_out`` always 1e-5, as transformers builds it);
block 0 first normalises the embeddings (``pre_ln``)::

    x = x + time_mix(ln1(x))
    x = x + channel_mix(ln2(x))

Token shift
-----------
Both mixers read each token together with the previous one (``x'_t =
x_{t−1}``, zeros before the sequence; the *normalised* input of the mixer):
every projection's input is an interpolation ``μ ⊙ x_t + (1 − μ) ⊙ x'_t`` with
its own learned ``time_mix_*`` (``μ``, one per channel). Decoding keeps the last
token's mixer inputs (a :class:`~hybridconv.models.common.StateCache`: slot 0
the time-mix input, slot 1 the channel-mix input).

Time mixing (WKV)
-----------------
With ``A = attention_hidden_size`` channels, per channel ``c``:
``k = key(x_k)``, ``v = value(x_v)``, ``r = sigmoid(receptance(x_r))``,
``w = exp(time_decay) > 0`` (decay per step) and ``u = time_first`` (the bonus
of the current token)::

    wkv_t = (Σ_{s<t} e^{−(t−1−s)w + k_s} v_s + e^{u + k_t} v_t)
          / (Σ_{s<t} e^{−(t−1−s)w + k_s}     + e^{u + k_t})
    out   = output(r ⊙ wkv)

A softmax-like average of the values with a per-channel exponential decay: a
linear recurrence on the numerator and denominator, ``a_t = e^{−w} a_{t−1} +
e^{k_t} v_t``. ``e^{k}`` overflows float32 for large keys, so the states are
kept divided by a running maximum of the exponents (the RWKV reference's
``max_state``). It is computed by the shared core
:mod:`hybridconv.models.linear_attention` (one head per channel, scalar keys,
``log f = −w``, ``log i = k``, ``bonus = u``): chunked for prefill (chunks of
:data:`WKV_CHUNK` steps, no loop over time steps), one step at a time for
decoding; the state (numerator, denominator, maximum) lives in a second
:class:`~hybridconv.models.common.StateCache` (slot 0: ``[num | den]`` ``[b, A,
1, 2]``, slot 1: the maximum ``[b, A]``). ``time_decay`` and ``time_first`` are
float32 (transformers keeps them so: ``_keep_in_fp32_modules``).

Channel mixing
--------------
``channel_mix(x) = sigmoid(receptance(x_r)) ⊙ value(relu(key(x_k))²)`` (the
squared ReLU of Primer, So et al. 2021), ``intermediate_size`` wide.

``rescale_every`` (inference)
-----------------------------
In inference (``eval``) mode transformers divides the weights of
``attention.output`` and ``feed_forward.value`` of block ``i`` by ``2^⌊i /
rescale_every⌋`` and halves the hidden states after every
``rescale_every``-th block (against fp16 overflow; LayerNorm makes it almost
invisible, but its epsilon does not scale). That is the reference: here block
``i`` halves its input when ``i > 0`` and ``i % rescale_every == 0``, divides
its two mixers' outputs by ``2^⌊i / rescale_every⌋`` (a power of two: the same
floats as dividing the weights first), and the final norm halves its input when
``num_hidden_layers % rescale_every == 0``. Block outputs thus equal the
outputs of transformers' blocks (the halving after block ``i`` happens in the
next block), which verify compares. ``rescale_every ≤ 0``: no rescaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .common import BaseModelArgs, CausalLM, StateCache
from .linear_attention import NO_STATE, exp_gated

WKV_CHUNK = 8  # steps per chunk of the WKV prefill: the fastest on the CPU (scripts/bench_linear_recurrences.py)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "rwkv"
    vocab_size: int = 50277
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    attention_hidden_size: int = 4096
    intermediate_size: int = 16384
    layer_norm_epsilon: float = 1e-5
    rescale_every: int = 6
    tie_word_embeddings: bool = False


def layer_schedule(args: ModelArgs) -> list[str]:
    return ["wkv"] * args.num_hidden_layers


def layer_windows(args: ModelArgs) -> list[Optional[int]]:
    return [None] * args.num_hidden_layers


def token_shift(x: mx.array, cache, slot: int) -> mx.array:
    """The previous token's ``x`` for every position (zeros, or the cached last
    token, before the first); stores this call's last token in ``cache[slot]``."""
    prev = cache[slot] if cache is not None else None
    if prev is None:
        prev = mx.zeros_like(x[:, :1])
    if cache is not None:
        cache[slot] = x[:, -1:]
    return mx.concatenate([prev.astype(x.dtype), x[:, :-1]], axis=1)


def mix(x: mx.array, shifted: mx.array, mu: mx.array) -> mx.array:
    mu = mu.astype(x.dtype)
    return x * mu + shifted * (1 - mu)


class TimeMix(nn.Module):
    """WKV time mixing (transformers' ``RwkvSelfAttention``)."""

    def __init__(self, args: ModelArgs, scale: float):
        super().__init__()
        H, A = args.hidden_size, args.attention_hidden_size
        self.time_decay = mx.zeros((A,))
        self.time_first = mx.zeros((A,))
        self.time_mix_key = mx.zeros((1, 1, H))
        self.time_mix_value = mx.zeros((1, 1, H))
        self.time_mix_receptance = mx.zeros((1, 1, H))
        self.key = nn.Linear(H, A, bias=False)
        self.value = nn.Linear(H, A, bias=False)
        self.receptance = nn.Linear(H, A, bias=False)
        self.output = nn.Linear(A, H, bias=False)
        self.scale = scale

    def __call__(self, x: mx.array, shift_cache=None, wkv_cache=None) -> mx.array:
        shifted = token_shift(x, shift_cache, 0)
        k = self.key(mix(x, shifted, self.time_mix_key))
        v = self.value(mix(x, shifted, self.time_mix_value))
        r = mx.sigmoid(self.receptance(mix(x, shifted, self.time_mix_receptance)))
        f32 = mx.float32
        log_f = mx.broadcast_to(-mx.exp(self.time_decay.astype(f32)), k.shape)
        state = None
        if wkv_cache is not None and wkv_cache[0] is not None:
            state = (wkv_cache[0], wkv_cache[1])
        num, den, _, state = exp_gated(None, None, v[..., None], log_f, k, state, WKV_CHUNK,
                                       bonus=self.time_first.astype(f32), m0=NO_STATE)
        if wkv_cache is not None:
            wkv_cache[0], wkv_cache[1] = state
        wkv = (num[..., 0] / den).astype(x.dtype)
        out = self.output(r * wkv)
        return out * self.scale if self.scale != 1.0 else out


class ChannelMix(nn.Module):
    """Channel mixing (transformers' ``RwkvFeedForward``)."""

    def __init__(self, args: ModelArgs, scale: float):
        super().__init__()
        H = args.hidden_size
        self.time_mix_key = mx.zeros((1, 1, H))
        self.time_mix_receptance = mx.zeros((1, 1, H))
        self.key = nn.Linear(H, args.intermediate_size, bias=False)
        self.receptance = nn.Linear(H, H, bias=False)
        self.value = nn.Linear(args.intermediate_size, H, bias=False)
        self.scale = scale

    def __call__(self, x: mx.array, shift_cache=None) -> mx.array:
        shifted = token_shift(x, shift_cache, 1)
        k = mx.square(nn.relu(self.key(mix(x, shifted, self.time_mix_key))))
        v = self.value(k)
        if self.scale != 1.0:
            v = v * self.scale
        return mx.sigmoid(self.receptance(mix(x, shifted, self.time_mix_receptance))) * v


def rescaled(args: ModelArgs, i: int) -> tuple[bool, float]:
    """(block ``i`` halves its input, the factor on its mixers' outputs); see the
    module docstring, ``rescale_every``."""
    every = args.rescale_every
    if every <= 0:
        return False, 1.0
    return i > 0 and i % every == 0, 2.0 ** -(i // every)


class Block(nn.Module):
    kind = "wkv"

    def __init__(self, args: ModelArgs, i: int):
        super().__init__()
        H, eps = args.hidden_size, args.layer_norm_epsilon
        if i == 0:
            self.pre_ln = nn.LayerNorm(H, eps=eps)
        self.ln1 = nn.LayerNorm(H, eps=eps)
        self.ln2 = nn.LayerNorm(H, eps=eps)
        self.halve_input, scale = rescaled(args, i)
        self.attention = TimeMix(args, scale)
        self.feed_forward = ChannelMix(args, scale)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        shift, wkv = cache if cache is not None else (None, None)
        if self.halve_input:
            x = x / 2
        if "pre_ln" in self:
            x = self.pre_ln(x)
        x = x + self.attention(self.ln1(x), shift, wkv)
        return x + self.feed_forward(self.ln2(x), shift)


class Model(CausalLM):
    """RWKV-4 for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``."""

    trunk_name, embedding_name, norm_name = "rwkv", "embeddings", "ln_out"

    def __init__(self, args: ModelArgs):
        super().__init__(
            args,
            layers=[Block(args, i) for i in range(args.num_hidden_layers)],
            norm=nn.LayerNorm(args.hidden_size, eps=1e-5),  # transformers: nn.LayerNorm(hidden_size)
        )

    def layer_cache(self, layer):
        # (token-shift inputs of both mixers, WKV state [num | den] and maximum)
        return (StateCache(), StateCache())

    def final_norm(self, h: mx.array, dtype=None) -> mx.array:
        every = self.args.rescale_every
        if every > 0 and self.args.num_hidden_layers % every == 0:
            h = h / 2  # the halving after the last block (rescale_every)
        return self.rwkv.ln_out(h)
