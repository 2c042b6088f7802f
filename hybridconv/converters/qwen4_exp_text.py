"""Qwen4-Exp converter: ``qwen4_exp_text`` checkpoints and the multimodal
``Qwen4ExpForConditionalGeneration`` wrappers (``model_type: qwen4_exp``).

Architecture and math: :mod:`hybridconv.models.qwen4_exp_text`.

Config layouts
--------------
Qwen3.5-MoE's (:mod:`hybridconv.converters.qwen3_next`: ``rope_parameters``
or top-level ``rope_theta`` / ``partial_rotary_factor``, ``layer_types`` or
``full_attention_interval``; a wrapper's ``text_config``), plus Qwen4-Exp's
own keys with ``Qwen4ExpTextConfig``'s defaults. The released configs spell
the indexed layers ``full_attention`` in ``layer_types`` (transformers reads
them as ``indexed_attention``); both are read, ``indexed_attention`` is
written. Refused with a ConfigError naming the key, as transformers refuses
them: an indexed layer without the five ``indexer_*`` sizes, ``indexer_kv_heads``
≠ 1, an ``indexer_budget`` not a multiple of ``indexer_compress_ratio``, a
rotary part wider than ``indexer_head_dim``, ``hc_count`` < 2, PLE on an
indexed layer or outside ``1 … num_hidden_layers``, ``ple_embed_dim`` not a
multiple of the n-gram head count, PLE without ``eos_token_id``, an
``output_gate_type`` other than ``silu`` / ``sigmoid``. Unlike Qwen3.5-MoE the
router's ``norm_topk_prob`` is read (transformers' Qwen4 router honours it).
Written: ``model_type: qwen4_exp_text``, ``architectures: ["Qwen4ExpForCausalLM"]``,
no ``text_config``, ``norm_offset_folded: true``.

Tensor rules
------------
Qwen3.5-MoE's (wrapper prefix ``model.language_model.`` renamed, ``model.visual.*``
and ``mtp.*`` dropped, experts stacked into ``switch_mlp``, DeltaNet conv to
MLX's layout, ``A_log`` / ``dt_bias`` float32), and:

* ``regroup`` each PLE layer's n-gram table, stored as ``split_ngram_parts``
  row shards ``ple.ple_embedding.ngram_embedding.shard_N.weight``, into one
  ``ngram_embedding.weight`` (the shards' rows concatenated in order, streamed
  from the sources; the row count is computed from the config — primes above
  ``ngram_vocab_size_base`` — and checked); a table stored whole passes as is;
* ``conv1d-to-mlx`` the PLE's dilated depthwise conv;
* ``add-offset`` +1 on every zero-centred norm (the attention's q/k norms,
  the indexer's ``q_layernorm`` / ``k_layernorm``, every ``hc_norm``, the PLE's
  ``norm_key`` / ``norm_query`` / ``norm_conv``), unless the source says
  ``norm_offset_folded``; the DeltaNet's gated norm holds its scale;
* ``drop`` the PLE's int64 buffers (``layer_multipliers``,
  ``ngram_heads_vocab_sizes``, ``ngram_heads_offsets``): hash constants the
  model computes from the config by transformers' rule (its ``_init_weights``
  does the same; tests check they equal the stored ones).

Quantization policy
-------------------
Qwen3.5-MoE's (:data:`PROTECTED` adds the PLE norms; norms, conv kernels and
the decay stay float; routers, ``shared_expert_gate`` and the DeltaNet's
``b``/``a`` projections float by default), and for what is new:

* the QSA ``index_qk_proj``: float by default (it decides which blocks the
  attention sees; ``(n_h + 1)·d × hidden`` per indexed layer);
* the hyper-connection mixers (``input_mix_weight_down/up``,
  ``block_inject_weight``), the PLE projections and the n-gram tables:
  quantized (the tables are most of the model's bytes in the released sizes).

Measured on ``qwen4_exp-tiny`` (verify, 4 × 64 random tokens, seed 2, against
the float32 transformers reference): default 4-bit mean KL 6.0e-4 (gate
0.15). Quantizing ``index_qk_proj`` too: 6.8e-4 (+13 %, the largest of any
single role: kept float); the hyper-connection mixers at 4 bits: 6.1e-4
(+2 %, quantized). One role at 8 bits: embeddings 3.9e-4, head 4.7e-4 (both
sensitive), DeltaNet ``in_proj`` 5.3e-4, every other role within 2 % of the
default; the routers / ``shared_expert_gate`` at 4 bits 6.3e-4 and the
DeltaNet ``b``/``a`` 6.1e-4 (kept float, as for Qwen3.5). The PLE projections
and tables (inputs of 32 and 8 here, below the group size) stay float on this
fixture whatever the policy.
"""

from __future__ import annotations

from ..config import pick, positive_int
from ..errors import ConfigError
from ..models import qwen4_exp_text as model_module
from .qwen3_next import FOLD, PROTECTED as QWEN_PROTECTED, ROLES as QWEN_ROLES, _text_config, normalize_text, text_rules
from .registry import Architecture, Protected, Role, Wrapper, register, register_wrapper
from .rules import AddOffset, ConvToMLX, Drop, Regroup, Rule

MIXERS = ("linear_attention", "indexed_attention", "full_attention")
EXTRA_ZERO_CENTRED = r"\.(hc_norm|q_layernorm|k_layernorm|norm_key|norm_query|norm_conv)\.weight$"


def _layer_types(text: dict) -> list[str]:
    """The schedule in Qwen3-Next's spelling (``full_attention`` for an indexed layer)."""
    n = positive_int(text, "num_hidden_layers")
    types = pick(text, "layer_types", default=None, kind=list)
    if types is None:
        every = positive_int(text, "full_attention_interval", default=4)
        return ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)]
    if len(types) != n or any(t not in MIXERS for t in types):
        raise ConfigError(f"config.json: layer_types must list {n} entries (num_hidden_layers), each one of "
                          f"{', '.join(MIXERS)}; found {types!r}")
    return ["full_attention" if t != "linear_attention" else t for t in types]


def normalize_config(raw: dict) -> dict:
    text, wrapper = _text_config(raw)
    types = _layer_types(text)
    spelled = {**text, "layer_types": types}
    cfg = normalize_text({**raw, "text_config": spelled} if wrapper else spelled,
                         "qwen4_exp_text", "Qwen4ExpForCausalLM", "all")
    cfg["layer_types"] = ["indexed_attention" if t == "full_attention" else t for t in types]
    cfg["norm_topk_prob"] = pick(text, "norm_topk_prob", default=True, kind=bool)
    n, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]

    cfg["hc_count"] = positive_int(text, "hc_count", default=4)
    if cfg["hc_count"] < 2:
        raise ConfigError(f"config.json: hc_count must be > 1 (hyper-connection streams), found {cfg['hc_count']}")
    cfg["hc_lowrank"] = positive_int(text, "hc_lowrank", default=320)

    act = cfg["output_gate_type"] = pick(text, "output_gate_type", default=None, kind=str) or "silu"
    if act not in ("silu", "sigmoid"):
        raise ConfigError(f"config.json: output_gate_type {act!r} is not supported; expected 'silu' or 'sigmoid'")

    names = ("indexer_n_heads", "indexer_kv_heads", "indexer_head_dim", "indexer_budget", "indexer_compress_ratio")
    if "indexed_attention" in cfg["layer_types"]:
        missing = [k for k in names if text.get(k) is None]
        if missing:
            raise ConfigError(f"config.json: the indexed attention layers need {', '.join(missing)} (QSA sizes)")
        for k in names:
            cfg[k] = positive_int(text, k)
        if cfg["indexer_kv_heads"] != 1:
            raise ConfigError(f"config.json: indexer_kv_heads is {cfg['indexer_kv_heads']}; Qwen4-Exp's QSA has one "
                              "key head (transformers refuses others)")
        if cfg["indexer_budget"] % cfg["indexer_compress_ratio"]:
            raise ConfigError(f"config.json: indexer_budget ({cfg['indexer_budget']}) is not a multiple of "
                              f"indexer_compress_ratio ({cfg['indexer_compress_ratio']})")
        rot = int(cfg["head_dim"] * cfg["partial_rotary_factor"])
        if rot > cfg["indexer_head_dim"]:
            raise ConfigError(f"config.json: the rotary part of the attention heads ({rot} channels) does not fit "
                              f"indexer_head_dim ({cfg['indexer_head_dim']})")

    ple = pick(text, "ple_layer_ids", default=None, kind=list) or []
    for i in ple:
        if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= n:
            raise ConfigError(f"config.json: ple_layer_ids entry {i!r} is not a 1-based layer id in 1..{n}")
        if cfg["layer_types"][i - 1] != "linear_attention":
            raise ConfigError(f"config.json: ple_layer_ids names layer {i} (1-based), an indexed attention layer; "
                              "Qwen4-Exp puts PLE on linear_attention layers only")
    cfg["ple_layer_ids"] = sorted(set(ple))
    cfg["ple_embed_dim"] = hidden if text.get("ple_embed_dim") is None else positive_int(text, "ple_embed_dim")
    for name, default in (("ple_conv_kernel_size", 4), ("ngram_size", 3), ("heads_per_ngram", 8),
                          ("ngram_vocab_size_base", 20_000_000), ("make_ngram_vocab_size_divisible_by", 128),
                          ("split_ngram_parts", 512)):
        cfg[name] = positive_int(text, name, default=default)
    cfg["seed"] = pick(text, "seed", default=1234, kind=int)
    eos = text.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    if cfg["ple_layer_ids"]:
        heads = (cfg["ngram_size"] - 1) * cfg["heads_per_ngram"]
        if cfg["ngram_size"] < 2 or cfg["ple_embed_dim"] % heads:
            raise ConfigError(f"config.json: ple_embed_dim ({cfg['ple_embed_dim']}) must be a multiple of the n-gram "
                              f"heads ((ngram_size - 1) x heads_per_ngram = {heads}), ngram_size >= 2")
        if isinstance(eos, bool) or not isinstance(eos, int):
            raise ConfigError("config.json: eos_token_id must be set (an integer) when ple_layer_ids is not empty: "
                              "it ends the n-gram segments")
    cfg["eos_token_id"] = eos if isinstance(eos, int) and not isinstance(eos, bool) else 0
    return cfg


def _args(cfg: dict):
    return model_module.ModelArgs.from_dict(cfg)


def rules(cfg: dict) -> list[Rule]:
    out = text_rules(cfg)
    args = _args(cfg)
    parts = cfg["split_ngram_parts"]
    for k, layer in enumerate(cfg["ple_layer_ids"]):
        rows = model_module.ngram_table_rows(args, k)
        out.append(Regroup(
            rf"(?<=\.layers\.{layer - 1}\.ple\.ple_embedding\.ngram_embedding)\.(?P<piece>shard_\d+)\.weight$",
            [f"shard_{i}" for i in range(parts)], [(".weight", rows)],
            what=f"layer {layer - 1}'s n-gram table in {parts} row shards",
        ))
    out.append(Drop(r"\.ple\.ple_embedding\.(layer_multipliers|ngram_heads_vocab_sizes|ngram_heads_offsets)$",
                    "n-gram hash constants: recomputed from the config (seed, vocab_size, ngram_vocab_size_base) "
                    "by transformers' rule", "PLE hash buffers"))
    out.append(ConvToMLX(r"\.ple\.conv1d\.weight$", cfg["ple_conv_kernel_size"], "PLE dilated conv kernels"))
    if cfg.get(FOLD):
        out.append(AddOffset(EXTRA_ZERO_CENTRED, 1.0, "zero-centred RMSNorm weights of the hyper-connections, "
                                                       "the QSA indexer and PLE (scale 1 + w)"))
    return out


PROTECTED = QWEN_PROTECTED + (
    Protected(r"\.ple\.norm_(key|query|conv)\.weight$", "norm weights scale whole activations"),
)
ROLES = QWEN_ROLES[:2] + (
    Role("hc.mix", r"(_hyper_connection|hyper_connection_mixer)\.(input_mix_weight_(down|up)|block_inject_weight)"
         r"\.weight$"),
    Role("qsa.indexer", r"\.self_attn\.indexer\.index_qk_proj\.weight$", default="float",
         why="QSA scores: which blocks attention sees flips on small perturbations"),
    Role("ple.proj", r"\.ple\.(key_proj|value_proj)\.weight$"),
    Role("ple.ngram_embedding", r"\.ple\.ple_embedding\.ngram_embedding\.weight$"),
) + QWEN_ROLES[2:]

ARCH = register(
    Architecture(
        model_type="qwen4_exp_text",
        architectures=("Qwen4ExpForCausalLM",),
        title="Qwen4-Exp (gated DeltaNet + QSA-indexed attention, hyper-connections, n-gram PLE, MoE)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)

# The multimodal release: its language model (``model.language_model.*``, found
# from the tensor names), the vision tower dropped (converters/_wrappers.py).
register_wrapper(Wrapper("qwen4_exp", ("Qwen4ExpForConditionalGeneration",), "qwen4_exp_text",
                         "Qwen4-Exp (multimodal)", tie="text"))
