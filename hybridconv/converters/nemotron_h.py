"""Nemotron-H converter: config normalisation and tensor rules.

Architecture and math: :mod:`hybridconv.models.nemotron_h`. Parameter names
are mlx-lm's (``backbone.layers.N.mixer.…``, the experts stacked as
``mixer.switch_mlp.fc1`` / ``fc2``), so ``mlx_lm.utils.load_model`` opens the
output.

Config normalisation (the published Nemotron-H / Nemotron 3 configs and
transformers 5's):

* the schedule from ``hybrid_override_pattern`` (published: a string of
  ``M`` / ``*`` / ``-`` / ``E``) or the list ``layers_block_type`` (alias
  ``layer_types``; transformers 5: ``linear_attention`` / ``full_attention``
  / ``mlp`` / ``moe``, older ``mamba`` / ``attention`` accepted); both present
  must agree. The layer count is the pattern's length (transformers writes no
  ``num_hidden_layers``; a stated one must agree). Written as both the
  pattern string and the transformers-5 list.
* the published Mamba key spellings transformers still accepts
  (``mamba_n_groups``, ``mamba_d_conv``, ``mamba_expand``, ``mamba_dt_min``,
  ``mamba_dt_max``, ``mamba_dt_limit``, ``mamba_dt_init_floor``,
  ``mamba_conv_bias``, ``mamba_chunk_size``), taking precedence as in
  transformers; ``num_local_experts`` for ``n_routed_experts``.
* what transformers ignores is written so that mlx-lm computes the same:
  ``attention_bias`` false (transformers' attention has no bias),
  ``mamba_proj_bias = use_bias`` (transformers biases ``in_proj`` /
  ``out_proj`` by ``use_bias``; mlx-lm reads ``mamba_proj_bias``),
  ``time_step_limit = [time_step_min, null]`` (transformers clamps Δ from
  below at ``time_step_min`` whatever ``time_step_limit`` says; ``null``: no
  upper limit), ``tie_word_embeddings`` false (never tied in transformers).
* ``head_dim`` absent means 128 (transformers' default, not
  ``hidden / heads``); ``mamba_hidden_act`` must be ``silu``.

Tensor rules: ``drop`` multi-token-prediction tensors (``mtp.*``, which
transformers ignores at load); ``stack-experts`` the per-expert
``experts.{e}.up_proj`` / ``down_proj`` into ``switch_mlp.fc1`` / ``fc2``
``[E, out, in]`` (an already stacked ``experts.up_proj`` is renamed);
``conv1d-to-mlx`` the Mamba conv kernels; ``keep-float32`` ``A_log``, ``D``,
``dt_bias`` and the router (``gate.weight`` and ``e_score_correction_bias``,
float32 in transformers too: ``_keep_in_fp32_modules_strict``).

Multimodal release: ``nemotron_h_omni`` (``NemotronH_Omni_Reasoning_V3``,
NVIDIA's Nemotron omni models): the language model's config is
``text_config`` (``llm_config`` in the released configs, with
``hybrid_override_pattern``), its tensors ``language_model.backbone.*`` /
``language_model.lm_head.weight``; the RADIO vision tower (``vision_model.*``),
its projector (``mlp1.*``) and the audio encoder (``sound_encoder.*``,
``sound_projection.*``) are dropped, listed in the ledger. The head belongs to
the language model (never tied, as above).

Quantization policy (``hybridconv quantize``)
---------------------------------------------
Never quantized (:data:`PROTECTED`; the dynamics and the router float32, kept
so by the conversion; the rest in the output dtype, as mlx-lm stores them):
``A_log``, ``D``, ``dt_bias``, the conv1d kernels and biases, every norm weight (including the gated norm and
``norm_f``), and the router (weight and correction bias: a small ``[E, H]``
matrix whose rounding changes *which* experts run). Quantized (:data:`ROLES`):
embeddings and head, Mamba ``in_proj`` / ``out_proj``, attention projections,
MLP and shared-expert projections, the stacked experts (group-wise per expert,
as mlx-lm's ``QuantizedSwitchLinear``) and the latent projections. Sensitive:
embeddings, head, ``in_proj`` and the down projections (MLP, shared expert).
"""

from __future__ import annotations

import math

from ..config import pick, positive, positive_int
from ..errors import ConfigError
from ..models import nemotron_h as model_module
from .registry import Architecture, Protected, Role, Wrapper, register, register_wrapper
from .rules import ConvToMLX, Drop, KeepFloat32, Rename, Rule, StackExperts

LIST_TO_CHAR = {
    "linear_attention": "M",
    "mamba": "M",
    "full_attention": "*",
    "attention": "*",
    "mlp": "-",
    "moe": "E",
}
CHAR_TO_LIST = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}


def schedule_pattern(raw: dict) -> str:
    """The pattern string from either layout (see module docstring)."""
    pattern = raw.get("hybrid_override_pattern")
    if pattern is not None:
        if isinstance(pattern, list) and all(isinstance(c, str) and len(c) == 1 for c in pattern):
            pattern = "".join(pattern)  # mlx-lm accepts a list of characters too
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"config.json: hybrid_override_pattern must be a non-empty string, found {pattern!r}")
        bad = sorted(set(pattern) - set(CHAR_TO_LIST))
        if bad:
            raise ConfigError(
                f"config.json: hybrid_override_pattern holds {''.join(bad)!r}; expected only M (Mamba-2), "
                "* (attention), - (MLP), E (MoE)"
            )
    key = next((k for k in ("layers_block_type", "layer_types") if raw.get(k) is not None), None)
    listed = None
    if key is not None:
        kinds = raw[key]
        if not isinstance(kinds, list) or not kinds:
            raise ConfigError(f"config.json: '{key}' must be a non-empty list of layer kinds, found {kinds!r}")
        for i, kind in enumerate(kinds):
            if kind not in LIST_TO_CHAR:
                raise ConfigError(
                    f"config.json: {key}[{i}] is {kind!r}; expected one of {', '.join(LIST_TO_CHAR)}"
                )
        listed = "".join(LIST_TO_CHAR[k] for k in kinds)
    if pattern is not None and listed is not None and pattern != listed:
        raise ConfigError(
            f"config.json: hybrid_override_pattern {pattern!r} and {key} (as a pattern {listed!r}) disagree"
        )
    if pattern is None and listed is None:
        raise ConfigError(
            "config.json: required field 'hybrid_override_pattern' is missing "
            "(tried 'hybrid_override_pattern', 'layers_block_type', 'layer_types')"
        )
    return pattern if pattern is not None else listed


def normalize_config(raw: dict) -> dict:
    cfg = dict(raw)
    cfg["model_type"] = "nemotron_h"

    def num(*names, default, kind=int):
        value = pick(raw, *names, default=default, kind=kind)
        return positive(names[0], value) if kind is int and value is not None else value

    pattern = schedule_pattern(raw)
    n = positive("num_hidden_layers", len(pattern))
    stated = raw.get("num_hidden_layers")
    if stated is not None and stated != n:
        raise ConfigError(
            f"config.json: num_hidden_layers = {stated!r}, but the layer pattern has {n} layers",
            "transformers takes the layer count from the pattern; fix one of the two",
        )
    for key in ("layer_types", "mtp_hybrid_override_pattern"):
        cfg.pop(key, None)
    cfg["hybrid_override_pattern"] = pattern
    cfg["layers_block_type"] = [CHAR_TO_LIST[c] for c in pattern]
    cfg["num_hidden_layers"] = n

    cfg["hidden_size"] = positive_int(raw, "hidden_size")
    cfg["vocab_size"] = positive_int(raw, "vocab_size")
    cfg["layer_norm_epsilon"] = pick(raw, "layer_norm_epsilon", "rms_norm_eps", default=1e-5, kind=float)

    # Attention (no position embedding, no bias).
    heads = cfg["num_attention_heads"] = num("num_attention_heads", default=32)
    kv = cfg["num_key_value_heads"] = num("num_key_value_heads", default=heads if "num_key_value_heads" in raw else 8)
    if heads % kv:
        raise ConfigError(f"config.json: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})")
    head_dim = cfg["head_dim"] = num("head_dim", default=128)
    other = raw.get("attention_head_dim")
    if other is not None and other != head_dim:
        raise ConfigError(
            f"config.json: attention_head_dim ({other!r}) and head_dim ({head_dim}) disagree; "
            "transformers uses head_dim (default 128)"
        )
    cfg["attention_bias"] = False

    # MLP.
    cfg["intermediate_size"] = num("intermediate_size", default=21504)
    act = cfg["mlp_hidden_act"] = pick(raw, "mlp_hidden_act", default="relu2", kind=str)
    if act not in model_module.ACTIVATIONS:
        raise ConfigError(
            f"config.json: mlp_hidden_act {act!r} is not supported (expected one of "
            f"{', '.join(model_module.ACTIVATIONS)})"
        )
    cfg["mlp_bias"] = pick(raw, "mlp_bias", default=False, kind=bool)

    # Mamba-2 (published spellings first, as transformers' __post_init__ does).
    m_act = pick(raw, "mamba_hidden_act", default="silu", kind=str)
    if m_act != "silu":
        raise ConfigError(f"config.json: mamba_hidden_act {m_act!r} is not supported (expected 'silu')")
    m_heads = cfg["mamba_num_heads"] = num("mamba_num_heads", default=128)
    cfg["mamba_head_dim"] = num("mamba_head_dim", default=64)
    cfg["ssm_state_size"] = num("ssm_state_size", default=128)
    groups = cfg["n_groups"] = num("mamba_n_groups", "n_groups", default=8)
    if m_heads % groups:
        raise ConfigError(f"config.json: mamba_num_heads ({m_heads}) must be a multiple of n_groups ({groups})")
    cfg["conv_kernel"] = num("mamba_d_conv", "conv_kernel", default=4)
    cfg["expand"] = num("mamba_expand", "expand", default=2)
    cfg["chunk_size"] = num("mamba_chunk_size", "chunk_size", default=128)
    cfg["use_conv_bias"] = pick(raw, "mamba_conv_bias", "use_conv_bias", default=True, kind=bool)
    cfg["use_bias"] = pick(raw, "use_bias", default=False, kind=bool)
    cfg["mamba_proj_bias"] = cfg["use_bias"]
    t_min = cfg["time_step_min"] = pick(raw, "mamba_dt_min", "time_step_min", default=1e-3, kind=float)
    if not 0.0 <= t_min < math.inf:
        raise ConfigError(f"config.json: time_step_min must be >= 0, found {t_min}")
    cfg["time_step_max"] = pick(raw, "mamba_dt_max", "time_step_max", default=0.1, kind=float)
    cfg["time_step_limit"] = [t_min, None]
    for alias in ("mamba_n_groups", "mamba_d_conv", "mamba_expand", "mamba_dt_min", "mamba_dt_max",
                  "mamba_dt_limit", "mamba_conv_bias", "mamba_chunk_size", "mamba_dt_init_floor"):
        cfg.pop(alias, None)

    # MoE.
    experts = cfg["n_routed_experts"] = num("n_routed_experts", "num_local_experts", default=8)
    cfg.pop("num_local_experts", None)
    k = cfg["num_experts_per_tok"] = num("num_experts_per_tok", default=2)
    if k > experts:
        raise ConfigError(f"config.json: num_experts_per_tok ({k}) exceeds n_routed_experts ({experts})")
    cfg["moe_intermediate_size"] = num("moe_intermediate_size", default=7688)
    cfg["moe_shared_expert_intermediate_size"] = num("moe_shared_expert_intermediate_size", default=7688)
    cfg["moe_latent_size"] = num("moe_latent_size", default=None)
    cfg["n_shared_experts"] = 1  # transformers builds exactly one shared expert MLP
    ng = cfg["n_group"] = num("n_group", default=1)
    tg = cfg["topk_group"] = num("topk_group", default=1)
    if experts % ng or tg > ng:
        raise ConfigError(
            f"config.json: n_group ({ng}) must divide n_routed_experts ({experts}) and topk_group ({tg}) "
            "must not exceed it"
        )
    cfg["norm_topk_prob"] = pick(raw, "norm_topk_prob", default=True, kind=bool)
    cfg["routed_scaling_factor"] = pick(raw, "routed_scaling_factor", default=1.0, kind=float)
    cfg["tie_word_embeddings"] = False
    cfg["num_nextn_predict_layers"] = 0  # the mtp.* tensors are dropped
    return cfg


def rules(cfg: dict) -> list[Rule]:
    E = cfg["n_routed_experts"]
    pre = r"^(?P<pre>backbone\.layers\.\d+\.mixer)"
    return [
        Drop(r"^mtp\.", "multi-token-prediction head: transformers ignores it at load", "mtp.* tensors"),
        Drop(r"(^|\.)rotary_emb\.inv_freq$", "Nemotron-H attention has no rotary embedding", "rotary inv_freq buffers"),
        StackExperts(pre + r"\.experts\.(?P<expert>\d+)\.up_proj\.weight$", r"\g<pre>.switch_mlp.fc1.weight", E,
                     "expert up_proj"),
        StackExperts(pre + r"\.experts\.(?P<expert>\d+)\.down_proj\.weight$", r"\g<pre>.switch_mlp.fc2.weight", E,
                     "expert down_proj"),
        Rename(r"\.mixer\.experts\.up_proj$", ".mixer.switch_mlp.fc1.weight"),
        Rename(r"\.mixer\.experts\.down_proj$", ".mixer.switch_mlp.fc2.weight"),
        ConvToMLX(r"\.mixer\.conv1d\.weight$", cfg["conv_kernel"], "Mamba-2 conv1d weights"),
        KeepFloat32(SSM_FLOAT32, "SSM decay parameters: rounding compounds over every step", "A_log, D, dt_bias"),
        KeepFloat32(ROUTER, "router in float32, as transformers keeps it: rounding changes which experts run",
                    "gate.weight, gate.e_score_correction_bias"),
    ]


SSM_FLOAT32 = r"\.mixer\.(A_log|D|dt_bias)$"
ROUTER = r"\.mixer\.gate\.(weight|e_score_correction_bias)$"

PROTECTED = (
    Protected(SSM_FLOAT32, "SSM dynamics: A = -exp(A_log), dt = softplus(. + dt_bias)"),
    Protected(r"\.mixer\.conv1d\.(weight|bias)$", "conv1d kernel: a handful of taps per channel"),
    Protected(r"(norm|norm_f)\.weight$", "norm weights scale whole activations"),
    Protected(ROUTER, "router: its rounding changes which experts run"),
)
ROLES = (
    Role("embed", r"^backbone\.embeddings\.weight$", sensitive=True),
    Role("lm_head", r"^lm_head\.weight$", sensitive=True),
    Role("mamba.in_proj", r"\.mixer\.in_proj\.weight$", sensitive=True),
    Role("mamba.out_proj", r"\.mixer\.out_proj\.weight$"),
    Role("attn.q_proj", r"\.mixer\.q_proj\.weight$"),
    Role("attn.k_proj", r"\.mixer\.k_proj\.weight$"),
    Role("attn.v_proj", r"\.mixer\.v_proj\.weight$"),
    Role("attn.o_proj", r"\.mixer\.o_proj\.weight$"),
    Role("mlp.up_proj", r"\.mixer\.up_proj\.weight$"),
    Role("mlp.down_proj", r"\.mixer\.down_proj\.weight$", sensitive=True),
    Role("moe.shared_up_proj", r"\.shared_experts\.up_proj\.weight$"),
    Role("moe.shared_down_proj", r"\.shared_experts\.down_proj\.weight$", sensitive=True),
    Role("moe.experts_fc1", r"\.switch_mlp\.fc1\.weight$"),
    Role("moe.experts_fc2", r"\.switch_mlp\.fc2\.weight$"),
    Role("moe.latent_proj", r"\.fc[12]_latent_proj\.weight$"),
)

ARCH = register(
    Architecture(
        model_type="nemotron_h",
        architectures=("NemotronHForCausalLM",),
        title="Nemotron-H (Mamba-2, attention, MLP and MoE layers)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)

register_wrapper(Wrapper("nemotron_h_omni", ("NemotronH_Omni_Reasoning_V3",), "nemotron_h", "Nemotron-H omni",
                         config_keys=("text_config", "llm_config"), tie="text"))
