"""Pieces several converters share: config readers and the rules, protections
and quantization roles of components that more than one architecture uses.

Not an architecture (the leading ``_`` keeps it out of auto-registration).
What lives here is read or computed the same way by every importer; a
converter that needs something else spells it out itself.

* Config readers: the per-layer kind lists in either spelling
  (``attention``/``mamba`` or transformers 5's ``full_attention``/
  ``linear_attention``), layer index lists, Mamba-2's ``time_step_limit``
  (transformers 5 writes infinity as ``{"__float__": "Infinity"}``; the
  output states it as ``[low, null]``: JSON has no infinity), the ``default``
  RoPE ``rope_theta`` at the top level or in ``rope_parameters``, the
  attention head counts, the ``silu`` activation check, and the Mamba-2 keys
  of transformers' Bamba-style configs (``mamba_*``).
* Tensor rules: rotary ``inv_freq`` buffers dropped, a tied ``lm_head``
  dropped, routed experts (one tensor per expert, or transformers 5's fused
  ones) to mlx-lm's stacked ``switch_mlp`` layout, and the Mamba-2 mixer
  under the ``.mamba.`` name (Bamba, GraniteMoeHybrid, Falcon-H1, Zamba2):
  conv kernels to MLX's layout, the SSM dynamics (``A_log``, ``D``,
  ``dt_bias``) kept float32.
* Quantization: the protections and roles of that mixer, of Llama-layout
  attention and of a gated MLP under ``feed_forward``.
"""

from __future__ import annotations

import math

from ..config import pick, positive, positive_int
from ..errors import ConfigError
from .registry import Protected, Role
from .rules import ConvToMLX, Drop, KeepFloat32, Rename, Rule, Split, StackExperts

# --- config readers ---------------------------------------------------------

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
    """``[low, high]`` with ``None`` for an infinite ``high`` (module docstring)."""
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
    heads = cfg["num_attention_heads"] = positive_int(raw, "num_attention_heads")
    kv = cfg["num_key_value_heads"] = positive_int(raw, "num_key_value_heads", default=kv_default or heads)
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


def normalize_mamba2(raw: dict, cfg: dict) -> None:
    """The Mamba-2 keys shared by Bamba and GraniteMoeHybrid (transformers' names)."""
    hidden = cfg["hidden_size"]
    expand = positive_int(raw, "mamba_expand", default=2)
    heads = cfg["mamba_n_heads"] = positive_int(raw, "mamba_n_heads", default=128)
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
    groups = cfg["mamba_n_groups"] = positive_int(raw, "mamba_n_groups", default=1)
    if heads % groups:
        raise ConfigError(f"config.json: mamba_n_heads ({heads}) must be a multiple of mamba_n_groups ({groups})")
    cfg["mamba_d_state"] = positive_int(raw, "mamba_d_state", default=256)
    cfg["mamba_d_conv"] = positive_int(raw, "mamba_d_conv", default=4)
    cfg["mamba_chunk_size"] = positive_int(raw, "mamba_chunk_size", default=256)
    cfg["mamba_conv_bias"] = pick(raw, "mamba_conv_bias", default=True, kind=bool)
    cfg["mamba_proj_bias"] = pick(raw, "mamba_proj_bias", default=False, kind=bool)
    cfg["time_step_limit"] = parse_time_step_limit(raw)


# --- tensor rules -----------------------------------------------------------


def head_rules(cfg: dict, embedding: str = "model.embed_tokens.weight", rotary: bool = True) -> list[Rule]:
    """Drop rotary ``inv_freq`` buffers (``rotary``: the model has RoPE, they are
    recomputed from ``rope_theta``) and, when ``tie_word_embeddings``, the
    ``lm_head.weight`` (the head is ``embedding``)."""
    out: list[Rule] = []
    if rotary:
        out.append(Drop(r"(^|\.)rotary_emb\.inv_freq$", "recomputed from rope_theta", "rotary inv_freq buffers"))
    if cfg["tie_word_embeddings"]:
        out.append(Drop(r"^lm_head\.weight$", f"tied: the head is {embedding}", "lm_head.weight"))
    return out


def fused_expert_rules(intermediate: int, dst: str = ".mlp.switch_mlp") -> list[Rule]:
    """transformers 5's fused routed experts under ``.mlp.experts.``
    (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) to mlx-lm's
    ``dst.{gate,up,down}_proj.weight``: the gate/up halves split at ``I``."""
    return [
        Split(r"\.mlp\.experts\.gate_up_proj$", 1,
              [(f"{dst}.gate_proj.weight", intermediate), (f"{dst}.up_proj.weight", intermediate)],
              "fused expert gate_up_proj [E, 2I, H]"),
        Rename(r"\.mlp\.experts\.down_proj$", f"{dst}.down_proj.weight"),
    ]


def switch_mlp_rules(experts: int, intermediate: int) -> list[Rule]:
    """Routed experts under ``.mlp.experts.`` to ``.mlp.switch_mlp.``, whether the
    checkpoint stores one tensor per expert (``experts.{e}.gate_proj.weight``;
    stacked to ``[E, ...]``) or transformers 5's fused ones."""
    return [
        StackExperts(r"\.mlp\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$",
                     r".mlp.switch_mlp.\g<proj>.weight", experts, "per-expert MLP weights"),
        *fused_expert_rules(intermediate),
    ]


MAMBA2_SSM_FLOAT32 = r"\.mamba\.(A_log|D|dt_bias)$"


def mamba2_mixer_rules(cfg: dict) -> list[Rule]:
    """The Mamba-2 mixer under ``.mamba.`` (kernel width ``mamba_d_conv``)."""
    return [
        ConvToMLX(r"\.mamba\.conv1d\.weight$", cfg["mamba_d_conv"], "Mamba-2 conv1d weights"),
        KeepFloat32(MAMBA2_SSM_FLOAT32, "SSM decay parameters: rounding compounds over every step", "A_log, D, dt_bias"),
    ]


def mamba2_rules(cfg: dict) -> list[Rule]:
    """Bamba's rules, shared by GraniteMoeHybrid and Falcon-H1 (same mixer, same names)."""
    return head_rules(cfg) + mamba2_mixer_rules(cfg)


# --- quantization -----------------------------------------------------------

MAMBA2_PROTECTED = (
    Protected(MAMBA2_SSM_FLOAT32, "SSM dynamics: A = -exp(A_log), dt = softplus(. + dt_bias)"),
    Protected(r"\.mamba\.conv1d\.(weight|bias)$", "conv1d kernel: a handful of taps per channel"),
    Protected(r"norm\.weight$", "norm weights scale whole activations"),
)
MAMBA2_ROLES = (
    Role("embed", r"^model\.embed_tokens\.weight$", sensitive=True),
    Role("lm_head", r"^lm_head\.weight$", sensitive=True),
    Role("mamba.in_proj", r"\.mamba\.in_proj\.weight$", sensitive=True),
    Role("mamba.out_proj", r"\.mamba\.out_proj\.weight$"),
)
ATTENTION_ROLES = (
    Role("attn.q_proj", r"\.self_attn\.q_proj\.weight$"),
    Role("attn.k_proj", r"\.self_attn\.k_proj\.weight$"),
    Role("attn.v_proj", r"\.self_attn\.v_proj\.weight$"),
    Role("attn.o_proj", r"\.self_attn\.o_proj\.weight$"),
)


def swiglu_roles(module: str) -> tuple:
    """The roles of a SwiGLU MLP stored as ``<module>.{gate,up,down}_proj``."""
    return (
        Role("mlp.gate_proj", rf"\.{module}\.gate_proj\.weight$"),
        Role("mlp.up_proj", rf"\.{module}\.up_proj\.weight$"),
        Role("mlp.down_proj", rf"\.{module}\.down_proj\.weight$", sensitive=True),
    )


FEED_FORWARD_ROLES = swiglu_roles("feed_forward")
