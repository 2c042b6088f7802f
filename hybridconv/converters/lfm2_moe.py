"""LFM2-MoE converter: LFM2's config and rules plus the experts.

Architecture and math: :mod:`hybridconv.models.lfm2_moe`; the shared keys and
layouts: :mod:`hybridconv.converters.lfm2`. LFM2-MoE's own keys:
``num_dense_layers``, ``num_experts``, ``num_experts_per_tok``,
``moe_intermediate_size``, ``use_expert_bias``, ``norm_topk_prob``,
``routed_scaling_factor``; the dense layers' ``intermediate_size`` is used as
is (no auto-adjust rule, as in transformers' ``Lfm2MoeMLP``).

Tensor rules, after LFM2's (drop inv_freq / tied head, conv kernels to MLX):

* ``rename`` the dense layers' ``feed_forward.w1/w3/w2`` to mlx-lm's
  ``gate_proj/up_proj/down_proj``;
* ``stack-experts`` ``feed_forward.experts.{e}.w1/w3/w2.weight`` (one tensor per
  expert, as ``save_pretrained`` writes them) into
  ``feed_forward.switch_mlp.{gate,up,down}_proj.weight [E, out, in]``;
* ``split`` a fused ``feed_forward.experts.gate_up_proj [E, 2I, H]`` (the layout
  transformers holds in memory; first half gate, second up) into the same two
  targets, and ``rename`` ``experts.down_proj`` to ``switch_mlp.down_proj.weight``;
* ``keep-float32`` ``expert_bias``: it only decides which experts win, between
  sigmoid scores that can be closer than a bf16 step.

Quantization policy: LFM2's, plus the stacked experts quantized at ``--bits``
expert by expert, group-wise along the input axis (``down_proj`` sensitive);
the router ``feed_forward.gate`` (``[E, H]``, a fraction of a percent of the
parameters) stays in float by default: a 4-bit router error flips expert
choices (mlx-lm keeps it at 8 bits for the same reason); ``expert_bias`` is
protected (float32).
"""

from __future__ import annotations

from ..config import pick, positive_int
from ..errors import ConfigError
from ..models import lfm2_moe as model_module
from . import lfm2
from .registry import Architecture, Protected, Role, register
from .rules import KeepFloat32, Rename, Rule, Split, StackExperts

FF = r"^(?P<pre>.*\.feed_forward)"
EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def normalize_config(raw: dict) -> dict:
    cfg = lfm2.normalize_common(raw, "lfm2_moe")
    n = cfg["num_hidden_layers"]
    cfg["intermediate_size"] = positive_int(raw, "intermediate_size", "block_ff_dim")
    cfg["moe_intermediate_size"] = positive_int(raw, "moe_intermediate_size")
    experts = cfg["num_experts"] = positive_int(raw, "num_experts")
    k = cfg["num_experts_per_tok"] = positive_int(raw, "num_experts_per_tok")
    if k > experts:
        raise ConfigError(f"config.json: num_experts_per_tok ({k}) exceeds num_experts ({experts})")
    dense = cfg["num_dense_layers"] = pick(raw, "num_dense_layers", default=2, kind=int)
    if not 0 <= dense <= n:
        raise ConfigError(f"config.json: num_dense_layers ({dense}) is not within 0..num_hidden_layers ({n})")
    cfg["use_expert_bias"] = pick(raw, "use_expert_bias", default=True, kind=bool)
    cfg["norm_topk_prob"] = pick(raw, "norm_topk_prob", default=True, kind=bool)
    cfg["routed_scaling_factor"] = pick(raw, "routed_scaling_factor", default=1.0, kind=float)
    cfg["block_auto_adjust_ff_dim"] = False
    return cfg


def rules(cfg: dict) -> list[Rule]:
    out = lfm2.common_rules(cfg)
    E, inter = cfg["num_experts"], cfg["moe_intermediate_size"]
    for src, dst in EXPERT_NAMES.items():
        out.append(Rename(rf"\.feed_forward\.{src}\.weight$", f".feed_forward.{dst}.weight"))
        out.append(
            StackExperts(
                FF + rf"\.experts\.(?P<expert>\d+)\.{src}\.weight$",
                rf"\g<pre>.switch_mlp.{dst}.weight",
                E,
                f"expert {src} ({dst})",
            )
        )
    out.append(
        Split(
            FF + r"\.experts\.gate_up_proj$",
            1,
            [(r"\g<pre>.switch_mlp.gate_proj.weight", inter), (r"\g<pre>.switch_mlp.up_proj.weight", inter)],
            "fused expert gate_up_proj",
        )
    )
    out.append(Rename(FF + r"\.experts\.down_proj$", r"\g<pre>.switch_mlp.down_proj.weight"))
    out.append(KeepFloat32(r"\.feed_forward\.expert_bias$", "decides expert choices between close scores", "expert_bias"))
    return out


PROTECTED = lfm2.PROTECTED + (
    Protected(r"\.feed_forward\.expert_bias$", "routing bias: decides which experts run"),
)
ROLES = lfm2.COMMON_ROLES + (
    Role("mlp.gate_up", r"\.feed_forward\.(gate|up)_proj\.weight$"),
    Role("mlp.down", r"\.feed_forward\.down_proj\.weight$", sensitive=True),
    Role("moe.experts.gate_up", r"\.switch_mlp\.(gate|up)_proj\.weight$"),
    Role("moe.experts.down", r"\.switch_mlp\.down_proj\.weight$", sensitive=True),
    Role(
        "moe.router",
        r"\.feed_forward\.gate\.weight$",
        sensitive=True,
        default="float",
        why="router: a quantization error flips expert choices (tiny: E x H)",
    ),
)

ARCH = register(
    Architecture(
        model_type="lfm2_moe",
        architectures=("Lfm2MoeForCausalLM",),
        title="LFM2-MoE (gated short convolutions + attention, MoE)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)
