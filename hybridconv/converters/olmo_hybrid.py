"""OLMo-Hybrid converter: config normalisation, tensor rules, quantization policy.

Architecture and math: :mod:`hybridconv.models.olmo_hybrid`.

Config
------
transformers 5's layout (``rope_parameters``) and the published one (top-level
``rope_theta``, or none: the released checkpoints use no rotary embeddings —
``rope_theta``/``rope_parameters`` null means NoPE); ``layer_types`` or its
default (attention at ``i % 4 == 3``, the last layer if that gives none);
transformers' defaults for the DeltaNet sizes (``linear_num_*_heads`` =
``num_attention_heads``, ``linear_key_head_dim = int(0.75·hidden /
heads)``, value head twice the key head). Written with the keys mlx-lm's
``olmo_hybrid`` requires (``layer_types``, ``rope_theta`` — null for NoPE —,
``linear_allow_neg_eigval``, ``tie_word_embeddings``, ``attention_bias``)
and ``layer_norm_epsilon = 1e-5``, the gated output norm's fixed eps.

Tensor rules, in order
----------------------
* ``rename`` the checkpoint's norm names to the module names transformers
  loads them into and mlx-lm uses: ``attention_layer_norm`` →
  ``input_layernorm``, ``feedforward_layer_norm`` →
  ``post_attention_layernorm`` (mlx-lm reads only these, hence "fails on
  weight names" on an unconverted checkpoint);
* ``drop`` rotary ``inv_freq`` buffers and, when tied, ``lm_head.weight``;
* ``regroup`` the three DeltaNet conv kernels (``q_conv1d``, ``k_conv1d``,
  ``v_conv1d``, separate as in the original checkpoints and mlx-lm):
  concatenated and re-cut at ``Kd, Kd, Vd`` rows, in the MLX ``[C, K, 1]``
  layout. transformers 5 *saves* its fused ``conv1d`` as three equal thirds
  (the fixture's are 64, 64, 64 rows for 48, 48, 96 channels), which mlx-lm
  cannot load; the original checkpoints have the exact sizes. Both convert;
* ``keep-float32`` ``A_log`` and ``dt_bias`` (the decay compounds over every
  step).

Quantization policy
-------------------
Never quantized, float32 (:data:`PROTECTED`): ``A_log``, ``dt_bias``, the
conv kernels, every norm weight (including the full-width q/k norms).
Kept in float (``default="float"``): ``a_proj`` and ``b_proj`` (one row per
value head: they set the decay and β ∈ (0, 2), whose errors compound).
Quantized at ``--bits``: the other projections, MLPs, embeddings and head;
embeddings/head, ``down_proj`` and the DeltaNet ``o_proj`` are sensitive.
"""

from __future__ import annotations

from ..config import pick, positive, positive_int
from ..errors import ConfigError
from ..models import olmo_hybrid as model_module
from .registry import Architecture, Protected, Role, register
from .rules import Drop, KeepFloat32, Regroup, Rename, Rule


def normalize_config(raw: dict) -> dict:
    cfg = dict(raw)
    cfg["model_type"] = "olmo_hybrid"

    for name in ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "intermediate_size"):
        cfg[name] = positive_int(raw, name)
    n, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    cfg["num_key_value_heads"] = positive_int(raw, "num_key_value_heads", default=heads)
    cfg["head_dim"] = positive_int(raw, "head_dim", default=cfg["hidden_size"] // heads)
    cfg["linear_num_key_heads"] = positive_int(raw, "linear_num_key_heads", default=heads)
    cfg["linear_num_value_heads"] = positive_int(raw, "linear_num_value_heads", default=heads)
    cfg["linear_key_head_dim"] = positive("linear_key_head_dim", pick(
        raw, "linear_key_head_dim", default=int(0.75 * cfg["hidden_size"] / cfg["linear_num_key_heads"]), kind=int))
    cfg["linear_value_head_dim"] = positive_int(raw, "linear_value_head_dim", default=2 * cfg["linear_key_head_dim"])
    cfg["linear_conv_kernel_dim"] = positive_int(raw, "linear_conv_kernel_dim", default=4)
    cfg["linear_allow_neg_eigval"] = pick(raw, "linear_allow_neg_eigval", default=True, kind=bool)
    cfg["rms_norm_eps"] = pick(raw, "rms_norm_eps", default=1e-6, kind=float)
    cfg["layer_norm_epsilon"] = model_module.O_NORM_EPS
    cfg["tie_word_embeddings"] = pick(raw, "tie_word_embeddings", default=False, kind=bool)
    cfg["attention_bias"] = pick(raw, "attention_bias", default=False, kind=bool)
    cfg["max_position_embeddings"] = pick(raw, "max_position_embeddings", default=65536, kind=int)
    act = pick(raw, "hidden_act", default="silu", kind=str)
    if act != "silu":
        raise ConfigError(f"config.json: 'hidden_act' is {act!r}; OLMo-Hybrid uses 'silu'")

    pick(raw, "rope_parameters", default={}, kind=dict)  # an object (or null: NoPE) when present
    rope_type = pick(raw, "rope_parameters.rope_type", "rope_parameters.type", "rope_scaling.rope_type",
                     "rope_scaling.type", default="default", kind=str)
    if rope_type != "default":
        raise ConfigError(
            f"config.json: rope type {rope_type!r} (rope_parameters.rope_type) is not supported; expected 'default'"
        )
    theta = pick(raw, "rope_parameters.rope_theta", "rope_theta", default=None, kind=float)
    cfg["rope_theta"] = theta  # None: no rotary embeddings (NoPE)
    cfg["rope_parameters"] = None if theta is None else {"rope_type": "default", "rope_theta": theta}
    cfg.pop("rope_scaling", None)

    types = pick(raw, "layer_types", default=None, kind=list)
    if types is None:
        types = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(n)]
        if "full_attention" not in types:
            types[-1] = "full_attention"
    if len(types) != n:
        raise ConfigError(f"config.json: 'layer_types' has {len(types)} entries, expected num_hidden_layers = {n}")
    for t in types:
        if t not in ("linear_attention", "full_attention"):
            raise ConfigError(f"config.json: 'layer_types' entry {t!r}: expected 'linear_attention' or 'full_attention'")
    cfg["layer_types"] = list(types)
    for a, b in (("num_attention_heads", "num_key_value_heads"), ("linear_num_value_heads", "linear_num_key_heads")):
        if cfg[a] % cfg[b]:
            raise ConfigError(f"config.json: {a} ({cfg[a]}) is not a multiple of {b} ({cfg[b]})")
    return cfg


def rules(cfg: dict) -> list[Rule]:
    out: list[Rule] = [
        Rename(r"\.attention_layer_norm\.", ".input_layernorm."),
        Rename(r"\.feedforward_layer_norm\.", ".post_attention_layernorm."),
        Drop(r"(^|\.)rotary_emb\.inv_freq$", "recomputed from rope_theta", "rotary inv_freq buffers"),
    ]
    if cfg["tie_word_embeddings"]:
        out.append(Drop(r"^lm_head\.weight$", "tied: the head is model.embed_tokens.weight", "lm_head.weight"))
    kd = cfg["linear_num_key_heads"] * cfg["linear_key_head_dim"]
    vd = cfg["linear_num_value_heads"] * cfg["linear_value_head_dim"]
    out.append(Regroup(
        r"\.linear_attn\.(?P<piece>[qkv])_conv1d\.weight$", ["q", "k", "v"],
        [(".linear_attn.q_conv1d.weight", kd), (".linear_attn.k_conv1d.weight", kd), (".linear_attn.v_conv1d.weight", vd)],
        kernel_size=cfg["linear_conv_kernel_dim"], what="DeltaNet q/k/v conv1d weights",
    ))
    out.append(KeepFloat32(r"\.linear_attn\.(A_log|dt_bias)$", "decay parameters: rounding compounds over every step",
                           "A_log, dt_bias"))
    return out


PROTECTED = (
    Protected(r"\.linear_attn\.(A_log|dt_bias)$", "decay: g = -exp(A_log) * softplus(a + dt_bias)"),
    Protected(r"\.[qkv]_conv1d\.weight$", "conv1d kernel: a handful of taps per channel"),
    Protected(r"norm\.weight$", "norm weights scale whole activations"),
)
ROLES = (
    Role("embed", r"^model\.embed_tokens\.weight$", sensitive=True),
    Role("lm_head", r"^lm_head\.weight$", sensitive=True),
    Role("delta.qkv_proj", r"\.linear_attn\.[qkv]_proj\.weight$"),
    Role("delta.g_proj", r"\.linear_attn\.g_proj\.weight$"),
    Role("delta.ab_proj", r"\.linear_attn\.[ab]_proj\.weight$", default="float",
         why="sets beta and the decay of the recurrent state (one row per value head)"),
    Role("delta.o_proj", r"\.linear_attn\.o_proj\.weight$", sensitive=True),
    Role("attn.q_proj", r"\.self_attn\.q_proj\.weight$"),
    Role("attn.kv_proj", r"\.self_attn\.[kv]_proj\.weight$"),
    Role("attn.o_proj", r"\.self_attn\.o_proj\.weight$"),
    Role("mlp.gate_up", r"\.mlp\.(gate_proj|up_proj)\.weight$"),
    Role("mlp.down_proj", r"\.mlp\.down_proj\.weight$", sensitive=True),
)

ARCH = register(
    Architecture(
        model_type="olmo_hybrid",
        architectures=("OlmoHybridForCausalLM",),
        title="OLMo-Hybrid (gated DeltaNet with negative eigenvalues + attention)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)
