"""ZAYA1 converter: config normalisation, tensor rules, quantization policy.

Architecture and math: :mod:`hybridconv.models.zaya`.

Config layouts
--------------
The checkpoints Zyphra publishes for transformers (``Zyphra/ZAYA1-8B``) use
transformers 5's layout: ``layer_types`` (``hybrid`` / ``hybrid_sliding``), one
decoder layer per attention + MoE pair, ``rope_parameters`` nested by layer type.
Read as transformers reads it: a stray top-level ``rope_type`` inside the nested
``rope_parameters`` (the published ZAYA1-8B config has one; transformers deletes
it) is ignored; missing keys take transformers' defaults (every layer
``hybrid``; RoPE ``default`` with ``partial_rotary_factor`` 0.5 and θ = 5·10⁶ /
10⁴; ``head_dim`` 128, ``router_hidden_size`` 256, ``cca_time0`` = ``cca_time1`` =
2, ...); ``rope_scaling`` is read as ``rope_parameters``. Refused, as transformers
refuses them: ``num_experts_per_tok`` ≠ 1, ``hybrid_sliding`` layers without a
``sliding_window``, heads not a multiple of KV heads; and a RoPE type other than
``default`` (hybridconv implements only that one for ZAYA). The older
Megatron-style checkpoints (``-legacy``: attention and MoE as alternating
layers) are not this model type's layout: transformers converts them with a
script, and so must the user.

Tensor rules, in order
----------------------
* ``drop`` rotary ``inv_freq`` buffers, and ``lm_head.weight`` when tied
  (``lm_head.bias`` stays: the head's own);
* ``conv1d-to-mlx`` the CCA depthwise kernels ``conv_qk_depthwise.weight``
  ``[C, 1, cca_time0] -> [C, cca_time0, 1]``; the grouped kernels
  ``conv_qk_grouped.weight [C, head_dim, cca_time1]`` are copied as they are
  (the model reads that layout; see there why);
* ``split`` the fused experts ``mlp.experts.gate_up_proj [E, 2I, D]`` into
  ``mlp.switch_mlp.gate_proj.weight`` and ``up_proj.weight`` (first half gate, as
  ``Qwen3MoeExperts`` chunks it), ``rename`` ``mlp.experts.down_proj`` to
  ``mlp.switch_mlp.down_proj.weight``;
* ``keep-float32`` the router's ``balancing_biases`` (it only decides the
  expert choice, between probabilities that can be closer than a bf16 step),
  ``router_states_scale`` (multiplies the router state carried across every
  layer), ``qk_norm.temp`` (a logit temperature per KV head) and the residual
  scalings (``input_hidden_states_*``, ``post_*_residual_scale.*``: they scale
  the float32 residual stream at every layer, so their rounding compounds over
  depth). A few vectors per layer; measured below.

Quantization policy
-------------------
Never quantized (:data:`PROTECTED`): the float32 tensors above, the CCA
convolution kernels and biases (depthwise: ``cca_time0`` taps per channel;
grouped: a ``d × d`` matrix per head and tap, 3-D, stored in the output dtype),
every RMSNorm weight. Kept in float by default: the whole router
(``gate.down_proj``, ``router_mlp.fc1/fc2/out_proj``): a 4-bit error flips the
top-1 choice, and with one expert per token (or none: the skip expert) a flipped
choice replaces the layer's whole MoE output. Quantized at ``--bits``: q/k/v
projections (``v_proj_current``, ``v_proj_delayed``), ``o_proj``, the experts
(``down_proj`` sensitive), embeddings / head (sensitive).

Measured on zaya-tiny (verify on 2 × 64 random tokens against the float32
reference, scratch script): default 4-bit mean KL 0.001694 (p99 0.00231) with
the router in float, 0.001698 (p99 0.00251) with it at 4 bits too — within noise
on this random model, for 0.75 bits per weight on the tiny model, where the
router is about 6 % of the weights; at ZAYA1-8B's sizes it is about 0.3 %, so it
stays in float as the other MoE routers do. bf16: mean KL 2.1e-6 (p99 2.6e-6)
with the vectors above in float32, 4.8e-6 (p99 6.8e-6) with every tensor in
bf16.
"""

from __future__ import annotations

from ..config import pick, positive_int
from ..errors import ConfigError
from ..models import zaya as model_module
from ._common import head_rules
from .registry import Architecture, Protected, Role, register
from .rules import ConvToMLX, KeepFloat32, Rename, Rule, Split

DEFAULT_ROPE = {
    "hybrid": {"rope_type": "default", "rope_theta": 5000000.0, "partial_rotary_factor": 0.5},
    "hybrid_sliding": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
}


def _rope_parameters(raw: dict, types: list[str], head_dim: int) -> dict:
    given = pick(raw, "rope_parameters", "rope_scaling", default=None, kind=dict)
    if given is None:
        given = {k: dict(v) for k, v in DEFAULT_ROPE.items()}
    given = {k: v for k, v in given.items() if k != "rope_type"}  # the published config's stray key
    if not any(isinstance(given.get(t), dict) for t in model_module.LAYER_TYPES):
        raise ConfigError(
            f"config.json: rope_parameters {given!r} is not nested by layer type",
            "ZAYA takes one table per layer type: {\"hybrid\": {...}, \"hybrid_sliding\": {...}}",
        )
    out = {}
    for t in model_module.LAYER_TYPES:
        if t not in types:
            continue
        p = given.get(t)
        if not isinstance(p, dict):
            raise ConfigError(f"config.json: rope_parameters has no table for the {t} layers")
        kind = pick(p, "rope_type", "type", default="default", kind=str)
        if kind != "default":
            raise ConfigError(f"config.json: rope_parameters.{t}.rope_type {kind!r} is not supported (only 'default')")
        prf = pick(p, "partial_rotary_factor", default=1.0, kind=float)
        rotated = int(head_dim * prf)
        if not 0.0 < prf <= 1.0 or rotated < 2 or rotated % 2:
            raise ConfigError(
                f"config.json: rope_parameters.{t}.partial_rotary_factor {prf} rotates {rotated} of {head_dim} "
                "head dimensions; RoPE needs an even number, at least 2"
            )
        out[t] = {"rope_type": "default", "rope_theta": pick(p, "rope_theta", kind=float),
                  "partial_rotary_factor": prf}
    return out


def normalize_config(raw: dict) -> dict:
    cfg = dict(raw)
    cfg["model_type"] = "zaya"
    D = cfg["hidden_size"] = positive_int(raw, "hidden_size", default=2048)
    n = cfg["num_hidden_layers"] = positive_int(raw, "num_hidden_layers", default=40)
    cfg["vocab_size"] = positive_int(raw, "vocab_size", default=262272)
    heads = cfg["num_attention_heads"] = positive_int(raw, "num_attention_heads", default=8)
    kv = cfg["num_key_value_heads"] = positive_int(raw, "num_key_value_heads", default=2)
    if heads % kv:
        raise ConfigError(
            f"config.json: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})"
        )
    d = cfg["head_dim"] = positive_int(raw, "head_dim", default=128)
    if (kv * d) % 2:
        raise ConfigError(f"config.json: num_key_value_heads · head_dim ({kv * d}) must be even (half-delayed values)")
    cfg["rms_norm_eps"] = pick(raw, "rms_norm_eps", default=1e-5, kind=float)
    act = pick(raw, "hidden_act", default="silu", kind=str)
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act {act!r} is not supported (ZAYA's experts use 'silu')")
    cfg["attention_bias"] = pick(raw, "attention_bias", default=False, kind=bool)
    cfg["lm_head_bias"] = pick(raw, "lm_head_bias", default=False, kind=bool)
    cfg["tie_word_embeddings"] = pick(raw, "tie_word_embeddings", default=True, kind=bool)
    cfg["moe_intermediate_size"] = positive_int(raw, "moe_intermediate_size", default=2048)
    E = cfg["num_experts"] = positive_int(raw, "num_experts", default=16)
    k = cfg["num_experts_per_tok"] = positive_int(raw, "num_experts_per_tok", default=1)
    if k != 1:
        raise ConfigError(f"config.json: num_experts_per_tok is {k}; ZAYA routes every token to one expert (or none)")
    cfg["router_hidden_size"] = positive_int(raw, "router_hidden_size", default=256)
    cfg["cca_time0"] = positive_int(raw, "cca_time0", default=2)
    cfg["cca_time1"] = positive_int(raw, "cca_time1", default=2)
    cfg["max_position_embeddings"] = pick(raw, "max_position_embeddings", default=131072, kind=int)
    types = pick(raw, "layer_types", default=None, kind=list)
    if types is None:
        types = ["hybrid"] * n
    if len(types) != n:
        raise ConfigError(f"config.json: layer_types has {len(types)} entries, num_hidden_layers is {n}")
    for t in types:
        if t not in model_module.LAYER_TYPES:
            raise ConfigError(f"config.json: layer_types entry {t!r} is not one of {', '.join(model_module.LAYER_TYPES)}")
    cfg["layer_types"] = list(types)
    window = pick(raw, "sliding_window", default=None, kind=int)
    if "hybrid_sliding" in types:
        if window is None:
            raise ConfigError("config.json: layer_types has hybrid_sliding layers but sliding_window is not set")
        window = positive_int({"sliding_window": window}, "sliding_window")
    cfg["sliding_window"] = window
    cfg["rope_parameters"] = _rope_parameters(raw, types, d)
    cfg.pop("rope_scaling", None)
    del D, E
    return cfg


ATTN = r"\.self_attn\.qkv_proj\."
FLOAT32 = (r"(\.mlp\.gate\.(balancing_biases|router_states_scale)|\.self_attn\.qk_norm\.temp"
           r"|_residual_scale\.(hidden_states|residual)_(scale|bias)|^model\.input_hidden_states_(scale|bias))$")


def rules(cfg: dict) -> list[Rule]:
    I = cfg["moe_intermediate_size"]
    out = head_rules(cfg)
    out.append(ConvToMLX(ATTN + r"conv_qk_depthwise\.weight$", cfg["cca_time0"], "CCA depthwise conv kernels"))
    out.append(Split(r"^(?P<pre>.*\.mlp)\.experts\.gate_up_proj$", 1,
                     [(r"\g<pre>.switch_mlp.gate_proj.weight", I), (r"\g<pre>.switch_mlp.up_proj.weight", I)],
                     "fused expert gate_up_proj"))
    out.append(Rename(r"^(?P<pre>.*\.mlp)\.experts\.down_proj$", r"\g<pre>.switch_mlp.down_proj.weight"))
    out.append(KeepFloat32(FLOAT32, "routing biases, logit and residual scales: decide choices or compound over depth",
                           "balancing_biases, router_states_scale, qk_norm.temp, residual scalings"))
    return out


PROTECTED = (
    Protected(FLOAT32, "routing bias / router-state, key and residual scales", float32=True),
    Protected(ATTN + r"conv_qk_(depthwise|grouped)\.(weight|bias)$", "CCA conv kernels: a few taps per channel / head"),
    Protected(r"norm\.weight$", "norm weights scale whole activations"),
)
ROUTER_WHY = "router: a quantization error flips the top-1 (or skip) choice, replacing the layer's MoE output"
ROLES = (
    Role("embed", r"^model\.embed_tokens\.weight$", sensitive=True),
    Role("lm_head", r"^lm_head\.weight$", sensitive=True),
    Role("attn.q_proj", ATTN + r"q_proj\.weight$"),
    Role("attn.k_proj", ATTN + r"k_proj\.weight$"),
    Role("attn.v_proj", ATTN + r"v_proj_(current|delayed)\.weight$"),
    Role("attn.o_proj", r"\.self_attn\.o_proj\.weight$"),
    Role("moe.router", r"\.mlp\.gate\.(down_proj|router_mlp\.(fc1|fc2|out_proj))\.weight$", default="float",
         why=ROUTER_WHY),
    Role("moe.experts", r"\.mlp\.switch_mlp\.(gate_proj|up_proj)\.weight$"),
    Role("moe.experts.down_proj", r"\.mlp\.switch_mlp\.down_proj\.weight$", sensitive=True),
)

ARCH = register(
    Architecture(
        model_type="zaya",
        architectures=("ZayaForCausalLM",),
        title="ZAYA1 (compressed convolutional attention + MoE with skip expert)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)
