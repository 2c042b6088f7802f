"""Qwen3.5 (dense) converter: the text model of ``qwen3_5_text`` checkpoints
and of the multimodal ``Qwen3_5ForConditionalGeneration`` wrappers.

Architecture and math: :mod:`hybridconv.models.qwen3_5`. Config layouts,
tensor rules and the quantization policy are Qwen3-Next's
(:mod:`hybridconv.converters.qwen3_next`), with:

* the multimodal wrapper (``model_type: qwen3_5``, a ``text_config``): the
  language model's config is the ``text_config`` (wrapper-level
  ``tie_word_embeddings`` inherited), its weights ``model.language_model.*``
  are renamed ``model.*``, and the vision tower ``model.visual.*`` is left
  out — every vision tensor is listed in the ledger as dropped;
* the written config has ``model_type: qwen3_5`` (mlx-lm's module for this
  architecture; it has none named ``qwen3_5_text``) and no ``text_config``,
  which mlx-lm reads as the text model. Wrappers (``model_type: qwen3_5``) and
  the written folders are found by their ``architectures``
  (``Qwen3_5ForConditionalGeneration``, ``Qwen3_5ForCausalLM``).
"""

from __future__ import annotations

from ..models import qwen3_5 as model_module
from .qwen3_next import PROTECTED, ROLES, _text_config, normalize_text, text_rules
from .registry import Architecture, register

WRAPPER = "_multimodal_wrapper"  # planning note: the source is a Qwen3_5ForConditionalGeneration


def register_text_model(model_type: str, mlx_type: str, causal_lm: str, wrapper: str, moe_layers: str,
                        title: str, model_module) -> Architecture:
    """Register a Qwen3.5 text model (dense or MoE): Qwen3-Next's config layouts,
    rules and policy, written as mlx-lm's ``mlx_type``, with its multimodal
    ``wrapper`` class accepted as a source (``moe_layers``: "none" or "all")."""

    def normalize_config(raw: dict) -> dict:
        cfg = normalize_text(raw, mlx_type, causal_lm, moe_layers)
        cfg[WRAPPER] = _text_config(raw)[1]
        return cfg

    def rules(cfg: dict):
        return text_rules(cfg, wrapper=cfg.get(WRAPPER, False))

    return register(
        Architecture(
            model_type=model_type,
            architectures=(causal_lm, wrapper),
            title=title,
            normalize_config=normalize_config,
            rules=rules,
            model_module=model_module,
            roles=ROLES,
            protected=PROTECTED,
            # the wrapper's model_type and the one written for mlx-lm
            model_types=(mlx_type,),
        )
    )


ARCH = register_text_model("qwen3_5_text", "qwen3_5", "Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration",
                           "none", "Qwen3.5 (gated DeltaNet + gated attention)", model_module)
