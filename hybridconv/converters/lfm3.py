"""LFM3 converter: config normalisation, tensor rules, quantization policy.

Architecture and math: :mod:`hybridconv.models.lfm3`.

Config layouts
--------------
transformers 5 (``Lfm3Config``) writes ``layer_types`` (``conv`` /
``full_attention`` / ``sliding_attention``), ``rope_parameters`` nested by
attention type, ``norm_eps``, ``sliding_window``, ``use_sandwich_norm``,
``use_attention_gate``. Also read, as transformers reads them: ``rms_norm_eps``
(its ``attribute_map`` alias of ``norm_eps``), ``rope_scaling`` in place of
``rope_parameters``, a top-level ``rope_theta`` / ``partial_rotary_factor`` as the
default of each nested table that lacks one, and every key transformers
defaults when absent (``layer_types``: attention at ``i % 4 == 2``, sliding at
``i % 4 == 0``, ``i > 0``; ``rope_parameters``: sliding ``default`` θ = 10⁴,
full ``proportional`` θ = 10⁶ with factor 0.5; ``head_dim`` 128,
``sliding_window`` 256, ...). A ``rope_parameters`` that is not nested by layer
type is refused (transformers' LFM3 indexes it by type and fails too), and so
is a RoPE type other than ``default`` and ``proportional``. The written config
states every attention type's table in full.

Tensor rules, in order
----------------------
* ``drop`` rotary ``inv_freq`` buffers, and ``lm_head.weight`` when tied;
* ``rename`` ``self_attn.g_proj`` (transformers' in-memory name of the gate) to
  ``self_attn.gate_proj`` (the original checkpoints' name, which
  ``save_pretrained`` restores: the oracle fixture has it);
* ``conv1d-to-mlx`` the short-conv kernels ``conv.conv.weight``
  ``[D, 1, L] -> [D, L, 1]``.

Quantization policy
-------------------
Never quantized (:data:`PROTECTED`), stored in the output dtype: the conv kernels
(``L = 7`` taps per channel, and their biases) and every RMSNorm weight
(operator, FFN, the two sandwich norms, ``q_norm`` / ``k_norm``, the final norm).
Quantized at ``--bits`` (:data:`ROLES`): embeddings / head and FFN ``w2``
(sensitive), the conv ``in_proj`` / ``out_proj``, the attention projections,
FFN ``w1`` / ``w3`` — LFM2's policy. New here, the per-head attention gate
``self_attn.gate_proj`` (``[heads, hidden]``: about 0.3 % of an attention
layer's weights at LFM3-1.7B's sizes) is quantized too: measured on lfm3-tiny
(default 4-bit against ``quantize(keep=["attn.gate"])``, verify on 2 × 64
random tokens against the float32 reference), keeping it in float left the
mean KL unchanged (0.042862 vs 0.042863; p99 0.102 vs 0.101) for +0.064 bits
per weight on the tiny model.
"""

from __future__ import annotations

from ..config import pick, positive_int
from ..errors import ConfigError
from ..models import lfm3 as model_module
from ._common import head_rules
from .registry import Architecture, Protected, Role, Wrapper, register, register_wrapper
from .rules import ConvToMLX, Rename, Rule

LAYER_TYPES = ("conv",) + model_module.ATTENTION_TYPES
ROPE_TYPES = ("default", "proportional")
DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "proportional", "rope_theta": 1000000.0, "partial_rotary_factor": 0.5},
}


def _layer_types(raw: dict, n: int) -> list[str]:
    types = pick(raw, "layer_types", default=None, kind=list)
    if types is None:  # transformers' default pattern
        return ["full_attention" if i % 4 == 2 else "sliding_attention" if i % 4 == 0 and i > 0 else "conv"
                for i in range(n)]
    if len(types) != n:
        raise ConfigError(f"config.json: layer_types has {len(types)} entries, num_hidden_layers is {n}")
    for t in types:
        if t not in LAYER_TYPES:
            raise ConfigError(f"config.json: layer_types entry {t!r} is not one of {', '.join(LAYER_TYPES)}")
    return list(types)


def _rope_parameters(raw: dict, types: list[str], head_dim: int) -> dict:
    given = pick(raw, "rope_parameters", "rope_scaling", default=None, kind=dict)
    if given is None:
        given = {k: dict(v) for k, v in DEFAULT_ROPE.items()}
    elif not any(isinstance(given.get(t), dict) for t in LAYER_TYPES):
        raise ConfigError(
            f"config.json: rope_parameters {given!r} is not nested by layer type",
            "LFM3 takes one table per attention type: {\"full_attention\": {...}, \"sliding_attention\": {...}}",
        )
    theta = pick(raw, "rope_theta", default=None, kind=float)
    factor = pick(raw, "partial_rotary_factor", default=None, kind=float)
    out = {}
    for t in model_module.ATTENTION_TYPES:
        if t not in types:
            continue
        p = given.get(t)
        if not isinstance(p, dict):
            raise ConfigError(f"config.json: rope_parameters has no table for the {t} layers")
        p = dict(p)
        if theta is not None:
            p.setdefault("rope_theta", theta)
        if factor is not None:
            p.setdefault("partial_rotary_factor", factor)
        kind = pick(p, "rope_type", "type", default="default", kind=str)
        if kind not in ROPE_TYPES:
            raise ConfigError(
                f"config.json: rope_parameters.{t}.rope_type {kind!r} is not supported (only {', '.join(ROPE_TYPES)})"
            )
        entry = {"rope_type": kind, "rope_theta": pick(p, "rope_theta", kind=float)}
        if kind == "proportional":
            prf = pick(p, "partial_rotary_factor", default=1.0, kind=float)
            if not 0.0 <= prf <= 1.0:
                raise ConfigError(f"config.json: rope_parameters.{t}.partial_rotary_factor {prf} is not within [0, 1]")
            entry["partial_rotary_factor"] = prf
            entry["factor"] = pick(p, "factor", default=1.0, kind=float)
            if entry["factor"] <= 0:
                raise ConfigError(f"config.json: rope_parameters.{t}.factor must be positive, found {entry['factor']}")
        out[t] = entry
    return out


def normalize_config(raw: dict) -> dict:
    cfg = dict(raw)
    cfg["model_type"] = "lfm3"
    cfg["hidden_size"] = positive_int(raw, "hidden_size")
    n = cfg["num_hidden_layers"] = positive_int(raw, "num_hidden_layers")
    cfg["vocab_size"] = positive_int(raw, "vocab_size")
    cfg["intermediate_size"] = positive_int(raw, "intermediate_size")
    heads = cfg["num_attention_heads"] = positive_int(raw, "num_attention_heads", default=16)
    kv = cfg["num_key_value_heads"] = positive_int(raw, "num_key_value_heads", default=4)
    if heads % kv:
        raise ConfigError(
            f"config.json: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})"
        )
    head_dim = cfg["head_dim"] = positive_int(raw, "head_dim", default=128)  # transformers' default
    cfg["norm_eps"] = pick(raw, "norm_eps", "rms_norm_eps", default=1e-5, kind=float)
    cfg.pop("rms_norm_eps", None)
    cfg["conv_bias"] = pick(raw, "conv_bias", default=False, kind=bool)
    cfg["conv_L_cache"] = positive_int(raw, "conv_L_cache", default=7)
    cfg["attention_bias"] = pick(raw, "attention_bias", default=False, kind=bool)
    cfg["use_sandwich_norm"] = pick(raw, "use_sandwich_norm", default=True, kind=bool)
    cfg["use_attention_gate"] = pick(raw, "use_attention_gate", default=True, kind=bool)
    cfg["tie_word_embeddings"] = pick(raw, "tie_word_embeddings", default=True, kind=bool)
    cfg["max_position_embeddings"] = pick(raw, "max_position_embeddings", default=128000, kind=int)
    types = cfg["layer_types"] = _layer_types(raw, n)
    if "sliding_attention" in types:
        if "sliding_window" in raw and raw["sliding_window"] is None:
            raise ConfigError(
                "config.json: sliding_window is null but layer_types has sliding_attention layers",
                "set sliding_window to the window the checkpoint was trained with",
            )
        cfg["sliding_window"] = positive_int(raw, "sliding_window", default=256)
    else:
        cfg["sliding_window"] = pick(raw, "sliding_window", default=256, kind=int)
    cfg["rope_parameters"] = _rope_parameters(raw, types, head_dim)
    cfg.pop("rope_scaling", None)
    cfg.pop("rope_theta", None)
    cfg.pop("partial_rotary_factor", None)
    return cfg


CONV_WEIGHT = r"\.conv\.conv\.weight$"


def rules(cfg: dict) -> list[Rule]:
    out = head_rules(cfg)
    out.append(Rename(r"\.self_attn\.g_proj\.", ".self_attn.gate_proj."))
    out.append(ConvToMLX(CONV_WEIGHT, cfg["conv_L_cache"], "short-conv kernels"))
    return out


PROTECTED = (
    Protected(r"\.conv\.conv\.(weight|bias)$", "short-conv kernel: conv_L_cache taps per channel"),
    Protected(r"norm\.weight$", "norm weights scale whole activations"),
)
ROLES = (
    Role("embed", r"^model\.embed_tokens\.weight$", sensitive=True),
    Role("lm_head", r"^lm_head\.weight$", sensitive=True),
    Role("conv.in_proj", r"\.conv\.in_proj\.weight$"),
    Role("conv.out_proj", r"\.conv\.out_proj\.weight$"),
    Role("attn.qkv", r"\.self_attn\.[qkv]_proj\.weight$"),
    Role("attn.o_proj", r"\.self_attn\.o_proj\.weight$"),
    Role("attn.gate", r"\.self_attn\.gate_proj\.weight$"),
    Role("mlp.w1_w3", r"\.feed_forward\.w[13]\.weight$"),
    Role("mlp.w2", r"\.feed_forward\.w2\.weight$", sensitive=True),
)

ARCH = register(
    Architecture(
        model_type="lfm3",
        architectures=("Lfm3ForCausalLM",),
        title="LFM3 (gated short convolutions + full and sliding attention)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)

# LFM3-VL: LFM3 under ``model.language_model``, head tied by the wrapper's flag
# (default true), as Lfm3VlForConditionalGeneration computes it.
register_wrapper(Wrapper("lfm3_vl", ("Lfm3VlForConditionalGeneration",), "lfm3", "LFM3-VL",
                         tie="wrapper", tie_default=True))
