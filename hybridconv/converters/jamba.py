"""Jamba converter: config normalisation and tensor rules.

Architecture and math: :mod:`hybridconv.models.jamba`.

Config normalisation (the published AI21 configs and transformers 5's use the
same keys):

* the mixer schedule from ``attn_layer_period`` / ``attn_layer_offset``
  (transformers' definition, offset < period); a config that already has
  such a list (``layers_block_type``, or transformers 5's ``layer_types``
  spelling) must agree with the periods, since the reference uses the
  periods. The list is not written: mlx-lm computes the same one from the
  periods, and transformers' ``JambaConfig`` refuses the key (a read-only
  property), which broke loading the output's tokenizer through
  ``AutoTokenizer`` (``mlx_lm.load``, ``mlx_lm.generate``).
* the expert layers from ``expert_layer_period`` / ``expert_layer_offset``
  (``i % period == offset``, transformers' definition; mlx-lm's differs, see
  the model docstring); ``num_experts`` (alias ``num_local_experts``) and
  ``num_experts_per_tok`` (``1 ≤ k ≤ E``).
* ``mamba_dt_rank = "auto"`` resolved to ``ceil(hidden_size / 16)``;
  ``num_key_value_heads`` defaults to 8, ``max_position_embeddings`` to 262144
  and ``tie_word_embeddings`` to false (transformers' defaults; mlx-lm's
  differ and it requires some of them, so all are written).

Tensor rules, in order:

* ``drop`` a tied ``lm_head.weight``.
* ``conv1d-to-mlx`` ``mamba.conv1d.weight`` (``K = mamba_d_conv``).
* ``keep-float32`` ``A_log`` (``[I, N]``), ``D`` and ``dt_proj.bias``: the
  decay ``exp(Δ·A)`` with ``Δ = softplus(dt_proj(δ) + bias)`` compounds any
  rounding of these over every step.
* ``stack-experts``: the published per-expert tensors
  ``feed_forward.experts.{e}.{gate,up,down}_proj.weight`` become
  ``feed_forward.switch_mlp.{gate,up,down}_proj.weight`` ``[E, out, in]``
  (mlx-lm's layout and names). A state dict saved in transformers 5's fused
  in-memory layout (``experts.gate_up_proj`` ``[E, 2I, H]``,
  ``experts.down_proj`` ``[E, H, I]``) is split and renamed to the same.
* everything else: cast to ``--dtype``, names unchanged (``feed_forward.router``
  is mlx-lm's name too).

Quantization policy (``hybridconv quantize``)
---------------------------------------------
Never quantized (:data:`PROTECTED`): ``A_log``, ``D``, ``dt_proj.bias`` (the SSM
dynamics: float32, kept so by the conversion), the conv1d kernels and biases, and
every norm weight including the ``dt``/``B``/``C`` layernorms (these in the output
dtype, as mlx-lm stores them: README, "Quantization"). Kept in float by
default (a role with ``default="float"``): the routers (``[E, H]``). Measured
on the fixture (4-bit, 3 × 2 × 64 random tokens) the choice is invisible —
mean KL 0.00823 with float routers, 0.00822 with 4-bit ones — because a
random-weight router has no confident choices to lose; they stay float
because a rounding error there is discrete (it changes which experts run, an
error no expert's precision can absorb) and the cost is nil at published
sizes (``E·H`` against ``3·E·I·H`` expert weights: 1/43 000 of an MoE layer
of Jamba-1.5-Mini). mlx-lm keeps them at 8 bits. Quantized: embeddings and head, ``in_proj``,
``x_proj``, ``dt_proj``, ``out_proj``, the attention projections, the dense
MLPs and the stacked experts (``[E, out, in]``, group-wise along ``in``, as
mlx-lm's ``QuantizedSwitchLinear``). Sensitive (wider in mixed recipes): the
embeddings and head, ``x_proj`` (it makes ``δ``, ``B``, ``C``: every input of
the recurrence) and the ``down_proj`` of MLPs and experts.
"""

from __future__ import annotations

import math

from ..config import pick, positive, positive_int
from ..errors import ConfigError
from ..models import jamba as model_module
from ._common import (
    ATTENTION_ROLES,
    FEED_FORWARD_ROLES,
    check_activation,
    head_rules,
    normalize_attention,
    parse_layer_kinds,
)
from .registry import Architecture, Protected, Role, register
from .rules import ConvToMLX, KeepFloat32, Rename, Rule, Split, StackExperts


def _period(raw: dict, what: str, period_default: int, offset_default: int) -> tuple[int, int]:
    p = positive_int(raw, f"{what}_layer_period", default=period_default)
    o = pick(raw, f"{what}_layer_offset", default=offset_default, kind=int)
    if not 0 <= o < p:
        raise ConfigError(
            f"config.json: {what}_layer_offset ({o}) must be in 0..{what}_layer_period - 1 ({p - 1}), "
            "as transformers requires"
        )
    return p, o


def normalize_config(raw: dict) -> dict:
    cfg = dict(raw)
    cfg["model_type"] = "jamba"

    hidden = cfg["hidden_size"] = positive_int(raw, "hidden_size")
    n = cfg["num_hidden_layers"] = positive_int(raw, "num_hidden_layers")
    cfg["vocab_size"] = positive_int(raw, "vocab_size")
    cfg["intermediate_size"] = positive_int(raw, "intermediate_size")
    normalize_attention(raw, cfg, kv_default=8)
    check_activation(raw)
    cfg["attn_layer_period"], cfg["attn_layer_offset"] = _period(raw, "attn", 8, 4)
    cfg["expert_layer_period"], cfg["expert_layer_offset"] = _period(raw, "expert", 2, 1)
    p, o = cfg["attn_layer_period"], cfg["attn_layer_offset"]
    kinds = ["attention" if i % p == o else "mamba" for i in range(n)]
    for key in ("layers_block_type", "layer_types"):
        if raw.get(key) is not None and parse_layer_kinds(raw[key], n, key) != kinds:
            raise ConfigError(
                f"config.json: '{key}' disagrees with attn_layer_period {p} / attn_layer_offset {o} "
                f"(which transformers uses): {raw[key]!r}"
            )
    cfg.pop("layer_types", None)
    cfg.pop("layers_block_type", None)  # the periods say it (module docstring)
    E = cfg["num_experts"] = positive_int(raw, "num_experts", "num_local_experts", default=16)
    cfg.pop("num_local_experts", None)
    k = cfg["num_experts_per_tok"] = positive_int(raw, "num_experts_per_tok", default=2)
    if E > 1 and k > E:
        raise ConfigError(f"config.json: num_experts_per_tok ({k}) exceeds num_experts ({E})")
    cfg["mamba_d_state"] = positive_int(raw, "mamba_d_state", default=16)
    cfg["mamba_d_conv"] = positive_int(raw, "mamba_d_conv", default=4)
    cfg["mamba_expand"] = positive_int(raw, "mamba_expand", default=2)
    rank = raw.get("mamba_dt_rank", "auto")
    if rank in ("auto", None):
        rank = math.ceil(hidden / 16)
    cfg["mamba_dt_rank"] = positive("mamba_dt_rank", pick({"mamba_dt_rank": rank}, "mamba_dt_rank", kind=int))
    cfg["mamba_conv_bias"] = pick(raw, "mamba_conv_bias", default=True, kind=bool)
    cfg["mamba_proj_bias"] = pick(raw, "mamba_proj_bias", default=False, kind=bool)
    cfg["rms_norm_eps"] = pick(raw, "rms_norm_eps", default=1e-6, kind=float)
    cfg["tie_word_embeddings"] = pick(raw, "tie_word_embeddings", default=False, kind=bool)
    cfg["max_position_embeddings"] = pick(raw, "max_position_embeddings", default=262144, kind=int)
    return cfg


SSM_FLOAT32 = r"\.mamba\.(A_log|D|dt_proj\.bias)$"
FFN = r"^(?P<pre>.*\.feed_forward)"


def rules(cfg: dict) -> list[Rule]:
    E, I = cfg["num_experts"], cfg["intermediate_size"]
    out = head_rules(cfg, rotary=False)
    out.append(ConvToMLX(r"\.mamba\.conv1d\.weight$", cfg["mamba_d_conv"], "Mamba conv1d weights"))
    out.append(
        KeepFloat32(SSM_FLOAT32, "SSM decay parameters: rounding compounds over every step", "A_log, D, dt_proj.bias")
    )
    for proj in ("gate_proj", "up_proj", "down_proj"):
        out.append(
            StackExperts(
                FFN + rf"\.experts\.(?P<expert>\d+)\.{proj}\.weight$",
                rf"\g<pre>.switch_mlp.{proj}.weight",
                E,
                f"feed_forward.experts.{{e}}.{proj}.weight",
            )
        )
    out.append(
        Split(
            FFN + r"\.experts\.gate_up_proj$",
            1,
            [(r"\g<pre>.switch_mlp.gate_proj.weight", I), (r"\g<pre>.switch_mlp.up_proj.weight", I)],
            "fused feed_forward.experts.gate_up_proj [E, 2I, H] (transformers 5 in memory)",
        )
    )
    out.append(Rename(FFN + r"\.experts\.down_proj$", r"\g<pre>.switch_mlp.down_proj.weight"))
    return out


PROTECTED = (
    Protected(SSM_FLOAT32, "SSM dynamics: A = -exp(A_log), dt = softplus(dt_proj(.) + bias)"),
    Protected(r"\.mamba\.conv1d\.(weight|bias)$", "conv1d kernel: a handful of taps per channel"),
    Protected(r"norm\.weight$", "norm weights scale whole activations"),
)
ROLES = (
    Role("embed", r"^model\.embed_tokens\.weight$", sensitive=True),
    Role("lm_head", r"^lm_head\.weight$", sensitive=True),
    Role("mamba.in_proj", r"\.mamba\.in_proj\.weight$"),
    Role("mamba.x_proj", r"\.mamba\.x_proj\.weight$", sensitive=True),
    Role("mamba.dt_proj", r"\.mamba\.dt_proj\.weight$"),
    Role("mamba.out_proj", r"\.mamba\.out_proj\.weight$"),
) + ATTENTION_ROLES + (
    Role("moe.router", r"\.feed_forward\.router\.weight$", default="float",
         why="router: a rounding error changes which experts run"),
    Role("moe.gate_proj", r"\.feed_forward\.switch_mlp\.gate_proj\.weight$"),
    Role("moe.up_proj", r"\.feed_forward\.switch_mlp\.up_proj\.weight$"),
    Role("moe.down_proj", r"\.feed_forward\.switch_mlp\.down_proj\.weight$", sensitive=True),
) + FEED_FORWARD_ROLES

ARCH = register(
    Architecture(
        model_type="jamba",
        architectures=("JambaForCausalLM",),
        title="Jamba (Mamba-1 + attention + MoE)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)
