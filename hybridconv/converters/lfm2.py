"""LFM2 converter: config normalisation and tensor rules.

Architecture and math: :mod:`hybridconv.models.lfm2`.

Config layouts
--------------
* transformers 5 (``save_pretrained``): ``layer_types`` (``conv`` /
  ``full_attention``), ``intermediate_size``, ``tie_word_embeddings``,
  ``rope_parameters.rope_theta``.
* as published with Liquid AI's checkpoints: ``full_attn_idxs``,
  ``block_ff_dim`` (wins over ``intermediate_size``, as in transformers),
  ``tie_embedding``, top-level ``rope_theta``, ``block_dim`` (= hidden size),
  ``block_norm_eps``.

The output ``config.json`` carries both ``layer_types`` and ``full_attn_idxs``,
``block_dim``, and the feed-forward width the weights have
(``intermediate_size = block_ff_dim =`` the width after the auto-adjust rule,
``block_auto_adjust_ff_dim: false``): mlx-lm needs ``block_dim`` and rounds the
width differently from transformers when ``block_ffn_dim_multiplier`` is null.

Tensor rules, in order:

* ``drop`` rotary ``inv_freq`` buffers, and ``lm_head.weight`` when the head is tied;
* ``conv1d-to-mlx`` the short-conv kernels ``conv.conv.weight``, PyTorch
  ``[D, 1, L]`` to MLX ``[D, L, 1]`` with ``L = conv_L_cache``;
* everything else cast to ``--dtype``; names are kept (they are mlx-lm's).

Multimodal release
------------------
``lfm2_vl`` (``Lfm2VlForConditionalGeneration``, LiquidAI's LFM2-VL): its
language model (``text_config``, tensors under ``model.language_model.``) is
converted as LFM2; the SigLIP2 vision tower and the projector are dropped,
listed in the ledger (:mod:`hybridconv.converters._wrappers`). The head is
tied by the wrapper's own ``tie_word_embeddings`` (``tie_embedding`` in the
released configs; default true), as transformers' wrapper class computes it.

Quantization policy
-------------------
Never quantized (:data:`PROTECTED`), stored in the output dtype as mlx-lm
stores them (README, "Quantization"): the conv kernels (``L = 3`` taps
per channel) and every RMSNorm weight (operator, FFN, final ``embedding_norm``,
per-head ``q_layernorm`` / ``k_layernorm``). Quantized at ``--bits``
(:data:`ROLES`): the embeddings / untied head and the FFN ``w2`` (sensitive:
wider in mixed recipes, as elsewhere), the conv block's ``in_proj`` /
``out_proj``, the attention projections and the FFN ``w1`` / ``w3`` — the
layers mlx-lm quantizes.
"""

from __future__ import annotations

from ..config import pick, positive, positive_int
from ..errors import ConfigError
from ..models import lfm2 as model_module
from ._common import head_rules
from .registry import Architecture, Protected, Role, Wrapper, register, register_wrapper
from .rules import ConvToMLX, Rule

LAYER_TYPES = ("conv", "full_attention")


def normalize_common(raw: dict, model_type: str) -> dict:
    """The keys LFM2 and LFM2-MoE share, validated, in both layouts."""
    cfg = dict(raw)
    cfg["model_type"] = model_type

    hidden = cfg["hidden_size"] = positive_int(raw, "hidden_size", "block_dim")
    if "block_dim" in raw and pick(raw, "block_dim", kind=int) != hidden:
        raise ConfigError(
            f"config.json: block_dim ({raw['block_dim']}) differs from hidden_size ({hidden}); LFM2 uses one width"
        )
    cfg["block_dim"] = hidden
    n = cfg["num_hidden_layers"] = positive_int(raw, "num_hidden_layers")
    cfg["vocab_size"] = positive_int(raw, "vocab_size")
    heads = cfg["num_attention_heads"] = positive_int(raw, "num_attention_heads", "num_heads")
    kv = cfg["num_key_value_heads"] = positive_int(raw, "num_key_value_heads", default=heads)
    if heads % kv:
        raise ConfigError(
            f"config.json: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})"
        )
    head_dim = pick(raw, "head_dim", default=None, kind=int)
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(
                f"config.json: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})"
            )
        head_dim = hidden // heads
    cfg["head_dim"] = positive("head_dim", head_dim)
    cfg["norm_eps"] = pick(raw, "norm_eps", "block_norm_eps", default=1e-5, kind=float)
    cfg["conv_bias"] = pick(raw, "conv_bias", default=False, kind=bool)
    cfg["conv_L_cache"] = positive_int(raw, "conv_L_cache", default=3)
    cfg["max_position_embeddings"] = pick(raw, "max_position_embeddings", default=128000, kind=int)
    cfg["tie_word_embeddings"] = pick(raw, "tie_embedding", "tie_word_embeddings", default=True, kind=bool)
    cfg.pop("tie_embedding", None)
    cfg["rope_theta"] = pick(raw, "rope_theta", "rope_parameters.rope_theta", default=1000000.0, kind=float)
    rope_type = pick(raw, "rope_parameters.rope_type", "rope_scaling.rope_type", "rope_scaling.type", default="default")
    if rope_type != "default":
        raise ConfigError(f"config.json: rope type {rope_type!r} is not supported by LFM2 (only 'default')")
    cfg["layer_types"] = _layer_types(raw, n)
    cfg["full_attn_idxs"] = [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"]
    return cfg


def _layer_types(raw: dict, n: int) -> list[str]:
    types = pick(raw, "layer_types", default=None, kind=list)
    if types is not None:
        if len(types) != n:
            raise ConfigError(
                f"config.json: layer_types has {len(types)} entries, num_hidden_layers is {n}"
            )
        for t in types:
            if t not in LAYER_TYPES:
                raise ConfigError(f"config.json: layer_types entry {t!r} is not one of {', '.join(LAYER_TYPES)}")
        return list(types)
    # Published layout; transformers' default without either key: every layer attention.
    idxs = pick(raw, "full_attn_idxs", default=list(range(n)), kind=list)
    for i in idxs:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise ConfigError(f"config.json: full_attn_idxs entry {i!r} is not a layer index 0..{n - 1}")
    return ["full_attention" if i in set(idxs) else "conv" for i in range(n)]


def normalize_config(raw: dict) -> dict:
    cfg = normalize_common(raw, "lfm2")
    size = positive("intermediate_size", pick(raw, "block_ff_dim", "intermediate_size", kind=int))
    multiple = positive_int(raw, "block_multiple_of", default=256)
    mult = pick(raw, "block_ffn_dim_multiplier", default=None, kind=float) if "block_ffn_dim_multiplier" in raw else 1.0
    auto = pick(raw, "block_auto_adjust_ff_dim", default=True, kind=bool)
    width = model_module.ff_dim(size, auto, mult, multiple)
    if width <= 0:
        raise ConfigError(f"config.json: the feed-forward width works out to {width} (intermediate_size {size})")
    # The width the weights have, stated plainly (module docstring).
    cfg.update(
        intermediate_size=width,
        block_ff_dim=width,
        block_auto_adjust_ff_dim=False,
        block_multiple_of=multiple,
        block_ffn_dim_multiplier=1.0 if mult is None else mult,
    )
    return cfg


CONV_WEIGHT = r"\.conv\.conv\.weight$"


def common_rules(cfg: dict) -> list[Rule]:
    out = head_rules(cfg)
    out.append(ConvToMLX(CONV_WEIGHT, cfg["conv_L_cache"], "short-conv kernels"))
    return out


def rules(cfg: dict) -> list[Rule]:
    return common_rules(cfg)


PROTECTED = (
    Protected(CONV_WEIGHT, "short-conv kernel: conv_L_cache taps per channel"),
    Protected(r"(norm|_layernorm)\.weight$", "norm weights scale whole activations"),
)
COMMON_ROLES = (
    Role("embed", r"^model\.embed_tokens\.weight$", sensitive=True),
    Role("lm_head", r"^lm_head\.weight$", sensitive=True),
    Role("conv.in_proj", r"\.conv\.in_proj\.weight$"),
    Role("conv.out_proj", r"\.conv\.out_proj\.weight$"),
    Role("attn.qkv", r"\.self_attn\.[qkv]_proj\.weight$"),
    Role("attn.out_proj", r"\.self_attn\.out_proj\.weight$"),
)
ROLES = COMMON_ROLES + (
    Role("mlp.w1_w3", r"\.feed_forward\.w[13]\.weight$"),
    Role("mlp.w2", r"\.feed_forward\.w2\.weight$", sensitive=True),
)

ARCH = register(
    Architecture(
        model_type="lfm2",
        architectures=("Lfm2ForCausalLM",),
        title="LFM2 (gated short convolutions + attention)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)

register_wrapper(Wrapper("lfm2_vl", ("Lfm2VlForConditionalGeneration",), "lfm2", "LFM2-VL",
                         tie="wrapper", tie_default=True))
