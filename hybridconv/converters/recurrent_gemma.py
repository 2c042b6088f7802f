"""RecurrentGemma (Griffin) converter: config normalisation and tensor rules.

Architecture and math: :mod:`hybridconv.models.recurrent_gemma`.

Config normalisation (transformers 4 and 5, and the published configs):

* ``rope_theta`` and ``partial_rotary_factor`` from the top level or from
  transformers 5's ``rope_parameters`` (defaults 10000 and 0.5, as the
  reference assumes); only the ``default`` rope type exists for this model.
* ``block_types`` from ``block_types`` or ``_block_types`` (the 2B and 9B
  configs differ), validated: every entry ``recurrent`` or ``attention``.
* ``lru_width`` defaults to ``hidden_size``; ``num_key_value_heads`` to
  ``num_attention_heads`` (transformers' default; the published models set 1);
  ``head_dim`` is ``hidden_size / num_attention_heads`` whatever the file says
  (transformers recomputes it the same way).
* ``dtype`` / ``torch_dtype``: both are written, naming the output dtype.

Tensor rules: ``drop`` rotary ``inv_freq`` buffers and a tied ``lm_head.weight``;
``conv1d-to-mlx`` for ``temporal_block.conv_1d.weight`` (``K = conv1d_width``);
everything else cast to ``--dtype``, names unchanged. The RG-LRU parameters stay
in the model dtype here because mlx-lm's implementation requires the recurrence
coefficients and inputs to share a dtype.

Quantization policy (``hybridconv quantize``)
---------------------------------------------
Never quantized (:data:`PROTECTED`): the RG-LRU parameters — ``recurrent_param``,
which sets the decay ``a = exp(-8·softplus(Λ)·r)`` (near 1 for long memory, where
a small error in ``Λ`` changes the memory length a lot), stored in float32
whatever ``--dtype`` says; and the block-diagonal input and recurrence gates with
their biases — the conv_1d kernels and biases, and every norm weight. All but
``recurrent_param`` are stored in the output dtype (bf16 for a bf16 output, as
mlx-lm stores them): the gate matrices are large (18 × 1.3 M parameters in the
2B model), float32 copies cost +0.62 to +0.76 bits per weight on the tiny
fixtures and about +0.14 on the 2B shape, for KL differences within bf16 noise
(README, "Quantization"). Mixed-dtype arithmetic promotes to float32, so both
hybridconv and mlx-lm compute the decay in float32.

Quantized (:data:`ROLES`): the embeddings (tied head), the recurrent block's
``linear_x``, ``linear_y``, ``linear_out``, the attention projections and the MLP.
Sensitive (6 bits in ``mixed-4-6``): the embeddings, ``linear_x`` (it feeds the
gates and the recurrence), ``v_proj`` (a single key/value head shared by all
query heads) and the MLP ``down_proj``.
"""

from __future__ import annotations

from ..config import pick, positive_int
from ..errors import ConfigError
from ..models import recurrent_gemma as model_module
from ._common import head_rules, swiglu_roles
from .registry import Architecture, Protected, Role, register
from .rules import ConvToMLX, Rule

BLOCK_KINDS = ("recurrent", "attention")
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_approx")


def parse_block_types(value) -> list[str]:
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not value:
        raise ConfigError(
            f"config.json: block_types must be a non-empty list, found {value!r}",
            f"each entry is one of: {', '.join(BLOCK_KINDS)}",
        )
    for i, kind in enumerate(value):
        if kind not in BLOCK_KINDS:
            raise ConfigError(
                f"config.json: block_types[{i}] is {kind!r}; allowed: {', '.join(BLOCK_KINDS)}"
            )
    return list(value)


def normalize_config(raw: dict) -> dict:
    cfg = dict(raw)
    cfg["model_type"] = "recurrent_gemma"

    hidden = cfg["hidden_size"] = positive_int(raw, "hidden_size")
    cfg["intermediate_size"] = positive_int(raw, "intermediate_size")
    cfg["num_hidden_layers"] = positive_int(raw, "num_hidden_layers")
    cfg["vocab_size"] = positive_int(raw, "vocab_size")
    heads = cfg["num_attention_heads"] = positive_int(raw, "num_attention_heads")
    kv = cfg["num_key_value_heads"] = positive_int(raw, "num_key_value_heads", default=heads)
    lru = cfg["lru_width"] = positive_int(raw, "lru_width", default=hidden)
    cfg["attention_window_size"] = positive_int(raw, "attention_window_size", "sliding_window", default=2048)
    cfg["conv1d_width"] = positive_int(raw, "conv1d_width", default=4)
    cfg["logits_soft_cap"] = pick(raw, "logits_soft_cap", default=30.0, kind=float)
    cfg["rms_norm_eps"] = pick(raw, "rms_norm_eps", default=1e-6, kind=float)
    cfg["rope_theta"] = pick(
        raw, "rope_theta", "rope_parameters.rope_theta", default=10000.0, kind=float
    )
    cfg["partial_rotary_factor"] = pick(
        raw,
        "partial_rotary_factor",
        "rope_parameters.partial_rotary_factor",
        default=0.5,
        kind=float,
    )
    rope_type = pick(raw, "rope_parameters.rope_type", "rope_scaling.rope_type", default="default")
    if rope_type != "default":
        raise ConfigError(
            f"config.json: rope type {rope_type!r} is not supported by RecurrentGemma (only 'default')"
        )
    cfg["block_types"] = parse_block_types(
        pick(raw, "block_types", "_block_types", default=["recurrent", "recurrent", "attention"])
    )
    cfg.pop("_block_types", None)
    act = pick(raw, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh", kind=str)
    if act not in ACTIVATIONS:
        raise ConfigError(
            f"config.json: hidden_activation {act!r} is not supported; expected one of {', '.join(ACTIVATIONS)}"
        )
    cfg["attention_bias"] = pick(raw, "attention_bias", default=False, kind=bool)
    cfg["tie_word_embeddings"] = pick(raw, "tie_word_embeddings", default=True, kind=bool)
    cfg["embeddings_scale_by_sqrt_dim"] = pick(
        raw, "embeddings_scale_by_sqrt_dim", default=True, kind=bool
    )
    for name, num, den in (
        ("hidden_size", hidden, heads),
        ("lru_width", lru, heads),
        ("num_attention_heads", heads, kv),
    ):
        if num % den:
            raise ConfigError(
                f"config.json: {name} ({num}) must be a multiple of {den} "
                f"({'num_key_value_heads' if name == 'num_attention_heads' else 'num_attention_heads'})"
            )
    cfg["head_dim"] = hidden // heads
    return cfg


def rules(cfg: dict) -> list[Rule]:
    out = head_rules(cfg)
    out.append(ConvToMLX(r"\.temporal_block\.conv_1d\.weight$", cfg["conv1d_width"], "RG-LRU conv_1d weights"))
    return out


PROTECTED = (
    Protected(r"\.rg_lru\.recurrent_param$", "RG-LRU decay a = exp(-8·softplus(Λ)·r): errors change the memory length",
              float32=True),
    Protected(r"\.rg_lru\.", "RG-LRU gates: they set the decay's exponent and the input's share"),
    Protected(r"\.conv_1d\.(weight|bias)$", "conv kernel: a handful of taps per channel"),
    Protected(r"norm\.weight$", "norm weights scale whole activations"),
)
ROLES = (
    Role("embed", r"^model\.embed_tokens\.weight$", sensitive=True),
    Role("lm_head", r"^lm_head\.weight$", sensitive=True),
    Role("recurrent.linear_x", r"\.temporal_block\.linear_x\.weight$", sensitive=True),
    Role("recurrent.linear_y", r"\.temporal_block\.linear_y\.weight$"),
    Role("recurrent.linear_out", r"\.temporal_block\.linear_out\.weight$"),
    Role("attn.q_proj", r"\.temporal_block\.q_proj\.weight$"),
    Role("attn.k_proj", r"\.temporal_block\.k_proj\.weight$"),
    Role("attn.v_proj", r"\.temporal_block\.v_proj\.weight$", sensitive=True),
    Role("attn.o_proj", r"\.temporal_block\.o_proj\.weight$"),
) + swiglu_roles("mlp_block")

ARCH = register(
    Architecture(
        model_type="recurrent_gemma",
        architectures=("RecurrentGemmaForCausalLM",),
        title="RecurrentGemma / Griffin (RG-LRU + local attention)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)
