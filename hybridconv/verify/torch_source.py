"""How the transformers reference opens a source that is not a plain float causal LM.

Three small pieces, kept apart from :mod:`hybridconv.verify.reference` so that
any way of running the reference (the whole model, or block by block) uses
them the same way:

* :func:`auto_class`: ``AutoModelForCausalLM`` — unless transformers maps the
  config to no causal-LM class but to an image-text-to-text one: a multimodal
  wrapper (LFM2-VL, Nemotron-H omni, MiniCPM-V). The wrapper then runs on the
  input ids alone (its language model, with the wrapper's own embedding and
  head), exactly what its oracle computes.
* :func:`decoder_layers`: the language model's blocks (a wrapper's vision
  tower may hold a ModuleList of the same length).
* :func:`reference_loader`: for an FP8 block-scaled source, the extra
  ``from_pretrained`` arguments that make the reference run *the same
  dequantized weights* hybridconv converts: the config without its
  ``quantization_config`` (no FP8 layers) and a state dict whose FP8 weights
  read as float32, dequantized block by block by
  :func:`hybridconv.safetensors_io.read_float32` when transformers
  materialises them (one tensor at a time), scales left out. transformers' own
  FP8 path on a CPU also dequantizes, but derives the block from the scale
  grid (``rows // scale_rows``), which differs from the format's fixed blocks
  where a dimension is not a multiple of the block; the reference must not
  compute another function than the one converted. What verify then proves:
  agreement with the FP8 release, not with a bf16 original it was made from.

A block-by-block reference reads its weights through
:func:`hybridconv.checkpoint.model_tensors` /
:func:`hybridconv.checkpoint.read_model_tensor`, the same seam.
"""

from __future__ import annotations

from pathlib import Path


def auto_class(config):
    """The transformers Auto class that builds the reference for ``config`` (a
    ``PreTrainedConfig``)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return AutoModelForCausalLM
    if type(config) in AutoModelForCausalLM._model_mapping:
        return AutoModelForCausalLM
    if type(config) in AutoModelForImageTextToText._model_mapping:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM  # fails with transformers' own message


def _concrete(auto, config):
    """(model class, config) as the Auto class would pick them (a wrapper's
    text-config swap included), for loading without a folder."""
    from transformers.models.auto.auto_factory import _get_model_class

    cls = _get_model_class(config, auto._model_mapping)
    text_cls = getattr(config, "sub_configs", {}).get("text_config")
    if text_cls is not None and getattr(cls, "config_class", None) == text_cls:
        config = config.get_text_config()
    return cls, config


def reference_loader(folder: Path, raw: dict, trust_remote_code: bool = False, config=None) -> tuple[object, str | None, dict]:
    """``(class, first argument, keyword arguments)`` to ``class.from_pretrained``
    the reference of the source in ``folder`` (raw config ``raw``): its Auto class
    and folder for a float checkpoint; for an FP8 block-scaled one the concrete
    class, no folder (the weights come as a state dict), the config without
    quantization and the dequantizing state dict (module docstring). ``config``:
    transformers' config object where config.json needs a rewrite to be read
    (``reference._reference_config``), else it is read from ``folder``."""
    from transformers import AutoConfig

    from ..checkpoint import model_tensors, source_quantization

    given = config is not None
    if not given:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    auto = auto_class(config)
    if source_quantization(raw, str(folder)) is None:
        return auto, str(folder), {"config": config} if given else {}
    cls, config = _concrete(auto, config)
    for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
        if getattr(cfg, "quantization_config", None) is not None:
            cfg.quantization_config = None
    return cls, None, {"config": config, "state_dict": {n: _Dequantized(t) for n, t in model_tensors(folder).items()}}


def decoder_layers(model, n_layers: int):
    """The ModuleList of the language model's ``n_layers`` blocks: the first of
    that length outside any vision / audio component."""
    import torch.nn as nn

    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    other = ("vision", "visual", "audio", "sound", "merger", "projector")
    text = [m for name, m in found if not any(w in name for w in other)]
    if text:
        return text[0]
    if found:
        return found[0][1]
    from ..errors import CheckpointError

    raise CheckpointError(f"cannot find the {n_layers} decoder blocks in the reference model")


class _Dequantized:
    """A tensor of the source, materialised as torch float32 when transformers
    indexes it (``t[...]``, as it does a safetensors slice): FP8 weights
    dequantized."""

    def __init__(self, info):
        self.info = info

    def __getitem__(self, key):
        import torch

        from ..checkpoint import read_model_tensor

        return torch.from_numpy(read_model_tensor(self.info))[key]
