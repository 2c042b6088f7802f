"""Ling-3 (``bailing_hybrid``) converter: config normalisation, tensor rules, quantization policy.

Architecture and math: :mod:`hybridconv.models.bailing_hybrid`.

Config layouts
--------------
* **released** (``inclusionAI/Ling-3.0-*``, remote code ``BailingMoeV3ForCausalLM``,
  the layout mlx-lm's ``bailing_moe_v3`` reads): ``head_dim`` and
  ``num_attention_heads`` are the KDA head size and count, ``short_conv_kernel_size``,
  ``layer_group_size`` (MLA closes every group), ``first_k_dense_replace``,
  ``num_experts_per_tok``, ``n_group``, ``num_shared_experts``,
  ``moe_shared_expert_intermediate_size``, top-level ``rope_theta``,
  ``num_nextn_predict_layers`` MTP layers stored after the decoder;
* **transformers 5** (the fixtures): the same plus ``linear_num_heads``,
  ``linear_head_dim``, ``linear_conv_kernel_dim``, ``layer_types``,
  ``mlp_layer_types``, ``num_experts_per_token``, ``num_expert_group``,
  ``moe_renormalize``, ``rope_parameters`` — and ``head_dim`` overwritten with
  the MLA rotary size ``qk_rope_head_dim`` (DeepSeek-V3's config does that), so
  ``head_dim`` is the KDA head size only when ``linear_head_dim`` is absent.

Precedence is transformers': ``linear_head_dim`` over ``head_dim``,
``linear_num_heads`` over ``num_attention_heads``, ``layer_types`` over
``layer_group_size``, ``mlp_layer_types`` over ``first_k_dense_replace``.
Defaults are ``BailingHybridConfig``'s. The written config carries both
spellings (transformers' and mlx-lm's, with ``head_dim = linear_head_dim``),
``tie_word_embeddings: false`` (transformers' class ties nothing), and
``architectures: ["BailingMoeV3ForCausalLM"]`` — mlx-lm picks its module by
``(model_type, architectures)`` and reads a ``bailing_hybrid`` with any other
class through its Ling-2.5 module. Refused with a ConfigError naming the key:
a rotary type other than ``default``, ``rope_interleave: false`` or
``no_kda_lora: false`` (the original code's other variants, which transformers
does not implement), ``moe_shared_expert_intermediate_size`` ≠
``moe_intermediate_size`` (transformers sizes the shared expert from the
latter), schedules of the wrong length or with unknown kinds, expert counts
that do not divide into groups.

Tensor rules
------------
The output keeps the checkpoints' own names (those mlx-lm's ``bailing_moe_v3``
reads): ``model.word_embeddings``, ``attention.*``, ``q_conv1d``/``k_conv1d``/
``v_conv1d``, ``mlp.gate.expert_bias``, MLA ``attention.dense``, KDA
``attention.o_proj``.

* ``drop`` the multi-token-prediction layers ``model.layers.{n} …
  model.layers.{n + num_nextn_predict_layers − 1}`` (not part of the causal LM;
  transformers ignores them too) and rotary ``inv_freq`` buffers;
* ``rename`` the KDA layers' output projection ``attention.dense`` (what
  transformers writes back for every layer) to ``attention.o_proj`` (what the
  released checkpoints and mlx-lm call it), by the layer schedule; and
  transformers' in-memory names, should a checkpoint carry them
  (``embed_tokens``, ``self_attn``, ``forget_gate.``, ``o_proj`` of MLA,
  ``e_score_correction_bias``), to these;
* ``stack-experts`` ``mlp.experts.N.{gate,up,down}_proj.weight`` into
  ``mlp.switch_mlp.*`` ``[E, ·, ·]``; the fused in-memory ``experts.gate_up_proj``
  is ``split``, and the fused ``conv1d`` ``regroup``\\ ed into the three kernels;
* ``conv1d-to-mlx`` the short-conv kernels ``[C, 1, K]`` to ``[C, K, 1]``;
* ``keep-float32`` ``A_log``, ``dt_bias`` (the KDA decay compounds over
  every step) and the router ``mlp.gate.weight`` / ``expert_bias``
  (transformers keeps both float32: a bf16 bias reorders near-tied experts).

Quantization policy
-------------------
Never quantized (:data:`PROTECTED`): ``A_log``, ``dt_bias``, the conv
kernels, every norm, the router and its bias. Kept float by default: MLA's
``kv_b_proj`` — mlx-lm refuses a quantized one ("Quantized Bailing V3
kv_b_proj weights are not supported"), so a 4-bit output stays loadable there
(``kv_lora_rank × H·(nope + v)`` per MLA layer, one layer in ``layer_group_size``).
Quantized at ``--bits``: every other projection, the experts, embeddings, head;
embeddings / head, KDA ``k_proj`` / ``v_proj`` and the dense / shared
``down_proj`` are *sensitive*. Measured on ``bailing_hybrid-tiny`` (verify, 4 ×
64 random tokens, seed 2): default 4-bit mean KL 0.0210 (gate 0.15; bf16
1.6e-5 over 2 × 64). One role at a time at 8 bits: embeddings 0.0147, KDA
``k_proj``/``v_proj`` 0.0153 (marked sensitive, as for Kimi-Linear), q
projections 0.0189, output projections 0.0194, the rest within 2 % of the
default (the forget gate ``f_proj`` and ``b_proj`` none: quantized like the
rest although they feed the decay); ``kv_b_proj`` and the experts' / shared
``down_proj`` have inputs of 32 here, below the group size, and stay float on
this fixture anyway.
"""

from __future__ import annotations

from ..config import pick, positive, positive_int
from ..errors import ConfigError
from ..models import bailing_hybrid as model_module
from ._common import check_activation, head_rules, switch_mlp_rules
from .registry import Architecture, Protected, Role, register
from .rules import ConvToMLX, Drop, KeepFloat32, Regroup, Rename, Rule

MIXERS = ("linear_attention", "full_attention")
MLPS = ("dense", "sparse")


def _types(raw: dict, key: str, allowed: tuple, n: int, default: list[str]) -> list[str]:
    types = pick(raw, key, default=None, kind=list)
    if types is None:
        return default
    if len(types) != n or any(t not in allowed for t in types):
        raise ConfigError(f"config.json: {key} must list {n} entries (num_hidden_layers), each one of "
                          f"{', '.join(allowed)}; found {types!r}")
    return list(types)


def normalize_config(raw: dict) -> dict:
    drop = ("auto_map", "rope_scaling", "num_experts_per_token", "num_expert_group", "moe_renormalize",
            "n_shared_experts", "num_local_experts", "num_mtp_layers")
    cfg = {k: v for k, v in raw.items() if k not in drop}
    cfg["model_type"] = "bailing_hybrid"
    cfg["architectures"] = ["BailingMoeV3ForCausalLM"]
    for name in ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads"):
        cfg[name] = positive_int(raw, name)
    n = cfg["num_hidden_layers"]
    sizes = dict(intermediate_size=6144, moe_intermediate_size=768, kv_lora_rank=512, qk_nope_head_dim=128,
                 qk_rope_head_dim=64, v_head_dim=128, layer_group_size=6)
    for name, d in sizes.items():
        cfg[name] = positive_int(raw, name, default=d)
    q_rank = pick(raw, "q_lora_rank", default=None, kind=int)
    cfg["q_lora_rank"] = None if q_rank is None else positive("q_lora_rank", q_rank)
    if cfg["qk_rope_head_dim"] % 2:
        raise ConfigError(f"config.json: qk_rope_head_dim ({cfg['qk_rope_head_dim']}) must be even (rotary pairs)")
    # KDA sizes: transformers' linear_* keys, else the released meaning of head_dim / heads.
    cfg["linear_num_heads"] = positive_int(raw, "linear_num_heads", "num_attention_heads")
    cfg["linear_head_dim"] = positive_int(raw, "linear_head_dim", "head_dim", default=128)
    cfg["linear_conv_kernel_dim"] = positive_int(raw, "linear_conv_kernel_dim", "short_conv_kernel_size", default=4)
    cfg["head_dim"] = cfg["linear_head_dim"]  # mlx-lm's reading (its KDA head size)
    cfg["short_conv_kernel_size"] = cfg["linear_conv_kernel_dim"]

    experts = cfg["num_experts"] = positive_int(raw, "num_experts", "num_local_experts", default=512)
    top_k = cfg["num_experts_per_tok"] = positive_int(raw, "num_experts_per_tok", "num_experts_per_token",
                                                      default=8)
    shared = pick(raw, "num_shared_experts", "n_shared_experts", default=1, kind=int)
    if shared < 1:
        raise ConfigError(f"config.json: num_shared_experts must be >= 1 (transformers always builds the shared "
                          f"expert), found {shared}")
    cfg["num_shared_experts"] = shared
    groups = cfg["n_group"] = positive_int(raw, "n_group", "num_expert_group", default=8)
    topk_group = cfg["topk_group"] = positive_int(raw, "topk_group", default=4)
    cfg["routed_scaling_factor"] = pick(raw, "routed_scaling_factor", default=2.5, kind=float)
    cfg["norm_topk_prob"] = pick(raw, "norm_topk_prob", "moe_renormalize", default=True, kind=bool)
    shared_size = pick(raw, "moe_shared_expert_intermediate_size", default=None, kind=int)
    if shared_size is not None and shared_size != cfg["moe_intermediate_size"]:
        raise ConfigError(
            f"config.json: moe_shared_expert_intermediate_size ({shared_size}) differs from moe_intermediate_size "
            f"({cfg['moe_intermediate_size']}); transformers' Ling-3 (the reference) sizes the shared expert "
            "num_shared_experts x moe_intermediate_size"
        )
    cfg["moe_shared_expert_intermediate_size"] = cfg["moe_intermediate_size"]

    cfg["rms_norm_eps"] = pick(raw, "rms_norm_eps", default=1e-6, kind=float)
    cfg["attention_bias"] = pick(raw, "attention_bias", default=False, kind=bool)
    pick(raw, "tie_word_embeddings", default=False, kind=bool)
    cfg["tie_word_embeddings"] = False  # transformers' BailingHybridForCausalLM ties nothing
    cfg["kda_safe_gate"] = pick(raw, "kda_safe_gate", default=True, kind=bool)
    cfg["kda_lower_bound"] = pick(raw, "kda_lower_bound", default=-5.0, kind=float)
    check_activation(raw)
    for key, why in (("rope_interleave", "rotates the rotary channels in halves"),
                     ("no_kda_lora", "gives KDA low-rank gate projections")):
        if pick(raw, key, default=True, kind=bool) is not True:
            raise ConfigError(f"config.json: {key} is false (expected true): the original code then {why}, "
                              "which transformers' Ling-3 (the reference) does not implement")
    cfg["rope_interleave"] = cfg["no_kda_lora"] = True

    pick(raw, "rope_parameters", default={}, kind=dict)
    rope_type = pick(raw, "rope_parameters.rope_type", "rope_parameters.type", "rope_scaling.rope_type",
                     "rope_scaling.type", default="default", kind=str)
    if rope_type != "default":
        raise ConfigError(f"config.json: rope type {rope_type!r} (rope_parameters.rope_type) is not supported; "
                          "expected 'default'")
    theta = cfg["rope_theta"] = pick(raw, "rope_parameters.rope_theta", "rope_theta", default=6e6, kind=float)
    rope = dict(pick(raw, "rope_parameters", default={}, kind=dict))
    rope.pop("type", None)
    rope.update(rope_type="default", rope_theta=theta)
    cfg["rope_parameters"] = rope
    cfg["max_position_embeddings"] = pick(raw, "max_position_embeddings", "model_max_length", default=262144,
                                          kind=int)
    cfg["model_max_length"] = cfg["max_position_embeddings"]
    mtp = pick(raw, "num_nextn_predict_layers", "num_mtp_layers", default=0, kind=int)
    if mtp < 0:
        raise ConfigError(f"config.json: num_nextn_predict_layers must be >= 0, found {mtp}")
    cfg["num_nextn_predict_layers"] = mtp

    g = cfg["layer_group_size"]
    cfg["layer_types"] = _types(raw, "layer_types", MIXERS, n,
                                ["full_attention" if (i + 1) % g == 0 else "linear_attention" for i in range(n)])
    k = pick(raw, "first_k_dense_replace", default=2, kind=int)
    if k < 0:
        raise ConfigError(f"config.json: first_k_dense_replace must be >= 0, found {k}")
    mlps = cfg["mlp_layer_types"] = _types(raw, "mlp_layer_types", MLPS, n,
                                           ["dense" if i < k else "sparse" for i in range(n)])
    cfg["first_k_dense_replace"] = next((i for i, t in enumerate(mlps) if t == "sparse"), n)
    if "sparse" in mlps:
        if top_k > experts:
            raise ConfigError(f"config.json: num_experts_per_tok ({top_k}) exceeds num_experts ({experts})")
        if experts % groups:
            raise ConfigError(f"config.json: num_experts ({experts}) is not a multiple of n_group ({groups})")
        if topk_group > groups:
            raise ConfigError(f"config.json: topk_group ({topk_group}) exceeds n_group ({groups})")
    return cfg


def _layers(cfg: dict, kind: str) -> str:
    """Alternation of the indices of the ``kind`` layers (``linear_attention`` / ``full_attention``)."""
    return "|".join(str(i) for i, t in enumerate(cfg["layer_types"]) if t == kind) or "(?!)"


def rules(cfg: dict) -> list[Rule]:
    n, mtp = cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"]
    E, inter = cfg["num_experts"], cfg["moe_intermediate_size"]
    proj, K = cfg["linear_num_heads"] * cfg["linear_head_dim"], cfg["linear_conv_kernel_dim"]
    out: list[Rule] = []
    if mtp:
        extra = "|".join(str(i) for i in range(n, n + mtp))
        out.append(Drop(rf"^model\.layers\.({extra})\.",
                        "multi-token prediction layers: not part of the causal LM (transformers ignores them)",
                        f"model.layers.{n}.* (MTP)"))
    out += head_rules(cfg, embedding="model.word_embeddings.weight")
    kda, mla = _layers(cfg, "linear_attention"), _layers(cfg, "full_attention")
    out += [
        Rename(r"^model\.embed_tokens\.", "model.word_embeddings."),
        Rename(r"\.self_attn\.forget_gate\.", ".self_attn."),
        Rename(rf"^(model\.layers\.(?:{kda})\.)(?:attention|self_attn)\.dense\.", r"\1attention.o_proj."),
        Rename(rf"^(model\.layers\.(?:{mla})\.)(?:attention|self_attn)\.o_proj\.", r"\1attention.dense."),
        Rename(r"\.self_attn\.", ".attention."),
        Rename(r"\.mlp\.gate\.e_score_correction_bias$", ".mlp.gate.expert_bias"),
        *switch_mlp_rules(E, inter),
        Regroup(r"\.(?:attention|self_attn)\.(?P<piece>conv1d)\.weight$", ["conv1d"],
                [(".attention.q_conv1d.weight", proj), (".attention.k_conv1d.weight", proj),
                 (".attention.v_conv1d.weight", proj)], kernel_size=K,
                what="fused KDA conv1d [q | k | v] (transformers' in-memory layout)"),
        ConvToMLX(r"\.attention\.[qkv]_conv1d\.weight$", K, "KDA short-conv kernels"),
        KeepFloat32(r"\.attention\.(A_log|dt_bias)$", "KDA decay parameters: rounding compounds over every step",
                    "A_log, dt_bias"),
        KeepFloat32(r"\.mlp\.gate\.(weight|expert_bias)$",
                    "the router chooses the experts; transformers keeps it float32", "MoE router and expert_bias"),
    ]
    return out


PROTECTED = (
    Protected(r"\.attention\.(A_log|dt_bias)$", "KDA decay: lower_bound·σ(exp(A_log)·(f + dt_bias)) compounds over steps"),
    Protected(r"\.attention\.[qkv]_conv1d\.weight$", "short-conv kernel: a handful of taps per channel"),
    Protected(r"norm\.weight$", "norm weights scale whole activations"),
    Protected(r"\.mlp\.gate\.(weight|expert_bias)$", "MoE router: chooses the experts (float32 in transformers)"),
)
ROLES = (
    Role("embed", r"^model\.word_embeddings\.weight$", sensitive=True),
    Role("lm_head", r"^lm_head\.weight$", sensitive=True),
    Role("attn.q_proj", r"\.attention\.(q_proj|q_a_proj|q_b_proj)\.weight$"),
    Role("kda.kv_proj", r"\.attention\.[kv]_proj\.weight$", sensitive=True),
    Role("kda.forget_gate", r"\.attention\.f_proj\.weight$"),
    Role("kda.beta_proj", r"\.attention\.b_proj\.weight$"),
    Role("attn.output_gate", r"\.attention\.g_proj\.weight$"),
    Role("mla.kv_a_proj", r"\.attention\.kv_a_proj_with_mqa\.weight$"),
    Role("mla.kv_b_proj", r"\.attention\.kv_b_proj\.weight$", default="float",
         why="mlx-lm cannot load a quantized Ling-3 kv_b_proj"),
    Role("attn.o_proj", r"\.attention\.(o_proj|dense)\.weight$"),
    Role("moe.experts.gate_up", r"\.mlp\.switch_mlp\.(gate|up)_proj\.weight$"),
    Role("moe.experts.down", r"\.mlp\.switch_mlp\.down_proj\.weight$"),
    Role("moe.shared.gate_up", r"\.mlp\.shared_experts\.(gate|up)_proj\.weight$"),
    Role("moe.shared.down", r"\.mlp\.shared_experts\.down_proj\.weight$", sensitive=True),
    Role("mlp.gate_up_proj", r"\.mlp\.(gate|up)_proj\.weight$"),
    Role("mlp.down_proj", r"\.mlp\.down_proj\.weight$", sensitive=True),
)

ARCH = register(
    Architecture(
        model_type="bailing_hybrid",
        architectures=("BailingHybridForCausalLM", "BailingMoeV3ForCausalLM"),
        title="Ling-3 (KDA + gated MLA, group-limited MoE)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)
