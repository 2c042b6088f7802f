"""GraniteMoeHybrid (Granite 4.0-H) converter: config normalisation and tensor rules.

Architecture and math: :mod:`hybridconv.models.granitemoehybrid`.

Config normalisation (the published Granite 4.0 configs and transformers 5's):

* ``layer_types`` (alias ``layers_block_type``): ``mamba`` / ``attention`` as
  published, ``linear_attention`` / ``full_attention`` as transformers 5
  writes them; written as ``mamba`` / ``attention`` (mlx-lm reads only those).
  Absent: every layer Mamba (transformers' default).
* ``position_embedding_type``: ``"rope"`` or none (``"nope"``, null or absent
  — transformers builds rotary embeddings only for ``"rope"``); written as
  ``"rope"`` or ``"nope"`` because mlx-lm applies RoPE unless it reads
  ``"nope"``. ``rope_theta`` top-level or in ``rope_parameters``; only the
  ``default`` rope type.
* the multipliers ``embedding_multiplier``, ``residual_multiplier``,
  ``attention_multiplier``, ``logits_scaling`` (default 1; all written: mlx-lm
  requires them).
* experts: ``num_local_experts`` (0 = a dense Granite-H: the shared MLP is the
  whole feed-forward), ``num_experts_per_tok`` (``1 ≤ k ≤ E``),
  ``shared_intermediate_size``. For a dense model ``intermediate_size`` (the
  expert width, unused by transformers then) is set to
  ``shared_intermediate_size``, the width of mlx-lm's dense ``mlp``.
* the Mamba-2 keys and ``time_step_limit`` as for Bamba
  (:func:`hybridconv.converters._common.normalize_mamba2`).
* ``num_key_value_heads`` defaults to ``num_attention_heads``; ``tie_word_embeddings``
  to false (transformers' defaults).

Tensor rules, in order: those of Bamba (``drop`` rotary ``inv_freq`` and a tied
``lm_head.weight``, ``conv1d-to-mlx``, ``keep-float32`` ``A_log``/``D``/
``dt_bias``), then

* MoE: ``split`` ``block_sparse_moe.input_linear.weight`` ``[E, 2I, H]`` along
  axis 1 into ``block_sparse_moe.switch_mlp.gate_proj.weight`` and
  ``up_proj.weight`` (``[E, I, H]`` each, gate first), ``rename``
  ``output_linear`` to ``switch_mlp.down_proj`` (``[E, H, I]``): mlx-lm's
  layout. transformers 5's in-memory names (``experts.gate_up_proj``,
  ``experts.down_proj``, ``router.weight``) map to the same.
* dense: ``split`` ``shared_mlp.input_linear.weight`` ``[2S, H]`` along axis 0
  into ``mlp.gate_proj`` / ``mlp.up_proj``, ``rename`` ``output_linear`` to
  ``mlp.down_proj`` (mlx-lm's dense names).

Quantization policy (``hybridconv quantize``)
---------------------------------------------
As Bamba's (:mod:`hybridconv.converters.bamba`): ``A_log``, ``D``,
``dt_bias`` never quantized and float32; conv kernels and norms never quantized,
in the output dtype. The routers
(``router.layer``, ``[E, H]``) stay in float by default, as Jamba's (see
:mod:`hybridconv.converters.jamba`; on this fixture 4-bit routers change the
mean KL by 1e-5: 0.00263 vs 0.00264; mlx-lm keeps them at 8 bits). Quantized: embeddings
(tied head), ``in_proj``/``out_proj``, attention, the stacked experts
(``[E, out, in]``, group-wise along ``in`` as mlx-lm's
``QuantizedSwitchLinear``), the shared / dense MLP. Sensitive: embeddings and
head, ``in_proj``, and the ``down_proj`` / ``output_linear`` projections.
"""

from __future__ import annotations

from ..config import pick, positive, positive_int
from ..errors import ConfigError
from ..models import granitemoehybrid as model_module
from ._common import (
    ATTENTION_ROLES,
    MAMBA2_PROTECTED,
    MAMBA2_ROLES,
    check_activation,
    mamba2_rules,
    normalize_attention,
    normalize_mamba2,
    parse_layer_kinds,
    rope_theta,
    swiglu_roles,
)
from .registry import Architecture, Role, register
from .rules import Rename, Rule, Split

POSITION_TYPES = {"rope": "rope", "nope": "nope", None: "nope"}


def normalize_config(raw: dict) -> dict:
    cfg = dict(raw)
    cfg["model_type"] = "granitemoehybrid"

    cfg["hidden_size"] = positive_int(raw, "hidden_size")
    n = cfg["num_hidden_layers"] = positive_int(raw, "num_hidden_layers")
    cfg["vocab_size"] = positive_int(raw, "vocab_size")
    normalize_attention(raw, cfg, kv_default=None)
    check_activation(raw)
    normalize_mamba2(raw, cfg)
    key = next((k for k in ("layer_types", "layers_block_type") if raw.get(k) is not None), None)
    cfg["layer_types"] = parse_layer_kinds(raw[key], n, key) if key else ["mamba"] * n
    cfg.pop("layers_block_type", None)
    pos = raw.get("position_embedding_type")
    if not (pos is None or isinstance(pos, str)) or pos not in POSITION_TYPES:
        raise ConfigError(
            f"config.json: position_embedding_type {pos!r} is not supported; expected 'rope', 'nope' or null"
        )
    cfg["position_embedding_type"] = POSITION_TYPES[pos]
    cfg["rope_theta"] = rope_theta(raw)
    for name in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
        cfg[name] = pick(raw, name, default=1.0, kind=float)
    if cfg["logits_scaling"] == 0:
        raise ConfigError("config.json: logits_scaling must not be 0 (the logits are divided by it)")
    E = cfg["num_local_experts"] = pick(raw, "num_local_experts", default=8, kind=int)
    if E < 0:
        raise ConfigError(f"config.json: num_local_experts must be 0 (dense) or positive, found {E}")
    cfg["shared_intermediate_size"] = positive_int(raw, "shared_intermediate_size", default=1024)
    if E > 0:
        positive("num_local_experts", E)
        cfg["intermediate_size"] = positive_int(raw, "intermediate_size")
        k = cfg["num_experts_per_tok"] = positive_int(raw, "num_experts_per_tok", default=2)
        if k > E:
            raise ConfigError(f"config.json: num_experts_per_tok ({k}) exceeds num_local_experts ({E})")
    else:
        cfg["intermediate_size"] = cfg["shared_intermediate_size"]
    cfg["rms_norm_eps"] = pick(raw, "rms_norm_eps", default=1e-6, kind=float)
    cfg["tie_word_embeddings"] = pick(raw, "tie_word_embeddings", default=False, kind=bool)
    cfg["attention_bias"] = pick(raw, "attention_bias", default=False, kind=bool)
    cfg["max_position_embeddings"] = pick(raw, "max_position_embeddings", default=2048, kind=int)
    return cfg


MOE = r"^(?P<pre>.*\.block_sparse_moe)"
SHARED = r"^(?P<pre>.*)\.shared_mlp"


def rules(cfg: dict) -> list[Rule]:
    out = mamba2_rules(cfg)
    if cfg["num_local_experts"] > 0:
        I = cfg["intermediate_size"]
        gate_up = [(r"\g<pre>.switch_mlp.gate_proj.weight", I), (r"\g<pre>.switch_mlp.up_proj.weight", I)]
        out += [
            Split(MOE + r"\.input_linear\.weight$", 1, gate_up, "experts' input_linear [E, 2I, H] (gate, up)"),
            Split(MOE + r"\.experts\.gate_up_proj$", 1, gate_up, "experts.gate_up_proj [E, 2I, H] (transformers 5)"),
            Rename(MOE + r"\.(output_linear\.weight|experts\.down_proj)$", r"\g<pre>.switch_mlp.down_proj.weight"),
            Rename(MOE + r"\.router\.weight$", r"\g<pre>.router.layer.weight"),
        ]
    else:
        S = cfg["shared_intermediate_size"]
        out += [
            Split(
                SHARED + r"\.input_linear\.weight$",
                0,
                [(r"\g<pre>.mlp.gate_proj.weight", S), (r"\g<pre>.mlp.up_proj.weight", S)],
                "dense shared_mlp.input_linear [2S, H] (gate, up)",
            ),
            Rename(SHARED + r"\.output_linear\.weight$", r"\g<pre>.mlp.down_proj.weight"),
        ]
    return out


ROLES = MAMBA2_ROLES + ATTENTION_ROLES + (
    Role("moe.router", r"\.block_sparse_moe\.router\.layer\.weight$", default="float",
         why="router: a rounding error changes which experts run"),
    Role("moe.gate_proj", r"\.switch_mlp\.gate_proj\.weight$"),
    Role("moe.up_proj", r"\.switch_mlp\.up_proj\.weight$"),
    Role("moe.down_proj", r"\.switch_mlp\.down_proj\.weight$", sensitive=True),
    Role("shared_mlp.input_linear", r"\.shared_mlp\.input_linear\.weight$"),
    Role("shared_mlp.output_linear", r"\.shared_mlp\.output_linear\.weight$", sensitive=True),
) + swiglu_roles("mlp")

ARCH = register(
    Architecture(
        model_type="granitemoehybrid",
        architectures=("GraniteMoeHybridForCausalLM",),
        title="Granite 4.0-H / GraniteMoeHybrid (Mamba-2 + attention + MoE)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=MAMBA2_PROTECTED,
    )
)
