"""Inkling-2-Mini (looped Inkling-2) converter: Inkling-2's config, rules and
policy (:mod:`hybridconv.converters.inkling2`) plus the loop.

Architecture and math: :mod:`hybridconv.models.inkling2_loop`.

Config
------
transformers 5's ``Inkling2LoopTextConfig``: Inkling-2's keys (its defaults for
the Mini sizes: hidden 2304, 24 layers, 24 heads, ``log_scaling_n_floor``
8192, 128 experts of 1152) and ``loop_layer_index_start`` / ``_end`` /
``loop_num_passes`` / ``loop_gate_rank`` (6 / 18 / 3 / 64), or, as the original
configs state them, a ``loop_config`` table (``core_start``, ``core_end``,
``num_passes``, ``gate_rank``: it wins, as in transformers). Checked as
transformers checks them (at least one pass; the start > 0; start and end
multiples of ``n_layers_per_attn_res_block``), and the end within the layers.
The blocks verify compares are the layer *runs*: ``num_hidden_layers +
(loop_num_passes − 1) · (end − start)``.

Tensor rules
------------
Before Inkling-2's rules: the loop layers' controllers ``controllers.{attn,k,v,mlp}``
-> ``{q,k,v,mlp}_message_gate`` with ``down_weight`` / ``gain_weight`` /
``forget_weight`` -> ``down_proj`` / ``message_gate_proj`` / ``forget_gate_proj``
``.weight``, and the message queries ``middle_cycle_cross_pass_queries`` /
``…_kv_queries`` -> ``model.message_input.queries`` / ``kv_queries``, kept as the
checkpoints store them (``[2L, D]`` each: q and MLP, k and v, of each loop
layer; transformers merges them into ``[L, 4, D]`` on load). ``keep-float32``
the message queries and the gates' ``forget_gate_proj`` / ``message_gate_proj``
(float32 in the reference in every dtype).

Quantization policy
-------------------
Inkling-2's, plus: the message queries and the two ``[D, rank]`` gate
projections are protected (float32); the gates' ``down_proj`` (``[rank, 2D]``)
is quantized (role ``loop.message_gate.down_proj``): measured on
inkling2_loop-tiny (default 4-bit against ``--keep`` of that role, verify on
2 × 64 random tokens against the float32 reference), mean KL 0.00837 (p99
0.0160) quantized vs 0.00846 (p99 0.0172) in float, for 0.70 bits per weight
more on the tiny model: no gain from keeping it.
"""

from __future__ import annotations

from ..config import pick, positive_int
from ..errors import ConfigError
from ..models import inkling2_loop as model_module
from . import inkling2
from .registry import Architecture, Protected, Role, register
from .rules import KeepFloat32, Rename, Rule

LOOP_KEYS = (("loop_layer_index_start", "core_start", 6), ("loop_layer_index_end", "core_end", 18),
             ("loop_num_passes", "num_passes", 3), ("loop_gate_rank", "gate_rank", 64))


def normalize_config(raw: dict) -> dict:
    cfg = inkling2.normalize_common(raw, "inkling2_loop_text", {
        **inkling2.DEFAULTS, "hidden_size": 2304, "num_hidden_layers": 24, "num_attention_heads": 24,
        "swa_num_attention_heads": 24, "log_scaling_n_floor": 8192, "moe_intermediate_size": 1152,
        "n_routed_experts": 128})
    loop = pick(raw, "loop_config", default={}, kind=dict)
    for key, alias, default in LOOP_KEYS:
        value = pick(loop, alias, default=None, kind=int)
        cfg[key] = value if value is not None else pick(raw, key, default=default, kind=int)
    cfg.pop("loop_config", None)
    n, block = cfg["num_hidden_layers"], cfg["n_layers_per_attn_res_block"]
    s, e, P = cfg["loop_layer_index_start"], cfg["loop_layer_index_end"], cfg["loop_num_passes"]
    if P < 1:
        raise ConfigError(f"config.json: loop_num_passes ({P}) must be at least 1")
    if not 0 < s < e <= n:
        raise ConfigError(f"config.json: the looped layers {s}..{e - 1} (loop_layer_index_start, loop_layer_index_end) "
                          f"must satisfy 0 < start < end <= num_hidden_layers ({n})")
    if s % block or e % block:
        raise ConfigError(f"config.json: loop_layer_index_start ({s}) and loop_layer_index_end ({e}) must be "
                          f"multiples of n_layers_per_attn_res_block ({block})")
    cfg["loop_gate_rank"] = positive_int(cfg, "loop_gate_rank")
    return cfg


GATE = r"_message_gate\."
FLOAT32 = r"(^model\.message_input\.(queries|kv_queries)|" + GATE + r"(forget_gate_proj|message_gate_proj)\.weight)$"


def rules(cfg: dict) -> list[Rule]:
    R = Rename
    loop: list[Rule] = [
        R(r"\.controllers\.attn\.", ".q_message_gate."),
        R(r"\.controllers\.(k|v|mlp)\.", r".\1_message_gate."),
        R(GATE + r"down_weight$", "_message_gate.down_proj.weight"),
        R(GATE + r"gain_weight$", "_message_gate.message_gate_proj.weight"),
        R(GATE + r"forget_weight$", "_message_gate.forget_gate_proj.weight"),
        R(r"^model\.(llm\.)?middle_cycle_cross_pass_queries$", "model.message_input.queries"),
        R(r"^model\.(llm\.)?middle_cycle_cross_pass_kv_queries$", "model.message_input.kv_queries"),
    ]
    return loop + inkling2.rules(cfg) + [
        KeepFloat32(FLOAT32, "kept float32 by transformers in every dtype", "message queries, message gate projections"),
    ]


PROTECTED = (Protected(FLOAT32, "message queries and gates (float32 in the reference)", float32=True),) \
    + inkling2.PROTECTED
ROLES = inkling2.ROLES + (Role("loop.message_gate.down_proj", GATE + r"down_proj\.weight$"),)

ARCH = register(
    Architecture(
        model_type="inkling2_loop_text",
        architectures=("Inkling2LoopForCausalLM",),
        title="Inkling-2-Mini (Inkling-2 with looped layers)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)
