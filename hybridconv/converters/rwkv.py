"""RWKV-4 converter: config normalisation, tensor rules, quantization policy.

Architecture and math: :mod:`hybridconv.models.rwkv` (WKV computed by
:mod:`hybridconv.models.linear_attention`). mlx-lm has no RWKV-4 (its
``rwkv7`` module is RWKV-7, another recurrence with other weights).

Config layouts
--------------
The published RWKV/rwkv-4-*-pile and Raven configs (transformers 4) and
transformers 5 write the same keys: ``hidden_size``, ``num_hidden_layers``,
``attention_hidden_size`` and ``intermediate_size`` (null: ``hidden_size`` and
``4 · hidden_size``, as transformers fills them), ``layer_norm_epsilon``,
``rescale_every`` (default 6; ``≤ 0``: none), ``context_length`` (only a limit
of transformers' CUDA kernel; not one here), ``tie_word_embeddings`` (default
false). The output states the resolved sizes.

Tensor rules, in order:

* ``rename`` ``rwkv.blocks.N.`` → ``rwkv.layers.N.`` (the layer naming every
  hybridconv model and its ledger use) and the head ``head.weight`` →
  ``lm_head.weight`` (or ``drop`` it when tied to ``rwkv.embeddings.weight``);
* ``keep-float32`` ``time_decay`` and ``time_first`` (see the policy);
* everything else cast to ``--dtype``. ``rescale_every`` is *not* folded into
  the weights: the model divides the two mixers' outputs by the same powers of
  two at run time (exactly the floats of dividing the weights), so the output
  holds the checkpoint's weights and converting it again changes nothing.

Quantization policy (``hybridconv quantize``)
---------------------------------------------
Never quantized (:data:`PROTECTED`): ``time_decay`` and ``time_first``,
float32 (as transformers keeps them, ``_keep_in_fp32_modules``); the
``time_mix_*`` interpolation weights and every LayerNorm, in the output dtype.
Quantized (:data:`ROLES`): the time-mix ``key`` / ``value`` / ``receptance`` /
``output`` and channel-mix ``key`` / ``receptance`` / ``value`` projections,
the embeddings and the head (sensitive, with the channel-mix ``value``, the
block's down projection).

Measured by ``scripts/precision_recurrences.py`` on rwkv-tiny (mean KL / max
|Δlogit| against the float32 transformers reference; 24 oracle tokens, 2 × 512
random tokens):

=========================================  =================  =================
variant                                    24 tokens          512 tokens
=========================================  =================  =================
bf16 output (this policy)                  2.3e-5 / 0.028     2.2e-5 / 0.037
float32, ``time_decay`` rounded to bf16    9.0e-9 / 9.1e-4    3.8e-8 / 1.9e-3
float32, ``time_first`` rounded to bf16    1.7e-8 / 9.6e-4    1.5e-8 / 1.2e-3
bf16, ``time_mix_*`` stored float32        2.3e-5 / 0.028     2.2e-5 / 0.037
4-bit default                              6.6e-3 / 0.52      6.8e-3 / 0.71
4-bit, channel-mix ``value`` at 8 bits     5.6e-3 / 0.50      5.9e-3 / 0.60
=========================================  =================  =================

The rounding of ``time_decay`` alone grows with the context (4× from 24 to 512
tokens: ``e^{−(t−s)·exp(time_decay)}`` compounds it) while ``time_first``'s
does not; both are far below bfloat16 activations here and cost nothing to
keep (two vectors per layer), so they stay float32 as in the reference.
``time_mix_*`` in float32 changes nothing: output dtype. The channel-mix
``value`` is the most sensitive matrix (8 bits: −14 % KL), hence sensitive.
"""

from __future__ import annotations

from ..config import pick, positive_int
from ..models import rwkv as model_module
from .registry import Architecture, Protected, Role, register
from .rules import Drop, KeepFloat32, Rename, Rule

WKV_FLOAT32 = r"\.attention\.time_(decay|first)$"


def normalize_config(raw: dict) -> dict:
    cfg = dict(raw)
    cfg["model_type"] = "rwkv"
    hidden = cfg["hidden_size"] = positive_int(raw, "hidden_size")
    cfg["num_hidden_layers"] = positive_int(raw, "num_hidden_layers")
    cfg["vocab_size"] = positive_int(raw, "vocab_size")
    cfg["attention_hidden_size"] = positive_int(raw, "attention_hidden_size", default=hidden)
    cfg["intermediate_size"] = positive_int(raw, "intermediate_size", default=4 * hidden)
    cfg["layer_norm_epsilon"] = pick(raw, "layer_norm_epsilon", default=1e-5, kind=float)
    cfg["rescale_every"] = pick(raw, "rescale_every", default=6, kind=int)
    cfg["tie_word_embeddings"] = pick(raw, "tie_word_embeddings", default=False, kind=bool)
    return cfg


def rules(cfg: dict) -> list[Rule]:
    out: list[Rule] = [Rename(r"^rwkv\.blocks\.(\d+)\.", r"rwkv.layers.\1.")]
    if cfg["tie_word_embeddings"]:
        out.append(Drop(r"^(lm_)?head\.weight$", "tied: the head is rwkv.embeddings.weight", "head.weight"))
    else:
        out.append(Rename(r"^head\.weight$", "lm_head.weight"))
    out.append(KeepFloat32(WKV_FLOAT32, "WKV decay and bonus: exponents, compounding over the context",
                           "time_decay, time_first"))
    return out


PROTECTED = (
    Protected(WKV_FLOAT32, "WKV dynamics: decay exp(time_decay) per step, bonus time_first"),
    Protected(r"\.time_mix_(key|value|receptance)$", "token-shift interpolation weights, one per channel"),
    Protected(r"(ln\d|ln_out|pre_ln)\.(weight|bias)$", "norm weights scale whole activations"),
)
ROLES = (
    Role("embed", r"^rwkv\.embeddings\.weight$", sensitive=True),
    Role("lm_head", r"^lm_head\.weight$", sensitive=True),
    Role("time_mix.key", r"\.attention\.key\.weight$"),
    Role("time_mix.value", r"\.attention\.value\.weight$"),
    Role("time_mix.receptance", r"\.attention\.receptance\.weight$"),
    Role("time_mix.output", r"\.attention\.output\.weight$"),
    Role("channel_mix.key", r"\.feed_forward\.key\.weight$"),
    Role("channel_mix.receptance", r"\.feed_forward\.receptance\.weight$"),
    Role("channel_mix.value", r"\.feed_forward\.value\.weight$", sensitive=True),
)

ARCH = register(
    Architecture(
        model_type="rwkv",
        architectures=("RwkvForCausalLM",),
        title="RWKV-4 (WKV time mixing)",
        normalize_config=normalize_config,
        rules=rules,
        model_module=model_module,
        roles=ROLES,
        protected=PROTECTED,
    )
)
