"""xLSTM converter: config normalisation, tensor rules, quantization policy.

Architecture and math: :mod:`hybridconv.models.xlstm` (the mLSTM recurrence in
:mod:`hybridconv.models.linear_attention`). mlx-lm has no xLSTM.

Config layouts
--------------
* transformers 5 (``save_pretrained``): ``hidden_size`` and ``embedding_dim``,
  ``num_hidden_layers`` and ``num_blocks`` (either may be null: transformers
  fills one from the other), ``weight_mode`` ``single`` or ``fused``.
* as published with NX-AI/xLSTM-7b (the ``xlstm`` package's
  ``xLSTMLargeConfig``): ``embedding_dim``, ``num_blocks``, Triton kernel names
  (``chunkwise--triton_xl_chunk``, ``native_sequence__triton``, ``triton``)
  and extra keys (``head_dim``, ``add_post_blocks_norm`` …) that do not change
  the function.

Every kernel choice computes the same recurrence (transformers' and the
package's chunkwise, sequence and step kernels reproduce one stabiliser; see
the model), so ``chunkwise_kernel``, ``sequence_kernel``, ``step_kernel``,
``mode``, ``autocast_kernel_dtype``, ``inference_state_dtype`` and
``max_inference_chunksize`` are carried but do not select anything here.
Refused: ``add_out_norm = false`` (transformers applies ``out_norm`` whatever
it says, the ``xlstm`` package skips it: the two references disagree) and a
``qk``/``v`` width not divisible by ``num_heads``. transformers never ties the
head of an xLSTM (``xLSTMForCausalLM`` declares no tied weights): the output
says ``tie_word_embeddings: false`` and needs ``lm_head.weight``.

Tensor rules, in order:

* ``rename`` ``backbone.blocks.N.`` → ``backbone.layers.N.`` (the layer naming
  every hybridconv model and its ledger use);
* ``split`` the fused layout (``weight_mode: fused``) into the single one:
  ``mlstm_layer.qkv_opreact`` ``[2·qk + 2·v, H]`` → ``q``, ``k``, ``v``,
  ``ogate_preact``; ``mlstm_layer.ifgate_preact`` ``[2·heads, H]`` (and its
  bias) → ``igate_preact``, ``fgate_preact``; ``ffn.proj_up_gate_z``
  ``[2·ffn, H]`` → ``proj_up_gate``, ``proj_up`` (the output says
  ``weight_mode: single``);
* ``keep-float32`` the gate biases ``igate_preact.bias`` and
  ``fgate_preact.bias`` (see the policy).

Quantization policy (``hybridconv quantize``)
---------------------------------------------
Never quantized (:data:`PROTECTED`): the input and forget gate biases, float32
(``log f = logsigmoid(·)`` compounds over every step; around the published
initialisation 3…6 bfloat16 resolves the forget bias to 0.016–0.03), and every
norm weight (output dtype). Kept in float by default (``default="float"``):
the gate projections ``igate_preact`` / ``fgate_preact`` (``[heads, H]``, 0.2 %
of a 7B block's weights: +0.02 bits per weight there). Quantized
(:data:`ROLES`): ``q``, ``k``, ``v``, ``ogate_preact``, ``out_proj``, the FFN
projections (``proj_down`` sensitive), the embeddings and head (sensitive).

Measured by ``scripts/precision_recurrences.py`` (mean KL against the float32
transformers reference, 24 oracle tokens / 2 × 512 random tokens):

==========================================  ===================  ===================
variant                                     xlstm-tiny           gates × 10
==========================================  ===================  ===================
bf16 output (this policy)                   6.2e-5 / 5.6e-5      2.4e-4 / 1.3e-3
bf16, gate biases rounded to bf16           1.6e-4 / 1.2e-4      2.7e-4 / 1.5e-3
float32, gate biases rounded to bf16 only   3.0e-5 / 2.0e-5      1.4e-5 / 4.7e-5
4-bit default (gate projections float)      0.0328 / 0.0329      0.132 / 0.134
4-bit with gate projections at 4 bits       0.0334 / 0.0329      0.134 / 0.154
==========================================  ===================  ===================

("gates × 10": the same checkpoint with its gate projections scaled by 10 —
the tiny model's are noise around transformers' zero initialisation, so its
gates barely depend on the input, unlike a trained model's.) Rounding the gate
biases alone costs as much as running the whole model in bfloat16 (2.5× the
bf16 KL); quantizing the gate projections costs up to 15 % more KL at 512
tokens where the gates depend on the input, for 0.24 bits per weight saved on
the tiny model and 0.02 at 7B shapes.
"""

from __future__ import annotations

import re

from ..config import pick, positive, positive_int
from ..errors import ConfigError
from ..models import xlstm as model_module
from .registry import Architecture, Protected, Role, register
from .rules import KeepFloat32, Rename, Rule, Split

WEIGHT_MODES = ("single", "fused")
GATE_BIASES = r"\.mlstm_layer\.(i|f|if)gate_preact\.bias$"


def _factor(raw: dict, key: str, default: float) -> float:
    value = pick(raw, key, default=default, kind=float)
    if not value > 0:
        raise ConfigError(f"config.json: '{key}' must be positive, found {value}")
    return value


def _cap(raw: dict, key: str, default: float):
    value = raw.get(key, default)
    if value is None:
        return None
    value = pick(raw, key, kind=float)
    if not value > 0:
        raise ConfigError(f"config.json: '{key}' must be positive or null, found {value}")
    return value


def normalize_config(raw: dict) -> dict:
    cfg = dict(raw)
    cfg["model_type"] = "xlstm"
    hidden = cfg["hidden_size"] = positive_int(raw, "hidden_size", "embedding_dim")
    if raw.get("embedding_dim") is not None and pick(raw, "embedding_dim", kind=int) != hidden:
        raise ConfigError(
            f"config.json: embedding_dim ({raw['embedding_dim']}) differs from hidden_size ({hidden}); "
            "transformers' xLSTM uses one width"
        )
    cfg["embedding_dim"] = hidden
    n = cfg["num_hidden_layers"] = positive_int(raw, "num_hidden_layers", "num_blocks")
    cfg["num_blocks"] = n
    cfg["vocab_size"] = positive_int(raw, "vocab_size")
    heads = cfg["num_heads"] = positive_int(raw, "num_heads", default=8)
    for key, default in (("qk_dim_factor", 0.5), ("v_dim_factor", 1.0)):
        cfg[key] = _factor(raw, key, default)
        width = int(hidden * cfg[key])
        if width <= 0 or width % heads:
            raise ConfigError(
                f"config.json: int(hidden_size * {key}) = {width} is not a positive multiple of num_heads ({heads})",
                "transformers' xLSTM cuts that width into num_heads equal heads",
            )
    cfg["ffn_proj_factor"] = _factor(raw, "ffn_proj_factor", 2.667)
    cfg["ffn_round_up_to_multiple_of"] = positive_int(raw, "ffn_round_up_to_multiple_of", default=64)
    cfg["chunk_size"] = positive_int(raw, "chunk_size", default=64)
    cfg["use_bias"] = pick(raw, "use_bias", default=False, kind=bool)
    cfg["norm_eps"] = pick(raw, "norm_eps", default=1e-6, kind=float)
    cfg["eps"] = pick(raw, "eps", default=1e-6, kind=float)
    cfg["gate_soft_cap"] = _cap(raw, "gate_soft_cap", 15.0)
    cfg["output_logit_soft_cap"] = _cap(raw, "output_logit_soft_cap", 30.0)
    mode = pick(raw, "weight_mode", default="single", kind=str)
    if mode not in WEIGHT_MODES:
        raise ConfigError(f"config.json: weight_mode {mode!r}; expected one of {', '.join(WEIGHT_MODES)}")
    cfg["weight_mode"] = "single"  # the fused tensors are split (see rules)
    if not pick(raw, "add_out_norm", default=True, kind=bool):
        raise ConfigError(
            "config.json: add_out_norm is false: transformers' xLSTM applies out_norm regardless, the xlstm "
            "package skips it, so the reference is ambiguous",
            "convert a checkpoint with add_out_norm true (every published xLSTM), or set it to what the weights expect",
        )
    cfg["tie_word_embeddings"] = False  # xLSTMForCausalLM never ties its head
    return cfg


def rules(cfg: dict) -> list[Rule]:
    qk, v = int(cfg["hidden_size"] * cfg["qk_dim_factor"]), int(cfg["hidden_size"] * cfg["v_dim_factor"])
    heads = cfg["num_heads"]
    ffn = model_module.round_up(cfg["hidden_size"] * cfg["ffn_proj_factor"], cfg["ffn_round_up_to_multiple_of"])
    fused = [
        ("mlstm_layer.qkv_opreact", [("mlstm_layer.q", qk), ("mlstm_layer.k", qk), ("mlstm_layer.v", v),
                                     ("mlstm_layer.ogate_preact", v)], "fused q/k/v/output-gate projection"),
        ("mlstm_layer.ifgate_preact", [("mlstm_layer.igate_preact", heads), ("mlstm_layer.fgate_preact", heads)],
         "fused input/forget gate projection"),
        ("ffn.proj_up_gate_z", [("ffn.proj_up_gate", ffn), ("ffn.proj_up", ffn)], "fused FFN gate/up projection"),
    ]
    out: list[Rule] = [Rename(r"^backbone\.blocks\.(\d+)\.", r"backbone.layers.\1.")]
    for src, parts, what in fused:
        for kind in ("weight", "bias"):
            out.append(Split(rf"\.{re.escape(src)}\.{kind}$", 0,
                             [(f".{dst}.{kind}", n) for dst, n in parts], f"{what} ({kind})"))
    out.append(KeepFloat32(GATE_BIASES, "gate biases: log f = logsigmoid(.) compounds over every step",
                           "igate_preact.bias, fgate_preact.bias"))
    return out


PROTECTED = (
    Protected(GATE_BIASES, "mLSTM gate biases: the forget gate's decay compounds over every step"),
    Protected(r"norm(_mlstm|_ffn)?\.(weight|bias)$", "norm weights scale whole activations"),
)
ROLES = (
    Role("embed", r"^backbone\.embeddings\.weight$", sensitive=True),
    Role("lm_head", r"^lm_head\.weight$", sensitive=True),
    Role("mlstm.q", r"\.mlstm_layer\.q\.weight$"),
    Role("mlstm.k", r"\.mlstm_layer\.k\.weight$"),
    Role("mlstm.v", r"\.mlstm_layer\.v\.weight$"),
    Role("mlstm.ogate", r"\.mlstm_layer\.ogate_preact\.weight$"),
    Role("mlstm.gates", r"\.mlstm_layer\.[if]gate_preact\.weight$", default="float",
         why="input/forget gate projections: one row per head, feeding the exponential gates"),
    Role("mlstm.out_proj", r"\.mlstm_layer\.out_proj\.weight$"),
    Role("ffn.proj_up_gate", r"\.ffn\.proj_up_gate\.weight$"),
    Role("ffn.proj_up", r"\.ffn\.proj_up\.weight$"),
    Role("ffn.proj_down", r"\.ffn\.proj_down\.weight$", sensitive=True),
)

ARCH = register(
    Architecture(
        model_type="xlstm",
        architectures=("xLSTMForCausalLM",),
        title="xLSTM (mLSTM blocks)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)
