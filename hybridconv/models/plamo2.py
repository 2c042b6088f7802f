"""PLaMo-2 (Preferred Networks): Mamba-2 mixers interleaved with attention.

Architecture
============
A decoder-only stack of ``num_hidden_layers`` layers. Every layer is
``x + post_mixer_norm(mixer(pre_mixer_norm(x)))`` followed by
``x + post_mlp_norm(mlp(pre_mlp_norm(x)))``, where ``mixer`` is either a Mamba-2
SSM block or grouped-query attention. Embeddings may be tied to the output head.

Layer schedule (``mamba_step``)
-------------------------------
Layer ``i`` is attention when ``i % mamba_step == mamba_step // 2`` and Mamba
otherwise; with ``mamba_step = 2`` that is Mamba, attention, Mamba, attention…
When the stack is too short to reach the first attention slot
(``num_hidden_layers <= mamba_step // 2``) the *last* layer is attention so the
model still has one. ``mamba_enabled = false`` makes every layer attention.
(mlx-lm indexes its caches with ``mamba_step // 2`` and crashes in that short
case; here the schedule is a list and nothing is indexed by the rule.)

Four norms per layer, with offsets
----------------------------------
PLaMo-2 normalises both *before* and *after* each sub-block ("sandwich" norm):
the post-norms bound the size of what each sub-block adds to the residual
stream, which keeps deep hybrid stacks stable in training. Norm weights are
stored as differences from a fixed scale: ``scale = weight + offset`` with
offset ``1`` for the two pre-norms and the final norm, ``1/5`` for the
post-mixer norm and ``1/5**1.5`` for the post-MLP norm (small initial
contributions from each sub-block, a depth-scaled initialisation written into
the parameterisation).

The Mamba-2 mixer, step by step (Dao & Gu, 2024, "Transformers are SSMs:
Generalized Models and Efficient Algorithms Through Structured State Space
Duality", arXiv:2405.21060)
--------------------------------------------------------------------------------
With ``H = mamba_num_heads`` heads of ``P = hidden_size_per_head`` channels and
state size ``N = mamba_d_state``:

1. ``in_proj`` maps ``x`` to ``2·H·P`` features, laid out *per head* as
   ``[z_h | x_h]`` (``P`` each): reshape to ``[H, 2P]`` and split, not a split of
   the flat vector in halves.
2. ``x`` goes through a causal depthwise conv1d of width ``mamba_d_conv`` (no
   bias) and SiLU.
3. ``bcdt_proj(x)`` gives ``B`` (``N``), ``C`` (``N``) and a low-rank ``dt``
   (``max(64, hidden/16)``), each RMS-normalised with its own weight
   (``B_norm_weight``, ``C_norm_weight``, ``dt_norm_weight``; no offset).
   ``B`` and ``C`` are shared by all heads (one group).
4. ``dt = softplus(dt_proj(dt) + dt_bias)`` per head, with **no clip**. This is
   the authors' semantics: Preferred Networks' own MLX port of their modeling
   code (ml-explore/mlx-examples, ``llms/mlx_lm/models/plamo2.py`` at commit
   fb1559e1) applies softplus only, and vLLM's PLaMo-2 passes
   ``dt_limit=(0.0, inf)``. mlx-lm clips to ``[1e-3, 100]``, the default of its
   generic ``ssm_update``, which belongs to no checkpoint: trained Mamba-2
   heads use time steps near and below 1e-3 (initialisation draws them from
   ``[1e-3, 0.1]``), where the clip changes the model.
5. ``A = -exp(A_log)`` (the checkpoint stores the log of ``-A`` so that ``A``
   stays negative, i.e. the state decays). Per head and step, with
   ``h ∈ R^{P×N}``::

       h_t = exp(dt_t · A) · h_{t-1} + dt_t · x_t ⊗ B_t
       y_t = h_t · C_t + D · x_t                      (D: per-head skip)

6. Output gate: ``out_proj(silu(z) * y)``.

Prefill evaluates the recurrence in the SSD "chunked" form (vectorised over
time) of the shared core :func:`hybridconv.models.ssm.ssd_scan` (one group: ``B``
and ``C`` shared by all heads): within a chunk of ``mamba_chunk_size`` steps the
output is a masked, decay-weighted attention-like product
``(C_t·B_s)·exp(Σ_{s<k≤t} dt_k A)``; the state is carried from chunk to chunk.
Decoding runs the same code on one step.

Attention
---------
Fused ``qkv_proj`` (``num_attention_heads`` query heads,
``num_key_value_heads`` key/value heads of ``hidden_size_per_head``), then
*QK normalisation*: each of q and k is RMS-normalised per head without weight
and multiplied by a learned per-head, per-channel weight (``q_weight``
``[H_q, d]``, ``k_weight`` ``[H_kv, d]``). Rotary embeddings over the full head,
``rope_theta`` (10000 by default).

Sliding window. A layer listed in ``full_attention_idx`` attends to the whole
history; every other attention layer attends within a window of
``W = attention_window_size``: a query sees **itself and the W positions before
it, W + 1 in all**. That is the authors' mask (their port builds
``swa_mask = tril(triu(ones, -W), W)`` on top of the causal mask) and their
cache holds the ``W`` past keys; here the windowed layer's
:class:`~hybridconv.models.common.WindowKVCache` is built with span ``W + 1``
(common's window counts the query itself, transformers' convention, which
RecurrentGemma uses) and so keeps ``W`` past positions: memory stays flat on
long generations. mlx-lm applies no window at all (a TODO; every layer gets a
full KV cache).

Evidence for both choices: on the oracle case ``plamo2-window-tiny`` (oracle:
the authors' port; window 8, 40 tokens, two heads with time steps near 1e-4),
the earlier semantics here (clip at 1e-3, a window of W positions) were off by
max |Δlogit| 7.2 and mlx-lm by 10.3; this module matches it to 1e-5. The older
fixtures ``plamo2-tiny*`` (made with mlx-lm) stay clear of both differences
(sequences shorter than the window, no time step below 1e-3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .common import (
    BaseModelArgs,
    CausalLM,
    KVCache,
    OffsetRMSNorm,
    StateCache,
    WindowKVCache,
    attend,
    causal_depthwise_conv,
)
from .ssm import ssd_scan

@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "plamo2"
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    hidden_size_per_head: int = 128
    max_position_embeddings: int = 2048
    attention_window_size: int = 2048
    full_attention_idx: list[int] = field(default_factory=list)
    mamba_d_state: int = 64
    mamba_d_conv: int = 4
    mamba_num_heads: int = 64
    mamba_step: int = 2
    mamba_chunk_size: int = 256
    mamba_enabled: bool = True
    intermediate_size: int = 13312
    vocab_size: int = 32000
    rope_theta: float = 10000.0


def layer_schedule(args: ModelArgs) -> list[str]:
    """``"mamba"`` or ``"attention"`` for every layer (see module docstring)."""
    n, step = args.num_hidden_layers, args.mamba_step
    if not args.mamba_enabled:
        return ["attention"] * n
    if n <= step // 2:
        return ["mamba"] * (n - 1) + ["attention"]
    return ["attention" if i % step == step // 2 else "mamba" for i in range(n)]


def layer_windows(args: ModelArgs) -> list[int | None]:
    """Attention window per layer (``None``: Mamba, or full attention)."""
    full = set(args.full_attention_idx or [])
    return [
        None if kind == "mamba" or i in full else args.attention_window_size
        for i, kind in enumerate(layer_schedule(args))
    ]


def dt_dim(args: ModelArgs) -> int:
    return max(64, args.hidden_size // 16)


class Mamba(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.num_heads = args.mamba_num_heads
        self.head_dim = args.hidden_size_per_head
        self.d_state = args.mamba_d_state
        self.chunk_size = args.mamba_chunk_size
        self.dt_dim = dt_dim(args)
        inner = self.num_heads * self.head_dim
        self.in_proj = nn.Linear(args.hidden_size, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(
            inner, inner, args.mamba_d_conv, groups=inner, bias=False
        )
        self.bcdt_proj = nn.Linear(inner, self.dt_dim + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_dim, self.num_heads, bias=False)
        self.dt_bias = mx.zeros((self.num_heads,))
        self.A_log = mx.zeros((self.num_heads,))
        self.D = mx.ones((self.num_heads,))
        self.dt_norm_weight = mx.ones((self.dt_dim,))
        self.B_norm_weight = mx.ones((self.d_state,))
        self.C_norm_weight = mx.ones((self.d_state,))
        self.out_proj = nn.Linear(inner, args.hidden_size, bias=False)

    def __call__(self, h: mx.array, cache: Optional[StateCache] = None) -> mx.array:
        b, T, _ = h.shape
        eps = self.args.rms_norm_eps
        zx = self.in_proj(h).reshape(b, T, self.num_heads, 2 * self.head_dim)
        z, x = zx[..., : self.head_dim], zx[..., self.head_dim :]
        x = x.reshape(b, T, -1)

        conv_state = cache[0] if cache is not None else None
        x, conv_state = causal_depthwise_conv(x, self.conv1d.weight, None, conv_state)
        x = nn.silu(x)

        bcdt = self.bcdt_proj(x)
        Bm = bcdt[..., : self.d_state]
        Cm = bcdt[..., self.d_state : 2 * self.d_state]
        dt = bcdt[..., 2 * self.d_state :]
        Bm = mx.fast.rms_norm(Bm, self.B_norm_weight.astype(Bm.dtype), eps)
        Cm = mx.fast.rms_norm(Cm, self.C_norm_weight.astype(Cm.dtype), eps)
        dt = mx.fast.rms_norm(dt, self.dt_norm_weight.astype(dt.dtype), eps)
        dt = self.dt_proj(dt).astype(mx.float32)
        # No clip: the authors' code applies softplus only (see module docstring).
        dt = nn.softplus(dt + self.dt_bias.astype(mx.float32))
        A = -mx.exp(self.A_log.astype(mx.float32))

        ssm_state = cache[1] if cache is not None else None
        y, ssm_state = ssd_scan(
            x.reshape(b, T, self.num_heads, self.head_dim).astype(mx.float32),
            dt,
            A,
            Bm.astype(mx.float32),
            Cm.astype(mx.float32),
            self.D.astype(mx.float32),
            ssm_state,
            self.chunk_size,
        )
        if cache is not None:
            cache[0], cache[1] = conv_state, ssm_state
        y = y.astype(h.dtype).reshape(b, T, -1)
        return self.out_proj(nn.silu(z.reshape(b, T, -1)) * y)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, window: Optional[int]):
        super().__init__()
        d = args.hidden_size_per_head
        self.n_q, self.n_kv, self.head_dim = (
            args.num_attention_heads,
            args.num_key_value_heads,
            d,
        )
        self.window = window
        # Positions a windowed query attends to: itself and the ``window`` before
        # it (the authors' mask). common.attend and WindowKVCache count the query
        # itself in their window (transformers' convention), hence the + 1.
        self.span = None if window is None else window + 1
        self.scale = d**-0.5
        self.qkv_proj = nn.Linear(
            args.hidden_size, (self.n_q + 2 * self.n_kv) * d, bias=False
        )
        self.o_proj = nn.Linear(self.n_q * d, args.hidden_size, bias=False)
        self.q_weight = mx.ones((self.n_q, d))
        self.k_weight = mx.ones((self.n_kv, d))
        self.rope = nn.RoPE(d, traditional=False, base=args.rope_theta)

    def __call__(self, h: mx.array, cache=None) -> mx.array:
        b, T, _ = h.shape
        d = self.head_dim
        qkv = self.qkv_proj(h)
        q = qkv[..., : self.n_q * d].reshape(b, T, self.n_q, d).transpose(0, 2, 1, 3)
        k = qkv[..., self.n_q * d : (self.n_q + self.n_kv) * d]
        k = k.reshape(b, T, self.n_kv, d).transpose(0, 2, 1, 3)
        v = qkv[..., (self.n_q + self.n_kv) * d :]
        v = v.reshape(b, T, self.n_kv, d).transpose(0, 2, 1, 3)
        # QK norm: per-head RMSNorm (fixed eps, as in PLaMo-2) with a [heads, d] weight.
        q = mx.fast.rms_norm(q, None, 1e-6) * self.q_weight[:, None].astype(q.dtype)
        k = mx.fast.rms_norm(k, None, 1e-6) * self.k_weight[:, None].astype(k.dtype)
        return self.o_proj(attend(q, k, v, self.rope, cache, self.span, self.scale))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = nn.Linear(
            args.hidden_size, 2 * args.intermediate_size, bias=False
        )
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, kind: str, window: Optional[int]):
        super().__init__()
        self.kind = kind
        self.is_mamba = kind == "mamba"
        self.mixer = Mamba(args) if self.is_mamba else Attention(args, window)
        self.mlp = MLP(args)
        eps = args.rms_norm_eps
        self.pre_mixer_norm = OffsetRMSNorm(args.hidden_size, eps, offset=1.0)
        self.post_mixer_norm = OffsetRMSNorm(args.hidden_size, eps, offset=1.0 / 5)
        self.pre_mlp_norm = OffsetRMSNorm(args.hidden_size, eps, offset=1.0)
        self.post_mlp_norm = OffsetRMSNorm(args.hidden_size, eps, offset=1.0 / 5**1.5)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        x = x + self.post_mixer_norm(self.mixer(self.pre_mixer_norm(x), cache=cache))
        return x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x)))


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.layers = [
            DecoderLayer(args, kind, window)
            for kind, window in zip(layer_schedule(args), layer_windows(args))
        ]


class PlamoModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = Decoder(args)  # parameter path model.layers.layers.N, as in HF
        self.norm = OffsetRMSNorm(args.hidden_size, args.rms_norm_eps, offset=1.0)


class Model(CausalLM):
    """PLaMo-2 for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``."""

    def __init__(self, args: ModelArgs):
        super().__init__(args, PlamoModel(args))

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers.layers

    def layer_cache(self, layer: DecoderLayer):
        if layer.is_mamba:
            return StateCache()  # [conv state, SSM state]
        if layer.mixer.window is None:
            return KVCache()
        return WindowKVCache(layer.mixer.span)  # keeps `window` past positions
