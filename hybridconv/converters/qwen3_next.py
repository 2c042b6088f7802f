"""Qwen3-Next converter (and the shared part of the Qwen3.5 ones): config
normalisation, tensor rules, quantization policy.

Architecture and math: :mod:`hybridconv.models.qwen3_next`.

Config layouts
--------------
* as transformers 5 writes it: ``rope_parameters`` holds ``rope_theta`` and
  ``partial_rotary_factor``, ``layer_types`` lists every layer;
* as published with the original checkpoints: top-level ``rope_theta`` and
  ``partial_rotary_factor``, the schedule as ``full_attention_interval``.

Both are read (``partial_rotary_factor`` defaults to 0.25 and the interval to
4, as in transformers); only the ``default`` rotary type is accepted (anything
else fails naming the key). The written config carries both forms — the
top-level keys and ``full_attention_interval`` that mlx-lm reads, and
``layer_types`` / ``rope_parameters`` — plus ``norm_offset_folded: true``
(see below; the planning note ``_fold_norm_offset``, not written, says whether
this conversion folds it). When ``layer_types`` is not periodic (attention
exactly at every ``n``-th layer) no interval describes it: the interval
written is then the published default (4), mlx-lm builds that schedule and
refuses the weights (measured: "Received 6 parameters not in model"), and
hybridconv, which follows ``layer_types``, converts and runs it. A dense
Qwen3-Next (``num_experts = 0``) is written with inert MoE keys, which
mlx-lm requires.

Tensor rules, in order
----------------------
* ``rename`` (Qwen3.5 multimodal wrappers only) ``model.language_model.`` to
  ``model.``;
* ``drop`` ``rotary_emb.inv_freq`` buffers (recomputed), the multi-token
  prediction head ``mtp.*`` (a training/speculative-decoding module that the
  causal LM does not run; transformers ignores it too), the vision tower
  ``model.visual.*`` of wrappers (this tool converts the language model) and,
  when tied, ``lm_head.weight``;
* ``stack-experts`` per-expert ``mlp.experts.N.{gate,up,down}_proj.weight``
  into ``mlp.switch_mlp.*.weight [E, ...]`` (mlx-lm's layout); the fused form
  some Qwen3.5-MoE checkpoints store (``mlp.experts.gate_up_proj [E, 2I, H]``,
  ``mlp.experts.down_proj``) is ``split`` / ``rename``\\ d into the same;
* ``conv1d-to-mlx`` the DeltaNet conv kernels ``[C, 1, K]`` to ``[C, K, 1]``;
* ``keep-float32`` ``A_log`` and ``dt_bias``: the decay ``exp(−exp(A_log)·
  softplus(a + dt_bias))`` multiplies the recurrent state at every step, so a
  bf16 rounding of either is an error in the decay rate compounded over the
  sequence (a few numbers per layer);
* ``add-offset`` +1 on the zero-centred norms (``input_layernorm``,
  ``post_attention_layernorm``, ``q_norm``, ``k_norm``, ``model.norm``): the
  checkpoint stores ``w`` with scale ``1 + w``; mlx-lm's and this model's norms
  read the scale. Applied only when the source config lacks
  ``norm_offset_folded`` (the written config sets it), so converting an output
  again changes nothing. The DeltaNet's gated norm stores its scale and is
  copied as is.

Quantization policy
-------------------
Never quantized, stored float32 (:data:`PROTECTED`): ``A_log``, ``dt_bias``,
the conv kernels (4 taps per channel), every norm weight. Kept in float by
default (roles with ``default="float"``): the MoE router ``mlp.gate`` and the
``shared_expert_gate`` (``[E, H]`` and ``[1, H]``: a top-k choice flips on small
perturbations of the router logits; mlx-lm keeps them at 8 bits for the same
reason) and the DeltaNet's ``b``/``a`` projections (``2·Hv`` rows per layer;
they set β and the decay, whose errors compound over time). Quantized at
``--bits``: every other projection, the experts, embeddings and head; the
embeddings/head, MLP/expert ``down_proj`` and the DeltaNet ``out_proj`` are
*sensitive* (wider in mixed recipes).
"""

from __future__ import annotations

from ..config import pick, positive, positive_int
from ..errors import ConfigError
from ..models import qwen3_next as model_module
from ._common import head_rules, switch_mlp_rules
from .registry import Architecture, Protected, Role, register
from .rules import AddOffset, ConvToMLX, Drop, KeepFloat32, Rule

FOLDED = "norm_offset_folded"  # written config: the norm weights hold the scale 1 + w
FOLD = "_fold_norm_offset"  # this conversion adds the 1 (the source has FOLDED unset)
ZERO_CENTRED_NORMS = r"(\.(input_layernorm|post_attention_layernorm|q_norm|k_norm)\.weight|^model\.norm\.weight)$"


def _text_config(raw: dict) -> tuple[dict, bool]:
    """The language model's config and whether ``raw`` is a multimodal wrapper
    (a ``text_config``); wrapper-level keys the text config lacks are inherited."""
    text = raw.get("text_config")
    if text is None:
        return raw, False
    if not isinstance(text, dict):
        raise ConfigError(f"config.json: 'text_config' must be an object, found {type(text).__name__}")
    merged = dict(text)
    for key in ("tie_word_embeddings", FOLDED):
        if key not in merged and key in raw:
            merged[key] = raw[key]
    return merged, True


def _layer_types(raw: dict, n: int) -> list[str]:
    types = pick(raw, "layer_types", default=None, kind=list)
    if types is None:
        interval = positive_int(raw, "full_attention_interval", default=4)
        return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]
    if len(types) != n:
        raise ConfigError(f"config.json: 'layer_types' has {len(types)} entries, expected num_hidden_layers = {n}")
    for t in types:
        if t not in ("linear_attention", "full_attention"):
            raise ConfigError(
                f"config.json: 'layer_types' entry {t!r}: expected 'linear_attention' or 'full_attention'"
            )
    return list(types)


def interval_of(types: list[str]) -> int | None:
    """``n`` such that layer ``i`` is full attention iff ``(i + 1) % n == 0`` (mlx-lm's rule), or None."""
    for n in range(1, len(types) + 2):
        if all((t == "full_attention") == ((i + 1) % n == 0) for i, t in enumerate(types)):
            return n
    return None


def normalize_text(raw: dict, model_type: str, architecture: str, moe: str) -> dict:
    """Shared normalisation. ``moe``: ``"optional"`` (Qwen3-Next: ``num_experts``,
    ``mlp_only_layers``, ``decoder_sparse_step``), ``"none"`` (Qwen3.5 dense),
    ``"all"`` (Qwen3.5-MoE: every layer)."""
    text, _ = _text_config(raw)
    skip = {"text_config", "vision_config", "architectures", "auto_map"}
    cfg = {k: v for k, v in text.items() if k not in skip}
    cfg["model_type"] = model_type
    cfg["architectures"] = [architecture]

    for name in ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads",
                 "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim"):
        cfg[name] = positive_int(text, name)
    n = cfg["num_hidden_layers"]
    cfg["num_key_value_heads"] = positive_int(text, "num_key_value_heads", default=cfg["num_attention_heads"])
    cfg["head_dim"] = positive_int(text, "head_dim", default=cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg["linear_conv_kernel_dim"] = positive_int(text, "linear_conv_kernel_dim", default=4)
    cfg["rms_norm_eps"] = pick(text, "rms_norm_eps", default=1e-6, kind=float)
    cfg["tie_word_embeddings"] = pick(text, "tie_word_embeddings", default=False, kind=bool)
    cfg["attention_bias"] = pick(text, "attention_bias", default=False, kind=bool)
    cfg["max_position_embeddings"] = pick(text, "max_position_embeddings", default=32768, kind=int)
    act = pick(text, "hidden_act", default="silu", kind=str)
    if act != "silu":
        raise ConfigError(f"config.json: 'hidden_act' is {act!r}; this architecture uses 'silu'")

    pick(text, "rope_parameters", default={}, kind=dict)  # an object when present
    rope_type = pick(text, "rope_parameters.rope_type", "rope_parameters.type", "rope_scaling.rope_type",
                     "rope_scaling.type", default="default", kind=str)
    if rope_type != "default":
        raise ConfigError(
            f"config.json: rope type {rope_type!r} (rope_parameters.rope_type) is not supported; expected 'default'"
        )
    cfg["rope_theta"] = pick(text, "rope_theta", "rope_parameters.rope_theta", default=10000.0, kind=float)
    cfg["partial_rotary_factor"] = pick(
        text, "partial_rotary_factor", "rope_parameters.partial_rotary_factor", default=0.25, kind=float
    )
    if not 0 < cfg["partial_rotary_factor"] <= 1 or int(cfg["head_dim"] * cfg["partial_rotary_factor"]) % 2:
        raise ConfigError(
            f"config.json: 'partial_rotary_factor' {cfg['partial_rotary_factor']} must be in (0, 1] and give an "
            f"even number of rotated channels of head_dim {cfg['head_dim']}"
        )
    rope = dict(pick(text, "rope_parameters", default={}, kind=dict))
    rope.update(rope_type="default", rope_theta=cfg["rope_theta"], partial_rotary_factor=cfg["partial_rotary_factor"])
    rope.pop("type", None)
    cfg["rope_parameters"] = rope
    cfg.pop("rope_scaling", None)

    cfg["layer_types"] = _layer_types(text, n)
    cfg["full_attention_interval"] = interval_of(cfg["layer_types"]) or 4

    experts = 0 if moe == "none" else pick(text, "num_experts", default=512, kind=int)
    if experts < 0 or (moe == "all" and experts == 0):
        raise ConfigError(f"config.json: 'num_experts' must be {'positive' if moe == 'all' else '>= 0'}, found {experts}")
    if experts == 0:  # dense: every layer a SwiGLU MLP (the MoE keys mlx-lm requires, written inert)
        cfg["intermediate_size"] = positive_int(text, "intermediate_size")
        cfg.update(num_experts=0, num_experts_per_tok=1, moe_intermediate_size=0, shared_expert_intermediate_size=0,
                   decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    else:
        cfg["num_experts"] = experts
        defaults = {"num_experts_per_tok": 10, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512}
        for name, d in defaults.items():
            cfg[name] = positive(name, pick(text, name, default=d, kind=int))
        if cfg["num_experts_per_tok"] > cfg["num_experts"]:
            raise ConfigError(
                f"config.json: num_experts_per_tok ({cfg['num_experts_per_tok']}) exceeds num_experts ({cfg['num_experts']})"
            )
        if moe == "all":
            cfg["norm_topk_prob"] = True  # Qwen3.5-MoE always renormalises the chosen weights
            cfg["decoder_sparse_step"], cfg["mlp_only_layers"] = 1, []
            cfg["intermediate_size"] = pick(text, "intermediate_size", default=0, kind=int)
        else:
            cfg["norm_topk_prob"] = pick(text, "norm_topk_prob", default=True, kind=bool)
            cfg["decoder_sparse_step"] = positive_int(text, "decoder_sparse_step", default=1)
            only = pick(text, "mlp_only_layers", default=[], kind=list)
            for i in only:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                    raise ConfigError(f"config.json: mlp_only_layers entry {i!r} is not a layer index 0..{n - 1}")
            cfg["mlp_only_layers"] = sorted(set(only))
            dense_needed = any(not m for m in model_module.moe_layers(model_module.ModelArgs.from_dict(cfg)))
            cfg["intermediate_size"] = (
                positive_int(text, "intermediate_size") if dense_needed else pick(text, "intermediate_size", default=0, kind=int)
            )
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ConfigError(
            f"config.json: num_attention_heads ({cfg['num_attention_heads']}) is not a multiple "
            f"of num_key_value_heads ({cfg['num_key_value_heads']})"
        )
    if cfg["linear_num_value_heads"] % cfg["linear_num_key_heads"]:
        raise ConfigError(
            f"config.json: linear_num_value_heads ({cfg['linear_num_value_heads']}) is not a multiple "
            f"of linear_num_key_heads ({cfg['linear_num_key_heads']})"
        )
    # The weights written have the offset folded; whether *this* conversion
    # folds it depends on the source (see the module docstring).
    cfg[FOLD] = not pick(text, FOLDED, default=False, kind=bool)
    cfg[FOLDED] = True
    return cfg


def normalize_config(raw: dict) -> dict:
    return normalize_text(raw, "qwen3_next", "Qwen3NextForCausalLM", "optional")


def text_rules(cfg: dict) -> list[Rule]:
    out: list[Rule] = head_rules(cfg) + [
        Drop(r"^mtp\.", "multi-token prediction head: not part of the causal LM", "mtp.*"),
    ]
    if cfg["num_experts"]:
        out += switch_mlp_rules(cfg["num_experts"], cfg["moe_intermediate_size"])
    out.append(ConvToMLX(r"\.linear_attn\.conv1d\.weight$", cfg["linear_conv_kernel_dim"], "DeltaNet conv1d weights"))
    out.append(KeepFloat32(r"\.linear_attn\.(A_log|dt_bias)$", "decay parameters: rounding compounds over every step",
                           "A_log, dt_bias"))
    if cfg.get(FOLD):
        out.append(AddOffset(ZERO_CENTRED_NORMS, 1.0, "zero-centred RMSNorm weights (scale 1 + w)"))
    return out


def rules(cfg: dict) -> list[Rule]:
    return text_rules(cfg)


PROTECTED = (
    Protected(r"\.linear_attn\.(A_log|dt_bias)$", "decay: g = -exp(A_log) * softplus(a + dt_bias)"),
    Protected(r"\.conv1d\.weight$", "conv1d kernel: a handful of taps per channel"),
    Protected(r"norm\.weight$", "norm weights scale whole activations"),
)
ROLES = (
    Role("embed", r"^model\.embed_tokens\.weight$", sensitive=True),
    Role("lm_head", r"^lm_head\.weight$", sensitive=True),
    Role("delta.in_proj", r"\.linear_attn\.in_proj_(qkvz|qkv|z)\.weight$"),
    Role("delta.in_proj_ba", r"\.linear_attn\.in_proj_(ba|b|a)\.weight$", default="float",
         why="sets beta and the decay of the recurrent state (2 x value heads rows)"),
    Role("delta.out_proj", r"\.linear_attn\.out_proj\.weight$", sensitive=True),
    Role("attn.q_proj", r"\.self_attn\.q_proj\.weight$"),
    Role("attn.kv_proj", r"\.self_attn\.[kv]_proj\.weight$"),
    Role("attn.o_proj", r"\.self_attn\.o_proj\.weight$"),
    Role("moe.router", r"\.mlp\.(gate|shared_expert_gate)\.weight$", default="float",
         why="router logits: a top-k choice flips on small perturbations"),
    Role("moe.experts", r"\.mlp\.switch_mlp\.(gate_proj|up_proj)\.weight$"),
    Role("moe.experts.down_proj", r"\.mlp\.switch_mlp\.down_proj\.weight$", sensitive=True),
    Role("mlp.gate_up", r"\.mlp\.(shared_expert\.)?(gate_proj|up_proj)\.weight$"),
    Role("mlp.down_proj", r"\.mlp\.(shared_expert\.)?down_proj\.weight$", sensitive=True),
)

ARCH = register(
    Architecture(
        model_type="qwen3_next",
        architectures=("Qwen3NextForCausalLM",),
        title="Qwen3-Next (gated DeltaNet + gated attention, MoE)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)
