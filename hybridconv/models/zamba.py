"""Zamba (v1, Zyphra): a multi-head Mamba-1 backbone that calls one *shared*
attention/MLP block.

Glorioso et al. 2024, "Zamba: A Compact 7B SSM Hybrid Model"
(arXiv:2405.16712); transformers' ``ZambaForCausalLM`` (Zyphra/Zamba-7B-v1).
Zamba2 (:mod:`hybridconv.models.zamba2`) grew out of it; this module is
Zamba2's frame with Zamba's pieces: the layer schedule, the shared-block
bookkeeping (one copy, each caller its own key/value cache), the hybrid and
Mamba layers and the shared attention are Zamba2's classes.

Architecture and schedule
=========================
A stack of ``num_hidden_layers`` Mamba-1 layers; the ``"hybrid"`` ones first
call the shared transformer block — the same weights at every call — on the
concatenation of the current hidden state and the token embeddings ``e`` (kept
from the start of the stack), and add its output, through the layer's own
``linear``, to the Mamba layer's input::

    mamba layer:   x = x + mamba(input_layernorm(x))
    hybrid layer:  t = linear(shared_block(x, e))
                   x = x + mamba(input_layernorm(x + t))

then ``final_layernorm`` and the head (tied to the embeddings by default). The
schedule is ``layers_block_type``: ``"mamba"`` (transformers 5:
``"linear_attention"``) or ``"hybrid"``; when a config does not list it,
transformers derives it as ``mamba, mamba, hybrid`` followed by ``hybrid`` at
every ``i % attn_layer_period == attn_layer_offset`` of the remaining layers
(the converter writes the list). Norms are RMSNorms (``rms_norm_eps``).

The shared block::

    u = input_layernorm([x | e])                       (2·hidden wide)
    a = attention(u)                                   → hidden
    t = mlp(pre_ff_layernorm(a))                       down(act(gate(·)) ⊙ up(·)), hidden_act (GELU)

Attention reads ``[x | e]`` with ``num_attention_heads`` heads of
``attention_head_dim`` (``2·hidden / heads``) channels, grouped KV heads,
logits scaled by ``(head_dim / 2)^-1/2`` (the paper's ``√(d/2)``: the head is
twice as wide as the residual stream's share), no position embedding, full
causal. Unlike Zamba2 there are no per-use adapters and only one block;
transformers ties every hybrid layer's ``shared_transf`` to the first one — but,
as for Zamba2, only with ``tie_word_embeddings`` (every published Zamba):
untied, each hybrid layer keeps its own block (``tie_shared_blocks``).

The multi-head Mamba-1 mixer
============================
:class:`hybridconv.models.ssm.MultiHeadMamba1Mixer` (Mamba-1, Gu & Dao 2023,
arXiv:2312.00752, split into ``n_mamba_heads`` heads): ``I = mamba_expand ·
hidden`` channels from ``in_proj`` (``x`` and the gate ``z`` interleaved), a
causal depthwise conv (``mamba_d_conv``, bias ``mamba_conv_bias``) and SiLU on
``x``, then per head its own ``[δ | B | C] = x_proj_weight[h] · x_h``
(``mamba_dt_rank + 2·mamba_d_state``), ``Δ = softplus(dt_proj_weight[h] · δ +
dt_proj_bias[h])`` and the selective scan ``h_t = exp(Δ A) h_{t−1} + Δ x ⊗
B_t``, ``y = h_t C_t + D x`` (no clamp on Δ), ``out_proj(y ⊙ silu(z))`` over all
heads. Prefill runs the chunked parallel scan, decoding the same code on one
step (a :class:`~hybridconv.models.common.StateCache`; a hybrid layer adds the
:class:`~hybridconv.models.common.KVCache` of its call of the shared block).

Verify's localisation hooks transformers' ``model.layers`` (one output per
layer, a hybrid layer's after its Mamba step), which is what the frame
records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import mlx.core as mx
import mlx.nn as nn

from .common import BaseModelArgs
from .ssm import MultiHeadMamba1Mixer
from .zamba2 import ACTIVATIONS, SharedAttention, block_of, layer_schedule, layer_windows
from .zamba2 import HybridLayer as Zamba2HybridLayer
from .zamba2 import MambaLayer
from .zamba2 import Model as Zamba2

__all__ = ["ModelArgs", "Model", "layer_schedule", "layer_windows"]  # the schedule is Zamba2's


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "zamba"
    hidden_size: int = 3712
    num_hidden_layers: int = 76
    vocab_size: int = 32000
    layers_block_type: list = field(default_factory=list)  # "mamba" / "hybrid"
    intermediate_size: int = 14848
    hidden_act: str = "gelu"
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    attention_head_dim: int = 464
    n_mamba_heads: int = 2
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int = 232
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    tie_shared_blocks: bool = True  # transformers 5 ties the block only with tie_word_embeddings
    num_mem_blocks: int = 1  # one shared block (Zamba2's frame cycles over num_mem_blocks)
    use_mem_rope: bool = False  # Zamba's attention has no position embedding
    rope_theta: float = 10000.0


def make_mixer(args: ModelArgs) -> MultiHeadMamba1Mixer:
    return MultiHeadMamba1Mixer(
        hidden_size=args.hidden_size,
        intermediate_size=args.mamba_expand * args.hidden_size,
        d_state=args.mamba_d_state,
        d_conv=args.mamba_d_conv,
        time_step_rank=args.mamba_dt_rank,
        num_heads=args.n_mamba_heads,
        use_conv_bias=args.mamba_conv_bias,
        use_bias=args.mamba_proj_bias,
    )


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.act = ACTIVATIONS[args.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class SharedBlock(nn.Module):
    """The shared transformer block (transformers' ``ZambaAttentionDecoderLayer``)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(2 * args.hidden_size, eps=args.rms_norm_eps)
        self.self_attn = SharedAttention(args)  # Zamba2's, without adapters or RoPE
        self.pre_ff_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.feed_forward = MLP(args)

    def __call__(self, x: mx.array, emb: mx.array, layer=None, cache=None) -> mx.array:
        u = self.input_layernorm(mx.concatenate([x, emb], axis=-1))
        a = self.self_attn(u, (None, None, None), cache=cache)
        return self.feed_forward(self.pre_ff_layernorm(a))


class HybridLayer(Zamba2HybridLayer):
    """``linear`` + the Mamba layer after the shared block; no adapters."""

    def add_adapters(self, args: ModelArgs) -> None:
        pass


class ZambaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = []
        j = 0
        for kind in layer_schedule(args):
            mamba = MambaLayer(args, make_mixer(args))
            if kind == "hybrid":
                self.layers.append(HybridLayer(args, block_of(args, j), mamba))
                j += 1
            else:
                self.layers.append(mamba)
        n_blocks = min(args.num_mem_blocks, j) if args.tie_shared_blocks else j
        self.shared_blocks = [SharedBlock(args) for _ in range(n_blocks)]
        self.final_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(Zamba2):
    """Zamba for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``.
    (Zamba2's frame: a hybrid layer calls its shared block on ``[h, embeddings]``
    with its own key/value cache.)"""

    trunk_class = ZambaModel
