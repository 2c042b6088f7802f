"""Where a checkpoint keeps its language model, decided from the tensor names.

Published checkpoints store the same language model under several prefixes,
whatever their config.json says:

* bare, as the text model itself: ``model.layers.0…`` (``backbone.…`` for
  Mamba-style trunks), ``lm_head.weight``;
* under a wrapper's base model, as transformers ≥ 4.52 saves multimodal
  models (Qwen3.5, LFM2-VL, MiniCPM-V): ``model.language_model.layers.0…``,
  the head at the top (``lm_head.weight``), the vision tower beside it
  (``model.visual.…``, ``model.vision_tower.…``);
* the whole causal LM under a prefix, as older transformers and remote code
  save wrappers (Nemotron-H omni, LLaVA-style): ``language_model.backbone.…``,
  ``language_model.lm_head.weight``.

A config can be flattened (``model_type: qwen3_5_moe_text``, no
``text_config``) while its tensors keep the wrapper's prefix — transformers 5.2
saved Qwen3.5 derivatives so — or nested while its tensors are bare. So
hybridconv never decides the layout from the config: :func:`layout_rules`
finds the language model's embedding among the tensor names (the text model's
``<trunk>.<embedding>.weight``, with or without a prefix, and its layers beside
it), renames that prefix away, and drops the wrapper's other components
(vision tower, projector, audio encoder: :data:`KNOWN_PARTS` plus the
wrapper's own ``parts``), each with its reason in the ledger. A tensor outside
the language model that is no known component fails the plan naming it: it is
never dropped silently.
"""

from __future__ import annotations

import re

from ..errors import LedgerError
from .rules import Drop, Rename, Rule

# Non-language components of multimodal wrappers, by module name (the first
# name component, or the second after the base model's ``model.``).
KNOWN_PARTS = {
    "visual": "vision tower",
    "vision_tower": "vision tower",
    "vision_model": "vision tower",
    "vision_encoder": "vision tower",
    "vpm": "vision tower",
    "vit": "vision tower",
    "multi_modal_projector": "multimodal projector",
    "mm_projector": "multimodal projector",
    "vision_projector": "vision projector",
    "mlp1": "vision projector",
    "merger": "vision merger",
    "resampler": "vision resampler",
    "audio_tower": "audio encoder",
    "audio_model": "audio encoder",
    "sound_encoder": "audio encoder",
    "sound_projection": "audio projector",
    "embed_audio": "audio projector",
    "embed_vision": "vision projector",
    "vision_final_layernorm": "vision tower's final norm",
}
# Language-model tensors a checkpoint may keep at the top level beside a prefixed
# trunk: the head and the multi-token-prediction module (the architecture's own
# rules decide what becomes of them).
TOP_LEVEL_TEXT = ("lm_head", "mtp")


def text_roots(arch) -> tuple[str, str]:
    """(trunk, embedding) names of the architecture's model: ``("model",
    "embed_tokens")`` or ``("backbone", "embeddings")``."""
    model = arch.model_module.Model
    return model.trunk_name, model.embedding_name


def find_prefix(names, trunk: str, embedding: str) -> tuple[str, bool] | None:
    """``(prefix, keeps_trunk)`` of the language model among ``names``, or None
    when its tensors are bare. ``keeps_trunk``: the prefix is followed by the
    trunk name (``language_model.backbone.…``), else it replaces it
    (``model.language_model.layers.…``). Candidates are prefixes under which
    both the embedding and layers are found; more than one fails naming them."""
    emb = f"{trunk}.{embedding}.weight"
    names = list(names)
    if emb in names:
        return None
    candidates = set()
    for n in names:
        if n.endswith("." + emb):
            p = n[: -len(emb)]
            if any(m.startswith(f"{p}{trunk}.layers.") for m in names):
                candidates.add((p, True))
        elif n.endswith(f".{embedding}.weight"):
            p = n[: -len(f"{embedding}.weight")]
            if any(m.startswith(f"{p}layers.") for m in names):
                candidates.add((p, False))
    if len(candidates) > 1:
        shown = ", ".join(sorted(f"'{p}'" for p, _ in candidates))
        raise LedgerError(
            f"the checkpoint holds more than one language model ({shown} each hold an embedding and layers)",
            "hybridconv converts one language model; remove the others or convert them separately",
        )
    return next(iter(candidates), None)


def _part_of(name: str, trunk_shared: bool) -> str | None:
    """The wrapper component a tensor belongs to (``model.visual``,
    ``vision_model``), or None for a name outside any component."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] in KNOWN_PARTS:
        return f"model.{parts[1]}"
    if parts[0] in KNOWN_PARTS:
        return parts[0]
    if trunk_shared and len(parts) > 2 and parts[0] == "model":
        return f"model.{parts[1]}"
    return None


def layout_rules(names, arch) -> list[Rule]:
    """The rules that bring a checkpoint's language model to the bare names the
    architecture's rules expect, decided from ``names`` (module docstring):
    a ``rename`` of the prefix and a ``drop`` per wrapper component. Empty for
    a bare checkpoint without wrapper components."""
    trunk, embedding = text_roots(arch)
    names = list(names)
    found = find_prefix(names, trunk, embedding)
    known = dict(KNOWN_PARTS)
    wrapper = getattr(arch, "wrapper", None)
    if wrapper is not None:
        known.update(dict(wrapper.parts))
    owner = f" of {wrapper.title}" if wrapper is not None else " of a multimodal wrapper"
    rules: list[Rule] = []
    if found is None:
        prefix, keeps = "", True
    else:
        prefix, keeps = found
        pat = "^" + re.escape(prefix)
        if keeps:
            rules.append(Rename(pat, ""))
        else:
            # The prefix stands for the trunk; a head under it is the text model's head.
            rules.append(Rename(pat + r"(?=lm_head\.)", ""))
            rules.append(Rename(pat + r"(?!lm_head\.)", f"{trunk}."))
    # The trunk's own name is shared with the wrapper's components when the
    # prefix replaces it (model.language_model.* beside model.visual.*).
    trunk_shared = bool(prefix) and prefix.startswith(f"{trunk}.")
    parts: dict[str, str] = {}
    unknown: list[str] = []
    for n in names:
        if prefix and n.startswith(prefix):
            continue
        first = n.split(".")[0]
        if first in TOP_LEVEL_TEXT:
            continue
        part = _part_of(n, trunk_shared)
        leaf = part.rsplit(".", 1)[-1] if part else None
        if leaf in known:
            parts[part] = known[leaf]
        elif prefix and (first != trunk or trunk_shared):
            unknown.append(n)
    if unknown:
        shown = ", ".join(f"'{n}'" for n in unknown[:6]) + (" ..." if len(unknown) > 6 else "")
        raise LedgerError(
            f"{len(unknown)} tensor(s) lie outside the language model (its tensors are under '{prefix}') "
            f"and belong to no known component{owner}: {shown}",
            "hybridconv converts the language model only; a component it does not know is not dropped silently — "
            "report the checkpoint",
        )
    for part, what in sorted(parts.items()):
        rules.append(Drop("^" + re.escape(part + "."), f"{what}{owner}: only the language model is converted",
                          f"{part}.* ({what})"))
    return rules
