"""Bamba converter: config normalisation and tensor rules.

Architecture and math: :mod:`hybridconv.models.bamba`. mlx-lm has no Bamba;
parameter names are the Hugging Face ones.

Config normalisation (the published Bamba configs and transformers 5's):

* the schedule from ``attn_layer_indices`` (published and transformers 5), or
  from a ``layers_block_type`` / ``layer_types`` list (``attention`` /
  ``mamba`` or transformers 5's ``full_attention`` / ``linear_attention``);
  written as ``attn_layer_indices``, validated (integers ``0..L-1``).
* ``rope_theta`` at the top level (published) or in ``rope_parameters``
  (transformers 5); only the ``default`` rope type. Rotary embeddings cover
  half of each head (transformers hard-codes ``partial_rotary_factor = 0.5``
  for Bamba); a config stating another factor, or an ``attn_rotary_emb`` other
  than ``head_dim / 2`` (the published key), is refused rather than silently
  computed differently from the reference.
* Mamba-2 sizes as transformers reads them: ``mamba_d_head = "auto"`` means
  ``mamba_expand · hidden_size / mamba_n_heads``, and ``mamba_n_heads ·
  mamba_d_head`` must equal ``mamba_expand · hidden_size``; ``mamba_n_heads``
  a multiple of ``mamba_n_groups``.
* ``time_step_limit`` (the clamp on Δ): transformers defaults to ``(0, inf)``
  and writes infinity as ``{"__float__": "Infinity"}``; both that and a plain
  number are read, and the output states it as ``[low, null]`` (``null``: no
  upper limit; JSON has no infinity). mlx-lm's models default to
  ``(1e-3, 100)`` when the key is absent, so it is always written.

Tensor rules: ``drop`` rotary ``inv_freq`` buffers and a tied
``lm_head.weight``; ``conv1d-to-mlx`` for ``mamba.conv1d.weight``
(``K = mamba_d_conv``); ``keep-float32`` ``A_log``, ``D`` and ``dt_bias`` (the
decay ``exp(Δ·A)`` compounds a bf16 rounding of ``A_log`` over every step);
everything else cast to ``--dtype``, names unchanged.

Quantization policy (``hybridconv quantize``)
---------------------------------------------
Never quantized (:data:`PROTECTED`): ``A_log``, ``D``, ``dt_bias`` (float32, kept
so by the conversion), the conv1d kernels and biases (a handful of taps per
channel) and every norm weight, the gated RMSNorm of the mixer included (these in
the output dtype, as mlx-lm stores them: README, "Quantization"). Quantized (:data:`ROLES`):
embeddings and head, the mixer's ``in_proj`` and ``out_proj``, the attention
projections and the MLP. Sensitive (the wider width in mixed recipes): the
embeddings and head, ``in_proj`` (it produces ``z``, ``x``, ``B``, ``C`` and
``Δ``, every input of the recurrence) and the MLP ``down_proj``.
"""

from __future__ import annotations

from ..config import pick, positive_int
from ..errors import ConfigError
from ..models import bamba as model_module
from ._common import (
    ATTENTION_ROLES,
    FEED_FORWARD_ROLES,
    MAMBA2_PROTECTED,
    MAMBA2_ROLES,
    check_activation,
    layer_indices,
    mamba2_rules,
    normalize_attention,
    normalize_mamba2,
    parse_layer_kinds,
    rope_theta,
)
from .registry import Architecture, register


def normalize_config(raw: dict) -> dict:
    cfg = dict(raw)
    cfg["model_type"] = "bamba"

    cfg["hidden_size"] = positive_int(raw, "hidden_size")
    n = cfg["num_hidden_layers"] = positive_int(raw, "num_hidden_layers")
    cfg["vocab_size"] = positive_int(raw, "vocab_size")
    cfg["intermediate_size"] = positive_int(raw, "intermediate_size")
    normalize_attention(raw, cfg, kv_default=8)
    check_activation(raw)
    normalize_mamba2(raw, cfg)
    if raw.get("attn_layer_indices") is not None:
        cfg["attn_layer_indices"] = layer_indices(raw["attn_layer_indices"], n, "attn_layer_indices")
    else:
        key = next((k for k in ("layers_block_type", "layer_types") if raw.get(k) is not None), None)
        kinds = parse_layer_kinds(raw[key], n, key) if key else ["mamba"] * n
        cfg["attn_layer_indices"] = [i for i, k in enumerate(kinds) if k == "attention"]
    for key in ("layers_block_type", "layer_types"):
        cfg.pop(key, None)  # the index list is the one statement of the schedule
    cfg["rope_theta"] = rope_theta(raw)
    factor = pick(raw, "partial_rotary_factor", "rope_parameters.partial_rotary_factor", default=0.5, kind=float)
    rotary = pick(raw, "attn_rotary_emb", default=None, kind=int)
    half = int(cfg["head_dim"] * 0.5)
    if factor != 0.5 or (rotary is not None and rotary != half):
        found = f"partial_rotary_factor {factor}" if factor != 0.5 else f"attn_rotary_emb {rotary}"
        raise ConfigError(
            f"config.json: Bamba rotates half of each head ({half} of {cfg['head_dim']} channels; "
            f"transformers hard-codes partial_rotary_factor 0.5), found {found}"
        )
    cfg["partial_rotary_factor"] = 0.5
    cfg["rms_norm_eps"] = pick(raw, "rms_norm_eps", default=1e-5, kind=float)
    cfg["tie_word_embeddings"] = pick(raw, "tie_word_embeddings", default=False, kind=bool)
    cfg["attention_bias"] = pick(raw, "attention_bias", default=False, kind=bool)
    cfg["mlp_bias"] = pick(raw, "mlp_bias", default=False, kind=bool)
    return cfg


ROLES = MAMBA2_ROLES + ATTENTION_ROLES + FEED_FORWARD_ROLES

ARCH = register(
    Architecture(
        model_type="bamba",
        architectures=("BambaForCausalLM",),
        title="Bamba (Mamba-2 + attention)",
        normalize_config=normalize_config,
        rules=mamba2_rules,
        model_module=model_module,
        roles=ROLES,
        protected=MAMBA2_PROTECTED,
    )
)
