"""Falcon-H1 converter: config normalisation and tensor rules.

Architecture and math: :mod:`hybridconv.models.falcon_h1`. Parameter names are
the Hugging Face ones, which are also mlx-lm's (``model.layers.N.mamba.…``,
``.self_attn.…``, ``.feed_forward.…``).

Config normalisation (the published Falcon-H1 configs and transformers 5's):

* Mamba-2 sizes as transformers reads them: ``mamba_d_ssm`` (``null`` means
  ``mamba_expand · hidden_size``), ``mamba_d_head = "auto"`` means
  ``mamba_d_ssm / mamba_n_heads``, and ``mamba_n_heads · mamba_d_head`` must
  equal ``mamba_d_ssm``; ``mamba_n_heads`` a multiple of ``mamba_n_groups``.
  Written as plain integers (mlx-lm reads ``mamba_d_ssm`` and
  ``mamba_d_head`` and has no ``"auto"``).
* ``head_dim`` (published) or ``hidden_size / num_attention_heads``
  (transformers' fallback); ``num_key_value_heads`` absent means 8
  (transformers' default).
* ``rope_theta`` at the top level (published) or in ``rope_parameters``
  (transformers 5), written at the top level (mlx-lm reads only that and
  otherwise assumes 1e11); only the ``default`` rope type.
* the µP multipliers (``embedding_multiplier``, ``lm_head_multiplier``,
  ``attention_in_multiplier``, ``attention_out_multiplier``,
  ``key_multiplier``, ``ssm_in_multiplier``, ``ssm_out_multiplier``,
  ``ssm_multipliers`` (5), ``mlp_multipliers`` (2)): validated finite numbers,
  kept in the written config as data, with ``multipliers_folded: true``
  (below).
* ``time_step_limit`` (transformers' ``{"__float__": "Infinity"}`` encoding or
  numbers) written as ``[low, null]`` / ``[low, high]`` (``null``: no limit).
* ``hidden_act`` must be ``silu`` (the MLP and the conv activation).

Tensor rules: ``drop`` rotary ``inv_freq`` buffers and a tied
``lm_head.weight``; ``conv1d-to-mlx`` for ``mamba.conv1d.weight``
(``K = mamba_d_conv``); ``keep-float32`` ``A_log``, ``D``, ``dt_bias`` (the
decay ``exp(Δ·A)`` compounds a bf16 rounding of ``A_log`` over every step);
everything else cast to ``--dtype``, names unchanged.

Folding the multipliers (``scale`` rules, float32 then one cast or quantized
after scaling). Each multiplier multiplies the input or the output of one
linear map, so it moves into that map exactly up to rounding:

=================================  =========================================
``model.embed_tokens.weight``      × ``embedding_multiplier``
``lm_head.weight`` (untied)        × ``lm_head_multiplier``
``self_attn.q_proj / v_proj``      weight × ``attention_in_multiplier``
``self_attn.k_proj``               weight × ``attention_in · key_multiplier``,
                                   bias × ``key_multiplier``
``self_attn.o_proj``               weight, bias × ``attention_out_multiplier``
``mamba.in_proj``                  row ``r`` of the weight ×
                                   ``ssm_in_multiplier · mup[r]``, of the bias
                                   × ``mup[r]`` (``mup``: ``ssm_multipliers``
                                   over ``[z | x | B | C | dt]``)
``mamba.out_proj``                 weight, bias × ``ssm_out_multiplier``
``feed_forward.gate_proj``         weight, bias × ``mlp_multipliers[0]``
``feed_forward.down_proj``         weight, bias × ``mlp_multipliers[1]``
=================================  =========================================

With tied embeddings the shared matrix carries ``embedding_multiplier`` and the
head multiplies by ``lm_head_multiplier / embedding_multiplier`` at run time
(what mlx-lm does for a tied head). The output says ``multipliers_folded:
true``; a source that says so is not folded again, so converting an output
again changes nothing. Why fold rather than apply at run time (hybridconv's
model can do either): mlx-lm reads an MLX-layout folder without applying any
multiplier (its own folding runs only on PyTorch-layout weights, and misses
``key_multiplier`` and ``v_proj``'s input multiplier); folded, the output
computes the reference function in both runtimes (measured in
tests/test_arch_falcon_h1.py). What folding cannot fix in mlx-lm: its gated
RMSNorm ignores ``mamba_n_groups`` (``mamba_rms_norm`` with groups > 1) and
it ignores ``time_step_limit``.

Quantization policy (``hybridconv quantize``)
---------------------------------------------
Never quantized (:data:`PROTECTED`; ``A_log``, ``D``, ``dt_bias`` float32, kept so
by the conversion; the rest in the output dtype, as mlx-lm stores them):
``A_log``, ``D``, ``dt_bias``, the conv1d kernels and biases, every norm weight (the input / pre-FF / final
RMSNorms and the mixer's gated norm when ``mamba_rms_norm``). Quantized
(:data:`ROLES`): embeddings and head, ``in_proj`` / ``out_proj``, the attention
projections and the MLP. Sensitive (wider in mixed recipes): embeddings, head,
``in_proj`` (all inputs of the recurrence) and the MLP ``down_proj``.
Folded multipliers are quantized with their weights (the rows are scaled
before the groups are formed).
"""

from __future__ import annotations

from ..config import pick, positive, positive_int
from ..errors import ConfigError
from ..models import falcon_h1 as model_module
from ._common import (
    ATTENTION_ROLES,
    FEED_FORWARD_ROLES,
    MAMBA2_PROTECTED,
    MAMBA2_ROLES,
    mamba2_rules,
    parse_time_step_limit,
    rope_theta,
)
from .registry import Architecture, register
from .rules import Rule, Scale

MULTIPLIERS = (
    "embedding_multiplier",
    "lm_head_multiplier",
    "attention_in_multiplier",
    "attention_out_multiplier",
    "key_multiplier",
    "ssm_in_multiplier",
    "ssm_out_multiplier",
)
LIST_MULTIPLIERS = {"ssm_multipliers": 5, "mlp_multipliers": 2}


def normalize_config(raw: dict) -> dict:
    cfg = dict(raw)
    cfg["model_type"] = "falcon_h1"

    hidden = cfg["hidden_size"] = positive_int(raw, "hidden_size")
    cfg["num_hidden_layers"] = positive_int(raw, "num_hidden_layers")
    cfg["vocab_size"] = positive_int(raw, "vocab_size")
    cfg["intermediate_size"] = positive_int(raw, "intermediate_size")
    act = pick(raw, "hidden_act", default="silu", kind=str)
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act {act!r} is not supported for Falcon-H1 (expected 'silu')")

    # Attention.
    heads = cfg["num_attention_heads"] = positive_int(raw, "num_attention_heads")
    kv = raw.get("num_key_value_heads", 8)  # absent: transformers' default 8; null: the head count
    kv = cfg["num_key_value_heads"] = positive(
        "num_key_value_heads", pick({"num_key_value_heads": kv if kv is not None else heads}, "num_key_value_heads", kind=int)
    )
    if heads % kv:
        raise ConfigError(f"config.json: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})")
    head_dim = raw.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(f"config.json: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})")
        head_dim = hidden // heads
    cfg["head_dim"] = positive("head_dim", pick({"head_dim": head_dim}, "head_dim", kind=int))
    cfg["rope_theta"] = rope_theta(raw)
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = None
    cfg["max_position_embeddings"] = pick(raw, "max_position_embeddings", default=8192, kind=int)

    # Mamba-2.
    expand = cfg["mamba_expand"] = positive_int(raw, "mamba_expand", default=2)
    d_ssm = raw.get("mamba_d_ssm", 1024)
    d_ssm = positive("mamba_d_ssm", pick({"mamba_d_ssm": d_ssm if d_ssm is not None else expand * hidden}, "mamba_d_ssm", kind=int))
    cfg["mamba_d_ssm"] = d_ssm
    n_heads = cfg["mamba_n_heads"] = positive_int(raw, "mamba_n_heads", default=128)
    d_head = raw.get("mamba_d_head", "auto")
    if d_head in ("auto", None):
        if d_ssm % n_heads:
            raise ConfigError(f"config.json: mamba_n_heads ({n_heads}) must divide mamba_d_ssm ({d_ssm})")
        d_head = d_ssm // n_heads
    d_head = cfg["mamba_d_head"] = positive("mamba_d_head", pick({"mamba_d_head": d_head}, "mamba_d_head", kind=int))
    if n_heads * d_head != d_ssm:
        raise ConfigError(
            f"config.json: mamba_n_heads * mamba_d_head ({n_heads} * {d_head}) must equal mamba_d_ssm ({d_ssm})"
        )
    groups = cfg["mamba_n_groups"] = positive_int(raw, "mamba_n_groups", default=1)
    if n_heads % groups:
        raise ConfigError(f"config.json: mamba_n_heads ({n_heads}) must be a multiple of mamba_n_groups ({groups})")
    cfg["mamba_d_state"] = positive_int(raw, "mamba_d_state", default=256)
    cfg["mamba_d_conv"] = positive_int(raw, "mamba_d_conv", default=4)
    cfg["mamba_chunk_size"] = positive_int(raw, "mamba_chunk_size", default=256)
    for key, default in (
        ("mamba_conv_bias", True),
        ("mamba_proj_bias", False),
        ("projectors_bias", False),
        ("mamba_rms_norm", False),
        ("mamba_norm_before_gate", True),
        ("attention_bias", False),
        ("mlp_bias", False),
        ("tie_word_embeddings", False),
    ):
        cfg[key] = pick(raw, key, default=default, kind=bool)
    cfg["time_step_limit"] = parse_time_step_limit(raw)
    cfg["rms_norm_eps"] = pick(raw, "rms_norm_eps", default=1e-5, kind=float)

    # µP multipliers.
    for key in MULTIPLIERS:
        cfg[key] = pick(raw, key, default=1.0, kind=float)
    for key, n in LIST_MULTIPLIERS.items():
        value = raw.get(key)
        if value is None:
            value = [1.0] * n
        if not isinstance(value, list) or len(value) != n:
            raise ConfigError(f"config.json: '{key}' must be a list of {n} numbers, found {value!r}")
        cfg[key] = [pick({key: v}, key, kind=float) for v in value]
    cfg.pop("layers_block_type", None)  # every layer is hybrid; nothing to state
    # The weights written carry the multipliers (folded); whether *this*
    # conversion folds them depends on the source (see the module docstring).
    cfg[FOLD] = not pick(raw, FOLDED, default=False, kind=bool)
    cfg[FOLDED] = True
    return cfg


FOLDED = "multipliers_folded"  # written config: the weights carry the multipliers
FOLD = "_fold_multipliers"  # this conversion folds them (the source has FOLDED unset); not written


def mup_vector(cfg: dict) -> tuple[float, ...]:
    """``ssm_multipliers`` spread over ``in_proj``'s output rows ``[z | x | B | C | dt]``."""
    d, gn, h = cfg["mamba_d_ssm"], cfg["mamba_n_groups"] * cfg["mamba_d_state"], cfg["mamba_n_heads"]
    widths = (d, d, gn, gn, h)
    return tuple(m for w, m in zip(widths, cfg["ssm_multipliers"]) for _ in range(w))


def fold_rules(cfg: dict) -> list[Rule]:
    """Each multiplier into the weights (and biases) of the linear map whose input or
    output it scales, exactly where transformers applies it (see the model docstring)."""
    m = cfg
    a_in, key, gate, down = m["attention_in_multiplier"], m["key_multiplier"], *m["mlp_multipliers"]
    mup = mup_vector(cfg)
    L = r"^model\.layers\.\d+\."
    out = [
        Scale(r"^model\.embed_tokens\.weight$", m["embedding_multiplier"], "embedding_multiplier"),
        Scale(L + r"self_attn\.(q|v)_proj\.weight$", a_in, "attention_in_multiplier"),
        Scale(L + r"self_attn\.k_proj\.weight$", a_in * key, "attention_in_multiplier · key_multiplier"),
        Scale(L + r"self_attn\.k_proj\.bias$", key, "key_multiplier"),
        Scale(L + r"self_attn\.o_proj\.(weight|bias)$", m["attention_out_multiplier"], "attention_out_multiplier"),
        Scale(L + r"mamba\.in_proj\.weight$", tuple(m["ssm_in_multiplier"] * v for v in mup),
              "ssm_in_multiplier · ssm_multipliers per segment"),
        Scale(L + r"mamba\.in_proj\.bias$", mup, "ssm_multipliers per segment"),
        Scale(L + r"mamba\.out_proj\.(weight|bias)$", m["ssm_out_multiplier"], "ssm_out_multiplier"),
        Scale(L + r"feed_forward\.gate_proj\.(weight|bias)$", gate, "mlp_multipliers[0]"),
        Scale(L + r"feed_forward\.down_proj\.(weight|bias)$", down, "mlp_multipliers[1]"),
    ]
    if not cfg["tie_word_embeddings"]:  # tied: the head keeps lm_head_multiplier / embedding_multiplier
        out.append(Scale(r"^lm_head\.weight$", m["lm_head_multiplier"], "lm_head_multiplier"))
    return out


def rules(cfg: dict) -> list[Rule]:
    out = mamba2_rules(cfg)
    if cfg.get(FOLD):
        out += fold_rules(cfg)
    return out


PROTECTED = MAMBA2_PROTECTED
ROLES = MAMBA2_ROLES + ATTENTION_ROLES + FEED_FORWARD_ROLES

ARCH = register(
    Architecture(
        model_type="falcon_h1",
        architectures=("FalconH1ForCausalLM",),
        title="Falcon-H1 (parallel attention + Mamba-2, µP multipliers)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)
