"""Lara-Mini converter: config normalisation, tensor rules, quantization policy.

Architecture and math: :mod:`hybridconv.models.lara_mini`.

Config layouts
--------------
* as transformers 5 writes it: ``rope_parameters`` holds ``rope_theta``,
  ``layer_types`` lists every layer (``linear_attention``,
  ``sliding_attention``, ``full_attention``);
* as published (the original checkpoints): top-level ``rope_theta`` (or
  ``rope_scaling``), ``layer_types`` possibly absent — then the released
  pattern of period 5 (DeltaNet, sliding, DeltaNet, full, sliding), as
  transformers fills it in.

Sizes default as transformers' ``LaraMiniConfig`` does (``head_dim`` 128, not
``hidden_size / heads``; ``sliding_window`` 512; 128 experts, top 4;
``tie_word_embeddings`` true). Only the ``default`` rotary type is accepted; a
``partial_rotary_factor`` is kept in ``rope_parameters`` but, as in
transformers' Lara-Mini rotary embedding, the whole head is rotated. Refused
with a ConfigError naming the key: an unknown layer type or a list of the wrong
length, an activation other than ``silu``, head counts that do not divide,
``num_experts_per_tok > num_experts``. The written config carries
``layer_types``, ``rope_theta`` and ``rope_parameters``.

Tensor rules, in order
----------------------
* ``drop`` rotary ``inv_freq`` buffers (recomputed) and, when tied,
  ``lm_head.weight``;
* ``split`` the fused DeltaNet ``linear_attn.in_proj.weight`` (rows
  ``[q | k | v | z | b | a]``: ``2·Hk·Dk + Hv·Dv``, ``Hv·Dv``, ``Hv``, ``Hv``)
  into ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a`` (what
  transformers' conversion mapping does on load); ``rename``
  ``linear_attn.out_norm`` to ``linear_attn.norm``;
* ``split`` the fused experts ``mlp.experts.gate_up_proj [E, 2I, H]`` into
  ``mlp.switch_mlp.gate_proj`` / ``up_proj`` and ``rename``
  ``mlp.experts.down_proj`` to ``mlp.switch_mlp.down_proj.weight``; per-expert
  ``mlp.experts.N.{gate,up,down}_proj.weight`` (transformers 4's layout) are
  ``stack``\\ ed into the same;
* ``conv1d-to-mlx`` the DeltaNet conv kernels ``[C, 1, K]`` to ``[C, K, 1]``;
* ``keep-float32`` ``A_log`` and ``dt_bias`` (the decay compounds over every
  step).

None of the norms carries an offset (transformers' ``LaraMiniRMSNorm`` scales
by the weight), so nothing is folded. Converting an output again changes
nothing (the fused names never reappear).

Quantization policy
-------------------
Qwen3-Next's (:mod:`.qwen3_next`: same mixer and MoE names): never quantized
— ``A_log``, ``dt_bias``, conv kernels, every norm; kept float by default — the
router ``mlp.gate`` and the DeltaNet ``in_proj_b`` / ``in_proj_a`` (they set β
and the decay); quantized at ``--bits`` — every other projection, the experts,
embeddings. Measured on ``lara_mini-tiny`` (verify, default 4-bit, group 64):
mean KL 0.0156 over 2 × 64 random tokens (tests/test_arch_lara_mini.py; gate
0.15), bf16 2.1e-5. One role at a time at 8 bits (4 × 64 tokens, default
0.0175): embeddings 0.0123, DeltaNet ``in_proj_qkv/z`` 0.0153, attention k/v
0.0159, ``o_proj`` 0.0162, shared-expert gate/up 0.0166, q 0.0168, experts
gate/up 0.0170, DeltaNet ``out_proj`` 0.0172 (the expert and shared
``down_proj``, input 32, are below the group size and stay float here). The
router or ``in_proj_b``/``in_proj_a`` quantized at 4 bits: 0.0175 either way —
no measurable cost on this random model; they stay float because they are a
few rows per layer and set the expert choice and the decay.
"""

from __future__ import annotations

from ..config import pick, positive_int
from ..errors import ConfigError
from ..models import lara_mini as model_module
from ._common import check_activation, head_rules, switch_mlp_rules
from .qwen3_next import PROTECTED, ROLES
from .registry import Architecture, register
from .rules import ConvToMLX, KeepFloat32, Rename, Rule, Split

LAYER_TYPES = ("linear_attention", "sliding_attention", "full_attention")


def _layer_types(raw: dict, n: int) -> list[str]:
    types = pick(raw, "layer_types", default=None, kind=list)
    if types is None:
        return [model_module.RELEASED_PATTERN[i % 5] for i in range(n)]
    if len(types) != n or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(
            f"config.json: layer_types must list {n} entries (num_hidden_layers), each one of "
            f"{', '.join(LAYER_TYPES)}; found {types!r}"
        )
    return list(types)


def normalize_config(raw: dict) -> dict:
    cfg = {k: v for k, v in raw.items() if k not in ("auto_map", "rope_scaling")}
    cfg["model_type"] = "lara_mini"
    cfg["architectures"] = ["LaraMiniForCausalLM"]
    for name in ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads"):
        cfg[name] = positive_int(raw, name)
    n = cfg["num_hidden_layers"]
    defaults = dict(num_key_value_heads=4, head_dim=128, linear_conv_kernel_dim=4, linear_key_head_dim=128,
                    linear_value_head_dim=128, linear_num_key_heads=8, linear_num_value_heads=16,
                    moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts=128,
                    num_experts_per_tok=4, sliding_window=512)
    for name, d in defaults.items():
        cfg[name] = positive_int(raw, name, default=d)
    check_activation(raw)
    cfg["hidden_act"] = "silu"
    cfg["rms_norm_eps"] = pick(raw, "rms_norm_eps", default=1e-6, kind=float)
    cfg["tie_word_embeddings"] = pick(raw, "tie_word_embeddings", default=True, kind=bool)
    cfg["attention_bias"] = pick(raw, "attention_bias", default=False, kind=bool)
    cfg["norm_topk_prob"] = pick(raw, "norm_topk_prob", default=True, kind=bool)
    cfg["max_position_embeddings"] = pick(raw, "max_position_embeddings", default=131072, kind=int)

    pick(raw, "rope_parameters", default={}, kind=dict)
    rope_type = pick(raw, "rope_parameters.rope_type", "rope_parameters.type", "rope_scaling.rope_type",
                     "rope_scaling.type", default="default", kind=str)
    if rope_type != "default":
        raise ConfigError(f"config.json: rope type {rope_type!r} (rope_parameters.rope_type) is not supported; "
                          "expected 'default'")
    theta = cfg["rope_theta"] = pick(raw, "rope_theta", "rope_parameters.rope_theta", "rope_scaling.rope_theta",
                                     default=10000.0, kind=float)
    rope = dict(pick(raw, "rope_parameters", default={}, kind=dict))
    rope.pop("type", None)
    rope.update(rope_type="default", rope_theta=theta)
    if "partial_rotary_factor" in cfg:  # kept in rope_parameters; the whole head rotates (module docstring)
        rope.setdefault("partial_rotary_factor", cfg.pop("partial_rotary_factor"))
    cfg["rope_parameters"] = rope

    cfg["layer_types"] = _layer_types(raw, n)
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ConfigError(f"config.json: num_attention_heads ({cfg['num_attention_heads']}) is not a multiple of "
                          f"num_key_value_heads ({cfg['num_key_value_heads']})")
    if cfg["linear_num_value_heads"] % cfg["linear_num_key_heads"]:
        raise ConfigError(f"config.json: linear_num_value_heads ({cfg['linear_num_value_heads']}) is not a multiple "
                          f"of linear_num_key_heads ({cfg['linear_num_key_heads']})")
    if cfg["num_experts_per_tok"] > cfg["num_experts"]:
        raise ConfigError(f"config.json: num_experts_per_tok ({cfg['num_experts_per_tok']}) exceeds num_experts "
                          f"({cfg['num_experts']})")
    cfg.pop("intermediate_size", None)  # no dense MLP in this architecture
    return cfg


def rules(cfg: dict) -> list[Rule]:
    key = cfg["linear_key_head_dim"] * cfg["linear_num_key_heads"]
    value = cfg["linear_value_head_dim"] * cfg["linear_num_value_heads"]
    hv, E, inter = cfg["linear_num_value_heads"], cfg["num_experts"], cfg["moe_intermediate_size"]
    return head_rules(cfg) + [
        Split(r"\.linear_attn\.in_proj\.weight$", 0,
              [(".linear_attn.in_proj_qkv.weight", 2 * key + value), (".linear_attn.in_proj_z.weight", value),
               (".linear_attn.in_proj_b.weight", hv), (".linear_attn.in_proj_a.weight", hv)],
              "fused DeltaNet in_proj (rows q|k|v|z|b|a)"),
        Rename(r"\.linear_attn\.out_norm\.weight$", ".linear_attn.norm.weight"),
        *switch_mlp_rules(E, inter),
        ConvToMLX(r"\.linear_attn\.conv1d\.weight$", cfg["linear_conv_kernel_dim"], "DeltaNet conv1d weights"),
        KeepFloat32(r"\.linear_attn\.(A_log|dt_bias)$", "decay parameters: rounding compounds over every step",
                    "A_log, dt_bias"),
    ]


ARCH = register(
    Architecture(
        model_type="lara_mini",
        architectures=("LaraMiniForCausalLM",),
        title="Lara-Mini (gated DeltaNet + sliding / NoPE full attention, MoE + shared expert)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)
