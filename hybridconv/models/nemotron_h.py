"""Nemotron-H (NVIDIA): Mamba-2, attention, MLP and MoE layers in a pattern.

Architecture
============
NVIDIA 2025, "Nemotron-H: A Family of Accurate and Efficient Hybrid
Mamba-Transformer Models" (arXiv:2504.03624); the MoE variant is Nemotron 3
Nano. A stack of single-mixer pre-norm residual blocks — unlike most hybrids a
layer holds *one* sub-block, so MLPs are layers of their own::

    x = x + mixer(norm(x))            mixer: Mamba-2 | attention | MLP | MoE

then ``norm_f`` and an untied ``lm_head`` (transformers never ties them,
whatever ``tie_word_embeddings`` says). Norms are plain RMSNorms
(``layer_norm_epsilon``) computed in float32.

Layer schedule
--------------
Published configs give ``hybrid_override_pattern``, one character per layer:
``M`` Mamba-2, ``*`` attention, ``-`` MLP, ``E`` MoE (e.g. Nemotron-H-8B:
``M-M-M-M*-M-…``). transformers 5 writes the list ``layers_block_type`` of
``linear_attention`` / ``full_attention`` / ``mlp`` / ``moe`` and derives the
layer count from it. The converter reads either and writes both; the schedule
kinds here are ``mamba``, ``attention``, ``mlp`` and ``moe``.

Mamba-2 (Dao & Gu, 2024, arXiv:2405.21060)
------------------------------------------
transformers' Mamba2Mixer layout (:class:`hybridconv.models.ssm.Mamba2Mixer`;
the recurrence, SSD chunked form and grouped gated norm are documented there):
``I = mamba_num_heads · mamba_head_dim`` channels, ``n_groups`` B/C groups,
state ``ssm_state_size``, conv width ``conv_kernel`` (bias
``use_conv_bias``), ``in_proj``/``out_proj`` bias ``use_bias``, output
``out_proj(rmsnorm_g(y ⊙ silu(z)) · w)`` with statistics per group of
``I / n_groups`` channels (``eps = layer_norm_epsilon``). The time step is
``Δ = max(softplus(dt + dt_bias), time_step_min)``: transformers' Nemotron-H
mixer clamps from below at ``time_step_min`` with no upper limit, whatever
``time_step_limit`` says.

Attention
---------
Grouped-query attention (``q_proj`` … ``o_proj``, never biased) with
``head_dim`` from the config and **no position embedding** at all (NoPE: the
Mamba layers carry position); full causal (a ``sliding_window`` in the
config is ignored by transformers, and here).

MLP and MoE
-----------
MLP: ``down(relu²(up(x)))`` (``mlp_hidden_act = relu2``, squared ReLU, So et
al. 2021, arXiv:2109.08668), not gated. MoE (DeepSeek-V3 routing, Liu et al.
2024, arXiv:2412.19437, via :func:`hybridconv.models.moe.route`): router
logits ``W_r x`` in float32, scores ``s = σ(logits)``; experts are *chosen* by
``s + e_score_correction_bias`` (only among the ``topk_group`` best of
``n_group`` groups, a group scored by the sum of its two best) and *weighted*
by ``s``, renormalised over the chosen ``k = num_experts_per_tok`` when
``norm_topk_prob`` (``Σ + 1e-20``), times ``routed_scaling_factor``. Each of
``n_routed_experts`` experts is a relu² MLP of ``moe_intermediate_size``,
run as gathered matmuls over stacked weights (mlx-lm's ``switch_mlp.fc1`` /
``fc2`` names); with ``moe_latent_size`` the experts work in a smaller space
(``fc1_latent_proj`` before, ``fc2_latent_proj`` after; routing still reads
``x``). One always-on shared expert (relu² MLP of
``moe_shared_expert_intermediate_size``) is added::

    y = fc2_latent(Σ_k w_k · expert_k(fc1_latent(x))) + shared(x)

The weighted sum is accumulated in float32, as transformers does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .common import Attention, BaseModelArgs, CausalLM, KVCache, StateCache
from .moe import SwitchLinear, _run_experts, relu2, route
from .ssm import Mamba2Mixer

KINDS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
ACTIVATIONS = {"relu2": relu2, "relu": nn.relu, "silu": nn.silu, "gelu": nn.gelu}


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "nemotron_h"
    hidden_size: int = 4096
    num_hidden_layers: int = 52
    vocab_size: int = 131072
    hybrid_override_pattern: str = ""
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 21504
    mlp_hidden_act: str = "relu2"
    mlp_bias: bool = False
    layer_norm_epsilon: float = 1e-5
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    use_bias: bool = False
    time_step_min: float = 1e-3
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: Optional[int] = None
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0


def layer_schedule(args: ModelArgs) -> list[str]:
    """``mamba`` / ``attention`` / ``mlp`` / ``moe`` per layer, from the pattern."""
    return [KINDS[c] for c in args.hybrid_override_pattern]


def layer_windows(args: ModelArgs) -> list[Optional[int]]:
    return [None] * len(args.hybrid_override_pattern)  # full causal attention


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, intermediate: int):
        super().__init__()
        self.up_proj = nn.Linear(args.hidden_size, intermediate, bias=args.mlp_bias)
        self.down_proj = nn.Linear(intermediate, args.hidden_size, bias=args.mlp_bias)
        self.act = ACTIVATIONS[args.mlp_hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.up_proj(x)))


class Router(nn.Module):
    """Router weight ``[E, H]`` and correction bias ``[E]`` (kept float32), mlx-lm's
    ``gate`` layout (plain arrays, not a Linear: the router is never quantized)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))
        self.e_score_correction_bias = mx.zeros((args.n_routed_experts,))

    def __call__(self, x: mx.array) -> mx.array:
        return x.astype(mx.float32) @ self.weight.astype(mx.float32).T


class Experts(nn.Module):
    """Non-gated relu² experts, stacked ``[E, out, in]`` (mlx-lm's ``fc1``/``fc2``)."""

    def __init__(self, dims: int, intermediate: int, num_experts: int, act):
        super().__init__()
        self.fc1 = SwitchLinear(dims, intermediate, num_experts)
        self.fc2 = SwitchLinear(intermediate, dims, num_experts)
        self.act = act

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        return _run_experts(x, indices, lambda h, idx, s: self.fc2(self.act(self.fc1(h, idx, s)), idx, s))


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        dims = args.moe_latent_size or args.hidden_size
        self.gate = Router(args)
        self.switch_mlp = Experts(dims, args.moe_intermediate_size, args.n_routed_experts, ACTIVATIONS[args.mlp_hidden_act])
        self.shared_experts = MLP(args, args.moe_shared_expert_intermediate_size)
        if args.moe_latent_size is not None:
            self.fc1_latent_proj = nn.Linear(args.hidden_size, args.moe_latent_size, bias=args.mlp_bias)
            self.fc2_latent_proj = nn.Linear(args.moe_latent_size, args.hidden_size, bias=args.mlp_bias)

    def __call__(self, x: mx.array) -> mx.array:
        a = self.args
        inds, weights = route(
            self.gate(x),
            a.num_experts_per_tok,
            score="sigmoid",
            norm_topk=a.norm_topk_prob,
            correction_bias=self.gate.e_score_correction_bias,
            routed_scaling=a.routed_scaling_factor,
            n_group=a.n_group,
            topk_group=a.topk_group,
            norm_eps=1e-20,
        )
        h = self.fc1_latent_proj(x) if "fc1_latent_proj" in self else x
        y = self.switch_mlp(h, inds)
        y = (y.astype(mx.float32) * weights[..., None]).sum(axis=-2).astype(x.dtype)
        if "fc2_latent_proj" in self:
            y = self.fc2_latent_proj(y)
        return y + self.shared_experts(x)


def make_mixer(args: ModelArgs, kind: str) -> nn.Module:
    if kind == "mamba":
        return Mamba2Mixer(
            hidden_size=args.hidden_size,
            num_heads=args.mamba_num_heads,
            head_dim=args.mamba_head_dim,
            n_groups=args.n_groups,
            d_state=args.ssm_state_size,
            d_conv=args.conv_kernel,
            chunk_size=args.chunk_size,
            use_conv_bias=args.use_conv_bias,
            use_bias=args.use_bias,
            norm_eps=args.layer_norm_epsilon,
            time_step_limit=(args.time_step_min, math.inf),
        )
    if kind == "attention":
        return Attention(
            args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim, bias=False, rope=None
        )
    if kind == "mlp":
        return MLP(args, args.intermediate_size)
    return MoE(args)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, kind: str):
        super().__init__()
        self.kind = kind
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.layer_norm_epsilon)
        self.mixer = make_mixer(args, kind)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        h = self.norm(x)
        h = self.mixer(h, cache=cache) if self.kind in ("mamba", "attention") else self.mixer(h)
        return x + h


class Model(CausalLM):
    """Nemotron-H for causal LM. ``model(ids[B, T], cache=None) -> logits[B, T, V]``.

    The head is never tied (the config has no ``tie_word_embeddings``)."""

    trunk_name, embedding_name, norm_name = "backbone", "embeddings", "norm_f"

    def __init__(self, args: ModelArgs):
        super().__init__(
            args,
            layers=[Block(args, kind) for kind in layer_schedule(args)],
            norm=nn.RMSNorm(args.hidden_size, eps=args.layer_norm_epsilon),
        )

    def layer_cache(self, layer: Block):
        # None for MLP / MoE layers, which keep no state.
        return StateCache() if layer.kind == "mamba" else KVCache() if layer.kind == "attention" else None
