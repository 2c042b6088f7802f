"""MiniMax-Text-01 converter: config normalisation, tensor rules, quantization policy.

Architecture and math: :mod:`hybridconv.models.minimax`.

Config layouts
--------------
* as transformers 5 writes it (``MiniMaxAI/MiniMax-Text-01-hf`` and the
  fixtures): ``layer_types``, ``rope_parameters.rope_theta``, the six residual
  factors ``{full_attn,linear_attn,mlp}_{alpha,beta}_factor``,
  ``num_local_experts``, ``block_size``;
* older / original spellings read as aliases: top-level ``rope_theta``,
  ``num_experts`` (transformers' ``attribute_map``), the remote-code
  ``attn_type_list`` (0 = lightning, 1 = softmax) and
  ``layernorm_{full_attention,linear_attention,mlp}_{alpha,beta}``.

Defaults are transformers' ``MiniMaxConfig``'s: ``rope_theta`` 1e6,
``num_key_value_heads`` 8, ``head_dim`` ``hidden_size / heads``, 8 experts,
top 2, factors 1, alternating layers (softmax first) when no list is given.
Refused with a ConfigError naming the key: an unknown layer type or a list of
the wrong length, a rotary type other than ``default``, ``postnorm: false``
(the original code's pre-norm residual, which transformers does not
implement), an activation other than ``silu``, ``num_experts_per_tok >
num_local_experts``. The written config carries the transformers-5 spellings.

Tensor rules
------------
* ``drop`` rotary ``inv_freq`` buffers and, when tied, ``lm_head.weight``;
* ``drop`` the lightning buffers ``query_decay``, ``key_decay``,
  ``diagonal_decay``: functions of ``slope_rate`` and ``block_size`` (written
  so by transformers' ``decay_factors``; equal to them on the fixture), which
  the chunked core recomputes from ``slope_rate``; ``diagonal_decay`` alone is
  ``H·block_size²`` floats per layer (16 MiB at the released 64 heads and
  blocks of 256);
* ``keep-float32`` ``slope_rate`` (the per-head decay ``exp(−slope)``
  compounds over every step; transformers reads it from the checkpoint, so it
  is kept, not recomputed from the formula);
* ``stack-experts`` ``block_sparse_moe.experts.N.w1/w3/w2.weight`` into
  ``block_sparse_moe.switch_mlp.gate_proj/up_proj/down_proj.weight`` ``[E, ·, ·]``
  (mlx-lm's Mixtral names); transformers' in-memory fused form
  (``mlp.experts.gate_up_proj [E, 2I, H]``, ``mlp.experts.down_proj``,
  ``mlp.gate``) is split / renamed into the same.

Quantization policy
-------------------
Never quantized (:data:`PROTECTED`): ``slope_rate`` (float32), every norm
(the per-layer pair, the lightning output norm over ``H·D``, the final norm).
Kept float by default: the MoE router ``block_sparse_moe.gate`` (a top-k choice
flips on small perturbations of its logits). Quantized at ``--bits``:
``qkv_proj``, ``output_gate``, ``out_proj``, the softmax attention
projections, the experts, embeddings and head; embeddings/head and the
experts' ``w2`` are *sensitive*. Measured on ``minimax-tiny`` (verify, 4 × 64
random tokens, seed 2): default 4-bit mean KL 0.00143 (gate 0.15), bf16 4e-6.
One role at a time at 8 bits: embeddings 0.00076, head 0.00081, ``qkv_proj``
0.00134, lightning ``out_proj`` 0.00140, everything else (softmax attention,
``output_gate``, experts) within 1 % of the default — so only the embeddings and
head are marked sensitive among these (the experts' ``w2`` as for every MoE
here: the largest outliers in trained models). The router quantized at 4 bits
moved the KL by under 0.1 % on this random model; it stays float because it is
``E × hidden`` per layer (negligible) and a flipped expert choice is not
gradual.
"""

from __future__ import annotations

from ..config import pick, positive_int
from ..errors import ConfigError
from ..models import minimax as model_module
from ._common import check_activation, fused_expert_rules, head_rules
from .registry import Architecture, Protected, Role, register
from .rules import Drop, KeepFloat32, Rename, Rule, StackExperts

LAYER_TYPES = ("linear_attention", "full_attention")
FACTORS = {  # transformers' name -> the remote-code config's
    "full_attn_alpha_factor": "layernorm_full_attention_alpha",
    "full_attn_beta_factor": "layernorm_full_attention_beta",
    "linear_attn_alpha_factor": "layernorm_linear_attention_alpha",
    "linear_attn_beta_factor": "layernorm_linear_attention_beta",
    "mlp_alpha_factor": "layernorm_mlp_alpha",
    "mlp_beta_factor": "layernorm_mlp_beta",
}


def _layer_types(raw: dict, n: int) -> list[str]:
    types = pick(raw, "layer_types", default=None, kind=list)
    if types is None:
        codes = pick(raw, "attn_type_list", default=None, kind=list)
        if codes is not None:
            if len(codes) != n or any(c not in (0, 1) or isinstance(c, bool) for c in codes):
                raise ConfigError(f"config.json: attn_type_list must list {n} entries (num_hidden_layers), each 0 "
                                  f"(lightning) or 1 (softmax); found {codes!r}")
            return ["full_attention" if c == 1 else "linear_attention" for c in codes]
        return ["full_attention" if i % 2 == 0 else "linear_attention" for i in range(n)]
    if len(types) != n or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(f"config.json: layer_types must list {n} entries (num_hidden_layers), each one of "
                          f"{', '.join(LAYER_TYPES)}; found {types!r}")
    return list(types)


def normalize_config(raw: dict) -> dict:
    drop = ("auto_map", "rope_scaling", "attn_type_list", "num_experts", *FACTORS.values())
    cfg = {k: v for k, v in raw.items() if k not in drop}
    cfg["model_type"] = "minimax"
    cfg["architectures"] = ["MiniMaxForCausalLM"]
    for name in ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads"):
        cfg[name] = positive_int(raw, name)
    n, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    cfg["intermediate_size"] = positive_int(raw, "intermediate_size", default=14336)
    cfg["num_key_value_heads"] = positive_int(raw, "num_key_value_heads", default=8)
    if heads % cfg["num_key_value_heads"]:
        raise ConfigError(f"config.json: num_attention_heads ({heads}) is not a multiple of num_key_value_heads "
                          f"({cfg['num_key_value_heads']})")
    if raw.get("head_dim") is None and cfg["hidden_size"] % heads:
        raise ConfigError(f"config.json: no head_dim and hidden_size ({cfg['hidden_size']}) is not a multiple of "
                          f"num_attention_heads ({heads})")
    cfg["head_dim"] = positive_int(raw, "head_dim", default=cfg["hidden_size"] // heads)
    if cfg["head_dim"] % 2:
        raise ConfigError(f"config.json: head_dim ({cfg['head_dim']}) must be even (rotary embedding)")
    cfg["num_local_experts"] = positive_int(raw, "num_local_experts", "num_experts", default=8)
    cfg["num_experts_per_tok"] = positive_int(raw, "num_experts_per_tok", default=2)
    if cfg["num_experts_per_tok"] > cfg["num_local_experts"]:
        raise ConfigError(f"config.json: num_experts_per_tok ({cfg['num_experts_per_tok']}) exceeds "
                          f"num_local_experts ({cfg['num_local_experts']})")
    cfg["block_size"] = positive_int(raw, "block_size", default=256)
    window = pick(raw, "sliding_window", default=None, kind=int)
    cfg["sliding_window"] = None if window is None else positive_int(raw, "sliding_window")
    cfg["rms_norm_eps"] = pick(raw, "rms_norm_eps", default=1e-5, kind=float)
    cfg["tie_word_embeddings"] = pick(raw, "tie_word_embeddings", default=False, kind=bool)
    check_activation(raw)
    if pick(raw, "postnorm", default=True, kind=bool) is not True:
        raise ConfigError("config.json: postnorm is false (expected true): the original code's pre-norm residual "
                          "is not what transformers' MiniMax (the reference) computes")
    for name, alias in FACTORS.items():
        cfg[name] = pick(raw, name, alias, default=1.0, kind=float)

    pick(raw, "rope_parameters", default={}, kind=dict)
    rope_type = pick(raw, "rope_parameters.rope_type", "rope_parameters.type", "rope_scaling.rope_type",
                     "rope_scaling.type", default="default", kind=str)
    if rope_type != "default":
        raise ConfigError(f"config.json: rope type {rope_type!r} (rope_parameters.rope_type) is not supported; "
                          "expected 'default'")
    theta = cfg["rope_theta"] = pick(raw, "rope_theta", "rope_parameters.rope_theta", "rope_scaling.rope_theta",
                                     default=1e6, kind=float)
    rope = dict(pick(raw, "rope_parameters", default={}, kind=dict))
    rope.pop("type", None)
    rope.update(rope_type="default", rope_theta=theta)
    cfg["rope_parameters"] = rope
    cfg["layer_types"] = _layer_types(raw, n)
    return cfg


MOE = r"\.(?:block_sparse_moe|mlp)\."


def rules(cfg: dict) -> list[Rule]:
    E, inter = cfg["num_local_experts"], cfg["intermediate_size"]
    out = head_rules(cfg) + [
        Drop(r"\.self_attn\.(query_decay|key_decay|diagonal_decay)$",
             "lightning decays derived from slope_rate and block_size: recomputed from slope_rate",
             "lightning query_decay / key_decay / diagonal_decay buffers"),
        KeepFloat32(r"\.self_attn\.slope_rate$", "lightning decay exp(-slope): rounding compounds over every step",
                    "slope_rate"),
    ]
    for src, dst in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        out.append(StackExperts(rf"{MOE}experts\.(?P<expert>\d+)\.{src}\.weight$",
                                rf".block_sparse_moe.switch_mlp.{dst}.weight", E, f"experts' {src} ({dst})"))
    out += [
        *fused_expert_rules(inter, ".block_sparse_moe.switch_mlp"),
        Rename(r"\.mlp\.gate\.weight$", ".block_sparse_moe.gate.weight"),
    ]
    return out


PROTECTED = (
    Protected(r"\.self_attn\.slope_rate$", "lightning decay exp(-slope_rate) per head"),
    Protected(r"norm\.weight$", "norm weights scale whole activations"),
)
ROLES = (
    Role("embed", r"^model\.embed_tokens\.weight$", sensitive=True),
    Role("lm_head", r"^lm_head\.weight$", sensitive=True),
    Role("lightning.qkv_proj", r"\.self_attn\.qkv_proj\.weight$"),
    Role("lightning.output_gate", r"\.self_attn\.output_gate\.weight$"),
    Role("lightning.out_proj", r"\.self_attn\.out_proj\.weight$"),
    Role("attn.q_proj", r"\.self_attn\.q_proj\.weight$"),
    Role("attn.kv_proj", r"\.self_attn\.[kv]_proj\.weight$"),
    Role("attn.o_proj", r"\.self_attn\.o_proj\.weight$"),
    Role("moe.router", r"\.block_sparse_moe\.gate\.weight$", default="float",
         why="router logits: a top-k choice flips on small perturbations"),
    Role("moe.experts", r"\.block_sparse_moe\.switch_mlp\.(gate_proj|up_proj)\.weight$"),
    Role("moe.experts.down_proj", r"\.block_sparse_moe\.switch_mlp\.down_proj\.weight$", sensitive=True),
)

ARCH = register(
    Architecture(
        model_type="minimax",
        architectures=("MiniMaxForCausalLM",),
        title="MiniMax-Text-01 (lightning attention + softmax attention, MoE)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)
