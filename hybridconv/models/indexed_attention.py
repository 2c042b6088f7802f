"""Indexed (top-k selected) attention: QSA and DSA, with torch.topk's ties.

A cheap *indexer* scores, for every query, compressed blocks of the keys it can
see; the attention then runs over the tokens of the ``k`` best blocks (plus the
query's own incomplete block) only. Two variants, both over blocks ("pools") of
``c`` consecutive tokens counted from position 0:

QSA (Qwen4-Exp, ``qwen4_exp_text``)
    ``index_qk_proj(x)`` gives ``n_h`` query heads and one raw key per token
    (``d`` channels). A block's key is the *mean* of its ``c`` raw keys,
    RMS-normalised (``k_layernorm``) and rotated by RoPE at the block's first
    position; the queries are RMS-normalised (``q_layernorm``) and rotated at
    their own position (the attention's partial RoPE: the first ``rot``
    channels). Block score for query ``t``::

        s_t(j) = Σ_h relu(q_{t,h} · K_j) / √d

    over the complete blocks the query sees, ``⌊(t+1)/c⌋`` of them; the best
    ``indexer_budget / c`` are kept.
DSA with k-pools (GLM-5.3-Flash, ``glm5_next``; DeepSeek-V3.2's sparse
attention, DeepSeek-AI 2025, "DeepSeek-V3.2-Exp", with pooled keys)
    ``q = wq_b(q_resid)`` (``n_h`` heads; ``q_resid`` is MLA's normalised
    query latent), one key per token ``k = LayerNorm(wk(x))`` and a gate
    ``g = W_gate x`` (``d`` channels each). A pool's key is a learned weighted
    average per channel::

        K_j = Σ_i softmax_i(g_i + ape_{i-jc}) ⊙ k_i      (i over the pool's c tokens)

    and the score ``s_t(j) = Σ_h w_{t,h} relu(q_{t,h} · K_j / √d)`` with
    per-query head weights ``w = weights_proj(x) / √n_h``. Every complete pool
    of the keys is a candidate; the ones the query cannot see (ending after
    it) score ``float32 min``; the best ``index_topk / c`` are taken and the
    unseen ones among them dropped. A layer whose ``indexer_types`` entry is
    ``"shared"`` has no indexer and reuses the selection of the layer before it.

Both then attend to the selected blocks' tokens plus the query's incomplete
block (positions ``c⌊(t+1)/c⌋ … t``; DSA's ``index_kpool_always_select_tail``).
The selection is a boolean ``[B, T, n_blocks]``; :func:`selection_mask`
expands it to the attention mask.

Ties: exactly torch.topk's choice
---------------------------------
Scores tie, exactly, whenever every head's ``relu`` is 0 for two blocks (both
score 0; frequent with few indexer heads). When such a tie straddles the
``k``-th place, *which* tied blocks win decides the output, and torch.topk on
the CPU (the reference) does not take the lowest indices: it runs libstdc++'s
``std::nth_element`` (introselect: median-of-3 Hoare partitions, insertion
sort below 4 elements, a heap when the depth limit is hit) on the ``(value,
index)`` pairs with the comparison ``value >`` — or ``std::partial_sort`` (a
heap select) when ``64·k <= n`` — and keeps the first ``k``
(aten/src/ATen/native/cpu/SortingKernel.cpp, ``topk_impl_loop``). Which tied
elements end in front depends on every value of the row and on its length.
:func:`topk_selection` therefore takes the selection vectorised wherever it
is unambiguous (the ``k``-th value's ties fit exactly) and, for the rows where
a tie straddles the ``k``-th place, replays that algorithm on the row as torch
sees it (:func:`torch_topk_set`, a Python transcription of libstdc++'s
``__introselect`` / ``__heap_select``; tests/test_indexed_attention.py checks
it against torch.topk on tie-heavy rows of every regime). That replay is a
Python loop over the *tied rows* only, on their ``n`` candidates: no time in
models whose indexer has enough heads that exact zeros do not happen.

One consequence, transformers' own: in a DSA prefill a query's row also holds
the pools after it (as ``float32 min``), in a cached decode step it does not,
so under a straddling tie the two can choose differently (measured on the
glm5_next fixture: 2 of 32 positions, up to 0.5 in a logit). Each mode here
reproduces transformers' same mode. QSA rows hold only the visible blocks:
prefill and decode agree.

Cache (bounded by the block count)
----------------------------------
A complete block's key never changes, so the indexer keeps it once
(``[B, n_blocks, d]``) plus the raw entries of the incomplete block
(``< c`` tokens: QSA's raw keys ``[B, r, d]``, DSA's keys and gates ``[B, r,
2d]``): a :class:`~.common.StateCache` ``[block keys, tail]``, ``d/c`` numbers
per token beside the attention's own key/value cache (which indexed attention
needs in full: any past block can be selected).
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

F32_MIN = -3.4028234663852886e38  # torch.finfo(torch.float32).min: DSA's score of an unseen pool


# --- torch.topk's choice, exactly -------------------------------------------------------------
# libstdc++ (bits/stl_algo.h, bits/stl_heap.h) on a list of (value, index) pairs with
# comp(x, y) = x.value > y.value, transcribed step for step.


def _gt(x, y) -> bool:
    return x[0] > y[0]


def _push_heap(a, first, hole, top, value):
    parent = (hole - 1) // 2
    while hole > top and _gt(a[first + parent], value):
        a[first + hole] = a[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    a[first + hole] = value


def _adjust_heap(a, first, hole, length, value):
    top, child = hole, hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if _gt(a[first + child], a[first + child - 1]):
            child -= 1
        a[first + hole] = a[first + child]
        hole = child
    if (length & 1) == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        a[first + hole] = a[first + child - 1]
        hole = child - 1
    _push_heap(a, first, hole, top, value)


def _heap_select(a, first, middle, last):
    length = middle - first
    if length >= 2:  # make_heap
        parent = (length - 2) // 2
        while True:
            _adjust_heap(a, first, parent, length, a[first + parent])
            if parent == 0:
                break
            parent -= 1
    for i in range(middle, last):
        if _gt(a[i], a[first]):  # pop_heap(first, middle, i)
            value = a[i]
            a[i] = a[first]
            _adjust_heap(a, first, 0, length, value)


def _insertion_sort(a, first, last):
    for i in range(first + 1, last):
        value = a[i]
        if _gt(value, a[first]):
            a[first + 1 : i + 1] = a[first:i]
            a[first] = value
        else:
            j = i
            while _gt(value, a[j - 1]):
                a[j] = a[j - 1]
                j -= 1
            a[j] = value


def _move_median_to_first(a, result, x, y, z):
    if _gt(a[x], a[y]):
        m = y if _gt(a[y], a[z]) else z if _gt(a[x], a[z]) else x
    else:
        m = x if _gt(a[x], a[z]) else z if _gt(a[y], a[z]) else y
    a[result], a[m] = a[m], a[result]


def _unguarded_partition(a, first, last, pivot):
    while True:
        while _gt(a[first], a[pivot]):
            first += 1
        last -= 1
        while _gt(a[pivot], a[last]):
            last -= 1
        if not first < last:
            return first
        a[first], a[last] = a[last], a[first]
        first += 1


def _introselect(a, first, nth, last, depth):
    while last - first > 3:
        if depth == 0:
            _heap_select(a, first, nth + 1, last)
            a[first], a[nth] = a[nth], a[first]
            return
        depth -= 1
        _move_median_to_first(a, first, first + 1, first + (last - first) // 2, last - 1)
        cut = _unguarded_partition(a, first + 1, last, first)
        if cut <= nth:
            first = cut
        else:
            last = cut
    _insertion_sort(a, first, last)


def torch_topk_set(values: list, k: int) -> list[int]:
    """The indices (ascending) that ``torch.topk(torch.tensor(values), k)``
    returns on the CPU, ties included (module docstring). ``values``: floats
    without NaN; ``1 <= k <= len(values)``."""
    n = len(values)
    a = [(v, i) for i, v in enumerate(values)]
    if k * 64 <= n:
        _heap_select(a, 0, k, n)  # std::partial_sort; its final sort_heap keeps the set
    else:
        _introselect(a, 0, k - 1, n, 2 * (n.bit_length() - 1))  # std::nth_element
    return sorted(i for _, i in a[:k])


def topk_selection(scores: mx.array, prefix: mx.array, budget: int, dropped: Optional[float] = None) -> mx.array:
    """torch.topk's choice of ``min(budget, prefix)`` entries in each row of
    ``scores [..., n]`` (float32), where row ``r`` as torch sees it is
    ``scores[r, :prefix[r]]``: a boolean ``[..., n]`` (False beyond the prefix).

    Vectorised where the choice is unambiguous; rows where a tie straddles
    the ``k``-th place are replayed by :func:`torch_topk_set` (module
    docstring) — except ties at the value ``dropped``, entries the caller
    drops whichever are chosen (DSA's unseen pools): those rows keep every
    entry above it."""
    shape = scores.shape
    n = shape[-1]
    s = scores.reshape(-1, n).astype(mx.float32)
    p = prefix.reshape(-1).astype(mx.int32)
    k = mx.minimum(p, budget)
    inrow = mx.arange(n)[None] < p[:, None]
    masked = mx.where(inrow, s, -mx.inf)
    desc = -mx.sort(-masked, axis=-1)
    thr = mx.take_along_axis(desc, mx.maximum(k - 1, 0)[:, None], axis=-1)
    gt = (masked > thr) & inrow
    eq = (masked == thr) & inrow
    need = k - gt.sum(axis=-1)
    n_eq = eq.sum(axis=-1)
    sel = (gt | (eq & (n_eq == need)[:, None])) & (k > 0)[:, None]
    straddle = (n_eq > need) & (k > 0)
    if dropped is not None:
        straddle = straddle & (thr[:, 0] != dropped)
    rows = [r for r, flag in enumerate(straddle.tolist()) if flag]
    if rows:
        flat: list[int] = []
        p_list, k_list = p.tolist(), k.tolist()
        for r in rows:
            vals = s[r, : p_list[r]].tolist()
            flat.extend(r * n + i for i in torch_topk_set(vals, k_list[r]))
        replay = mx.zeros((s.size,), mx.int32).at[mx.array(flat)].add(1).reshape(s.shape) > 0
        sel = mx.where(straddle[:, None], replay, sel)
    return sel.reshape(shape)


# --- blocks, selection, mask ------------------------------------------------------------------


def update_blocks(state, new: mx.array, c: int, pool):
    """Append ``new [B, T, w]`` (one entry per token) to the block state
    ``state`` (a :class:`~.common.StateCache` ``[block keys, tail]`` or None):
    the blocks completed by it are compressed by ``pool(groups [B, m, c, w],
    first_block) -> [B, m, d]`` and appended to the kept block keys. Returns
    the block keys of every complete block ``[B, n, d]`` (None when there is
    none)."""
    tail = state[1] if state is not None else None
    blocks = state[0] if state is not None else None
    entries = new if tail is None else mx.concatenate([tail.astype(new.dtype), new], axis=1)
    B, L, w = entries.shape
    m = L // c
    if m:
        first = 0 if blocks is None else blocks.shape[1]
        made = pool(entries[:, : m * c].reshape(B, m, c, w), first)
        blocks = made if blocks is None else mx.concatenate([blocks, made.astype(blocks.dtype)], axis=1)
    if state is not None:
        state[0] = blocks
        state[1] = entries[:, m * c :] if L > m * c else None
    return blocks


def visible_blocks(offset: int, T: int, c: int) -> mx.array:
    """Complete blocks the queries at positions ``offset … offset+T-1`` see: ``⌊(t+1)/c⌋``."""
    return (mx.arange(offset, offset + T) + 1) // c


def selection_mask(sel: Optional[mx.array], offset: int, T: int, S: int, c: int, tail: bool = True) -> mx.array:
    """The attention mask ``[B, 1, T, S]`` (True: attend) of a block selection
    ``sel [B, T, n]`` for queries at ``offset …`` over keys ``0 … S-1``: the
    selected blocks' tokens, plus (``tail``) each query's incomplete block up
    to itself."""
    q = mx.arange(offset, offset + T)[:, None]
    s = mx.arange(S)[None]
    if sel is not None and sel.shape[-1]:
        B, _, n = sel.shape
        keys = mx.repeat(sel, c, axis=-1)
        if n * c < S:
            keys = mx.concatenate([keys, mx.zeros((B, T, S - n * c), mx.bool_)], axis=-1)
    else:
        keys = mx.zeros((1, T, S), mx.bool_)
    if tail:
        start = ((q + 1) // c) * c
        keys = keys | ((s >= start) & (s <= q))[None]
    return keys[:, None]


# --- QSA --------------------------------------------------------------------------------------


class QSAIndexer(nn.Module):
    """Qwen4-Exp's QSA indexer (module docstring); the checkpoint's names
    (``index_qk_proj``, ``q_layernorm``, ``k_layernorm``; the two norms'
    zero-centred ``1 + w`` folded into plain scales by the converter)."""

    def __init__(self, hidden: int, n_heads: int, head_dim: int, budget: int, ratio: int, eps: float):
        super().__init__()
        self.n_heads, self.head_dim, self.ratio = n_heads, head_dim, ratio
        self.block_topk = budget // ratio
        self.index_qk_proj = nn.Linear(hidden, (n_heads + 1) * head_dim, bias=False)
        self.q_layernorm = nn.RMSNorm(head_dim, eps=eps)
        self.k_layernorm = nn.RMSNorm(head_dim, eps=eps)

    def __call__(self, x: mx.array, rope: nn.RoPE, offset: int, state) -> mx.array:
        """The block selection ``[B, T, n]`` for the queries of ``x`` at ``offset``."""
        B, T, _ = x.shape
        d, c = self.head_dim, self.ratio
        qk = self.index_qk_proj(x)
        q = self.q_layernorm(qk[..., : self.n_heads * d].reshape(B, T, self.n_heads, d))
        q = rope(q.transpose(0, 2, 1, 3), offset=offset)  # [B, h, T, d]
        raw = qk[..., self.n_heads * d :]

        def pool(groups, first):  # mean of the raw keys, normalised, rotated at the block's first position
            mean = groups.astype(mx.float32).mean(axis=2).astype(raw.dtype)
            return mx.fast.rope(self.k_layernorm(mean), rope.dims, traditional=rope.traditional, base=rope.base,
                                scale=float(c), offset=first)

        blocks = update_blocks(state, raw, c, pool)
        if blocks is None:
            return mx.zeros((B, T, 0), mx.bool_)
        scores = q.astype(mx.float32) @ blocks.astype(mx.float32)[:, None].swapaxes(-1, -2)  # [B, h, T, n]
        scores = nn.relu(scores).sum(axis=1) / math.sqrt(d)
        prefix = mx.broadcast_to(visible_blocks(offset, T, c)[None], (B, T))
        return topk_selection(scores, prefix, self.block_topk)


# --- DSA --------------------------------------------------------------------------------------


class DSAIndexer(nn.Module):
    """DeepSeek sparse attention's indexer with GLM-5.3-Flash's k-pools (module
    docstring); the checkpoint's names (``wq_b``, ``wk``, ``k_norm`` — a
    LayerNorm with bias, eps 1e-6 —, ``weights_proj``,
    ``index_kpool_compress_ape [c, d]``, ``index_kpool_compress_gate [d, H]``)."""

    def __init__(self, hidden: int, q_lora_rank: int, n_heads: int, head_dim: int, topk: int, kpool: int):
        super().__init__()
        self.n_heads, self.head_dim, self.kpool = n_heads, head_dim, kpool
        self.pool_topk = topk // kpool
        self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(hidden, n_heads, bias=False)
        self.index_kpool_compress_ape = mx.zeros((kpool, head_dim))
        self.index_kpool_compress_gate = mx.zeros((head_dim, hidden))

    def __call__(self, x: mx.array, q_resid: mx.array, offset: int, state) -> mx.array:
        """The pool selection ``[B, T, n]`` for the queries of ``x`` at ``offset``."""
        B, T, _ = x.shape
        d, c, H = self.head_dim, self.kpool, self.n_heads
        q = self.wq_b(q_resid).reshape(B, T, H, d).transpose(0, 2, 1, 3)  # [B, h, T, d]
        k = self.k_norm(self.wk(x))
        gate = x @ self.index_kpool_compress_gate.astype(x.dtype).T
        ape = self.index_kpool_compress_ape.astype(mx.float32)

        def pool(groups, first):  # per channel, a softmax over the pool's tokens weighs their keys
            keys, gates = groups[..., :d], groups[..., d:]
            p = mx.softmax(gates.astype(mx.float32) + ape, axis=2, precise=True).astype(keys.dtype)
            return (p * keys).sum(axis=2)

        pools = update_blocks(state, mx.concatenate([k, gate], axis=-1), c, pool)
        if pools is None:
            return mx.zeros((B, T, 0), mx.bool_)
        n = pools.shape[1]
        scores = nn.relu((q.astype(mx.float32) @ pools.astype(mx.float32)[:, None].swapaxes(-1, -2)) * d**-0.5)
        w = self.weights_proj(x).astype(mx.float32) * H**-0.5  # [B, T, h]
        scores = (w.transpose(0, 2, 1)[..., None] * scores).sum(axis=1)  # [B, T, n]
        seen = mx.arange(n)[None] < visible_blocks(offset, T, c)[:, None]  # [T, n]
        scores = mx.where(seen[None], scores, F32_MIN)
        # torch ranks every complete pool of the keys (the unseen ones at float32 min), then drops the unseen
        sel = topk_selection(scores, mx.full((B, T), n, mx.int32), self.pool_topk, dropped=F32_MIN)
        return sel & seen[None]
