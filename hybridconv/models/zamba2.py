"""Zamba2 (Zyphra): a Mamba-2 backbone that calls a few *shared* attention blocks.

Architecture
============
Glorioso et al. 2024, "Zamba: A Compact 7B SSM Hybrid Model"
(arXiv:2405.16712) and "The Zamba2 Suite" (arXiv:2411.15242). A stack of
``num_hidden_layers`` Mamba-2 layers. Some of them (``"hybrid"`` in the
schedule) first call one of ``num_mem_blocks`` shared transformer blocks —
the *same weights* at every call, cycled ``0, 1, …, num_mem_blocks-1, 0, 1, …``
in the order the hybrid layers appear — and feed its output into the Mamba
layer. With ``e`` the token embeddings (kept from the start of the stack)::

    mamba layer:   x = x + mamba(input_layernorm(x))
    hybrid layer:  t = linear(shared_block_b(x, e))            (linear: per layer)
                   x = x + mamba(input_layernorm(x + t))

and at the end ``final_layernorm`` and the head (tied to the embeddings by
default). Norms are plain RMSNorms (``rms_norm_eps``).

The shared block (one of ``num_mem_blocks``)::

    u = input_layernorm([x | e])                     (2·hidden wide)
    a = attn(u)                                      → hidden
    t = mlp(pre_ff_layernorm(a))                     (no residual inside)

Attention reads the concatenation ``[x | e]`` (``attention_hidden_size = 2 ·
hidden_size``) with ``num_attention_heads`` heads of ``attention_head_dim =
2·hidden / heads`` channels and scales the logits by ``(head_dim / 2)^-1/2``
(not ``head_dim^-1/2``: the head is twice as wide as the residual stream's
share). Rotary embeddings only with ``use_mem_rope`` (``rope_theta``); full
causal. The MLP is ``down(act(g) ⊙ u)`` with ``[g | u] = gate_up_proj(v)``
(``hidden_act``, GELU in the published models).

Per-use adapters (LoRA-style, Hu et al. 2021, arXiv:2106.09685): because the
block's weights are shared, each *call* adds its own low-rank correction,
owned by the hybrid layer that makes the call: ``gate_up_proj(v) +
B·A·v`` (``adapter_rank``) always, and, with ``use_shared_attention_adapter``,
the same on ``q_proj``, ``k_proj`` and ``v_proj``. Each call keeps its own
key/value cache. Here the shared weights live once in ``model.shared_blocks.b``
and the adapters and the ``linear`` in the hybrid layer
(``model.layers.i.gate_up_adapter.{0,1}``, ``.q_adapter`` …).

When are the blocks shared? transformers (5.x) applies *all* of Zamba2's
weight ties — the head to the embeddings and the shared blocks to their first
caller — only when ``tie_word_embeddings`` is true (every published Zamba2).
With ``tie_word_embeddings = false`` every hybrid layer keeps its own copy of
"the" block, initialised and loaded separately, and uses adapter ``j`` of its
own copy. The reference is what transformers computes, so the converter writes
``tie_shared_blocks = tie_word_embeddings`` and, when false, one block per
hybrid layer (``model.shared_blocks.j``).

Layer schedule (``layers_block_type``)
--------------------------------------
One entry per layer: ``"mamba"`` (published) / ``"linear_attention"``
(transformers 5) for a Mamba-2 layer, ``"hybrid"`` for a Mamba-2 layer that
calls a shared block. The ``j``-th hybrid layer calls block ``j mod
num_mem_blocks``.

The Mamba-2 mixer (Dao & Gu, 2024, arXiv:2405.21060)
----------------------------------------------------
transformers' Mamba2Mixer layout, :class:`hybridconv.models.ssm.Mamba2Mixer`
(recurrence, SSD chunked form and the grouped gated RMSNorm are documented
there): ``I = mamba_expand · hidden`` channels in ``n_mamba_heads`` heads,
``mamba_ngroups`` B/C groups, state ``mamba_d_state``, conv width
``mamba_d_conv`` (always with a bias), ``in_proj``/``out_proj`` bias
``add_bias_linear``. Two Zamba2 specifics, as transformers computes them:
``Δ = max(softplus(dt + dt_bias), time_step_min)`` (transformers clamps Δ
from below at ``time_step_min`` and has no upper limit) and the gated norm's
epsilon is fixed at 1e-5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .common import BaseModelArgs, CausalLM, KVCache, StateCache, attend, gelu_tanh
from .ssm import Mamba2Mixer

ACTIVATIONS = {
    "gelu": nn.gelu,  # transformers' "gelu" is the exact (erf) GELU
    "gelu_pytorch_tanh": gelu_tanh,  # the tanh GELU, vectorised on the CPU (models.common)
    "gelu_new": gelu_tanh,
    "silu": nn.silu,
    "swish": nn.silu,
    "relu": nn.relu,
}


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "zamba2"
    hidden_size: int = 2560
    num_hidden_layers: int = 54
    vocab_size: int = 32000
    layers_block_type: list = field(default_factory=list)  # "mamba" / "hybrid"
    intermediate_size: int = 10240
    hidden_act: str = "gelu"
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    attention_head_dim: int = 160
    num_mem_blocks: int = 1
    use_shared_attention_adapter: bool = False
    adapter_rank: int = 128
    use_mem_rope: bool = False
    rope_theta: float = 10000.0
    mamba_d_state: int = 64
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_ngroups: int = 1
    n_mamba_heads: int = 8
    mamba_headdim: int = 640
    chunk_size: int = 256
    add_bias_linear: bool = False
    rms_norm_eps: float = 1e-5
    time_step_min: float = 1e-3
    tie_word_embeddings: bool = True
    tie_shared_blocks: bool = True  # transformers 5: ties the blocks only with tie_word_embeddings


def layer_schedule(args: ModelArgs) -> list[str]:
    """``"mamba"`` or ``"hybrid"`` (shared block + Mamba-2) for every layer."""
    return list(args.layers_block_type)


def layer_windows(args: ModelArgs) -> list[Optional[int]]:
    return [None] * args.num_hidden_layers  # the shared blocks attend causally over everything


def hybrid_layer_ids(args: ModelArgs) -> list[int]:
    return [i for i, kind in enumerate(layer_schedule(args)) if kind == "hybrid"]


def block_of(args: ModelArgs, j: int) -> int:
    """The shared block called by the ``j``-th hybrid layer (see module docstring)."""
    return j % args.num_mem_blocks if args.tie_shared_blocks else j


def lora(hidden: int, rank: int, out: int) -> list[nn.Linear]:
    return [nn.Linear(hidden, rank, bias=False), nn.Linear(rank, out, bias=False)]


def apply_lora(adapter: Optional[list], x: mx.array) -> mx.array | float:
    return adapter[1](adapter[0](x)) if adapter is not None else 0.0


class SharedAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        width = 2 * args.hidden_size  # [x | embeddings]
        d = args.attention_head_dim
        self.n_q, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, d
        self.q_proj = nn.Linear(width, self.n_q * d, bias=False)
        self.k_proj = nn.Linear(width, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(width, self.n_kv * d, bias=False)
        self.o_proj = nn.Linear(self.n_q * d, args.hidden_size, bias=False)
        self.rope = nn.RoPE(d, traditional=False, base=args.rope_theta) if args.use_mem_rope else None
        self.scale = (d / 2) ** -0.5

    def __call__(self, u: mx.array, adapters, cache=None) -> mx.array:
        B, T, _ = u.shape
        qa, ka, va = adapters
        q = (self.q_proj(u) + apply_lora(qa, u)).reshape(B, T, self.n_q, -1).transpose(0, 2, 1, 3)
        k = (self.k_proj(u) + apply_lora(ka, u)).reshape(B, T, self.n_kv, -1).transpose(0, 2, 1, 3)
        v = (self.v_proj(u) + apply_lora(va, u)).reshape(B, T, self.n_kv, -1).transpose(0, 2, 1, 3)
        return self.o_proj(attend(q, k, v, self.rope, cache, None, self.scale))


class SharedMLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=args.add_bias_linear)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.add_bias_linear)
        self.act = ACTIVATIONS[args.hidden_act]

    def __call__(self, v: mx.array, adapter) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(v) + apply_lora(adapter, v), 2, axis=-1)
        return self.down_proj(self.act(gate) * up)


class SharedBlock(nn.Module):
    """One of the ``num_mem_blocks`` shared transformer blocks."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(2 * args.hidden_size, eps=args.rms_norm_eps)
        self.self_attn = SharedAttention(args)
        self.pre_ff_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.feed_forward = SharedMLP(args)

    def __call__(self, x: mx.array, emb: mx.array, layer: "HybridLayer", cache=None) -> mx.array:
        u = self.input_layernorm(mx.concatenate([x, emb], axis=-1))
        adapters = (layer.get("q_adapter"), layer.get("k_adapter"), layer.get("v_adapter"))
        a = self.self_attn(u, adapters, cache=cache)
        return self.feed_forward(self.pre_ff_layernorm(a), layer.gate_up_adapter)


def make_mixer(args: ModelArgs) -> Mamba2Mixer:
    inner = args.mamba_expand * args.hidden_size
    return Mamba2Mixer(
        hidden_size=args.hidden_size,
        num_heads=args.n_mamba_heads,
        head_dim=inner // args.n_mamba_heads,
        n_groups=args.mamba_ngroups,
        d_state=args.mamba_d_state,
        d_conv=args.mamba_d_conv,
        chunk_size=args.chunk_size,
        use_conv_bias=True,  # transformers' Zamba2 conv1d always has a bias
        use_bias=args.add_bias_linear,
        norm_eps=1e-5,  # fixed in transformers' Zamba2MambaMixer
        time_step_limit=(args.time_step_min, math.inf),
    )


class MambaLayer(nn.Module):
    kind = "mamba"

    def __init__(self, args: ModelArgs, mixer: Optional[nn.Module] = None):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        # Zamba (v1) passes its multi-head Mamba-1 mixer; Zamba2's is Mamba-2.
        self.mamba = make_mixer(args) if mixer is None else mixer

    def __call__(self, x: mx.array, add: Optional[mx.array] = None, cache=None) -> mx.array:
        u = self.input_layernorm(x + add if add is not None else x)
        return x + self.mamba(u, cache=cache)


class HybridLayer(nn.Module):
    """A Mamba-2 layer that first calls shared block ``block`` with its own
    ``linear``, MLP adapter and (optionally) q/k/v adapters."""

    kind = "hybrid"

    def __init__(self, args: ModelArgs, block: int, mamba_decoder: Optional[MambaLayer] = None):
        super().__init__()
        self.block = block
        h = args.hidden_size
        self.linear = nn.Linear(h, h, bias=False)
        self.mamba_decoder = MambaLayer(args) if mamba_decoder is None else mamba_decoder
        self.add_adapters(args)

    def add_adapters(self, args: ModelArgs) -> None:
        """This layer's per-use LoRA adapters of the shared block (Zamba v1 has none)."""
        h, r = args.hidden_size, args.adapter_rank
        self.gate_up_adapter = lora(h, r, 2 * args.intermediate_size)
        if args.use_shared_attention_adapter:
            w = 2 * h
            self.q_adapter = lora(w, r, args.num_attention_heads * args.attention_head_dim)
            self.k_adapter = lora(w, r, args.num_key_value_heads * args.attention_head_dim)
            self.v_adapter = lora(w, r, args.num_key_value_heads * args.attention_head_dim)

    def __call__(self, x: mx.array, emb: mx.array, shared: SharedBlock, cache=None) -> mx.array:
        ssm_cache, kv_cache = cache if cache is not None else (None, None)
        t = self.linear(shared(x, emb, self, cache=kv_cache))
        return self.mamba_decoder(x, add=t, cache=ssm_cache)


class Zamba2Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = []
        j = 0
        for kind in layer_schedule(args):
            if kind == "hybrid":
                self.layers.append(HybridLayer(args, block_of(args, j)))
                j += 1
            else:
                self.layers.append(MambaLayer(args))
        n_blocks = min(args.num_mem_blocks, j) if args.tie_shared_blocks else j
        self.shared_blocks = [SharedBlock(args) for _ in range(n_blocks)]
        self.final_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(CausalLM):
    """Zamba2 for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``."""

    norm_name = "final_layernorm"
    trunk_class = Zamba2Model  # Zamba (v1): its own trunk, the same frame

    def __init__(self, args: ModelArgs):
        super().__init__(args, self.trunk_class(args))

    def call_layer(self, layer, h: mx.array, cache, x0: mx.array) -> mx.array:
        # A hybrid layer runs its shared block on [h, original embeddings].
        if layer.kind == "hybrid":
            return layer(h, x0, self.model.shared_blocks[layer.block], cache=cache)
        return layer(h, cache=cache)

    def layer_cache(self, layer):
        # A hybrid layer: its Mamba state and the key/value history of its own
        # call of the shared block (the weights are shared, the history is not).
        return (StateCache(), KVCache()) if layer.kind == "hybrid" else StateCache()
