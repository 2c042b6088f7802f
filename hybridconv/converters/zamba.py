"""Zamba (v1) converter: config normalisation, shared-block and tensor rules,
quantization policy.

Architecture and math: :mod:`hybridconv.models.zamba` (the multi-head Mamba-1
mixer in :mod:`hybridconv.models.ssm`). mlx-lm has no Zamba.

Config layouts (Zyphra/Zamba-7B-v1 as published, transformers 4 and 5)
----------------------------------------------------------------------
* the schedule from ``layers_block_type`` (or its alias ``layer_types``):
  ``"mamba"`` (transformers 4) / ``"linear_attention"`` (transformers 5) or
  ``"hybrid"``, one per layer; absent, derived as transformers derives it from
  ``attn_layer_period`` / ``attn_layer_offset`` (``mamba, mamba, hybrid``, then
  ``hybrid`` where ``i % period == offset`` over the remaining layers). Written
  as the list, in the published spelling, with ``hybrid_layer_ids``.
* derived sizes as transformers derives them: ``attention_hidden_size = 2 ·
  hidden_size`` (anything else cannot run: the block reads ``[x |
  embeddings]``), ``attention_head_dim`` (alias ``head_dim``) null → ``2 ·
  hidden_size / num_attention_heads``, ``mamba_dt_rank: "auto"`` →
  ``ceil(hidden_size / 16)``; transformers' defaults for absent keys
  (``num_key_value_heads`` 16, ``n_mamba_heads`` 2, …).
* ``hidden_mamba_act`` must be ``silu`` (the only one the mixer implements, as
  every Zamba); ``hidden_act`` one of the activations the model implements.
* ``tie_shared_blocks = tie_word_embeddings`` (transformers 5 ties the shared
  block to its first caller only then; see the model) and ``num_mem_blocks: 1``
  are written for the model (Zamba2's frame).

Tensor rules, in order:

* ``drop`` a tied ``lm_head.weight``;
* the shared block (Zamba2's rules with Zamba's name, ``shared_transf``, and no
  adapters): ``rename`` the first hybrid layer's ``model.layers.F.shared_transf.*``
  → ``model.shared_blocks.0.*`` (one copy); ``drop`` the copy a checkpoint may
  hold under a later hybrid layer (transformers ties it at load); untied, each
  hybrid layer's own block → ``model.shared_blocks.j``;
* ``conv1d-to-mlx`` the Mamba conv kernels;
* ``keep-float32`` ``A_log``, ``D``, ``dt_proj_bias`` (the SSM dynamics, as for
  Mamba: rounding compounds over every step).

``in_proj`` keeps its interleaved ``[x, z]`` rows (the mixer de-interleaves its
output), and ``x_proj_weight`` / ``dt_proj_weight`` their per-head ``[heads,
out, in]`` layout, so every tensor but the conv kernels is stored as the
checkpoint has it.

Quantization policy (``hybridconv quantize``)
---------------------------------------------
Never quantized (:data:`PROTECTED`): ``A_log``, ``D``, ``dt_proj_bias``
(float32), the conv kernels and biases and every norm weight (output dtype).
Not quantizable, kept in the output dtype: the per-head ``x_proj_weight`` and
``dt_proj_weight`` (3-D, used as one batched matmul over heads, not a Linear;
4 % of a Zamba-7B Mamba layer). Quantized (:data:`ROLES`): embeddings and head
(sensitive), the mixers' ``in_proj`` (sensitive, as for Mamba: the largest
error source) and ``out_proj``, each hybrid layer's ``linear``, the shared
attention and MLP projections (the MLP's ``down_proj`` sensitive: its error
repeats at every call).

Measured by ``scripts/precision_recurrences.py`` on zamba-tiny (mean KL against
the float32 transformers reference, 24 oracle tokens / 2 × 512 random tokens):
bf16 output 4.2e-6 / 3.6e-6; the same with the conv kernels and biases in
float32 4.2e-6 / 3.6e-6 (no change: output dtype, as mlx-lm stores them); with
``A_log``, ``D``, ``dt_proj_bias`` rounded to bf16 4.4e-6 / 3.6e-6 (alone, with
float32 activations: 7.8e-9 / 8.4e-9), kept float32 as for Mamba; default 4-bit
1.2e-3 / 1.3e-3.
"""

from __future__ import annotations

import math

from ..config import pick, positive, positive_int
from ..errors import ConfigError
from ..models import zamba as model_module
from ..models.zamba2 import ACTIVATIONS
from ._common import ATTENTION_ROLES, head_rules, swiglu_roles
from .registry import Architecture, Protected, Role, register
from .rules import ConvToMLX, KeepFloat32, Rule
from .zamba2 import KIND_ALIASES, shared_block_rules

SSM_FLOAT32 = r"\.mamba\.(A_log|D|dt_proj_bias)$"


def default_schedule(n: int, period: int, offset: int) -> list[str]:
    """transformers' ``ZambaConfig`` schedule when the config lists none."""
    return ["mamba", "mamba", "hybrid"] + ["hybrid" if i % period == offset else "mamba" for i in range(n - 3)]


def normalize_config(raw: dict) -> dict:
    cfg = dict(raw)
    cfg["model_type"] = "zamba"
    hidden = cfg["hidden_size"] = positive_int(raw, "hidden_size")
    n = cfg["num_hidden_layers"] = positive_int(raw, "num_hidden_layers")
    cfg["vocab_size"] = positive_int(raw, "vocab_size")

    key = next((k for k in ("layers_block_type", "layer_types") if raw.get(k) is not None), None)
    if key is None:
        period = positive_int(raw, "attn_layer_period", default=6)
        offset = pick(raw, "attn_layer_offset", default=4, kind=int)
        kinds, key = default_schedule(n, period, offset), "attn_layer_period/attn_layer_offset"
        if len(kinds) != n:
            raise ConfigError(
                f"config.json: no layers_block_type, and transformers' default schedule has {len(kinds)} layers "
                f"for num_hidden_layers {n} (it needs at least 3)",
                "list the layer kinds in layers_block_type",
            )
    else:
        kinds = raw[key]
    if not isinstance(kinds, list) or len(kinds) != n:
        raise ConfigError(f"config.json: '{key}' must be a list of {n} layer kinds (num_hidden_layers), found {kinds!r}")
    for i, kind in enumerate(kinds):
        if kind not in KIND_ALIASES:
            raise ConfigError(f"config.json: {key}[{i}] is {kind!r}; expected one of {', '.join(KIND_ALIASES)}")
    cfg.pop("layer_types", None)
    cfg["layers_block_type"] = [KIND_ALIASES[k] for k in kinds]
    cfg["hybrid_layer_ids"] = [i for i, k in enumerate(cfg["layers_block_type"]) if k == "hybrid"]

    cfg["intermediate_size"] = positive_int(raw, "intermediate_size", default=14848)
    act = cfg["hidden_act"] = pick(raw, "hidden_act", default="gelu", kind=str)
    if act not in ACTIVATIONS:
        raise ConfigError(f"config.json: hidden_act {act!r} is not supported (expected one of {', '.join(ACTIVATIONS)})")
    mamba_act = pick(raw, "hidden_mamba_act", default="silu", kind=str)
    if mamba_act != "silu":
        raise ConfigError(f"config.json: hidden_mamba_act {mamba_act!r} is not supported (expected 'silu')")
    heads = cfg["num_attention_heads"] = positive_int(raw, "num_attention_heads", default=16)
    kv = cfg["num_key_value_heads"] = positive_int(raw, "num_key_value_heads", default=16)
    if heads % kv:
        raise ConfigError(f"config.json: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})")
    width = pick(raw, "attention_hidden_size", default=2 * hidden, kind=int)
    if width != 2 * hidden:
        raise ConfigError(
            f"config.json: attention_hidden_size is {width}; Zamba's shared block reads [hidden | embeddings], "
            f"2 * hidden_size = {2 * hidden} (transformers fails on anything else)"
        )
    cfg["attention_hidden_size"] = width
    head_dim = pick(raw, "attention_head_dim", "head_dim", default=2 * hidden // heads, kind=int)
    cfg["attention_head_dim"] = positive("attention_head_dim", head_dim)
    cfg.pop("head_dim", None)

    expand = cfg["mamba_expand"] = positive_int(raw, "mamba_expand", default=2)
    m_heads = cfg["n_mamba_heads"] = positive_int(raw, "n_mamba_heads", default=2)
    if (expand * hidden) % m_heads:
        raise ConfigError(f"config.json: n_mamba_heads ({m_heads}) must divide mamba_expand * hidden_size ({expand * hidden})")
    cfg["mamba_d_state"] = positive_int(raw, "mamba_d_state", default=16)
    cfg["mamba_d_conv"] = positive_int(raw, "mamba_d_conv", default=4)
    rank = pick(raw, "mamba_dt_rank", default="auto")
    if rank == "auto":
        rank = math.ceil(hidden / 16)
    elif isinstance(rank, bool) or not isinstance(rank, int):
        raise ConfigError(f"config.json: 'mamba_dt_rank' must be an integer or \"auto\", found {rank!r}")
    cfg["mamba_dt_rank"] = positive("mamba_dt_rank", rank)
    cfg["mamba_conv_bias"] = pick(raw, "mamba_conv_bias", default=True, kind=bool)
    cfg["mamba_proj_bias"] = pick(raw, "mamba_proj_bias", default=False, kind=bool)
    cfg["rms_norm_eps"] = pick(raw, "rms_norm_eps", default=1e-5, kind=float)
    cfg["tie_word_embeddings"] = pick(raw, "tie_word_embeddings", default=True, kind=bool)
    cfg["tie_shared_blocks"] = cfg["tie_word_embeddings"]
    cfg["num_mem_blocks"] = 1
    return cfg


def rules(cfg: dict) -> list[Rule]:
    return (
        head_rules(cfg, rotary=False)
        + shared_block_rules(cfg, source="shared_transf", adapters=False)
        + [
            ConvToMLX(r"\.mamba\.conv1d\.weight$", cfg["mamba_d_conv"], "Mamba conv1d weights"),
            KeepFloat32(SSM_FLOAT32, "SSM dynamics: rounding compounds over every step", "A_log, D, dt_proj_bias"),
        ]
    )


PROTECTED = (
    Protected(SSM_FLOAT32, "SSM dynamics: A = -exp(A_log), Δ = softplus(dt_proj_weight · δ + dt_proj_bias)"),
    Protected(r"\.mamba\.conv1d\.(weight|bias)$", "conv1d kernel: a handful of taps per channel"),
    Protected(r"norm\.weight$", "norm weights scale whole activations"),
)
ROLES = (
    Role("embed", r"^model\.embed_tokens\.weight$", sensitive=True),
    Role("lm_head", r"^lm_head\.weight$", sensitive=True),
    Role("mamba.in_proj", r"\.mamba\.in_proj\.weight$", sensitive=True),
    Role("mamba.out_proj", r"\.mamba\.out_proj\.weight$"),
    Role("hybrid.linear", r"\.layers\.\d+\.linear\.weight$"),
) + ATTENTION_ROLES + swiglu_roles("feed_forward")

ARCH = register(
    Architecture(
        model_type="zamba",
        architectures=("ZambaForCausalLM",),
        title="Zamba (multi-head Mamba-1 + a shared attention block)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)
