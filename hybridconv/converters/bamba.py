"""Bamba converter: config normalisation and tensor rules.

Architecture and math: :mod:`hybridconv.models.bamba`. mlx-lm has no Bamba;
parameter names are the Hugging Face ones.

Config normalisation (the published Bamba configs and transformers 5's):

* the schedule from ``attn_layer_indices`` (published and transformers 5), or
  from a ``layers_block_type`` / ``layer_types`` list (``attention`` /
  ``mamba`` or transformers 5's ``full_attention`` / ``linear_attention``);
  written as ``attn_layer_indices``, validated (integers ``0..L-1``).
* ``rope_theta`` at the top level (published) or in ``rope_parameters``
  (transformers 5); only the ``default`` rope type. Rotary embeddings cover
  half of each head (transformers hard-codes ``partial_rotary_factor = 0.5``
  for Bamba); a config stating another factor, or an ``attn_rotary_emb`` other
  than ``head_dim / 2`` (the published key), is refused rather than silently
  computed differently from the reference.
* Mamba-2 sizes as transformers reads them: ``mamba_d_head = "auto"`` means
  ``mamba_expand · hidden_size / mamba_n_heads``, and ``mamba_n_heads ·
  mamba_d_head`` must equal ``mamba_expand · hidden_size``; ``mamba_n_heads``
  a multiple of ``mamba_n_groups``.
* ``time_step_limit`` (the clamp on Δ): transformers defaults to ``(0, inf)``
  and writes infinity as ``{"__float__": "Infinity"}``; both that and a plain
  number are read, and the output states it as ``[low, null]`` (``null``: no
  upper limit; JSON has no infinity). mlx-lm's models default to
  ``(1e-3, 100)`` when the key is absent, so it is always written.

Tensor rules: ``drop`` rotary ``inv_freq`` buffers and a tied
``lm_head.weight``; ``conv1d-to-mlx`` for ``mamba.conv1d.weight``
(``K = mamba_d_conv``); ``keep-float32`` ``A_log``, ``D`` and ``dt_bias`` (the
decay ``exp(Δ·A)`` compounds a bf16 rounding of ``A_log`` over every step);
everything else cast to ``--dtype``, names unchanged.

Quantization policy (``hybridconv quantize``)
---------------------------------------------
Never quantized (:data:`PROTECTED`): ``A_log``, ``D``, ``dt_bias`` (float32, kept
so by the conversion), the conv1d kernels and biases (a handful of taps per
channel) and every norm weight, the gated RMSNorm of the mixer included (these in
the output dtype, as mlx-lm stores them: README, "Quantization"). Quantized (:data:`ROLES`):
embeddings and head, the mixer's ``in_proj`` and ``out_proj``, the attention
projections and the MLP. Sensitive (the wider width in mixed recipes): the
embeddings and head, ``in_proj`` (it produces ``z``, ``x``, ``B``, ``C`` and
``Δ``, every input of the recurrence) and the MLP ``down_proj``.
"""

from __future__ import annotations

import math

from ..config import pick, positive
from ..errors import ConfigError
from ..models import bamba as model_module
from .registry import Architecture, Protected, Role, register
from .rules import ConvToMLX, Drop, KeepFloat32, Rule

LAYER_KIND_ALIASES = {
    "mamba": "mamba",
    "linear_attention": "mamba",
    "attention": "attention",
    "full_attention": "attention",
}


def parse_layer_kinds(value, n: int, key: str) -> list[str]:
    """A per-layer list of ``mamba`` / ``attention`` in either spelling."""
    if not isinstance(value, list) or len(value) != n:
        raise ConfigError(
            f"config.json: '{key}' must be a list of {n} layer kinds (num_hidden_layers), found {value!r}"
        )
    out = []
    for i, kind in enumerate(value):
        if kind not in LAYER_KIND_ALIASES:
            raise ConfigError(
                f"config.json: {key}[{i}] is {kind!r}; expected one of {', '.join(LAYER_KIND_ALIASES)}"
            )
        out.append(LAYER_KIND_ALIASES[kind])
    return out


def layer_indices(value, n: int, key: str) -> list[int]:
    if not isinstance(value, list):
        raise ConfigError(f"config.json: '{key}' must be a list of layer indices, found {value!r}")
    for i in value:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise ConfigError(f"config.json: '{key}' entry {i!r} is not a layer index 0..{n - 1}")
    return sorted(set(value))


def parse_time_step_limit(raw: dict) -> list:
    """``[low, high]`` with ``None`` for an infinite ``high`` (see module docstring)."""
    value = raw.get("time_step_limit")
    if value is None:
        return [0.0, None]

    def number(v, which: str):
        if isinstance(v, dict) and set(v) == {"__float__"} and isinstance(v["__float__"], str):
            v = {"Infinity": math.inf, "inf": math.inf}.get(v["__float__"], v)  # transformers 5's encoding
        if v is None and which == "high":
            return math.inf
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise ConfigError(f"config.json: time_step_limit {which} bound must be a number, found {v!r}")
        return float(v)

    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"config.json: time_step_limit must be [low, high], found {value!r}")
    lo, hi = number(value[0], "low"), number(value[1], "high")
    if not (0.0 <= lo < hi) or math.isinf(lo):
        raise ConfigError(f"config.json: time_step_limit must satisfy 0 <= low < high, found {value!r}")
    return [lo, None if math.isinf(hi) else hi]


def normalize_mamba2(raw: dict, cfg: dict) -> None:
    """The Mamba-2 keys shared by Bamba and GraniteMoeHybrid (transformers' names)."""
    hidden = cfg["hidden_size"]
    expand = positive("mamba_expand", pick(raw, "mamba_expand", default=2, kind=int))
    heads = cfg["mamba_n_heads"] = positive("mamba_n_heads", pick(raw, "mamba_n_heads", default=128, kind=int))
    d_head = raw.get("mamba_d_head", "auto")
    if d_head in ("auto", None):
        if (expand * hidden) % heads:
            raise ConfigError(
                f"config.json: mamba_n_heads ({heads}) must divide mamba_expand * hidden_size ({expand * hidden})"
            )
        d_head = expand * hidden // heads
    d_head = cfg["mamba_d_head"] = positive("mamba_d_head", pick({"mamba_d_head": d_head}, "mamba_d_head", kind=int))
    if heads * d_head != expand * hidden:
        raise ConfigError(
            f"config.json: mamba_n_heads * mamba_d_head ({heads} * {d_head}) must equal "
            f"mamba_expand * hidden_size ({expand} * {hidden}), as transformers requires"
        )
    cfg["mamba_expand"] = expand
    groups = cfg["mamba_n_groups"] = positive("mamba_n_groups", pick(raw, "mamba_n_groups", default=1, kind=int))
    if heads % groups:
        raise ConfigError(f"config.json: mamba_n_heads ({heads}) must be a multiple of mamba_n_groups ({groups})")
    cfg["mamba_d_state"] = positive("mamba_d_state", pick(raw, "mamba_d_state", default=256, kind=int))
    cfg["mamba_d_conv"] = positive("mamba_d_conv", pick(raw, "mamba_d_conv", default=4, kind=int))
    cfg["mamba_chunk_size"] = positive("mamba_chunk_size", pick(raw, "mamba_chunk_size", default=256, kind=int))
    cfg["mamba_conv_bias"] = pick(raw, "mamba_conv_bias", default=True, kind=bool)
    cfg["mamba_proj_bias"] = pick(raw, "mamba_proj_bias", default=False, kind=bool)
    cfg["time_step_limit"] = parse_time_step_limit(raw)


def check_activation(raw: dict) -> None:
    act = pick(raw, "hidden_act", default="silu", kind=str)
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act {act!r} is not supported (expected 'silu')")


def rope_theta(raw: dict) -> float:
    rope_type = pick(raw, "rope_parameters.rope_type", "rope_scaling.rope_type", "rope_scaling.type", default="default")
    if rope_type != "default":
        raise ConfigError(f"config.json: rope type {rope_type!r} is not supported (only 'default')")
    return pick(raw, "rope_theta", "rope_parameters.rope_theta", default=10000.0, kind=float)


def normalize_attention(raw: dict, cfg: dict, kv_default: int | None) -> None:
    """Heads, KV heads (``kv_default``: transformers' default; None = the head count)."""
    heads = cfg["num_attention_heads"] = positive(
        "num_attention_heads", pick(raw, "num_attention_heads", kind=int)
    )
    kv = cfg["num_key_value_heads"] = positive(
        "num_key_value_heads",
        pick(raw, "num_key_value_heads", default=kv_default or heads, kind=int),
    )
    if heads % kv:
        raise ConfigError(
            f"config.json: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})"
        )
    head_dim = raw.get("head_dim")
    if head_dim is None:
        if cfg["hidden_size"] % heads:
            raise ConfigError(
                f"config.json: hidden_size ({cfg['hidden_size']}) is not a multiple of num_attention_heads ({heads})"
            )
        head_dim = cfg["hidden_size"] // heads
    cfg["head_dim"] = positive("head_dim", pick({"head_dim": head_dim}, "head_dim", kind=int))


def normalize_config(raw: dict) -> dict:
    cfg = dict(raw)
    cfg["model_type"] = "bamba"

    def req_int(name):
        return positive(name, pick(raw, name, kind=int))

    cfg["hidden_size"] = req_int("hidden_size")
    n = cfg["num_hidden_layers"] = req_int("num_hidden_layers")
    cfg["vocab_size"] = req_int("vocab_size")
    cfg["intermediate_size"] = req_int("intermediate_size")
    normalize_attention(raw, cfg, kv_default=8)
    check_activation(raw)
    normalize_mamba2(raw, cfg)
    if raw.get("attn_layer_indices") is not None:
        cfg["attn_layer_indices"] = layer_indices(raw["attn_layer_indices"], n, "attn_layer_indices")
    else:
        key = next((k for k in ("layers_block_type", "layer_types") if raw.get(k) is not None), None)
        kinds = parse_layer_kinds(raw[key], n, key) if key else ["mamba"] * n
        cfg["attn_layer_indices"] = [i for i, k in enumerate(kinds) if k == "attention"]
    for key in ("layers_block_type", "layer_types"):
        cfg.pop(key, None)  # the index list is the one statement of the schedule
    cfg["rope_theta"] = rope_theta(raw)
    factor = pick(raw, "partial_rotary_factor", "rope_parameters.partial_rotary_factor", default=0.5, kind=float)
    rotary = pick(raw, "attn_rotary_emb", default=None, kind=int)
    half = int(cfg["head_dim"] * 0.5)
    if factor != 0.5 or (rotary is not None and rotary != half):
        found = f"partial_rotary_factor {factor}" if factor != 0.5 else f"attn_rotary_emb {rotary}"
        raise ConfigError(
            f"config.json: Bamba rotates half of each head ({half} of {cfg['head_dim']} channels; "
            f"transformers hard-codes partial_rotary_factor 0.5), found {found}"
        )
    cfg["partial_rotary_factor"] = 0.5
    cfg["rms_norm_eps"] = pick(raw, "rms_norm_eps", default=1e-5, kind=float)
    cfg["tie_word_embeddings"] = pick(raw, "tie_word_embeddings", default=False, kind=bool)
    cfg["attention_bias"] = pick(raw, "attention_bias", default=False, kind=bool)
    cfg["mlp_bias"] = pick(raw, "mlp_bias", default=False, kind=bool)
    return cfg


SSM_FLOAT32 = r"\.mamba\.(A_log|D|dt_bias)$"


def mamba2_rules(cfg: dict) -> list[Rule]:
    """Rules shared with GraniteMoeHybrid (same mixer, same names)."""
    out: list[Rule] = [Drop(r"(^|\.)rotary_emb\.inv_freq$", "recomputed from rope_theta", "rotary inv_freq buffers")]
    if cfg["tie_word_embeddings"]:
        out.append(Drop(r"^lm_head\.weight$", "tied: the head is model.embed_tokens.weight", "lm_head.weight"))
    out.append(ConvToMLX(r"\.mamba\.conv1d\.weight$", cfg["mamba_d_conv"], "Mamba-2 conv1d weights"))
    out.append(
        KeepFloat32(SSM_FLOAT32, "SSM decay parameters: rounding compounds over every step", "A_log, D, dt_bias")
    )
    return out


MAMBA2_PROTECTED = (
    Protected(SSM_FLOAT32, "SSM dynamics: A = -exp(A_log), dt = softplus(. + dt_bias)"),
    Protected(r"\.mamba\.conv1d\.(weight|bias)$", "conv1d kernel: a handful of taps per channel"),
    Protected(r"norm\.weight$", "norm weights scale whole activations"),
)
MAMBA2_ROLES = (
    Role("embed", r"^model\.embed_tokens\.weight$", sensitive=True),
    Role("lm_head", r"^lm_head\.weight$", sensitive=True),
    Role("mamba.in_proj", r"\.mamba\.in_proj\.weight$", sensitive=True),
    Role("mamba.out_proj", r"\.mamba\.out_proj\.weight$"),
    Role("attn.q_proj", r"\.self_attn\.q_proj\.weight$"),
    Role("attn.k_proj", r"\.self_attn\.k_proj\.weight$"),
    Role("attn.v_proj", r"\.self_attn\.v_proj\.weight$"),
    Role("attn.o_proj", r"\.self_attn\.o_proj\.weight$"),
)
ROLES = MAMBA2_ROLES + (
    Role("mlp.gate_proj", r"\.feed_forward\.gate_proj\.weight$"),
    Role("mlp.up_proj", r"\.feed_forward\.up_proj\.weight$"),
    Role("mlp.down_proj", r"\.feed_forward\.down_proj\.weight$", sensitive=True),
)

ARCH = register(
    Architecture(
        model_type="bamba",
        architectures=("BambaForCausalLM",),
        title="Bamba (Mamba-2 + attention)",
        normalize_config=normalize_config,
        rules=mamba2_rules,
        model_module=model_module,
        roles=ROLES,
        protected=MAMBA2_PROTECTED,
    )
)
