"""Qwen3-Next (Qwen team, 2025): gated DeltaNet layers interleaved with gated attention, MoE.

Also the implementation behind Qwen3.5 (dense and MoE, :mod:`.qwen3_5`,
:mod:`.qwen3_5_moe`), which differ only in how the DeltaNet projections are
stored and in the MLP (see "Projection layouts" and "Feed-forward").

Architecture
============
A decoder-only stack; every layer is pre-norm::

    h = x + mixer(input_layernorm(x))
    y = h + mlp(post_attention_layernorm(h))

then a final norm and the LM head (untied by default). ``mixer`` is a gated
DeltaNet ("linear attention") or gated full attention.

Layer schedule
--------------
``layer_types[i]`` is ``"linear_attention"`` or ``"full_attention"``. The
published configs instead give ``full_attention_interval = n``: layer ``i`` is
full attention when ``(i + 1) % n == 0`` (3 DeltaNet layers, then attention,
for ``n = 4``). mlx-lm reads only the interval, so a ``layer_types`` that is
not of this periodic form is computed wrongly by mlx-lm (measured in
tests/test_arch_qwen3_next.py); here the list is the schedule.

Zero-centred norms
------------------
The checkpoints store every RMSNorm outside the DeltaNet (the two per layer,
the final norm, the per-head q/k norms of attention) as ``w`` with scale
``1 + w`` (initialised at zero, so weight decay pulls the scale toward 1, not
0). The converter folds the offset (``converters.rules.AddOffset``) so these
are plain ``nn.RMSNorm`` scales here, mlx-lm's layout; the DeltaNet's gated
output norm stores its scale directly and is not folded.

Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025, "Gated Delta Networks",
arXiv:2412.06464)
--------------------------------------------------------------------------
With ``Hk = linear_num_key_heads`` heads of ``Dk`` for q/k and ``Hv =
linear_num_value_heads`` heads of ``Dv`` for v (``Hv`` a multiple of ``Hk``;
each q/k head serves ``Hv / Hk`` consecutive value heads):

1. projections give ``q, k`` (``Hk·Dk`` each), ``v`` and the output gate ``z``
   (``Hv·Dv`` each), and per value head ``b`` and ``a``;
2. ``[q | k | v]`` goes through a causal depthwise conv1d of width
   ``linear_conv_kernel_dim`` (no bias) and SiLU; its state is the last
   ``K − 1`` inputs;
3. ``q`` and ``k`` are L2-normalised per head (``x·rsqrt(Σx² + 1e-6)``);
4. write strength ``β = σ(b)``; log-decay ``g = −exp(A_log)·softplus(a + dt_bias)``
   (float32: ``A_log`` and ``dt_bias`` are kept float32 by the converter);
5. the gated delta rule (:mod:`.gated_delta`, which carries the math): per value
   head a ``Dk×Dv`` memory ``S_t = exp(g_t)(I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``,
   output ``o_t = S_tᵀ q_t / √Dk``. Prefill runs the chunked WY/UT form (chunks
   of 64, loop over chunks only), decode the one-step recurrence;
6. ``out_proj(RMSNorm(o) · weight · silu(z))`` per value head (eps ``rms_norm_eps``).

Projection layouts
------------------
* Qwen3-Next: fused ``in_proj_qkvz`` and ``in_proj_ba``, laid out *per key
  head*: for each of the ``Hk`` groups ``[q (Dk) | k (Dk) | v (r·Dv) | z (r·Dv)]``
  and ``[b (r) | a (r)]`` with ``r = Hv / Hk`` — a reshape to ``[Hk, ·]`` and
  split, not a split of the flat vector.
* Qwen3.5: separate ``in_proj_qkv`` (flat ``[q | k | v]``), ``in_proj_z``,
  ``in_proj_b``, ``in_proj_a``.

Gated attention (Qiu et al. 2025, "Gated Attention for Large Language Models",
arXiv:2505.06708)
------------------------------------------------------------------------------
``q_proj`` gives ``2·head_dim`` per query head, laid out per head as
``[query | gate]``; per-head RMSNorm on q and k (zero-centred, folded);
rotary embeddings on the first ``partial_rotary_factor · head_dim`` channels
only (the rest pass unrotated; ``rope_theta``); grouped-query SDPA; the output
is multiplied by ``σ(gate)`` before ``o_proj``. (Qwen3.5 declares
multimodal rotary sections; with text positions all sections carry the same
position, which is plain RoPE.)

Feed-forward
------------
Layer ``i`` is MoE when ``num_experts > 0``, ``i ∉ mlp_only_layers`` and
``(i + 1) % decoder_sparse_step == 0``; otherwise a SwiGLU MLP of
``intermediate_size``. The MoE (:mod:`.moe`): softmax router over
``num_experts``, top ``num_experts_per_tok``, weights renormalised over the
chosen when ``norm_topk_prob``; SwiGLU experts of ``moe_intermediate_size``;
plus a shared SwiGLU expert of ``shared_expert_intermediate_size`` scaled by
``σ(shared_expert_gate(x))``.

Cache
-----
A DeltaNet layer keeps :class:`~.common.StateCache` ``[conv state
[B, K−1, 2·Hk·Dk + Hv·Dv], recurrent state [B, Hv, Dk, Dv] float32]``; an
attention layer a full :class:`~.common.KVCache`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .common import MLP, BaseModelArgs, CausalLM, StateCache, attend, causal_depthwise_conv
from .gated_delta import RMSNormGated, gated_delta, gdn_decay, l2norm
from .moe import MoEBlock

CHUNK_SIZE = 64  # delta-rule chunk length (transformers' and FLA's default)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "qwen3_next"
    hidden_size: int = 2048
    num_hidden_layers: int = 48
    intermediate_size: int = 5120
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    linear_num_value_heads: int = 32
    linear_num_key_heads: int = 16
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    num_experts: int = 0
    num_experts_per_tok: int = 1
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    mlp_only_layers: list[int] = field(default_factory=list)
    layer_types: list[str] = field(default_factory=list)
    full_attention_interval: int = 4
    rms_norm_eps: float = 1e-6
    vocab_size: int = 151936
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"

    @property
    def split_projections(self) -> bool:
        """Qwen3.5's separate in_proj_qkv/z/b/a (else Qwen3-Next's fused qkvz/ba)."""
        return self.model_type.startswith("qwen3_5")


def layer_schedule(args: ModelArgs) -> list[str]:
    """``"delta"`` (gated DeltaNet) or ``"attention"`` for every layer."""
    types = args.layer_types or [
        "full_attention" if (i + 1) % args.full_attention_interval == 0 else "linear_attention"
        for i in range(args.num_hidden_layers)
    ]
    return ["attention" if t == "full_attention" else "delta" for t in types]


def layer_windows(args: ModelArgs) -> list[Optional[int]]:
    """No sliding windows: attention layers see the whole history."""
    return [None] * args.num_hidden_layers


def moe_layers(args: ModelArgs) -> list[bool]:
    """Whether layer ``i``'s feed-forward is the MoE block (see module docstring)."""
    skip = set(args.mlp_only_layers or [])
    return [
        args.num_experts > 0 and i not in skip and (i + 1) % args.decoder_sparse_step == 0
        for i in range(args.num_hidden_layers)
    ]


class GatedDeltaNet(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.nk, self.nv = args.linear_num_key_heads, args.linear_num_value_heads
        self.dk, self.dv = args.linear_key_head_dim, args.linear_value_head_dim
        if self.nv % self.nk:
            raise ValueError(f"linear_num_value_heads ({self.nv}) is not a multiple of linear_num_key_heads ({self.nk})")
        self.key_dim, self.value_dim = self.nk * self.dk, self.nv * self.dv
        self.split = args.split_projections
        h = args.hidden_size
        conv_dim = 2 * self.key_dim + self.value_dim
        if self.split:
            self.in_proj_qkv = nn.Linear(h, conv_dim, bias=False)
            self.in_proj_z = nn.Linear(h, self.value_dim, bias=False)
            self.in_proj_b = nn.Linear(h, self.nv, bias=False)
            self.in_proj_a = nn.Linear(h, self.nv, bias=False)
        else:
            self.in_proj_qkvz = nn.Linear(h, 2 * self.key_dim + 2 * self.value_dim, bias=False)
            self.in_proj_ba = nn.Linear(h, 2 * self.nv, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, args.linear_conv_kernel_dim, groups=conv_dim, bias=False)
        self.dt_bias = mx.ones((self.nv,))
        self.A_log = mx.zeros((self.nv,))
        self.norm = RMSNormGated(self.dv, args.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, h, bias=False)

    def _project(self, x: mx.array):
        """``[q | k | v]`` (flat, conv input), ``z [B, T, Hv, Dv]``, ``b``, ``a`` ``[B, T, Hv]``."""
        B, T, _ = x.shape
        if self.split:
            z = self.in_proj_z(x).reshape(B, T, self.nv, self.dv)
            return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)
        r = self.nv // self.nk
        qkvz = self.in_proj_qkvz(x).reshape(B, T, self.nk, -1)  # per key head: [q | k | v | z]
        q, k, v, z = mx.split(qkvz, [self.dk, 2 * self.dk, 2 * self.dk + r * self.dv], axis=-1)
        ba = self.in_proj_ba(x).reshape(B, T, self.nk, 2 * r)  # per key head: [b | a]
        b, a = ba[..., :r].reshape(B, T, self.nv), ba[..., r:].reshape(B, T, self.nv)
        qkv = mx.concatenate([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], axis=-1)
        return qkv, z.reshape(B, T, self.nv, self.dv), b, a

    def __call__(self, x: mx.array, cache: Optional[StateCache] = None) -> mx.array:
        B, T, _ = x.shape
        qkv, z, b, a = self._project(x)
        qkv, conv_state = causal_depthwise_conv(qkv, self.conv1d.weight, None, cache[0] if cache else None)
        qkv = nn.silu(qkv)
        q, k, v = mx.split(qkv, [self.key_dim, 2 * self.key_dim], axis=-1)
        q = l2norm(q.reshape(B, T, self.nk, self.dk))
        k = l2norm(k.reshape(B, T, self.nk, self.dk))
        v = v.reshape(B, T, self.nv, self.dv)
        o, state = gated_delta(
            q, k, v, gdn_decay(a, self.A_log, self.dt_bias), mx.sigmoid(b.astype(mx.float32)),
            cache[1] if cache else None, CHUNK_SIZE,
        )
        if cache is not None:
            cache[0], cache[1] = conv_state, state
        o = self.norm(o.astype(x.dtype), z)
        return self.out_proj(o.reshape(B, T, -1))


class GatedAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d = args.head_dim
        self.n_q, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, d
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, 2 * self.n_q * d, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv * d, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv * d, bias=bias)
        self.o_proj = nn.Linear(self.n_q * d, args.hidden_size, bias=bias)
        self.q_norm = nn.RMSNorm(d, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(d, eps=args.rms_norm_eps)
        self.rope = nn.RoPE(int(d * args.partial_rotary_factor), traditional=False, base=args.rope_theta)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        B, T, _ = x.shape
        d = self.head_dim
        qg = self.q_proj(x).reshape(B, T, self.n_q, 2 * d)  # per head: [query | gate]
        q, gate = qg[..., :d], qg[..., d:]
        q = self.q_norm(q).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, T, self.n_kv, d)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.n_kv, d).transpose(0, 2, 1, 3)
        out = attend(q, k, v, self.rope, cache, None, d**-0.5)
        return self.o_proj(out * mx.sigmoid(gate.reshape(B, T, -1)))


def sparse_moe(args: ModelArgs) -> MoEBlock:
    """Softmax top-k experts + a sigmoid-gated shared expert (mlx-lm's names:
    ``gate``, ``switch_mlp``, ``shared_expert``, ``shared_expert_gate``)."""
    shared = MLP(args.hidden_size, args.shared_expert_intermediate_size) if args.shared_expert_intermediate_size else None
    return MoEBlock(
        args.hidden_size, args.moe_intermediate_size, args.num_experts, args.num_experts_per_tok,
        routing={"score": "softmax", "norm_topk": args.norm_topk_prob},
        shared=shared, shared_gate="shared_expert_gate" if shared is not None else None,
    )


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, kind: str, moe: bool):
        super().__init__()
        self.kind = kind
        self.is_delta = kind == "delta"
        if self.is_delta:
            self.linear_attn = GatedDeltaNet(args)
        else:
            self.self_attn = GatedAttention(args)
        self.mlp = sparse_moe(args) if moe else MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        mixer = self.linear_attn if self.is_delta else self.self_attn
        h = x + mixer(self.input_layernorm(x), cache=cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Model(CausalLM):
    """Qwen3-Next / Qwen3.5 for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``."""

    def __init__(self, args: ModelArgs):
        super().__init__(
            args,
            layers=[DecoderLayer(args, kind, moe) for kind, moe in zip(layer_schedule(args), moe_layers(args))],
            norm=nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps),
        )
