"""Inkling-2 (text) converter: config normalisation, tensor rules, quantization policy.

Architecture and math: :mod:`hybridconv.models.inkling2`. Inkling-2-Mini's
looped variant reuses all of this: :mod:`hybridconv.converters.inkling2_loop`.

Config layouts
--------------
transformers 5's ``Inkling2TextConfig`` with its ``attribute_map``:
``sliding_window`` for ``sliding_window_size``, ``num_local_experts`` for
``n_routed_experts``, ``sconv_kernel_size`` for ``conv_kernel_size``,
``model_max_length`` for ``max_position_embeddings``, ``intermediate_size`` for
``moe_intermediate_size`` (Inkling-2 has no dense MLP), ``routed_scaling_factor``
for ``route_scale``; missing keys take its defaults (``layer_types``: full at
every 6th layer, sliding elsewhere; ``unpadded_vocab_size`` 200058, ...). Only
``scoring_func: sigmoid`` exists there. ``unpadded_vocab_size`` above
``vocab_size`` is refused.

Tensor names
------------
transformers' conversion mapping restores the *original* checkpoint names on
``save_pretrained``, so these are what checkpoints hold (``model.llm.*``,
``attn.wq_du``, ``attn_res.attn_queries.N``, interleaved ``w13_weight``
experts, ...). The rules rename them, in order, to the module paths the MLX
model uses (transformers' in-memory names where they exist):

* ``model.llm.unembed.weight`` -> ``lm_head.weight`` (kept padded to
  ``vocab_size``: the model cuts the logits), ``model.llm.`` -> ``model.``,
  ``embed`` -> ``embed_tokens``, ``embed_norm`` -> ``model.embed_norm`` (beside
  the embedding, so a quantized embedding keeps it);
* experts ``w13_weight [E, 2I, D]`` -> ``switch_mlp.gate_up_proj.weight`` (gate
  and up rows stay interleaved: the model splits even/odd columns of one matmul),
  ``w2_weight`` -> ``switch_mlp.down_proj.weight``, ``gate.bias`` ->
  ``gate.e_score_correction_bias``;
* attention: ``attn.`` -> ``self_attn.``, ``wq_du`` -> ``q_proj.linear``, ``wk_dv`` /
  ``wv_dv`` -> ``k_proj`` / ``v_proj.linear``, ``k_sconv`` / ``v_sconv`` ->
  ``k_proj`` / ``v_proj.sconv``, ``q_l2_clip`` -> ``q_proj.norm``, ``wr_du`` ->
  ``relative_position_bias.linear``, ``rel_logits_proj`` / ``rel_l2_clip`` ->
  ``relative_position_bias`` / ``.norm``, ``wo_ud`` -> ``o_proj.linear``,
  ``gate_attn`` -> ``o_proj.gate_proj``, ``attn_sink_proj`` -> ``sink_proj``;
* ``attn_sconv`` / ``mlp_sconv`` -> ``post_attention_convolution`` /
  ``post_mlp_convolution``; a static kernel ``weight`` -> ``conv1d.weight``,
  ``static_w`` -> ``static_weight``, ``weight_proj`` -> ``weight_proj.weight``;
  ``attn_norm`` / ``mlp_norm`` / ``{q,k,v}_input_norm`` -> ``input_layernorm`` /
  ``post_attention_layernorm`` / ``{q,k,v}_input_layernorm``;
* the attention-residual queries ``attn_res.attn_queries.N`` -> layer ``N + 1``'s
  ``attention_input.query`` (layer 0 has none), ``attn_res.mlp_queries.N`` ->
  layer ``N``'s ``mlp_input.query``, ``attn_res.output_query`` ->
  ``model.final_input.query``;

then ``conv1d-to-mlx`` the static kernels and ``keep-float32`` what transformers
keeps float32 in every dtype (``_keep_in_fp32_modules_strict``): the router
weight and bias, the static short-conv kernels, the attention-residual queries.
Renamed names never match a rule again, so converting an output changes nothing.
Experts stored in a quantized format (MXFP8 / NVFP4 ``*_scale`` tensors) are not
read: the ledger names them.

Quantization policy
-------------------
Never quantized (:data:`PROTECTED`): the float32 tensors above (the router is a
plain ``[E, D]`` float32 matrix in the reference), every norm weight, the
q / relative-state clip scales, the relative-position profile banks, the dynamic
convolutions' ``static_weight`` taps. Quantized at ``--bits``: the q/k/v/o
projections, the output gates ``o_proj.gate_proj``, the relative-state
projections, the sink projections ``sink_proj`` and the dynamic-tap projections
``sconv.weight_proj``, the experts (``down_proj`` sensitive), embeddings and head
(sensitive). These projections are new kinds; measured on inkling2-tiny
(default 4-bit against ``--keep`` of each role, verify on 2 × 64 random tokens
against the float32 reference; bits per weight of the tiny model): default mean
KL 0.00747 (p99 0.0272, 10.02 bpw); sinks in float 0.00746 (+0.13 bpw), tap
projections 0.00738 (+0.26), output gates 0.00728 (+2.1), relative states
0.00750 (+0.53) — within 3 % of the default each, so all are quantized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import pick, positive_int
from ..errors import ConfigError
from ..models import inkling2 as model_module
from . import inkling
from .registry import Architecture, Protected, Role, register
from .rules import ConvToMLX, KeepFloat32, Meta, Rename, Rule, Step


@dataclass
class RenameIndex(Rule):
    """``regex`` with one ``(\\d+)`` group -> ``template.format(index + offset)``
    (the attention-residual queries, numbered from layer 1 in the checkpoints)."""

    regex: str
    template: str
    offset: int
    name = "rename"

    def __post_init__(self):
        self.pattern = re.compile(self.regex)

    def plan(self, step: Step, meta: Meta) -> Meta:
        new = self.pattern.sub(lambda m: self.template.format(int(m.group(1)) + self.offset), meta.name)
        step.actions.append(f"rename -> {new}")
        step.applied.append(self.name)
        return Meta(new, meta.dtype, meta.shape)

    def describe(self) -> str:
        return f"rename /{self.regex}/ -> {self.template.format('N + ' + str(self.offset))}"


DEFAULTS = dict(num_attention_heads=48, num_key_value_heads=8, head_dim=128, swa_num_attention_heads=48,
                swa_num_key_value_heads=8, swa_head_dim=128, sliding_window_size=1024, log_scaling_n_floor=128000,
                max_position_embeddings=1048576)


def normalize_common(raw: dict, model_type: str, defaults: dict) -> dict:
    cfg = dict(raw)
    cfg["model_type"] = model_type
    cfg["hidden_size"] = positive_int(raw, "hidden_size", default=defaults["hidden_size"])
    n = cfg["num_hidden_layers"] = positive_int(raw, "num_hidden_layers", default=defaults["num_hidden_layers"])
    inkling.normalize_vocab(raw, cfg, 200058)
    inkling.normalize_attention(raw, cfg, defaults)
    if cfg["log_scaling_n_floor"] is None:
        raise ConfigError("config.json: log_scaling_n_floor must be set for Inkling-2 (its full layers always scale)")
    cfg["layer_types"] = inkling.layer_types(raw, n, lambda i: "hybrid" if (i + 1) % 6 == 0 else "hybrid_sliding",
                                             local_ids=False)
    cfg["moe_intermediate_size"] = positive_int(raw, "moe_intermediate_size", "intermediate_size",
                                                default=defaults["moe_intermediate_size"])
    cfg.pop("intermediate_size", None)
    E = cfg["n_routed_experts"] = positive_int(raw, "n_routed_experts", "num_local_experts",
                                               default=defaults["n_routed_experts"])
    cfg.pop("num_local_experts", None)
    k = cfg["num_experts_per_tok"] = positive_int(raw, "num_experts_per_tok", default=8)
    if k > E:
        raise ConfigError(f"config.json: num_experts_per_tok ({k}) exceeds n_routed_experts ({E})")
    cfg["route_scale"] = pick(raw, "route_scale", "routed_scaling_factor", default=8.0, kind=float)
    cfg.pop("routed_scaling_factor", None)
    score = pick(raw, "scoring_func", default="sigmoid", kind=str)
    if score != "sigmoid":
        raise ConfigError(f"config.json: scoring_func {score!r} is not supported (Inkling-2 routes by 'sigmoid')")
    for key, default in (("qk_l2_clip_threshold", 22.627416997969522), ("rel_l2_clip_threshold", 8.0),
                         ("mlp_gate_softcap", 4.0), ("mlp_up_softcap", 25.0), ("final_logit_softcapping", 30.0)):
        value = cfg[key] = pick(raw, key, default=default, kind=float)
        if value <= 0:
            raise ConfigError(f"config.json: {key} must be positive, found {value}")
    cfg["n_layers_per_attn_res_block"] = positive_int(raw, "n_layers_per_attn_res_block", default=6)
    cfg["tie_word_embeddings"] = False
    return cfg


def normalize_config(raw: dict) -> dict:
    return normalize_common(raw, "inkling2_text", {**DEFAULTS, "hidden_size": 4608, "num_hidden_layers": 48,
                                                   "moe_intermediate_size": 2304, "n_routed_experts": 384})


SA = r"\.self_attn\."
STATIC_CONV = r"\.(sconv|post_attention_convolution|post_mlp_convolution)\.conv1d\.weight$"
FLOAT32 = (r"(\.mlp\.gate\.(weight|e_score_correction_bias)|\.(attention_input|mlp_input)\.query"
           r"|^model\.final_input\.query)$|" + STATIC_CONV)


def rules(cfg: dict) -> list[Rule]:
    R = Rename
    return [
        R(r"^model\.llm\.unembed\.weight$", "lm_head.weight"),
        R(r"^model\.llm\.", "model."),
        R(r"^model\.embed\.weight$", "model.embed_tokens.weight"),
        R(r"^model\.embed_tokens\.embed_norm\.weight$", "model.embed_norm.weight"),
        R(r"\.mlp\.experts\.w13_weight$", ".mlp.switch_mlp.gate_up_proj.weight"),
        R(r"\.mlp\.experts\.w2_weight$", ".mlp.switch_mlp.down_proj.weight"),
        R(r"\.mlp\.gate\.bias$", ".mlp.gate.e_score_correction_bias"),
        R(r"\.attn\.", ".self_attn."),
        R(SA + r"wq_du\.", ".self_attn.q_proj.linear."),
        R(SA + r"wk_dv\.", ".self_attn.k_proj.linear."),
        R(SA + r"wv_dv\.", ".self_attn.v_proj.linear."),
        R(SA + r"k_sconv\.", ".self_attn.k_proj.sconv."),
        R(SA + r"v_sconv\.", ".self_attn.v_proj.sconv."),
        R(SA + r"rel_logits_proj\.", ".self_attn.relative_position_bias."),
        R(SA + r"wr_du\.", ".self_attn.relative_position_bias.linear."),
        R(SA + r"q_l2_clip\.", ".self_attn.q_proj.norm."),
        R(SA + r"rel_l2_clip\.", ".self_attn.relative_position_bias.norm."),
        R(SA + r"wo_ud\.", ".self_attn.o_proj.linear."),
        R(SA + r"gate_attn\.", ".self_attn.o_proj.gate_proj."),
        R(SA + r"attn_sink_proj\.", ".self_attn.sink_proj."),
        R(r"\.attn_sconv\.", ".post_attention_convolution."),
        R(r"\.mlp_sconv\.", ".post_mlp_convolution."),
        R(r"\.(sconv|post_attention_convolution|post_mlp_convolution)\.weight$", r".\1.conv1d.weight"),
        R(r"\.sconv\.static_w$", ".sconv.static_weight"),
        R(r"\.sconv\.weight_proj$", ".sconv.weight_proj.weight"),
        R(r"\.attn_norm\.", ".input_layernorm."),
        R(r"\.mlp_norm\.", ".post_attention_layernorm."),
        R(r"\.(q|k|v)_input_norm\.", r".\1_input_layernorm."),
        RenameIndex(r"^model\.attn_res\.attn_queries\.(\d+)$", "model.layers.{}.attention_input.query", 1),
        RenameIndex(r"^model\.attn_res\.mlp_queries\.(\d+)$", "model.layers.{}.mlp_input.query", 0),
        R(r"^model\.attn_res\.output_query$", "model.final_input.query"),
        ConvToMLX(STATIC_CONV, cfg["conv_kernel_size"], "static short-conv kernels"),
        KeepFloat32(FLOAT32, "kept float32 by transformers in every dtype",
                    "router weight and bias, static short-conv kernels, attention-residual queries"),
    ]


PROTECTED = (
    Protected(FLOAT32, "router, static conv kernels, attention-residual queries (float32 in the reference)",
              float32=True),
    Protected(r"\.norm\.scale$", "per-head scale before the L2 clip"),
    Protected(r"\.relative_position_bias\.proj$", "relative-position profile bank: bias per distance"),
    Protected(r"\.sconv\.static_weight$", "static taps of the dynamic convolution"),
    Protected(r"norm\.weight$", "norm weights scale whole activations"),
)
ROLES = (
    Role("embed", r"^model\.embed_tokens\.weight$", sensitive=True),
    Role("lm_head", r"^lm_head\.weight$", sensitive=True),
    Role("attn.qkv", SA + r"[qkv]_proj\.linear\.weight$"),
    Role("attn.o_proj", SA + r"o_proj\.linear\.weight$"),
    Role("attn.output_gate", SA + r"o_proj\.gate_proj\.weight$"),
    Role("attn.relative_states", SA + r"relative_position_bias\.linear\.weight$"),
    Role("attn.sink_proj", SA + r"sink_proj\.weight$"),
    Role("attn.conv_taps", r"\.sconv\.weight_proj\.weight$"),
    Role("moe.experts.gate_up", r"\.mlp\.switch_mlp\.gate_up_proj\.weight$"),
    Role("moe.experts.down_proj", r"\.mlp\.switch_mlp\.down_proj\.weight$", sensitive=True),
)

ARCH = register(
    Architecture(
        model_type="inkling2_text",
        architectures=("Inkling2ForCausalLM",),
        title="Inkling-2 (convolutional attention with sinks, attention residuals, soft-capped MoE)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)
