"""GLM-5.3-Flash (Z.ai, 2026; ``glm5_next``), its language model: Kimi Delta
Attention + DSA-indexed NoPE MLA, manifold-constrained hyper-connections, MoE.

The reference implementation is transformers' ``Glm5NextForConditionalGeneration``
(a multimodal wrapper; its logits for token ids alone are the language model's,
``Glm5NextTextModel`` + ``lm_head``). The converter keeps the language model
and drops the vision tower. The modular file derives it from GLM-5's DSA
attention (``GlmMoeDsa``), DeepSeek-V3's MoE, DeepSeek-V4's hyper-connections
and Kimi-Linear's KDA.

Architecture
============
``hc_mult`` residual streams (:mod:`.hyper_connections`, mHC): the embedding
is copied into each; every layer is, per sub-block, ``x = Σ_s pre_s H_s``
(weights from the streams), a pre-norm sub-block, and ``H'_i = post_i f(x) +
Σ_j comb_{j,i} H_j`` with ``comb`` Sinkhorn-normalised::

    x, post, comb = attn_hc(H);  H = merge(post · mixer(input_layernorm(x)), comb, H)
    x, post, comb = ffn_hc(H);   H = merge(post · mlp(post_attention_layernorm(x)), comb, H)

After the last layer the streams are averaged (``hc_head``: an unweighted
mean), RMS-normalised and fed to the head (tied to the embedding when the
wrapper's ``tie_word_embeddings`` says so). A block's output
is the ``[B, T, hc_mult·hidden]`` streams (transformers' decoder layer returns
``[B, T, hc_mult, hidden]``; verify flattens it).

Layer schedule
--------------
``layer_types``: ``linear_attention`` (KDA) or ``indexed_attention`` (MLA with
DSA; ``full_attention`` in older configs; default: every 4th layer).
``mlp_layer_types``: ``dense`` / ``sparse`` (default: the first three dense).
``indexer_types``: per layer ``full`` (the layer runs its indexer) or
``shared`` (it reuses the selection of the layer just before it, which must be
an indexed ``full`` layer; default all ``full``; older configs give
``index_topk_pattern`` ``"FSS…"`` or ``index_topk_freq`` /
``index_skip_topk_offset``).

Kimi Delta Attention
--------------------
Kimi-Linear's computation (:class:`~.kimi_linear.DeltaAttention`, explained in
:mod:`.kimi_linear`; Kimi Team 2025, arXiv:2510.26692): ``q, k, v`` through
their own short causal convs (``q_conv1d`` …) and SiLU, q/k L2-normalised, the
per-channel gated delta rule (:mod:`.gated_delta`) with ``β = σ(b_proj(x))``,
``o_proj(RMSNorm_D(o) · w · σ(g_b(g_a(x))))``. The forget gate is Kimi's
low-rank one with Ling-3's *safe* bound when ``linear_lower_bound`` is set::

    g = f_b(f_a(x)) + dt_bias;   log α = lower_bound · σ(exp(A_log) · g)   ∈ (lower_bound, 0)

else ``−exp(A_log)·softplus(g)``.

DSA-indexed MLA without RoPE
----------------------------
Kimi-Linear's MLA (:class:`~.kimi_linear.MLAttention`: ``q = q_b(q_a_layernorm(q_a(x)))``,
one latent ``c`` per token, ``kv_b_proj`` expanding it into per-head keys and
values, the cache holding the latents, absorbed decode) with
``qk_rope_head_dim = 0`` (no position encoding: the KDA layers carry
position), latent norms at ``rms_norm_eps``, and the causal mask replaced by
the DSA selection (:class:`~.indexed_attention.DSAIndexer`: pools of
``index_kpool`` tokens with learned softmax-weighted keys, scored by
``index_n_heads`` heads weighted per query; the best ``index_topk /
index_kpool`` complete pools, plus the query's incomplete pool when
``index_kpool_always_select_tail``), torch.topk's tie-breaking reproduced.
Without the tail the first ``index_kpool − 1`` queries select nothing; torch's
SDPA then outputs 0 for them (its safe softmax), and so does this model.

Mixture of experts (DeepSeek-V3's router)
-----------------------------------------
Sigmoid scores in float32, experts chosen by ``score + e_score_correction_bias``
within the ``topk_group`` best of ``n_group`` groups, weighted by the unbiased
scores renormalised (``+1e-20``) when ``norm_topk_prob``, times
``routed_scaling_factor``; ``n_routed_experts`` SwiGLU experts of
``moe_intermediate_size`` and ``n_shared_experts`` shared ones; dense layers a
SwiGLU of ``intermediate_size``. Every SwiGLU here is clamped (``swiglu_limit``):
``down(silu(min(gate, L)) · clip(up, −L, L))``.

The selection a ``shared`` layer reuses
---------------------------------------
It is state passed between two blocks outside the streams. A block stays a
function of its inputs: an indexed layer's ``__call__(h, cache, selection)``
returns ``(h, selection)`` — the ``[B, T, n_pools]`` pools it attended to —
and a ``shared`` layer takes the selection its predecessor made *for the same
queries*. :meth:`Model.call_layer` (what the model's forward, verify and a
block-by-block runner call) keeps, on the model, the selections a ``full``
layer followed by a ``shared`` one made, keyed by (layer, first query
position, query count, batch), and hands the ``shared`` layer the one for its
own queries (its cache's offset), removing it. So a block-by-block run (a
layer over a prefix, then token by token, then the next layer over the same)
finds them as a whole-model forward does; a ``shared`` layer run before its
predecessor fails naming it. Entries not taken are dropped when the same layer
starts again at an earlier or equal position (a new sequence): what is kept is
at most the selections of one sequence's pending calls.

Cache
-----
KDA layer: :class:`~.common.StateCache` ``[conv state [B, K−1, 3·H·D],
recurrent state [B, H, D, D] float32]``; indexed layer: a
:class:`~.common.KVCache` of the latents ``[B, 1, T, kv_lora_rank]`` (and the
empty rotary key), and for a ``full`` one the indexer's StateCache ``[pool
keys [B, ⌊T/c⌋, index_head_dim], keys and gates of the incomplete pool
[B, < c, 2·index_head_dim]]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .common import MLP, BaseModelArgs, CausalLM, KVCache, StateCache
from .hyper_connections import ManifoldHyperConnection
from .indexed_attention import DSAIndexer, selection_mask
from .kimi_linear import DeltaAttention, MLAttention
from .moe import MoEBlock


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "glm5_next"
    vocab_size: int = 154880
    hidden_size: int = 4096
    intermediate_size: int = 12288
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 45
    num_attention_heads: int = 64
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    kv_lora_rank: int = 512
    q_lora_rank: Optional[int] = 1536
    qk_nope_head_dim: int = 256
    qk_rope_head_dim: int = 0
    v_head_dim: int = 256
    n_routed_experts: int = 288
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    swiglu_limit: Optional[float] = 10.0
    linear_num_heads: int = 64
    linear_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    linear_lower_bound: Optional[float] = -5.0
    hc_mult: int = 4
    hc_eps: float = 1e-6
    hc_sinkhorn_iters: int = 20
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 32
    index_kpool: int = 16
    index_kpool_always_select_tail: bool = True
    layer_types: list[str] = field(default_factory=list)
    mlp_layer_types: list[str] = field(default_factory=list)
    indexer_types: list[str] = field(default_factory=list)
    tie_word_embeddings: bool = False


def layer_schedule(args: ModelArgs) -> list[str]:
    """``"kda"`` or ``"indexed_attention"`` (DSA MLA) for every layer (the converter writes ``layer_types``)."""
    return ["kda" if t == "linear_attention" else "indexed_attention" for t in args.layer_types]


def layer_windows(args: ModelArgs) -> list[Optional[int]]:
    """No window: an indexed layer can select any past pool."""
    return [None] * args.num_hidden_layers


def block_width(args: ModelArgs) -> int:
    """A block's output is the hyper-connection streams: ``hc_mult · hidden_size`` wide."""
    return args.hc_mult * args.hidden_size


def shared_layers(args: ModelArgs) -> list[bool]:
    """Whether each layer is an indexed layer reusing its predecessor's selection."""
    kinds = layer_schedule(args)
    return [k == "indexed_attention" and args.indexer_types[i] == "shared" for i, k in enumerate(kinds)]


class ClampedMLP(MLP):
    """SwiGLU with GLM-5.3-Flash's clamps: ``down(silu(min(gate, L)) · clip(up, −L, L))``."""

    def __init__(self, hidden: int, intermediate: int, limit: Optional[float]):
        super().__init__(hidden, intermediate)
        self.limit = limit

    def __call__(self, x: mx.array) -> mx.array:
        g, u = self.gate_proj(x), self.up_proj(x)
        if self.limit is not None:
            g, u = mx.minimum(g, self.limit), mx.clip(u, -self.limit, self.limit)
        return self.down_proj(nn.silu(g) * u)


class GlmDeltaAttention(DeltaAttention):
    """GLM-5.3-Flash's KDA: Kimi's low-rank forget and output gates, the safe
    bound (module docstring); the checkpoint's names (``q_conv1d`` …, ``f_a_proj``,
    ``f_b_proj``, ``A_log [H]``, ``dt_bias [H·D]``, ``g_a_proj``, ``g_b_proj``)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads = H = args.linear_num_heads
        self.head_dim = D = args.linear_head_dim
        hidden, proj, K = args.hidden_size, H * D, args.linear_conv_kernel_dim
        self.lower_bound = args.linear_lower_bound
        self.q_proj = nn.Linear(hidden, proj, bias=False)
        self.k_proj = nn.Linear(hidden, proj, bias=False)
        self.v_proj = nn.Linear(hidden, proj, bias=False)
        self.q_conv1d = nn.Conv1d(proj, proj, K, groups=proj, bias=False)
        self.k_conv1d = nn.Conv1d(proj, proj, K, groups=proj, bias=False)
        self.v_conv1d = nn.Conv1d(proj, proj, K, groups=proj, bias=False)
        self.f_a_proj = nn.Linear(hidden, D, bias=False)
        self.f_b_proj = nn.Linear(D, proj, bias=False)
        self.A_log = mx.zeros((H,))
        self.dt_bias = mx.zeros((proj,))
        self.b_proj = nn.Linear(hidden, H, bias=False)
        self.g_a_proj = nn.Linear(hidden, D, bias=False)
        self.g_b_proj = nn.Linear(D, proj, bias=False)
        self.o_norm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.o_proj = nn.Linear(proj, hidden, bias=False)

    def conv_weights(self) -> list[mx.array]:
        return [self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight]

    def forget_gate(self, x: mx.array) -> mx.array:
        b, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        g = (self.f_b_proj(self.f_a_proj(x)).astype(mx.float32) + self.dt_bias.astype(mx.float32)).reshape(b, T, H, D)
        rate = mx.exp(self.A_log.astype(mx.float32)).reshape(H, 1)
        if self.lower_bound is not None:
            return self.lower_bound * mx.sigmoid(rate * g)
        return -rate * nn.softplus(g)

    def output_gate(self, x: mx.array) -> mx.array:
        return self.g_b_proj(self.g_a_proj(x))

    def out_proj(self, o: mx.array) -> mx.array:
        return self.o_proj(o)


class IndexedMLA(MLAttention):
    """MLA (NoPE) over the DSA selection. ``__call__(x, cache, selection) -> (y,
    selection)``: a ``full`` layer (with ``indexer``) selects; a ``shared`` one
    uses ``selection``. Cache: ``(KVCache, StateCache)`` for a ``full`` layer,
    a ``KVCache`` for a ``shared`` one."""

    def __init__(self, args: ModelArgs, shared: bool):
        super().__init__(args, latent_eps=args.rms_norm_eps)
        self.kpool, self.tail = args.index_kpool, args.index_kpool_always_select_tail
        if not shared:
            self.indexer = DSAIndexer(args.hidden_size, args.q_lora_rank, args.index_n_heads, args.index_head_dim,
                                      args.index_topk, args.index_kpool)

    def __call__(self, x: mx.array, cache=None, selection: Optional[mx.array] = None):
        shared = "indexer" not in self
        kv, state = (cache, None) if shared or cache is None else cache
        if shared and selection is None:
            raise ValueError("a shared DSA layer needs the selection of the indexed layer before it (selection=...)")
        made = {}

        def select(x, q_latent, offset, n_keys):
            sel = selection if shared else self.indexer(x, q_latent, offset, state)
            made["selection"] = sel
            made["mask"] = mask = selection_mask(sel, offset, x.shape[1], n_keys, self.kpool, self.tail)
            return mask

        y = super().__call__(x, kv, select=select)
        if not self.tail:
            # Without the tail a query may select nothing (the first index_kpool - 1 ones):
            # torch's SDPA then gives an attention output of 0 (its safe softmax), so o_proj's bias.
            empty = ~made["mask"].any(axis=-1)[:, 0, :, None]  # [B, T, 1]
            o = self.o_proj
            y = mx.where(empty, o["bias"].astype(y.dtype) if "bias" in o else mx.zeros((), y.dtype), y)
        return y, made["selection"]


def sparse_moe(args: ModelArgs) -> MoEBlock:
    """DeepSeek-V3 routing, clamped SwiGLU experts, transformers' names:
    ``gate`` (with ``gate.e_score_correction_bias``), ``switch_mlp``, ``shared_experts``."""
    return MoEBlock(
        args.hidden_size, args.moe_intermediate_size, args.n_routed_experts, args.num_experts_per_tok,
        routing=dict(score="sigmoid", norm_topk=args.norm_topk_prob, norm_eps=1e-20,
                     routed_scaling=args.routed_scaling_factor, n_group=args.n_group, topk_group=args.topk_group),
        correction_bias="e_score_correction_bias", correction_bias_in_router=True,
        shared=ClampedMLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts, args.swiglu_limit),
        shared_name="shared_experts", swiglu_limit=args.swiglu_limit,
    )


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, index: int, kind: str, mlp_kind: str, shared: bool, feeds_next: bool):
        super().__init__()
        self.kind, self.index, self.shared, self.feeds_next = kind, index, shared, feeds_next
        self.self_attn = GlmDeltaAttention(args) if kind == "kda" else IndexedMLA(args, shared)
        self.mlp = sparse_moe(args) if mlp_kind == "sparse" else ClampedMLP(
            args.hidden_size, args.intermediate_size, args.swiglu_limit)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        hc = (args.hidden_size, args.hc_mult, args.hc_eps, args.rms_norm_eps, args.hc_sinkhorn_iters)
        self.attn_hc = ManifoldHyperConnection(*hc)
        self.ffn_hc = ManifoldHyperConnection(*hc)

    def __call__(self, h: mx.array, cache=None, selection: Optional[mx.array] = None):
        """``h``: the streams ``[B, T, hc_mult·hidden]``. Returns the new streams, and for
        an indexed layer ``(streams, its selection)``."""
        x, post, comb = self.attn_hc(h)
        x = self.input_layernorm(x)
        if self.kind == "kda":
            y, sel = self.self_attn(x, cache=cache), None
        else:
            y, sel = self.self_attn(x, cache=cache, selection=selection)
        h = self.attn_hc.merge(h, y, post, comb)
        x, post, comb = self.ffn_hc(h)
        h = self.ffn_hc.merge(h, self.mlp(self.post_attention_layernorm(x)), post, comb)
        return h if self.kind == "kda" else (h, sel)


class _Selections:
    """Selections made by ``full`` layers for the ``shared`` layer after them,
    keyed by (layer, first query position, query count, batch); a plain object
    (MLX modules would file arrays as parameters)."""

    def __init__(self):
        self.kept: dict = {}

    def put(self, layer: int, offset: int, T: int, B: int, sel: mx.array) -> None:
        for key in [k for k in self.kept if k[0] == layer and k[1] >= offset]:
            del self.kept[key]  # a new sequence (or a repeated call) supersedes them
        self.kept[(layer, offset, T, B)] = sel

    def take(self, layer: int, offset: int, T: int, B: int) -> mx.array:
        sel = self.kept.pop((layer, offset, T, B), None)
        if sel is None:
            raise ValueError(
                f"layer {layer + 1} reuses the DSA selection of layer {layer} (indexer_types 'shared'): run layer "
                f"{layer} on the same {T} token(s) at position {offset} first")
        return sel


class Model(CausalLM):
    """GLM-5.3-Flash's language model for causal LM. ``model(ids[B, T], cache=None) ->
    logits[B, T, V]``; block outputs are the ``[B, T, hc_mult·hidden]`` streams."""

    def __init__(self, args: ModelArgs):
        kinds, mlps, shared = layer_schedule(args), args.mlp_layer_types, shared_layers(args)
        n = args.num_hidden_layers
        super().__init__(
            args,
            layers=[DecoderLayer(args, i, kinds[i], mlps[i], shared[i], i + 1 < n and shared[i + 1])
                    for i in range(n)],
            norm=nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps),
        )
        object.__setattr__(self, "_selections", _Selections())

    def scale_embeddings(self, h: mx.array) -> mx.array:
        return mx.concatenate([h] * self.args.hc_mult, axis=-1)  # every stream starts as the embedding

    def final_norm(self, h: mx.array, dtype=None) -> mx.array:
        n, d = self.args.hc_mult, self.args.hidden_size
        return self.trunk.norm(h.reshape(*h.shape[:-1], n, d).mean(axis=-2))

    def layer_cache(self, layer):
        if layer.kind == "kda":
            return StateCache()
        return KVCache() if layer.shared else (KVCache(), StateCache())

    def call_layer(self, layer, h: mx.array, cache, x0: mx.array) -> mx.array:
        if layer.kind == "kda":
            return layer(h, cache=cache)
        kv = cache if layer.shared or cache is None else cache[0]
        key = (h.shape[1], h.shape[0])
        offset = kv.offset if kv is not None else 0
        given = self._selections.take(layer.index - 1, offset, *key) if layer.shared else None
        h, sel = layer(h, cache=cache, selection=given)
        if layer.feeds_next:
            self._selections.put(layer.index, offset, *key, sel)
        return h
