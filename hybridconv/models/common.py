"""Building blocks shared by the hybrid architectures.

Kept deliberately small: an RMSNorm whose scale is ``weight + offset`` (both
PLaMo-2 and RecurrentGemma store norm weights as a *difference* from a fixed
scale), a causal depthwise 1-D convolution with a rolling state for decoding,
the causal (optionally sliding-window) attention mask for a chunk of new
tokens placed after ``offset`` cached ones, attention over long prefills in
query blocks, and tanh / soft-cap / GELU computed on the CPU from arithmetic
MLX vectorises (its own tanh there is scalar libm).
"""

from __future__ import annotations

import shutil
from functools import lru_cache
from typing import Optional

import mlx.core as mx
import mlx.nn as nn


class OffsetRMSNorm(nn.Module):
    """RMSNorm with scale ``weight + offset``.

    ``y = x / sqrt(mean(x^2) + eps) * (weight + offset)``. The checkpoint stores
    ``weight`` as the difference from ``offset`` (initialised at zero), so losing
    the offset silently rescales every activation: it is a constructor argument
    here, never a weight.
    """

    def __init__(self, dims: int, eps: float = 1e-6, offset: float = 1.0):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps
        self.offset = offset

    def __call__(self, x: mx.array) -> mx.array:
        # The scale is formed in the weight's dtype (float32 when a quantized
        # model protects its norms) and applied in the activations' dtype.
        return mx.fast.rms_norm(x, (self.weight + self.offset).astype(x.dtype), self.eps)


# --- tanh on the CPU -----------------------------------------------------------
# MLX's CPU backend computes tanh (and exp, sigmoid) one element at a time
# through libm, about 15 ns per float32 on x86-64 where a multiply costs 0.5 ns:
# RecurrentGemma's soft-cap over its [T, vocab] logits and its GELUs were a third
# of a prefill. On the CPU, for float32, tanh is computed instead from
# arithmetic MLX compiles into vectorised C++ kernels (mx.compile runs g++): a
# clamp, then t·P(t²)/Q(t²), the rational approximation Eigen uses for float32
# (Eigen/src/Core/MathFunctionsImpl.h, generic_fast_tanh_float), at most 4e-7
# from the exact tanh (mx.tanh: 1e-7). Elsewhere (a GPU, other dtypes, no g++,
# where compile would run the ~20 ops one by one) it is mx.tanh, unchanged.
# Two kernels, not one: g++ leaves the loop scalar when the clamp feeds the
# polynomials in the same loop.

TANH_CLAMP = 7.90531110763549805  # beyond it the approximation's value is ±(1 - 4e-7)
_TANH_P = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
           -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)


def tanh_rational(t: mx.array, scale: float = 1.0) -> mx.array:
    """``scale · tanh(t)`` for ``|t| <= TANH_CLAMP`` (t clamped already), float32.
    Estrin's scheme rather than Horner's: fewer dependent steps, so the whole
    expression stays within what mx.compile fuses into one kernel."""
    z = t * t
    z2 = z * z
    z4 = z2 * z2
    p0, p1, p2, p3, p4, p5, p6 = (scale * c for c in _TANH_P)
    q0, q1, q2, q3 = _TANH_Q
    num = ((p0 + p1 * z) + (p2 + p3 * z) * z2) + ((p4 + p5 * z) + p6 * z2) * z4
    return num * t / ((q0 + q1 * z) + (q2 + q3 * z) * z2)


def _clamp(t: mx.array) -> mx.array:
    return mx.clip(t, -TANH_CLAMP, TANH_CLAMP)


@lru_cache(maxsize=None)
def _have_gxx() -> bool:
    """g++ on the PATH (what MLX's CPU compile runs) and the compiled kernels build
    and agree with ``mx.tanh`` here, tried once per process: a compiler that is
    present but cannot build (no headers, a read-only temporary folder) falls
    back to ``mx.tanh`` instead of failing the model."""
    if shutil.which("g++") is None:
        return False
    try:
        with mx.stream(mx.cpu):
            x = mx.array([-9.0, -0.5, 0.0, 0.25, 3.0], dtype=mx.float32)
            got = _tanh_out(_tanh_in(x))
            return bool(mx.allclose(got, mx.tanh(x), rtol=0.0, atol=1e-6).item())
    except Exception:  # any failure to build or run the kernels: the plain path
        return False


def rational_tanh_pays(x: mx.array) -> bool:
    """Whether :func:`tanh_rational` beats ``mx.tanh`` for ``x``: float32 on the
    CPU where the compiled kernels work. (Only ``x.dtype`` and the default device
    are looked at.)"""
    return x.dtype == mx.float32 and mx.default_device() == mx.cpu and _have_gxx()


_tanh_in = mx.compile(_clamp)
_tanh_out = mx.compile(tanh_rational)


def tanh(x: mx.array) -> mx.array:
    """``tanh(x)``: :func:`tanh_rational` where that pays, else ``mx.tanh``."""
    if not rational_tanh_pays(x):
        return mx.tanh(x)
    return _tanh_out(_tanh_in(x))


@lru_cache(maxsize=None)
def _soft_cap_kernels(cap: float):
    return (mx.compile(lambda x: _clamp(x / cap)),
            mx.compile(lambda t: tanh_rational(t, cap)))


def soft_cap(x: mx.array, cap: float) -> mx.array:
    """Logit soft-capping ``cap · tanh(x / cap)`` (Gemma-2, RecurrentGemma)."""
    if not rational_tanh_pays(x):
        return mx.tanh(x / cap) * cap
    into, out = _soft_cap_kernels(float(cap))
    return out(into(x))


_GELU_K = 0.7978845608028654  # sqrt(2 / pi)


@mx.compile
def _gelu_in(x: mx.array) -> tuple[mx.array, mx.array]:
    u = _GELU_K * (x + 0.044715 * (x * x * x))
    # Where tanh(u) is -1 within float32 the GELU is 0 within float32 (as with
    # mx.tanh); 1 + tanh_rational(-TANH_CLAMP) alone would leave 2e-7·x.
    return _clamp(u), mx.where(u > -TANH_CLAMP, x, 0.0)


@mx.compile
def _gelu_out(t: mx.array, x: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + tanh_rational(t))


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU, tanh approximation (``nn.gelu_approx``; transformers' ``gelu_pytorch_tanh``)."""
    if not rational_tanh_pays(x):
        return nn.gelu_approx(x)
    return _gelu_out(*_gelu_in(x))


def causal_depthwise_conv(
    x: mx.array,
    weight: mx.array,
    bias: Optional[mx.array],
    state: Optional[mx.array],
) -> tuple[mx.array, mx.array]:
    """Causal depthwise convolution over time.

    ``x``: ``[B, T, C]``; ``weight``: MLX layout ``[C, K, 1]`` (PyTorch stores
    ``[C, 1, K]``; the converter transposes it). ``state`` holds the previous
    ``K - 1`` inputs (``None`` at sequence start, meaning zeros, i.e. PyTorch's
    left padding). Returns the output and the new state.
    """
    channels, k, _ = weight.shape
    if state is None:
        padded = mx.pad(x, [(0, 0), (k - 1, 0), (0, 0)])
    else:
        padded = mx.concatenate([state.astype(x.dtype), x], axis=1)
    if x.dtype == mx.float32:
        # The K taps (a loop over K, not time) as shifted products: on the CPU
        # 8x faster than a grouped conv_general (3.6 ms against 29 for
        # 2048 x 512, K = 4); the same float32 sum, in another order. Other
        # dtypes keep conv_general, as before.
        taps = weight[:, :, 0].T.astype(x.dtype)  # [K, C]
        T = x.shape[1]
        y = padded[:, :T] * taps[0]
        for j in range(1, k):
            y = y + padded[:, j : j + T] * taps[j]
    else:
        y = mx.conv_general(padded, weight.astype(x.dtype), groups=channels)
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y, padded[:, padded.shape[1] - (k - 1) :, :]


def attention_mask(
    n_queries: int, n_keys: int, offset: int, window: Optional[int]
) -> Optional[mx.array]:
    """Boolean mask ``[n_queries, n_keys]`` for queries at absolute positions
    ``offset .. offset+n_queries-1`` over the last ``n_keys`` positions (keys in
    temporal order, ending with the queries' own). A query at ``q`` sees keys
    ``k`` with ``q - window < k <= q`` (``window`` counts the query itself, as
    in transformers' sliding-window mask). ``None`` when nothing is masked.
    """
    if n_queries == 1 and (window is None or n_keys <= window):
        return None
    q_pos = mx.arange(offset, offset + n_queries)[:, None]
    first_key = offset + n_queries - n_keys
    k_pos = mx.arange(first_key, first_key + n_keys)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask = mask & (k_pos > q_pos - window)
    return mask


# Queries per block of a long prefill in :func:`attend` (see there).
ATTENTION_QUERY_BLOCK = 128


def attend(q: mx.array, k: mx.array, v: mx.array, rope, cache, window: Optional[int], scale: float) -> mx.array:
    """Rotary positions (continuing from the cache's offset; ``rope=None``: none),
    cache update, and causal attention within ``window``. ``q``/``k``/``v``: ``[B, heads, T, d]``;
    returns ``[B, T, heads·d]``.

    More than ``ATTENTION_QUERY_BLOCK`` queries are taken in blocks of that many,
    each against only the keys one of its queries can see (from the window's
    start for its first query to its last query), with the same mask restricted
    to them. The keys left out are the ones the mask gave weight exactly 0, so
    the result is the same; the work is not: on the CPU
    ``scaled_dot_product_attention`` forms every query's scores against every
    key, so a whole causal prefill computed (and exponentiated) twice the scores
    it uses, and more than that with a window shorter than the sequence. The
    loop is over T / 128 blocks (16 at T = 2048), not over time steps.

    A batch cache of mlx-lm's BatchGenerator (:func:`is_batch_cache`: one offset
    per sequence, left padding) takes mlx-lm's own mask for it, made before the
    update as its models do, and each sequence's positions."""
    if is_batch_cache(cache):
        mask = cache.make_mask(q.shape[2], window_size=window, return_array=True)
        if rope is not None:
            q = rope(q, offset=cache.offset)
            k = rope(k, offset=cache.offset)
        k, v = cache.update_and_fetch(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        B, _, T, _ = out.shape
        return out.transpose(0, 2, 1, 3).reshape(B, T, -1)
    offset = cache.offset if cache is not None else 0
    if rope is not None:  # None: no position embedding (NoPE)
        q = rope(q, offset=offset)
        k = rope(k, offset=offset)
    if cache is not None:
        k, v = cache.update_and_fetch(k, v)
    n_q, n_k = q.shape[2], k.shape[2]
    block = ATTENTION_QUERY_BLOCK
    if n_q <= block:
        mask = attention_mask(n_q, n_k, offset, window)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    else:
        first_key = offset + n_q - n_k  # absolute position of k[:, :, 0]
        parts = []
        for start in range(0, n_q, block):
            stop = min(start + block, n_q)  # queries at offset + start .. offset + stop - 1
            lo = first_key if window is None else max(first_key, offset + start - window + 1)
            hi = offset + stop  # keys up to the block's last query, as attention_mask expects
            mask = attention_mask(stop - start, hi - lo, offset + start, window)
            keys = slice(lo - first_key, hi - first_key)
            parts.append(mx.fast.scaled_dot_product_attention(
                q[:, :, start:stop], k[:, :, keys], v[:, :, keys], scale=scale, mask=mask))
        out = mx.concatenate(parts, axis=2)
    B, _, T, _ = out.shape
    return out.transpose(0, 2, 1, 3).reshape(B, T, -1)


def attend_biased(q: mx.array, k: mx.array, v: mx.array, cache, window: Optional[int], scale: float,
                  bias=None, sinks: Optional[mx.array] = None) -> mx.array:
    """Causal attention (within ``window``) with an additive score bias and
    optional per-query sink logits, for attention that ``mx.fast`` cannot express
    (Inkling's relative position bias, Inkling-2's per-token sinks). ``q``:
    ``[B, Hq, T, d]``, ``k``/``v``: ``[B, Hkv, T, d]`` (grouped: query head ``h``
    reads KV head ``h // (Hq / Hkv)``); no position embedding is applied here.

    ``bias(q0, q1, k0, k1)`` returns the additive bias ``[B, Hq, q1 - q0, k1 - k0]``
    for the queries at absolute positions ``q0 .. q1 - 1`` and the keys at
    ``k0 .. k1 - 1``.
    ``sinks`` (``[B, Hq, T]``) adds one logit per query with a zero value: it
    only takes probability mass (``softmax([scores, sink])`` without its last
    column). Scores are ``scale · q·k + bias``, masked, softmaxed in float32, and
    cast to the values' dtype before the weighted sum (as transformers' eager
    attention does). Long prefills run in query blocks of
    ``ATTENTION_QUERY_BLOCK`` against only the keys a block can see (see
    :func:`attend`). Returns ``[B, T, Hq·d]``."""
    offset = cache.offset if cache is not None else 0
    if cache is not None:
        k, v = cache.update_and_fetch(k, v)
        if q.shape[2] == 1 and hasattr(cache, "_temporal_order"):
            # mlx-lm's RotatingKVCache returns a single step's keys in ring order;
            # the bias depends on each key's position, so put them back in time order.
            k, v = cache._temporal_order(k), cache._temporal_order(v)
    B, Hq, n_q, d = q.shape
    Hkv, n_k = k.shape[1], k.shape[2]
    g = Hq // Hkv
    first_key = offset + n_q - n_k
    parts = []
    for start in range(0, n_q, ATTENTION_QUERY_BLOCK):
        stop = min(start + ATTENTION_QUERY_BLOCK, n_q)
        lo = first_key if window is None else max(first_key, offset + start - window + 1)
        hi = offset + stop
        keys = slice(lo - first_key, hi - first_key)
        qb = q[:, :, start:stop].reshape(B, Hkv, g, stop - start, d)
        kb, vb = k[:, :, keys][:, :, None], v[:, :, keys][:, :, None]  # [B, Hkv, 1, nk, d]
        scores = (qb @ kb.swapaxes(-1, -2)).astype(mx.float32) * scale  # [B, Hkv, g, nq, nk]
        if bias is not None:
            b = bias(offset + start, offset + stop, lo, hi).astype(mx.float32)
            scores = scores + b.reshape(B, Hkv, g, stop - start, hi - lo)
        mask = attention_mask(stop - start, hi - lo, offset + start, window)
        if mask is not None:
            scores = mx.where(mask, scores, mx.array(-mx.inf, mx.float32))
        if sinks is not None:
            sink = sinks[:, :, start:stop].astype(mx.float32).reshape(B, Hkv, g, stop - start, 1)
            p = mx.softmax(mx.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
        else:
            p = mx.softmax(scores, axis=-1)
        parts.append((p.astype(vb.dtype) @ vb).reshape(B, Hq, stop - start, d))
    out = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)
    return out.transpose(0, 2, 1, 3).reshape(B, n_q, -1)


class ProportionalRoPE(nn.Module):
    """transformers' ``proportional`` RoPE (Gemma-4, LFM3's full-attention layers):
    the first ``rotated // 2`` of the ``dims // 2`` rotation pairs ``(i, i + dims/2)``
    turn with inverse frequency ``base^(-2i / dims) / factor`` — the exponent
    counts the *whole* head, not the rotated part — and the remaining pairs not at
    all (inverse frequency 0). Unlike ``nn.RoPE(rotated)``, which rotates the
    first ``rotated`` channels as pairs ``(i, i + rotated/2)`` with
    ``base^(-2i / rotated)``, the rotated channels here are spread over both
    halves of the head. ``mx.fast.rope`` takes wavelengths: an infinite one is a
    pair that never turns (mlx-lm's ``ProportionalRoPE`` does the same)."""

    def __init__(self, dims: int, rotated: int, base: float = 10000.0, factor: float = 1.0):
        super().__init__()
        if not 0 <= rotated <= dims:
            raise ValueError(f"rotated dims {rotated} not within 0..{dims}")
        self.dims = dims
        exponents = mx.arange(0, rotated, 2, dtype=mx.float32) / dims
        self._freqs = mx.concatenate(
            [factor * (base**exponents), mx.full(((dims - rotated) // 2,), mx.inf)]
        )

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs)


class MLP(nn.Module):
    """The SwiGLU feed-forward most of these models use (Shazeer 2020, "GLU Variants
    Improve Transformer"): ``down_proj(silu(gate_proj(x)) ⊙ up_proj(x))``, with
    transformers' and mlx-lm's parameter names."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


# --- caches: mlx-lm's own classes -------------------------------------------------
# The decoding caches ARE mlx-lm's (mlx_lm.models.cache), so that one model code
# serves hybridconv.load, verify and mlx-lm alike (the output can carry this code:
# hybridconv/mlx_lm_code.py): mlx-lm's generate, prompt caching
# (save/load_prompt_cache rebuild caches by class name from mlx_lm.models.cache,
# so they must be its classes, not subclasses), trimming and its server work as
# with its built-in models. The names below are the ones the model modules use.
# mlx-lm is imported on first use, not at import: importing it loads
# transformers (and torch), which `hybridconv convert` / `inspect` never need.


def KVCache():
    """Full key/value history of an attention layer (keys ``[B, H, T, d]``):
    ``mlx_lm.models.cache.KVCache``. ``update_and_fetch(k, v)`` returns every key
    so far in temporal order; ``offset`` counts the positions seen."""
    from mlx_lm.models.cache import KVCache as _KVCache

    return _KVCache()


def WindowKVCache(window: int):
    """Key/value cache of a sliding-window attention layer whose query sees
    itself and the ``window - 1`` positions before it (``window`` counts the
    query, as :func:`attention_mask` does): ``mlx_lm.models.cache.RotatingKVCache``
    with ``max_size = window`` and nothing pinned (``keep = 0``).

    What :func:`attend` relies on (mlx-lm's semantics): a chunk of several tokens
    gets the last ``window - 1`` cached positions then the chunk, in temporal
    order, so :func:`attention_mask` applies; a single token gets at most
    ``window`` keys, in ring order once the ring has wrapped, all of which it may
    see (no mask is needed, and attention does not depend on the keys' order).
    Memory stays bounded by the window plus the chunk being processed."""
    from mlx_lm.models.cache import RotatingKVCache

    return RotatingKVCache(max_size=window, keep=0)


def StateCache():
    """Recurrent state of an SSM, RG-LRU, short-conv or delta-rule layer:
    ``mlx_lm.models.cache.ArraysCache`` with two slots, ``cache[0]`` the conv
    state and ``cache[1]`` the recurrent state (``None`` before the first call)."""
    from mlx_lm.models.cache import ArraysCache

    return ArraysCache(2)


def _as_mlx_lm_cache(entry):
    """A layer's cache as one mlx-lm cache object: a tuple (a layer with several
    caches, e.g. Falcon-H1's SSM state and keys/values) becomes a ``CacheList``
    (indexable and unpackable like the tuple); ``None`` (a stateless block, e.g.
    Nemotron-H's MLP layers) an empty, never-written ``ArraysCache(1)``, since
    mlx-lm reads ``.state`` of every entry (prompt-cache files, evaluation)."""
    if isinstance(entry, (tuple, list)):
        from mlx_lm.models.cache import CacheList

        return CacheList(*entry)
    if entry is None:
        from mlx_lm.models.cache import ArraysCache

        return ArraysCache(1)
    return entry


def is_batch_cache(cache) -> bool:
    """Whether ``cache`` is one of mlx-lm's batch caches (``BatchKVCache``,
    ``BatchRotatingKVCache``, what its BatchGenerator and server merge several
    sequences into): one offset per sequence (an array) and left padding."""
    return cache is not None and not isinstance(cache.offset, int)


def refuse_padded_batch(caches, model_type: str) -> None:
    """Refuse what these models cannot compute: mlx-lm's BatchGenerator processing
    prompts of different lengths together right-pads them and marks the padding
    in the state caches (``ArraysCache.lengths``); recurrent layers here run
    through the padding, which would enter the state. Attention layers handle
    mlx-lm's padding (:func:`attend`), and sequences of different lengths decode
    together correctly; only such prompt batches are refused."""
    for c in caches:
        for sub in getattr(c, "caches", None) or (c,):
            if getattr(sub, "lengths", None) is not None:
                raise ValueError(
                    f"hybridconv's {model_type} model cannot process prompts of different lengths in one "
                    "batch (the padding would enter its recurrent state): run mlx_lm.server with "
                    "--prompt-concurrency 1")


class Attention(nn.Module):
    """Grouped-query attention in the Llama layout (``q_proj``, ``k_proj``,
    ``v_proj``, ``o_proj``, optional biases) around :func:`attend`.

    ``rope``: an ``nn.RoPE`` (possibly over part of the head: ``dims <
    head_dim`` rotates the first ``dims`` channels and passes the rest, as
    transformers' partial rotary does) or ``None`` for no position embedding.
    ``scale``: the logit scale (``head_dim ** -0.5`` unless a model says
    otherwise, e.g. Granite's ``attention_multiplier``)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        bias: bool = False,
        rope=None,
        scale: Optional[float] = None,
        window: Optional[int] = None,
    ):
        super().__init__()
        self.n_q, self.n_kv, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.rope = rope
        self.scale = head_dim**-0.5 if scale is None else scale
        self.window = window

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.n_q, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, T, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)
        return self.o_proj(attend(q, k, v, self.rope, cache, self.window, self.scale))


class BaseModelArgs:
    """Base of every architecture's ``ModelArgs`` dataclass: ``from_dict`` takes
    the keys of a normalised config that are fields and ignores the rest (the
    config also carries ``quantization``, ``dtype``, architectures, ...)."""

    @classmethod
    def from_dict(cls, cfg: dict):
        names = cls.__dataclass_fields__
        args = cls(**{k: v for k, v in cfg.items() if k in names})
        # The checkpoint's float dtype, for the activations (CausalLM); not a
        # field: it does not describe the architecture.
        args.config_dtype = cfg.get("dtype") or cfg.get("torch_dtype")
        return args


class CausalLM(nn.Module):
    """The causal-LM frame every architecture shares: embedding → blocks → final
    norm → head (tied to the embedding unless ``tie_word_embeddings`` is false).

    A subclass declares, as class attributes, where its parameters live (the
    names are the checkpoint's and mlx-lm's, so they are the parameter paths):

    * ``trunk_name``: the attribute holding the trunk (``"model"`` or
      ``"backbone"``); a trunk module is passed to ``__init__``, or for the
      plain trunk (an embedding, the blocks, a final norm) only its
      ``layers=`` and ``norm=``;
    * ``embedding_name``: the trunk's ``nn.Embedding`` (``"embed_tokens"``,
      ``"embeddings"``);
    * ``norm_name``: the trunk's final norm (``"norm"``, ``"final_layernorm"``,
      ``"norm_f"``, ...);

    and overrides only what differs from the plain frame:

    * ``scale_embeddings(h)`` / ``scale_logits(logits)``: multipliers on the
      embedding output / the logits (µP multipliers, Gemma's √d, soft caps);
      identity by default;
    * ``layer_cache(layer)``: the decoding cache a block needs (a
      :func:`KVCache`, :func:`WindowKVCache`, :func:`StateCache`, a tuple
      of them, or ``None`` for a stateless block); by default a
      :func:`KVCache` for a block of kind ``"attention"``, else a
      :func:`StateCache`;
    * ``call_layer(layer, h, cache, x0)``: how a block is called (``x0``: the
      embedding output, which Zamba2's shared blocks read again, and whose
      dtype is the activations' dtype); by default ``layer(h, cache=cache)``;
    * ``final_norm(h, dtype)``: the final norm (``dtype``: the activations'
      dtype, for models whose residual stream runs in float32); by default the
      trunk's ``norm_name`` module;
    * ``block_output(h)`` / ``block_input(reference, own)``: for models whose
      blocks pass more than the residual stream to the next block (ZAYA's
      router state, carried in extra channels of ``h``): the part of a block's
      output that the reference's decoder layer returns (what verify compares;
      by default all of ``h``), and a block's input rebuilt from the
      reference's output of the previous block and this model's own output of
      it (verify's blocks on the reference's inputs; by default the reference's);
    * ``layers``: the list of blocks (by default ``trunk.layers``).

    It gets what the loader, verify and decoding use: ``args``,
    ``model_type``, ``lm_head`` when untied, ``layers``, ``block_kinds()``
    (each block's ``kind``), ``activation_dtype`` (the checkpoint's float
    dtype from the config's ``dtype``/``torch_dtype``, which the loader may
    override; the embedding output is cast to it, since a quantized embedding
    may dequantize to another dtype), ``embed``, ``head``,
    ``__call__(inputs, cache=None, hidden_states=None)`` (every block's output
    appended to ``hidden_states`` when it is a list: verify's localisation)
    and ``make_cache()`` (one mlx-lm cache per block: what mlx-lm's generate,
    prompt cache and server use).
    """

    trunk_name = "model"
    embedding_name = "embed_tokens"
    norm_name = "norm"

    # Activations dtype: the checkpoint's float dtype (set by the loader).
    activation_dtype = None

    def __init__(self, args, trunk: Optional[nn.Module] = None, *, layers: Optional[list] = None,
                 norm: Optional[nn.Module] = None):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        if trunk is None:  # the plain trunk: embedding, ``layers``, final ``norm``
            trunk = nn.Module()
            setattr(trunk, self.embedding_name, nn.Embedding(args.vocab_size, args.hidden_size))
            trunk.layers = layers
            setattr(trunk, self.norm_name, norm)
        setattr(self, self.trunk_name, trunk)
        # Activations in the checkpoint's float dtype, whoever loads the model
        # (hybridconv's loader may set another: the float32 compute path).
        dtype = getattr(args, "config_dtype", None)
        if dtype in ("float32", "float16", "bfloat16"):
            self.activation_dtype = getattr(mx, dtype)
        if not self.tied:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def tied(self) -> bool:
        """Whether the head is the embedding matrix (configs without the key: untied)."""
        return bool(getattr(self.args, "tie_word_embeddings", False))

    @property
    def trunk(self) -> nn.Module:
        return getattr(self, self.trunk_name)

    @property
    def layers(self) -> list:
        return self.trunk.layers

    def block_kinds(self) -> list[str]:
        return [layer.kind for layer in self.layers]

    def scale_embeddings(self, h: mx.array) -> mx.array:
        return h

    def scale_logits(self, logits: mx.array) -> mx.array:
        return logits

    def layer_cache(self, layer):
        # An attention block keeps its key/value history; any other block its
        # recurrent state (conv state, then the SSM / delta-rule / LRU state).
        return KVCache() if layer.kind == "attention" else StateCache()

    def call_layer(self, layer, h: mx.array, cache, x0: mx.array) -> mx.array:
        return layer(h, cache=cache)

    def final_norm(self, h: mx.array, dtype=None) -> mx.array:
        return getattr(self.trunk, self.norm_name)(h)

    def block_output(self, h: mx.array) -> mx.array:
        return h

    def block_input(self, reference: mx.array, own: mx.array) -> mx.array:
        return reference

    def embed(self, inputs: mx.array) -> mx.array:
        h = getattr(self.trunk, self.embedding_name)(inputs)
        if self.activation_dtype is not None:
            h = h.astype(self.activation_dtype)
        return self.scale_embeddings(h)

    def head(self, h: mx.array, dtype=None) -> mx.array:
        h = self.final_norm(h, dtype)
        if self.tied:
            logits = getattr(self.trunk, self.embedding_name).as_linear(h)
        else:
            logits = self.lm_head(h)
        return self.scale_logits(logits)

    def __call__(self, inputs: mx.array, cache=None, hidden_states=None) -> mx.array:
        """Logits for ``inputs``; if ``hidden_states`` is a list, the output of
        every block is appended to it (used to localise divergence)."""
        h = x0 = self.embed(inputs)
        if cache is not None:
            refuse_padded_batch(cache, self.model_type)
        caches = cache if cache is not None else [None] * len(self.layers)
        for layer, c in zip(self.layers, caches):
            h = self.call_layer(layer, h, c, x0)
            if hidden_states is not None:
                hidden_states.append(self.block_output(h))
        return self.head(h, x0.dtype)

    def make_cache(self) -> list:
        """One mlx-lm cache per block (``layer_cache``'s, a tuple as a ``CacheList``,
        ``None`` as an empty placeholder): what mlx-lm's ``make_prompt_cache`` calls."""
        return [_as_mlx_lm_cache(self.layer_cache(layer)) for layer in self.layers]
