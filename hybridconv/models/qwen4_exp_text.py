"""Qwen4-Exp (Qwen team, 2026; ``qwen4_exp_text``): gated DeltaNet + QSA-indexed attention,
hyper-connection streams, hashed n-gram per-layer embeddings, MoE + shared expert.

The reference implementation is transformers' ``Qwen4ExpForCausalLM`` (its
modular file derives it from Qwen3.5-MoE). What it shares with Qwen3.5-MoE is
computed by the same code (:mod:`.qwen3_next`): the gated DeltaNet (Yang,
Kautz & Hatamizadeh 2025, "Gated Delta Networks", arXiv:2412.06464; separate
``in_proj_qkv/z/b/a``, the chunked delta rule of :mod:`.gated_delta`), the
gated attention (Qiu et al. 2025, arXiv:2505.06708: ``q_proj`` gives
``[query | gate]`` per head, per-head q/k RMSNorm, partial RoPE over the first
``partial_rotary_factor · head_dim`` channels — the declared multimodal
sections carry one position for text), and the MoE (softmax router, top
``num_experts_per_tok`` renormalised when ``norm_topk_prob``, SwiGLU experts,
a shared SwiGLU expert scaled by ``σ(shared_expert_gate(x))``). What is new:

Hyper-connection streams (:mod:`.hyper_connections`, :class:`~.hyper_connections.GatedResidual`)
    The residual is ``n = hc_count`` streams of ``hidden_size``: the embedding
    is copied into each (``[B, T, n·d]``, stream-major), and every mixer and
    every MoE reads ``x = mean_s(a_s ⊙ RMSNorm(H)_s)`` and writes ``H + w ⊗
    f(x)``. There are no other norms: no input/post-attention layernorm, no
    final norm — after the last layer ``hyper_connection_mixer`` (the same
    module without the write-back) reduces the streams to the head's input.
    A block's output is the ``[B, T, n·d]`` streams, as transformers' decoder
    layer returns them.

Indexed attention (QSA; :mod:`.indexed_attention`)
    Every ``indexed_attention`` layer (``full_attention`` in the released
    configs) is the gated attention restricted, per query, to the tokens of
    the ``indexer_budget / indexer_compress_ratio`` best complete blocks of
    ``indexer_compress_ratio`` tokens, plus its own incomplete block; the
    blocks are scored by :class:`~.indexed_attention.QSAIndexer` (mean-pooled,
    normalised, rotated block keys against ``indexer_n_heads`` normalised,
    rotated query heads, ``Σ_h relu(q·K)/√d``), torch.topk's tie-breaking
    reproduced.

Per-layer embedding of hashed n-grams (PLE), on the 1-based ``ple_layer_ids``
    For each token, the ``2 … ngram_size``-grams ending at it (within its
    segment: an ``eos_token_id`` ends a segment, positions before a segment's
    start read ``eos``) are hashed, ``heads_per_ngram`` times each, into
    prime-sized tables::

        m_g = ⊕_{j<g} token_{t−j} · M_j        (int64 products, XOR; M_j odd, from splitmix64 of the seed)
        id_{g,h} = m_g mod p_{g,h} + offset_{g,h}   (p: successive primes above ngram_vocab_size_base)

    The ``(ngram_size − 1)·heads_per_ngram`` looked-up rows of
    ``ngram_embedding`` (one table per layer; the checkpoint stores it in
    ``split_ngram_parts`` row shards, which the converter concatenates) form
    ``e``. Then, per stream ``s``::

        g_s = RMSNorm(key_proj(e))_s · RMSNorm(H)_s / √d,   g_s ← sign(g_s)·√max(|g_s|, 1e-6)
        u_s = σ(g_s) · value_proj(e)
        H ← H + u + silu(DilatedConv(RMSNorm(u)))   (depthwise, kernel ple_conv_kernel_size, dilation ngram_size)

    The multipliers ``M`` (:func:`layer_multipliers`), table sizes
    (:func:`head_vocab_sizes`) and offsets are computed from the config by
    transformers' rule, as its ``_init_weights`` does; the checkpoint's copies
    (int64 buffers) are dropped by the converter, and the tests check the two
    agree.

All RMSNorms outside the DeltaNet store a zero-centred scale ``1 + w``; the
converter folds it (``norm_offset_folded``), so they are plain scales here.

Token ids inside a block
    PLE needs the token ids, which a block's inputs (its streams ``h``, the
    embedding output ``x0``, its cache) do not carry. :meth:`Model.embed` keeps
    the ids it embedded (and its output); :meth:`Model.call_layer` hands a PLE
    layer the ids of its ``x0`` — those of the same call, or, when ``x0`` is a
    slice of that output (verify runs a block on a prefix, then token by
    token), the ids of the window whose embedding equals ``x0`` exactly.

Cache
-----
DeltaNet layer: :class:`~.common.StateCache` ``[conv state, recurrent state
[B, Hv, Dk, Dv] float32]``; with PLE a second StateCache ``[the last
ngram_size − 1 token ids [B, n−1] int64, the dilated conv's input
[B, (K−1)·ngram_size, n·d]]``. Indexed attention layer: a
:class:`~.common.KVCache` (every past token can be selected) and the
indexer's StateCache ``[block keys [B, ⌊T/c⌋, d], raw keys of the incomplete
block [B, < c, d]]``. Everything but the key/value history is bounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import qwen3_next
from .common import CausalLM, KVCache, StateCache
from .gated_delta import RMSNormGated
from .hyper_connections import GatedResidual, GroupRMSNorm
from .indexed_attention import QSAIndexer, selection_mask


@dataclass
class ModelArgs(qwen3_next.ModelArgs):
    model_type: str = "qwen4_exp_text"
    rope_theta: float = 10_000_000.0
    hc_count: int = 4
    hc_lowrank: int = 320
    ple_layer_ids: list[int] = field(default_factory=list)
    ple_embed_dim: int = 0
    ple_conv_kernel_size: int = 4
    ngram_size: int = 3
    heads_per_ngram: int = 8
    ngram_vocab_size_base: int = 20_000_000
    make_ngram_vocab_size_divisible_by: int = 128
    seed: int = 1234
    indexer_n_heads: int = 8
    indexer_head_dim: int = 128
    indexer_budget: int = 2048
    indexer_compress_ratio: int = 4
    output_gate_type: Optional[str] = None
    eos_token_id: int = 0

    @property
    def split_projections(self) -> bool:
        return True  # Qwen3.5's separate in_proj_qkv / z / b / a


def layer_schedule(args: ModelArgs) -> list[str]:
    """``"delta"`` (gated DeltaNet) or ``"indexed_attention"`` (QSA) for every layer."""
    return ["delta" if t == "linear_attention" else "indexed_attention" for t in args.layer_types]


def layer_windows(args: ModelArgs) -> list[Optional[int]]:
    """No window: an indexed layer can select any past block."""
    return [None] * args.num_hidden_layers


def block_width(args: ModelArgs) -> int:
    """A block's output is the hyper-connection streams: ``hc_count · hidden_size`` wide."""
    return args.hc_count * args.hidden_size


# --- the n-gram tables (transformers' rule) ----------------------------------------------------

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


def _is_prime(v: int) -> bool:
    if v < 2:
        return False
    if v % 2 == 0:
        return v == 2
    return all(v % d for d in range(3, math.isqrt(v) + 1, 2))


@lru_cache(maxsize=None)
def _primes_from(base: int, count: int) -> tuple[int, ...]:
    """The first ``count`` primes ``>= base``."""
    primes, p = [], base - 1
    while len(primes) < count:
        p += 1
        while not _is_prime(p):
            p += 1
        primes.append(p)
    return tuple(primes)


def head_vocab_sizes(args: ModelArgs, ple_index: int) -> list[int]:
    """The prime table sizes of the ``ple_index``-th PLE layer's n-gram heads:
    global head ``g`` (layer-major) takes the ``(g+1)``-th prime ``>= ngram_vocab_size_base``."""
    heads = (args.ngram_size - 1) * args.heads_per_ngram
    primes = _primes_from(args.ngram_vocab_size_base, (ple_index + 1) * heads)
    return list(primes[ple_index * heads :])


def ngram_table_rows(args: ModelArgs, ple_index: int) -> int:
    """Rows of that layer's ``ngram_embedding``: the sum of its heads' sizes,
    rounded up to ``make_ngram_vocab_size_divisible_by``."""
    div = args.make_ngram_vocab_size_divisible_by
    return math.ceil(sum(head_vocab_sizes(args, ple_index)) / div) * div


def layer_multipliers(args: ModelArgs, ple_index: int) -> list[int]:
    """transformers' odd hash multipliers of the ``ple_index``-th PLE layer: splitmix64 of
    ``seed + 10007·ple_index + γ·(i+1)`` modulo half the largest safe multiplier, doubled plus one."""
    half = max(1, (((1 << 63) - 1) // max(args.vocab_size, 1)) // 2)
    base = args.seed + 10007 * ple_index
    out = []
    for i in range(args.ngram_size):
        v = (base + _GAMMA * (i + 1)) & _MASK64
        v = (v + _GAMMA) & _MASK64
        v = ((v ^ (v >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        v = ((v ^ (v >> 27)) * 0x94D049BB133111EB) & _MASK64
        out.append(2 * ((v ^ (v >> 31)) % half) + 1)
    return out


class NGramEmbedding(nn.Module):
    """Hashed n-gram embedding (module docstring), the checkpoint's names."""

    def __init__(self, args: ModelArgs, ple_index: int):
        super().__init__()
        self.n, self.per, self.eos = args.ngram_size, args.heads_per_ngram, args.eos_token_id
        heads = (self.n - 1) * self.per
        self.ngram_embedding = nn.Embedding(ngram_table_rows(args, ple_index), args.ple_embed_dim // heads)
        sizes = head_vocab_sizes(args, ple_index)
        offsets = [sum(sizes[:i]) for i in range(heads)]
        # constants, not parameters (plain lists: MLX would file arrays as parameters)
        object.__setattr__(self, "_hash", (layer_multipliers(args, ple_index), sizes, offsets))

    def _shifted(self, tokens: mx.array, shift: int) -> mx.array:
        """``tokens`` moved right by ``shift`` within each eos-ended segment, ``eos`` where none."""
        if shift == 0:
            return tokens
        L = tokens.shape[1]
        pos = mx.arange(L)
        eos_pos = mx.where(tokens == self.eos, pos, -1)
        before = mx.concatenate([mx.full((tokens.shape[0], 1), -1, eos_pos.dtype),
                                 mx.cummax(eos_pos, axis=1)[:, :-1]], axis=1)  # last eos strictly before
        valid = (pos - (before + 1) >= shift) & (pos >= shift)
        moved = mx.concatenate([mx.full((tokens.shape[0], shift), self.eos, tokens.dtype), tokens[:, : L - shift]],
                               axis=1)
        return mx.where(valid, moved, self.eos)

    def __call__(self, ids: mx.array, state: Optional[StateCache]) -> mx.array:
        B, T = ids.shape
        ids = ids.astype(mx.int64)
        ctx = state[0] if state is not None else None
        if ctx is None:
            ctx = mx.full((B, self.n - 1), self.eos, mx.int64)
        history = mx.concatenate([ctx, ids], axis=1)
        if state is not None:
            state[0] = history[:, history.shape[1] - (self.n - 1) :]
        shifted = [self._shifted(history, s) for s in range(self.n)]
        mult, sizes, offsets = (mx.array(v, dtype=mx.int64) for v in self._hash)
        blocks = []
        for g in range(2, self.n + 1):  # n-gram orders (a few), not time
            mixed = shifted[0] * mult[0]
            for j in range(1, g):
                mixed = mx.bitwise_xor(mixed, shifted[j] * mult[j])
            h = slice((g - 2) * self.per, (g - 1) * self.per)
            blocks.append(mx.remainder(mixed[..., None], sizes[h]) + offsets[h])
        rows = mx.concatenate(blocks, axis=-1)[:, history.shape[1] - T :]
        e = self.ngram_embedding(rows.astype(mx.uint32))
        return e.reshape(B, T, -1)


def dilated_causal_conv(x: mx.array, weight: mx.array, dilation: int, state: Optional[mx.array]):
    """Causal depthwise conv with dilation: ``y_t = Σ_j w_j x_{t − (K−1−j)·dilation}``
    (``weight`` MLX layout ``[C, K, 1]``; ``state``: the last ``(K−1)·dilation``
    inputs, None = zeros). Returns the output and the new state."""
    _, K, _ = weight.shape
    span = (K - 1) * dilation
    T = x.shape[1]
    if state is None:
        padded = mx.pad(x, [(0, 0), (span, 0), (0, 0)])
    else:
        padded = mx.concatenate([state.astype(x.dtype), x], axis=1)
    taps = weight[:, :, 0].T.astype(x.dtype)  # [K, C]
    y = padded[:, :T] * taps[0]
    for j in range(1, K):  # the K taps, not time
        y = y + padded[:, j * dilation : j * dilation + T] * taps[j]
    return y, padded[:, padded.shape[1] - span :]


class PLE(nn.Module):
    """Per-layer embedding of hashed n-grams into every stream (module docstring)."""

    def __init__(self, args: ModelArgs, ple_index: int):
        super().__init__()
        d, n = args.hidden_size, args.hc_count
        self.hidden, self.streams, self.dilation = d, n, args.ngram_size
        self.ple_embedding = NGramEmbedding(args, ple_index)
        e = args.ple_embed_dim
        self.key_proj = nn.Linear(e, n * d, bias=False)
        self.value_proj = nn.Linear(e, d, bias=False)
        self.norm_key = GroupRMSNorm(n * d, d, args.rms_norm_eps)
        self.norm_query = GroupRMSNorm(n * d, d, args.rms_norm_eps)
        self.norm_conv = GroupRMSNorm(n * d, d, args.rms_norm_eps)
        self.conv1d = nn.Conv1d(n * d, n * d, args.ple_conv_kernel_size, groups=n * d, bias=False)

    def __call__(self, h: mx.array, ids: mx.array, state: Optional[StateCache]) -> mx.array:
        B, T, _ = h.shape
        n, d = self.streams, self.hidden
        e = self.ple_embedding(ids, state)
        key = self.norm_key(self.key_proj(e)).reshape(B, T, n, d)
        value = self.value_proj(e)
        query = self.norm_query(h).reshape(B, T, n, d)
        gate = (key * query).sum(axis=-1, keepdims=True) / math.sqrt(d)
        gate = mx.sqrt(mx.maximum(mx.abs(gate), 1e-6)) * mx.sign(gate)
        u = (mx.sigmoid(gate) * value[..., None, :]).reshape(B, T, n * d)
        y, conv_state = dilated_causal_conv(self.norm_conv(u), self.conv1d.weight, self.dilation,
                                            state[1] if state is not None else None)
        if state is not None:
            state[1] = conv_state
        return u + nn.silu(y)


class DeltaNet(qwen3_next.GatedDeltaNet):
    """Qwen3.5's gated DeltaNet, its output gate's activation ``output_gate_type`` (default ``hidden_act``)."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.norm = RMSNormGated(self.dv, args.rms_norm_eps, activation=args.output_gate_type or args.hidden_act)


class IndexedAttention(qwen3_next.GatedAttention):
    """Qwen3.5's gated attention over the QSA-selected tokens (module docstring).
    Cache: ``(KVCache, StateCache)`` — keys/values, the indexer's blocks."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.ratio = args.indexer_compress_ratio
        self.indexer = QSAIndexer(args.hidden_size, args.indexer_n_heads, args.indexer_head_dim, args.indexer_budget,
                                  self.ratio, args.rms_norm_eps)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        kv, state = cache if cache is not None else (None, None)
        B, T, _ = x.shape
        d = self.head_dim
        offset = kv.offset if kv is not None else 0
        sel = self.indexer(x, self.rope, offset, state)
        qg = self.q_proj(x).reshape(B, T, self.n_q, 2 * d)  # per head: [query | gate]
        q, gate = qg[..., :d], qg[..., d:]
        q = self.rope(self.q_norm(q).transpose(0, 2, 1, 3), offset=offset)
        k = self.rope(self.k_norm(self.k_proj(x).reshape(B, T, self.n_kv, d)).transpose(0, 2, 1, 3), offset=offset)
        v = self.v_proj(x).reshape(B, T, self.n_kv, d).transpose(0, 2, 1, 3)
        if kv is not None:
            k, v = kv.update_and_fetch(k, v)
        mask = selection_mask(sel, offset, T, k.shape[2], self.ratio)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, -1)
        return self.o_proj(out * mx.sigmoid(gate.reshape(B, T, -1)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, kind: str, ple_index: Optional[int]):
        super().__init__()
        self.kind = kind
        if kind == "delta":
            self.linear_attn = DeltaNet(args)
        else:
            self.self_attn = IndexedAttention(args)
        self.mlp = qwen3_next.sparse_moe(args)
        if ple_index is not None:
            self.ple = PLE(args, ple_index)
        hc = dict(hidden=args.hidden_size, streams=args.hc_count, rank=args.hc_lowrank, eps=args.rms_norm_eps)
        self.attn_hyper_connection = GatedResidual(**hc)
        self.mlp_hyper_connection = GatedResidual(**hc)

    @property
    def has_ple(self) -> bool:
        return "ple" in self

    def __call__(self, h: mx.array, cache=None, ids: Optional[mx.array] = None) -> mx.array:
        mixer_cache, ple_cache = (cache if self.has_ple else (cache, None)) if cache is not None else (None, None)
        if self.has_ple:
            if ids is None:
                raise ValueError("this layer embeds hashed n-grams (PLE): it needs the token ids (ids=...)")
            h = h + self.ple(h, ids, ple_cache)
        mixer = self.linear_attn if self.kind == "delta" else self.self_attn
        x, w = self.attn_hyper_connection(h)
        h = self.attn_hyper_connection.inject(h, mixer(x, cache=mixer_cache), w)
        x, w = self.mlp_hyper_connection(h)
        return self.mlp_hyper_connection.inject(h, self.mlp(x), w)


class _Embedded:
    """The latest :meth:`Model.embed` call's token ids and output (a plain
    object: MLX modules would file arrays as parameters)."""

    ids: Optional[mx.array] = None
    out: Optional[mx.array] = None


class Model(CausalLM):
    """Qwen4-Exp (text) for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``;
    block outputs (``hidden_states``) are the ``[B, T, hc_count·hidden_size]`` streams."""

    norm_name = "hyper_connection_mixer"

    def __init__(self, args: ModelArgs):
        ple = {i - 1: k for k, i in enumerate(sorted(set(args.ple_layer_ids)))}
        super().__init__(
            args,
            layers=[DecoderLayer(args, kind, ple.get(i)) for i, kind in enumerate(layer_schedule(args))],
            norm=GatedResidual(args.hidden_size, args.hc_count, args.hc_lowrank, args.rms_norm_eps, combine=False),
        )
        object.__setattr__(self, "_embedded", _Embedded())

    def embed(self, inputs: mx.array) -> mx.array:
        h = super().embed(inputs)
        out = mx.concatenate([h] * self.args.hc_count, axis=-1)  # every stream starts as the embedding
        self._embedded.ids, self._embedded.out = inputs, out
        return out

    def final_norm(self, h: mx.array, dtype=None) -> mx.array:
        return self.trunk.hyper_connection_mixer(h)[0]

    def layer_cache(self, layer):
        if layer.kind == "indexed_attention":
            return KVCache(), StateCache()
        return (StateCache(), StateCache()) if layer.has_ple else StateCache()

    def call_layer(self, layer, h: mx.array, cache, x0: mx.array) -> mx.array:
        if not layer.has_ple:
            return layer(h, cache=cache)
        return layer(h, cache=cache, ids=self.ids_of(x0))

    def ids_of(self, x0: mx.array) -> mx.array:
        """The token ids whose embedding is ``x0`` (see "Token ids inside a block")."""
        ids, out = self._embedded.ids, self._embedded.out
        if ids is None:
            raise ValueError("Qwen4-Exp's PLE layers need the token ids: call model.embed(ids) first")
        T, N = x0.shape[1], out.shape[1]
        if N == T and x0.shape[0] == out.shape[0]:
            return ids
        if T < N and x0.shape[0] == out.shape[0]:
            starts = mx.all(out == x0[:, :1], axis=-1).all(axis=0).tolist()
            for a, hit in enumerate(starts[: N - T + 1]):
                if hit and mx.array_equal(out[:, a : a + T], x0).item():
                    return ids[:, a : a + T]
        raise ValueError("the embedding output given to a PLE layer is not (a window of) the latest model.embed "
                         "output: embed the tokens first")
