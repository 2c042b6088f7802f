"""Qwen3.5 (dense) converter: the text model of ``qwen3_5_text`` checkpoints
and of the multimodal releases built on it — Qwen's own
``Qwen3_5ForConditionalGeneration`` and OpenBMB's MiniCPM-V 4.6 / 4.7 and
MiniCPM-OCR.

Architecture and math: :mod:`hybridconv.models.qwen3_5`. Config layouts,
tensor rules and the quantization policy are Qwen3-Next's
(:mod:`hybridconv.converters.qwen3_next`), with:

* the multimodal wrappers (registered here, :class:`~.registry.Wrapper`): the
  language model's config is the ``text_config``; where its tensors lie
  (``model.language_model.*``, bare, or flattened configs with prefixed names)
  is decided from the tensor names, and the vision tower and merger are left
  out, every one of their tensors listed in the ledger as dropped
  (:mod:`hybridconv.converters._wrappers`). Whether the head is tied follows
  the class transformers runs: Qwen3.5's wrapper is read through
  ``AutoModelForCausalLM`` (``Qwen3_5ForCausalLM`` on the ``text_config``:
  the text config's flag), MiniCPM's through their
  ``…ForConditionalGeneration`` (the wrapper's flag: MiniCPM-OCR ties its head
  by its own ``tie_word_embeddings: true`` while its ``text_config`` says
  false);
* the written config has ``model_type: qwen3_5`` (mlx-lm's module for this
  architecture; it has none named ``qwen3_5_text``) and no ``text_config``,
  which mlx-lm reads as the text model. The written folders are found by
  ``model_type: qwen3_5`` (read as a flattened wrapper config).
"""

from __future__ import annotations

from ..models import qwen3_5 as model_module
from .qwen3_next import PROTECTED, ROLES, normalize_text, text_rules
from .registry import Architecture, Wrapper, register, register_wrapper


def register_text_model(model_type: str, mlx_type: str, causal_lm: str, moe_layers: str,
                        title: str, model_module) -> Architecture:
    """Register a Qwen3.5 text model (dense or MoE): Qwen3-Next's config layouts,
    rules and policy, written as mlx-lm's ``mlx_type`` (``moe_layers``: "none"
    or "all")."""

    def normalize_config(raw: dict) -> dict:
        return normalize_text(raw, mlx_type, causal_lm, moe_layers)

    return register(
        Architecture(
            model_type=model_type,
            architectures=(causal_lm,),
            title=title,
            normalize_config=normalize_config,
            rules=text_rules,
            model_module=model_module,
            roles=ROLES,
            protected=PROTECTED,
            # the wrapper's model_type and the one written for mlx-lm
            model_types=(mlx_type,),
        )
    )


ARCH = register_text_model("qwen3_5_text", "qwen3_5", "Qwen3_5ForCausalLM", "none",
                           "Qwen3.5 (gated DeltaNet + gated attention)", model_module)

register_wrapper(Wrapper("qwen3_5", ("Qwen3_5ForConditionalGeneration",), "qwen3_5_text",
                         "Qwen3.5 (multimodal)", tie="text"))
for _type, _cls, _title, _tie in (
    ("minicpmv4_6", "MiniCPMV4_6ForConditionalGeneration", "MiniCPM-V 4.6", False),
    ("minicpmv4_7", "MiniCPMV4_7ForConditionalGeneration", "MiniCPM-V 4.7", False),
    ("minicpm_ocr", "MiniCPMOcrForConditionalGeneration", "MiniCPM-OCR", True),
):
    register_wrapper(Wrapper(_type, (_cls,), "qwen3_5_text", _title, tie="wrapper", tie_default=_tie))
