"""GLM-5.3-Flash (``glm5_next``) converter: the language model of the
multimodal ``Glm5NextForConditionalGeneration``; config normalisation, tensor
rules, quantization policy.

Architecture and math: :mod:`hybridconv.models.glm5_next`.

The multimodal wrapper, handled here (converter-local)
------------------------------------------------------
A transformers-5 checkpoint is the wrapper: ``config.json`` holds the
language model in ``text_config`` (``model_type: glm5_next_text``) beside a
``vision_config``; the weights are ``model.language_model.*`` (the language
model), ``lm_head.weight`` and ``model.visual.*`` (the vision tower and its
merger). The converter reads the ``text_config`` (wrapper-level
``tie_word_embeddings`` inherited when the text config lacks it), renames
``model.language_model.`` to ``model.``, and drops every ``model.visual.*``
tensor with its reason in the ledger ("vision tower: only the language model
is converted"). The written config is transformers' *flat* (text-only)
``glm5_next`` layout — the text fields at the top level, no
``text_config`` / ``vision_config`` — which this converter also reads (so an
output converts again to itself). This wrapper handling is
:data:`WRAPPER_PREFIX` / :func:`_text_config` / :func:`wrapper_rules` only,
to be replaced by a shared wrapper mechanism when there is one.

Config layouts
--------------
transformers 5's (``layer_types``, ``mlp_layer_types``, ``indexer_types``,
``linear_*``) and the older spellings ``Glm5NextTextConfig`` accepts:
``linear_attn_config`` (``head_dim``, ``num_heads``, ``short_conv_kernel_size``,
``gate_lower_bound``, ``safe_gate``), ``index_topk_pattern`` (``"FSS…"``) or
``index_topk_freq`` / ``index_skip_topk_offset`` for ``indexer_types``,
``full_attention`` for an indexed layer, ``num_local_experts`` for
``n_routed_experts``. Defaults are ``Glm5NextTextConfig``'s. Refused with a
ConfigError naming the key: ``qk_rope_head_dim`` ≠ 0 (transformers refuses
RoPE in these layers), ``num_key_value_heads`` ≠ ``num_attention_heads``, no
``q_lora_rank``, ``index_topk`` not a multiple of ``index_kpool``, a
``shared`` indexed layer not right after a ``full`` indexed one (transformers
fails there at run time), schedules of the wrong length or with unknown
kinds, expert counts that do not divide into groups.

Tensor rules
------------
* the wrapper's (above);
* ``drop`` layers numbered ``num_hidden_layers`` and up (the multi-token
  prediction layer, not part of the causal LM: transformers ignores
  ``layers.45.*`` and ``shared_head``) and rotary buffers;
* ``rename`` the original hyper-connection names ``hc_attn_fn`` / ``_base`` /
  ``_scale`` (and ``hc_ffn_*``) to the modules ``attn_hc.fn`` … (transformers'
  in-memory names, the model's), and transformers' in-memory
  ``self_attn.forget_gate.*`` to ``self_attn.*`` (the checkpoints' names);
* ``stack-experts`` ``mlp.experts.N.{gate,up,down}_proj.weight`` into
  ``mlp.switch_mlp.*`` ``[E, ·, ·]``; the fused in-memory ``gate_up_proj`` is
  ``split``; the fused in-memory KDA ``conv1d`` ``regroup``\\ ed into the three
  kernels; ``conv1d-to-mlx`` the short-conv kernels;
* ``keep-float32`` what transformers keeps float32 (``_keep_in_fp32_modules_strict``):
  ``A_log``, ``dt_bias``, the conv kernels, the router ``mlp.gate.weight`` and
  ``e_score_correction_bias``, the hyper-connections' ``base`` and ``scale``.

Quantization policy
-------------------
Never quantized (:data:`PROTECTED`): the float32 tensors above, every norm
(weights and the indexer key norm's bias), the hyper-connections' ``fn``
(read as a matrix by the model, ``(2 + n)·n`` rows) and the indexer's k-pool
``index_kpool_compress_ape`` / ``index_kpool_compress_gate``. Kept float by
default: the DSA indexer's projections (``wq_b``, ``wk``, ``weights_proj``:
they decide which pools attention sees). Quantized at ``--bits``: every other
projection, the experts, embeddings and head (sensitive: embeddings, head,
KDA ``k_proj`` / ``v_proj``, the output projections, the dense and shared
``down_proj``).

Measured on ``glm5_next-tiny`` (verify, 4 × 64 random tokens, seed 2, against
the float32 transformers reference): default 4-bit mean KL 0.0333 (gate
0.15). One role at 8 bits: embeddings 0.0237, KDA ``k_proj``/``v_proj``
0.0274, KDA ``q_proj`` 0.0303, output projections 0.0307, dense
``gate``/``up`` 0.0315, the head 0.0329, the rest within 1 %. The indexer at
4 bits: 0.0333 — nothing measurable here (``wq_b``'s input is 32, below the
group size, so only ``wk`` and ``weights_proj`` were quantized); it is kept
float for the reason measured on Qwen4-Exp's QSA indexer (+13 % KL when
quantized, :mod:`.qwen4_exp_text`).
"""

from __future__ import annotations

from ..config import pick, positive, positive_int
from ..errors import ConfigError
from ..models import glm5_next as model_module
from ._common import check_activation, head_rules, switch_mlp_rules
from .registry import Architecture, Protected, Role, register
from .rules import ConvToMLX, Drop, KeepFloat32, Regroup, Rename, Rule

WRAPPER_PREFIX = r"^model\.language_model\."
WRAPPER = "_multimodal_wrapper"  # planning note: the source is the Glm5NextForConditionalGeneration layout
MIXERS = ("linear_attention", "indexed_attention", "full_attention")


def _text_config(raw: dict) -> tuple[dict, bool]:
    """The language model's config and whether ``raw`` is the wrapper layout (a ``text_config``)."""
    text = raw.get("text_config")
    if text is None:
        return raw, False
    if not isinstance(text, dict):
        raise ConfigError(f"config.json: 'text_config' must be an object, found {type(text).__name__}")
    merged = dict(text)
    if "tie_word_embeddings" not in merged and "tie_word_embeddings" in raw:
        merged["tie_word_embeddings"] = raw["tie_word_embeddings"]
    return merged, True


def _types(text: dict, key: str, allowed: tuple, n: int, default: list[str]) -> list[str]:
    types = pick(text, key, default=None, kind=list)
    if types is None:
        return default
    if len(types) != n or any(t not in allowed for t in types):
        raise ConfigError(f"config.json: {key} must list {n} entries (num_hidden_layers), each one of "
                          f"{', '.join(allowed)}; found {types!r}")
    return list(types)


def _indexer_types(text: dict, n: int) -> list[str]:
    types = pick(text, "indexer_types", default=None, kind=list)
    if types is None:
        pattern = text.get("index_topk_pattern")
        if pattern is not None:
            if isinstance(pattern, str):
                if any(c not in "FS" for c in pattern):
                    raise ConfigError(f"config.json: index_topk_pattern {pattern!r}: expected letters F and S")
                types = ["full" if c == "F" else "shared" for c in pattern]
            else:
                types = list(pattern)
        else:
            freq = max(pick(text, "index_topk_freq", default=1, kind=int), 1)
            offset = pick(text, "index_skip_topk_offset", default=2, kind=int)
            types = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n)]
    if len(types) != n or any(t not in ("full", "shared") for t in types):
        raise ConfigError(f"config.json: indexer_types must list {n} entries (num_hidden_layers), each 'full' or "
                          f"'shared'; found {types!r}")
    return list(types)


def normalize_config(raw: dict) -> dict:
    text, wrapper = _text_config(raw)
    drop = ("text_config", "vision_config", "auto_map", "linear_attn_config", "index_topk_pattern", "index_topk_freq",
            "index_skip_topk_offset", "num_local_experts", "rope_scaling", "rope_parameters", "first_k_dense_replace")
    cfg = {k: v for k, v in text.items() if k not in drop}
    cfg["model_type"] = "glm5_next"
    cfg["architectures"] = ["Glm5NextForConditionalGeneration"]
    cfg[WRAPPER] = wrapper
    for name in ("hidden_size", "num_hidden_layers", "vocab_size"):
        cfg[name] = positive_int(text, name)
    n = cfg["num_hidden_layers"]
    sizes = dict(intermediate_size=12288, moe_intermediate_size=2048, num_attention_heads=64, kv_lora_rank=512,
                 qk_nope_head_dim=256, v_head_dim=256, num_experts_per_tok=8, n_group=1, topk_group=1,
                 index_topk=2048, index_head_dim=128, index_n_heads=32, index_kpool=16, hc_mult=4,
                 hc_sinkhorn_iters=20)
    for name, d in sizes.items():
        cfg[name] = positive_int(text, name, default=d)
    cfg["n_routed_experts"] = positive_int(text, "n_routed_experts", "num_local_experts", default=288)
    cfg["n_shared_experts"] = pick(text, "n_shared_experts", default=1, kind=int)
    if cfg["n_shared_experts"] < 0:
        raise ConfigError(f"config.json: n_shared_experts must be >= 0, found {cfg['n_shared_experts']}")
    kv = pick(text, "num_key_value_heads", default=None, kind=int)
    if kv is not None and kv != cfg["num_attention_heads"]:
        raise ConfigError(f"config.json: num_key_value_heads ({kv}) must equal num_attention_heads "
                          f"({cfg['num_attention_heads']}), as transformers requires")
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    rope = pick(text, "qk_rope_head_dim", default=0, kind=int)
    if rope != 0:
        raise ConfigError(f"config.json: qk_rope_head_dim is {rope}; GLM-5.3-Flash's DSA layers are NoPE (0), "
                          "as transformers requires")
    cfg["qk_rope_head_dim"] = cfg["head_dim"] = 0
    cfg["qk_head_dim"] = cfg["qk_nope_head_dim"]
    q_rank = pick(text, "q_lora_rank", default=1536, kind=int)
    if "q_lora_rank" in text and text["q_lora_rank"] is None:
        raise ConfigError("config.json: q_lora_rank is null; the DSA indexer reads the query latent (required)")
    cfg["q_lora_rank"] = positive("q_lora_rank", q_rank)
    cfg["rms_norm_eps"] = pick(text, "rms_norm_eps", default=1e-5, kind=float)
    cfg["attention_bias"] = pick(text, "attention_bias", default=False, kind=bool)
    cfg["routed_scaling_factor"] = pick(text, "routed_scaling_factor", default=2.5, kind=float)
    cfg["norm_topk_prob"] = pick(text, "norm_topk_prob", default=True, kind=bool)
    cfg["swiglu_limit"] = pick(text, "swiglu_limit", default=10.0, kind=float)
    cfg["hc_eps"] = pick(text, "hc_eps", default=1e-6, kind=float)
    cfg["index_kpool_always_select_tail"] = pick(text, "index_kpool_always_select_tail", default=True, kind=bool)
    # the wrapper ties (or not) its head by its own flag (transformers' tie of lm_head to the
    # language model's embed_tokens), which the text config inherits only when it has none
    cfg["tie_word_embeddings"] = pick(raw, "tie_word_embeddings", default=False, kind=bool)
    check_activation(text)

    # KDA sizes: linear_attn_config's entries win over the linear_* keys (transformers applies it last)
    lin = pick(text, "linear_attn_config", default={}, kind=dict)
    for key, old_key, default in (("linear_head_dim", "head_dim", 128), ("linear_num_heads", "num_heads", 64),
                                  ("linear_conv_kernel_dim", "short_conv_kernel_size", 4)):
        cfg[key] = positive_int(lin, old_key) if lin.get(old_key) is not None else \
            positive_int(text, key, default=default)
    bound = text.get("linear_lower_bound", -5.0)
    if lin:
        bound = lin.get("gate_lower_bound", bound)
        if bound is None and lin.get("safe_gate", True):
            bound = -5.0
    if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float)) or bound >= 0):
        raise ConfigError(f"config.json: linear_lower_bound must be a negative number or null, found {bound!r}")
    cfg["linear_lower_bound"] = None if bound is None else float(bound)

    types = _types(text, "layer_types", MIXERS, n,
                   ["linear_attention" if i % 4 != 3 else "indexed_attention" for i in range(n)])
    cfg["layer_types"] = ["indexed_attention" if t == "full_attention" else t for t in types]
    cfg["mlp_layer_types"] = _types(text, "mlp_layer_types", ("dense", "sparse"), n,
                                    ["dense"] * min(3, n) + ["sparse"] * (n - min(3, n)))
    cfg["indexer_types"] = _indexer_types(text, n)
    for i, (t, it) in enumerate(zip(cfg["layer_types"], cfg["indexer_types"])):
        if t == "indexed_attention" and it == "shared":
            if i == 0 or cfg["layer_types"][i - 1] != "indexed_attention" or cfg["indexer_types"][i - 1] != "full":
                raise ConfigError(f"config.json: layer {i} reuses the DSA selection of the layer before it "
                                  "(indexer_types 'shared'), which is not an indexed layer with its own indexer "
                                  "('full'); transformers fails there too")
    if cfg["index_topk"] % cfg["index_kpool"]:
        raise ConfigError(f"config.json: index_topk ({cfg['index_topk']}) is not a multiple of index_kpool "
                          f"({cfg['index_kpool']})")
    if "sparse" in cfg["mlp_layer_types"]:
        E, groups = cfg["n_routed_experts"], cfg["n_group"]
        if cfg["num_experts_per_tok"] > E:
            raise ConfigError(f"config.json: num_experts_per_tok ({cfg['num_experts_per_tok']}) exceeds "
                              f"n_routed_experts ({E})")
        if E % groups or cfg["topk_group"] > groups:
            raise ConfigError(f"config.json: n_routed_experts ({E}) must split into n_group ({groups}) groups and "
                              f"topk_group ({cfg['topk_group']}) must not exceed them")
    return cfg


def wrapper_rules(cfg: dict) -> list[Rule]:
    """The wrapper's prefix and vision tower (module docstring); applied to the
    flat layout too, whose checkpoints may keep the wrapper's tensor names."""
    return [Rename(WRAPPER_PREFIX, "model."),
            Drop(r"^model\.visual\.", "vision tower: only the language model is converted", "model.visual.*")]


def rules(cfg: dict) -> list[Rule]:
    n = cfg["num_hidden_layers"]
    E, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    proj, K = cfg["linear_num_heads"] * cfg["linear_head_dim"], cfg["linear_conv_kernel_dim"]
    decoder = "|".join(str(i) for i in range(n))
    out = wrapper_rules(cfg) + [
        Drop(rf"^model\.layers\.(?!(?:{decoder})\.)\d+\.",
             "layers after the decoder (multi-token prediction): not part of the causal LM (transformers ignores "
             "them)", f"model.layers.{n}+.*"),
        Drop(r"\.shared_head\.", "multi-token prediction head: not part of the causal LM", "shared_head.*"),
    ]
    out += head_rules(cfg)
    out += [
        Rename(r"\.hc_(attn|ffn)_(fn|base|scale)$", r".\1_hc.\2"),
        Rename(r"\.self_attn\.forget_gate\.", ".self_attn."),
        *switch_mlp_rules(E, inter),
        Regroup(r"\.self_attn\.(?P<piece>conv1d)\.weight$", ["conv1d"],
                [(".self_attn.q_conv1d.weight", proj), (".self_attn.k_conv1d.weight", proj),
                 (".self_attn.v_conv1d.weight", proj)], kernel_size=K,
                what="fused KDA conv1d [q | k | v] (transformers' in-memory layout)"),
        ConvToMLX(r"\.self_attn\.[qkv]_conv1d\.weight$", K, "KDA short-conv kernels"),
        KeepFloat32(r"\.self_attn\.(A_log|dt_bias|[qkv]_conv1d\.weight)$",
                    "KDA decay and conv: float32 in transformers; rounding compounds over every step",
                    "A_log, dt_bias, conv kernels"),
        KeepFloat32(r"\.mlp\.gate\.(weight|e_score_correction_bias)$",
                    "the router chooses the experts; transformers keeps it float32", "MoE router and bias"),
        KeepFloat32(r"\.(attn|ffn)_hc\.(base|scale)$", "hyper-connection biases and scales: float32 in transformers",
                    "hyper-connection base, scale"),
    ]
    return out


PROTECTED = (
    Protected(r"\.self_attn\.(A_log|dt_bias)$", "KDA decay: lower_bound·σ(exp(A_log)·(f + dt_bias)) compounds over steps"),
    Protected(r"\.self_attn\.[qkv]_conv1d\.weight$", "short-conv kernel: a handful of taps per channel"),
    Protected(r"norm\.(weight|bias)$", "norm weights scale whole activations"),
    Protected(r"\.mlp\.gate\.(weight|e_score_correction_bias)$", "MoE router: chooses the experts (float32 in "
              "transformers)"),
    Protected(r"\.(attn|ffn)_hc\.(fn|base|scale)$", "hyper-connection stream weights: every block's input and mix"),
    Protected(r"\.indexer\.index_kpool_compress_(ape|gate)$", "DSA k-pool weighting: which pool keys the indexer "
              "scores"),
)
ROLES = (
    Role("embed", r"^model\.embed_tokens\.weight$", sensitive=True),
    Role("lm_head", r"^lm_head\.weight$", sensitive=True),
    Role("dsa.indexer", r"\.self_attn\.indexer\.(wq_b|wk|weights_proj)\.weight$", default="float",
         why="DSA scores: which pools attention sees flips on small perturbations"),
    Role("kda.q_proj", r"\.self_attn\.q_proj\.weight$"),
    Role("kda.kv_proj", r"\.self_attn\.[kv]_proj\.weight$", sensitive=True),
    Role("kda.gates", r"\.self_attn\.(f_a_proj|f_b_proj|g_a_proj|g_b_proj|b_proj)\.weight$"),
    Role("mla.q_proj", r"\.self_attn\.(q_a_proj|q_b_proj)\.weight$"),
    Role("mla.kv_proj", r"\.self_attn\.(kv_a_proj_with_mqa|kv_b_proj)\.weight$"),
    Role("attn.o_proj", r"\.self_attn\.o_proj\.weight$", sensitive=True),
    Role("moe.experts.gate_up", r"\.mlp\.switch_mlp\.(gate|up)_proj\.weight$"),
    Role("moe.experts.down", r"\.mlp\.switch_mlp\.down_proj\.weight$"),
    Role("moe.shared.gate_up", r"\.mlp\.shared_experts\.(gate|up)_proj\.weight$"),
    Role("moe.shared.down", r"\.mlp\.shared_experts\.down_proj\.weight$", sensitive=True),
    Role("mlp.gate_up_proj", r"\.mlp\.(gate|up)_proj\.weight$"),
    Role("mlp.down_proj", r"\.mlp\.down_proj\.weight$", sensitive=True),
)

ARCH = register(
    Architecture(
        model_type="glm5_next",
        architectures=("Glm5NextForConditionalGeneration",),
        title="GLM-5.3-Flash language model (KDA + DSA-indexed NoPE MLA, hyper-connections, MoE)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)
