"""Inkling (text) converter: config normalisation, tensor rules, quantization policy.

Architecture and math: :mod:`hybridconv.models.inkling`.

Config layouts
--------------
transformers 5's ``InklingTextConfig`` (``model_type: inkling_text``) with every
alias and compatibility rule it has: ``sliding_window`` for
``sliding_window_size``, ``num_local_experts`` for ``n_routed_experts``,
``sconv_kernel_size`` (the checkpoints' name) for ``conv_kernel_size``,
``model_max_length`` for ``max_position_embeddings``, ``embedding_multiplier`` for
``logits_mup_width_multiplier``; ``layer_types`` from ``local_layer_ids`` (the
sliding layers) when absent, else every layer whose index ``i`` has
``(i + 1) % 6 ≠ 0`` is sliding; ``mlp_layer_types`` from ``dense_mlp_idx`` (the
first ``dense_mlp_idx`` layers dense) when absent, else all sparse; and, as in
the checkpoints' configs, ``dense_intermediate_size`` — then ``intermediate_size``
is the *experts'* width and ``dense_intermediate_size`` the dense MLP's. The head
is never tied (transformers ties nothing for Inkling). ``shared_expert_sink``
is read and ignored, as transformers ignores it (its router always scores the
shared experts with the routed ones); a sparse layer needs at least one shared
expert there, so ``n_shared_experts: 0`` is refused.

Tensor rules, in order
----------------------
* ``drop`` the multi-token-prediction layers ``model.mtp.*`` (transformers does
  not load them; the causal LM never runs them);
* ``rename`` ``model.embed_tokens.embed_norm.weight`` to ``model.embed_norm.weight``
  (a sibling of the embedding, so that a quantized embedding keeps its norm);
* ``conv1d-to-mlx`` the four short-conv kernels per layer (``k_sconv``,
  ``v_sconv``, ``attn_sconv``, ``mlp_sconv``: ``.conv1d.weight [C, 1, K]``);
* ``split`` the fused experts ``mlp.experts.gate_up_proj [E, 2I, D]`` (first half
  gate) into ``mlp.switch_mlp.{gate,up}_proj.weight``, ``rename``
  ``mlp.experts.down_proj`` to ``mlp.switch_mlp.down_proj.weight`` and the stacked
  shared experts ``mlp.shared_experts.{gate,up,down}_proj [S, ...]`` to
  ``….weight`` (run as a :class:`~hybridconv.models.moe.SwitchGLU` of ``S``
  experts, all chosen);
* ``keep-float32`` what transformers keeps in float32 in any dtype
  (``_keep_in_fp32_modules_strict``): the short-conv kernels, the router's
  ``e_score_correction_bias`` and ``gate.global_scale``.

Quantization policy
-------------------
Never quantized (:data:`PROTECTED`): the float32 tensors above, every norm
weight, the dense MLPs' ``global_scale``, the relative-position profile banks
``rel_logits_proj.proj`` (``[d_rel, extent]``, not a linear layer: the bias is
``r · proj`` per distance), and the router ``mlp.gate.weight`` (``[E + S, D]``, a
plain matrix beside the router's bias and scale: a flipped top-k choice changes
the layer's output; mlx-lm keeps routers at 8 bits for the same reason).
Quantized at ``--bits``: q/k/v/o, the relative-state projection ``r_proj``, the
dense MLPs, routed and shared experts (``down_proj`` sensitive), embeddings and
head (sensitive). ``r_proj`` is new: measured on inkling-tiny (default 4-bit
against ``--keep attn.r_proj``, verify on 2 × 64 random tokens), keeping it in
float left the mean KL at 0.00033 (p99 0.000466 both) for +0.53 bits per weight
on the tiny model: it is quantized.
"""

from __future__ import annotations

from ..config import pick, positive, positive_int
from ..errors import ConfigError
from ..models import inkling as model_module
from .registry import Architecture, Protected, Role, register
from .rules import ConvToMLX, Drop, KeepFloat32, Rename, Rule, Split

SCONV = r"\.(k_sconv|v_sconv|attn_sconv|mlp_sconv)\.conv1d\.weight$"
ROUTER_FLOAT32 = r"\.mlp\.gate\.(e_score_correction_bias|global_scale)$"


def layer_types(raw: dict, n: int, default, local_ids: bool = True) -> list[str]:
    """``layer_types`` as given, else ``local_layer_ids`` (Inkling; ``local_ids``),
    else ``default(i)``."""
    types = pick(raw, "layer_types", default=None, kind=list)
    if types is None:
        local = pick(raw, "local_layer_ids", default=None, kind=list) if local_ids else None
        if local is not None:
            for i in local:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                    raise ConfigError(f"config.json: local_layer_ids entry {i!r} is not a layer index 0..{n - 1}")
            types = ["hybrid_sliding" if i in set(local) else "hybrid" for i in range(n)]
        else:
            types = [default(i) for i in range(n)]
    if len(types) != n:
        raise ConfigError(f"config.json: layer_types has {len(types)} entries, num_hidden_layers is {n}")
    for t in types:
        if t not in model_module.LAYER_TYPES:
            raise ConfigError(f"config.json: layer_types entry {t!r} is not one of {', '.join(model_module.LAYER_TYPES)}")
    return list(types)


def normalize_attention(raw: dict, cfg: dict, defaults: dict) -> None:
    """Head counts and sizes of both layer types, the window, the relative bias and
    log scaling (the keys Inkling and Inkling-2 share)."""
    for key, kv_key, dim_key in (("num_attention_heads", "num_key_value_heads", "head_dim"),
                                 ("swa_num_attention_heads", "swa_num_key_value_heads", "swa_head_dim")):
        heads = cfg[key] = positive_int(raw, key, default=defaults[key])
        kv = cfg[kv_key] = positive_int(raw, kv_key, default=defaults[kv_key])
        if heads % kv:
            raise ConfigError(f"config.json: {key} ({heads}) is not a multiple of {kv_key} ({kv})")
        cfg[dim_key] = positive_int(raw, dim_key, default=defaults[dim_key])
    cfg["sliding_window_size"] = positive_int(raw, "sliding_window_size", "sliding_window",
                                              default=defaults["sliding_window_size"])
    cfg.pop("sliding_window", None)
    cfg["d_rel"] = positive_int(raw, "d_rel", default=16)
    cfg["rel_extent"] = positive_int(raw, "rel_extent", default=1024)
    floor = pick(raw, "log_scaling_n_floor", default=defaults["log_scaling_n_floor"], kind=int)
    cfg["log_scaling_n_floor"] = None if floor is None else positive("log_scaling_n_floor", floor)
    cfg["log_scaling_alpha"] = pick(raw, "log_scaling_alpha", default=0.1, kind=float)
    cfg["conv_kernel_size"] = positive_int(raw, "conv_kernel_size", "sconv_kernel_size", default=4)
    cfg.pop("sconv_kernel_size", None)
    cfg["rms_norm_eps"] = pick(raw, "rms_norm_eps", default=1e-6, kind=float)
    cfg["max_position_embeddings"] = pick(raw, "max_position_embeddings", "model_max_length",
                                          default=defaults["max_position_embeddings"], kind=int)
    cfg.pop("model_max_length", None)
    act = pick(raw, "hidden_act", default="silu", kind=str)
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act {act!r} is not supported (Inkling's MLPs use 'silu')")


def normalize_vocab(raw: dict, cfg: dict, default_unpadded) -> None:
    V = cfg["vocab_size"] = positive_int(raw, "vocab_size", default=201024)
    unpadded = pick(raw, "unpadded_vocab_size", default=default_unpadded, kind=int)
    if unpadded is not None and not 0 < unpadded <= V:
        raise ConfigError(f"config.json: unpadded_vocab_size ({unpadded}) must be within 1..vocab_size ({V})")
    cfg["unpadded_vocab_size"] = unpadded


DEFAULTS = dict(num_attention_heads=64, num_key_value_heads=8, head_dim=128, swa_num_attention_heads=64,
                swa_num_key_value_heads=16, swa_head_dim=128, sliding_window_size=512, log_scaling_n_floor=None,
                max_position_embeddings=131072)


def normalize_config(raw: dict) -> dict:
    cfg = dict(raw)
    cfg["model_type"] = "inkling_text"
    cfg["hidden_size"] = positive_int(raw, "hidden_size", default=6144)
    n = cfg["num_hidden_layers"] = positive_int(raw, "num_hidden_layers", default=66)
    normalize_vocab(raw, cfg, None)
    normalize_attention(raw, cfg, DEFAULTS)
    cfg["layer_types"] = layer_types(raw, n, lambda i: "hybrid_sliding" if (i + 1) % 6 else "hybrid")
    cfg.pop("local_layer_ids", None)
    dense_size = pick(raw, "dense_intermediate_size", default=None, kind=int)
    if dense_size is not None:  # the checkpoints' spelling: intermediate_size is the experts' width
        cfg["moe_intermediate_size"] = positive_int(raw, "intermediate_size", default=3072)
        cfg["intermediate_size"] = positive("dense_intermediate_size", dense_size)
        cfg.pop("dense_intermediate_size")
    else:
        cfg["intermediate_size"] = positive_int(raw, "intermediate_size", default=24576)
        cfg["moe_intermediate_size"] = positive_int(raw, "moe_intermediate_size", default=3072)
    kinds = pick(raw, "mlp_layer_types", default=None, kind=list)
    if kinds is None:
        k = pick(raw, "dense_mlp_idx", default=0, kind=int)
        kinds = ["dense" if i < k else "sparse" for i in range(n)]
    if len(kinds) != n or any(t not in ("dense", "sparse") for t in kinds):
        raise ConfigError(f"config.json: mlp_layer_types must list 'dense' or 'sparse' for each of {n} layers, "
                          f"found {kinds!r}")
    cfg["mlp_layer_types"] = list(kinds)
    cfg.pop("dense_mlp_idx", None)
    E = cfg["n_routed_experts"] = positive_int(raw, "n_routed_experts", "num_local_experts", default=256)
    cfg.pop("num_local_experts", None)
    k = cfg["num_experts_per_tok"] = positive_int(raw, "num_experts_per_tok", default=6)
    if k > E:
        raise ConfigError(f"config.json: num_experts_per_tok ({k}) exceeds n_routed_experts ({E})")
    S = cfg["n_shared_experts"] = pick(raw, "n_shared_experts", default=2, kind=int)
    if S < 1 and "sparse" in kinds:
        raise ConfigError(f"config.json: n_shared_experts is {S}; Inkling's router needs at least one shared expert "
                          "(its weights are normalised over the chosen and the shared experts)")
    cfg["route_scale"] = pick(raw, "route_scale", default=8.0, kind=float)
    cfg["logits_mup_width_multiplier"] = pick(raw, "logits_mup_width_multiplier", "embedding_multiplier",
                                              default=24.0, kind=float)
    if cfg["logits_mup_width_multiplier"] <= 0:
        raise ConfigError("config.json: logits_mup_width_multiplier must be positive")
    cfg.pop("embedding_multiplier", None)
    cfg["tie_word_embeddings"] = False
    return cfg


def expert_rules(cfg: dict) -> list[Rule]:
    """Fused routed experts to mlx-lm's switch_mlp layout (Inkling and Inkling-2)."""
    I = cfg["moe_intermediate_size"]
    return [
        Split(r"^(?P<pre>.*\.mlp)\.experts\.gate_up_proj$", 1,
              [(r"\g<pre>.switch_mlp.gate_proj.weight", I), (r"\g<pre>.switch_mlp.up_proj.weight", I)],
              "fused expert gate_up_proj"),
        Rename(r"^(?P<pre>.*\.mlp)\.experts\.down_proj$", r"\g<pre>.switch_mlp.down_proj.weight"),
    ]


def rules(cfg: dict) -> list[Rule]:
    return [
        Drop(r"^model\.mtp\.", "multi-token-prediction layers: not part of the causal LM (transformers skips them)",
             "model.mtp.*"),
        Rename(r"^model\.embed_tokens\.embed_norm\.weight$", "model.embed_norm.weight"),
        ConvToMLX(SCONV, cfg["conv_kernel_size"], "short-conv kernels"),
        *expert_rules(cfg),
        Rename(r"\.mlp\.shared_experts\.(gate|up|down)_proj$", r".mlp.shared_experts.\1_proj.weight"),
        KeepFloat32(SCONV + "|" + ROUTER_FLOAT32, "kept float32 by transformers in every dtype",
                    "short-conv kernels, e_score_correction_bias, gate.global_scale"),
    ]


PROTECTED = (
    Protected(SCONV + "|" + ROUTER_FLOAT32, "short-conv kernels and routing bias/scale (float32 in the reference)",
              float32=True),
    Protected(r"\.rel_logits_proj\.proj$", "relative-position profile bank: bias per distance"),
    Protected(r"\.mlp\.global_scale$", "a scalar on the dense MLP's output"),
    Protected(r"\.mlp\.gate\.weight$", "router: a quantization error flips the top-k choice"),
    Protected(r"norm\.weight$", "norm weights scale whole activations"),
)
ROLES = (
    Role("embed", r"^model\.embed_tokens\.weight$", sensitive=True),
    Role("lm_head", r"^lm_head\.weight$", sensitive=True),
    Role("attn.qkv", r"\.self_attn\.[qkv]_proj\.weight$"),
    Role("attn.r_proj", r"\.self_attn\.r_proj\.weight$"),
    Role("attn.o_proj", r"\.self_attn\.o_proj\.weight$"),
    Role("moe.experts", r"\.mlp\.(switch_mlp|shared_experts)\.(gate_proj|up_proj)\.weight$"),
    Role("moe.experts.down_proj", r"\.mlp\.(switch_mlp|shared_experts)\.down_proj\.weight$", sensitive=True),
    Role("mlp.gate_up", r"\.mlp\.(gate_proj|up_proj)\.weight$"),
    Role("mlp.down_proj", r"\.mlp\.down_proj\.weight$", sensitive=True),
)

ARCH = register(
    Architecture(
        model_type="inkling_text",
        architectures=("InklingForCausalLM",),
        title="Inkling (attention with short convolutions and relative position bias, MoE)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)
