"""Language models inside multimodal releases, and where a checkpoint keeps its
language model decided from the tensor names (converters/_wrappers.py).

The wave3 wrapper oracles (LFM2-VL, Nemotron-H omni, MiniCPM-V 4.6 / 4.7,
MiniCPM-OCR: transformers' wrapper classes on input ids alone) are converted
as their text models and match through ``hybridconv.load``; prefill = cached
decode; bf16 and default 4-bit pass verify against the wrapper's transformers
reference. The same weights under other prefixes (flattened configs with
prefixed names, nested configs with bare names, LLaVA-style
``language_model.model.*``) give the same logits; a tensor outside the
language model that is no known component fails naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hybridconv
from hybridconv.checkpoint import resolve
from hybridconv.convert import convert, plan
from hybridconv.errors import HybridconvError, LedgerError

from . import arch_checks
from .conftest import assert_logits_close, decode_logits, hybrid_case, oracle_logits

CASES = {  # wave3 case -> (written model_type, block kinds, language-model prefix in the source, head tied)
    "wave3/lfm2_vl-tiny": ("lfm2", ["conv", "attention", "conv", "attention"], "model.language_model.", True),
    "wave3/lfm3_vl-tiny": ("lfm3", ["conv", "conv", "attention", "conv", "attention"], "model.language_model.", True),
    "wave3/nemotron_h_omni-tiny": ("nemotron_h", ["mamba", "moe", "attention", "mlp"], "language_model.", False),
    "wave3/minicpmv4_6-tiny": ("qwen3_5", ["delta", "delta", "delta", "attention"], "model.language_model.", False),
    "wave3/minicpmv4_7-tiny": ("qwen3_5", ["delta", "delta", "delta", "attention"], "model.language_model.", False),
    "wave3/minicpm_ocr-tiny": ("qwen3_5", ["delta", "delta", "delta", "attention"], "model.language_model.", True),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("wrappers")
    outs = {}
    for case in CASES:
        outs[case] = root / Path(case).name
        convert(str(hybrid_case(case)), outs[case], dtype="float32")
    return outs


@pytest.mark.parametrize("case", sorted(CASES))
def test_wrapper_oracle_matches_as_text_model(converted, case):
    model_type, kinds, prefix, tied = CASES[case]
    out = converted[case]
    ids, ref = oracle_logits(hybrid_case(case))
    model = hybridconv.load(out)
    assert model.block_kinds() == kinds
    assert_logits_close(np.array(model(mx.array(ids))), ref)
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == model_type
    assert not {"text_config", "llm_config", "vision_config"} & set(written)
    assert written["tie_word_embeddings"] is tied
    assert ("lm_head.weight" in mx.load(str(out / "model.safetensors"))) is not tied


@pytest.mark.parametrize("case", sorted(CASES))
def test_wrapper_ledger_drops_only_the_other_components(converted, case):
    """Every tensor outside the language model is dropped with a reason naming its
    component; every language-model tensor is kept (or dropped by the text
    model's own rules: a tied head)."""
    _, _, prefix, _ = CASES[case]
    record = json.loads((converted[case] / "conversion.json").read_text())
    for t in record["tensors"]:
        inside = t["source"].startswith(prefix) or t["source"] == "lm_head.weight"
        if inside:
            assert t["target"] is not None, t
        else:
            assert t["target"] is None and "only the language model is converted" in t["dropped_because"], t
            assert any(w in t["dropped_because"] for w in ("vision", "projector", "merger")), t
    assert any(r.startswith("rename ") and prefix.split(".")[0] in r for r in record["rules"]), record["rules"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_wrapper_prefill_equals_cached_decode(converted, case):
    ids, _ = oracle_logits(hybrid_case(case))
    model = hybridconv.load(converted[case])
    full = np.array(model(mx.array(ids)))
    assert_logits_close(decode_logits(model, ids, prefill=9), full)


@pytest.mark.parametrize("case", sorted(CASES))
def test_wrapper_bf16_and_4bit_verify(case, tmp_path):
    """Against the wrapper's own transformers class (AutoModelForImageTextToText,
    input ids alone), blocks localised in its language model."""
    reports, ref = arch_checks.verify_bf16_and_4bit(hybrid_case(case), tmp_path, with_reference=True)
    assert "ForConditionalGeneration" in ref.implementation or "Omni" in ref.implementation
    assert ref.block_kinds == CASES[case][1]


# --- the layout is decided from the tensor names -------------------------------------------


def _rewrite(src: Path, dst: Path, rename=None, config=None) -> Path:
    """A copy of ``src`` with its tensors renamed by ``rename(name) -> name | None``
    (None: left out) and its config rewritten by ``config(dict) -> dict``."""
    shutil.copytree(src, dst)
    w = load_file(str(src / "model.safetensors"))
    if rename is not None:
        w = {rename(k): v for k, v in w.items() if rename(k) is not None}
        save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((src / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(config(cfg), indent=2))
    return dst


def _logits(folder: Path, ids) -> np.ndarray:
    out = folder.parent / (folder.name + "-out")
    convert(str(folder), out, dtype="float32")
    return np.array(hybridconv.load(out)(mx.array(ids)))


def test_flattened_config_with_prefixed_names(tmp_path):
    """The refused Qwen3.5-MoE derivative of issue 24: ``model_type:
    qwen3_5_moe_text``, ``architectures: [Qwen3_5MoeForConditionalGeneration]``,
    no text_config, every tensor under ``model.language_model.``. transformers
    loads it (its reference here); hybridconv converts it to the same function."""
    case = hybrid_case("qwen3_5_moe-tiny")
    ids, ref = oracle_logits(case)

    def prefixed(k):
        return k if k == "lm_head.weight" else "model.language_model." + k.removeprefix("model.")

    def flattened(c):
        return {**c, "architectures": ["Qwen3_5MoeForConditionalGeneration"]}

    src = _rewrite(case, tmp_path / "flat", prefixed, flattened)
    p = plan(resolve(str(src)))
    assert p.config["model_type"] == "qwen3_5_moe" and not p.dropped
    assert_logits_close(_logits(src, ids), ref)
    from hybridconv.verify.reference import compute_reference
    from hybridconv.verify.inputs import Inputs

    got = compute_reference(resolve(str(src)), Inputs([ids[0]], "oracle ids"), keep_hidden=False)
    assert_logits_close(np.asarray(got.outputs[0]["logits"])[None], ref)


def test_nested_config_with_bare_names(tmp_path):
    """A wrapper config (text_config) whose language model is stored bare
    (``model.layers.*``), the vision tower beside it: converted the same."""
    case = hybrid_case("wave3/lfm2_vl-tiny")
    ids, ref = oracle_logits(case)
    src = _rewrite(case, tmp_path / "bare", lambda k: k.replace("model.language_model.", "model."))
    p = plan(resolve(str(src)))
    assert {s.source.split(".")[1] for s in p.dropped} == {"vision_tower", "multi_modal_projector"}
    assert_logits_close(_logits(src, ids), ref)


def test_llava_style_prefix_with_head_under_it(tmp_path):
    """The whole causal LM under ``language_model.`` (``language_model.model.*``,
    ``language_model.lm_head.weight``), as older transformers saved wrappers."""
    case = hybrid_case("wave3/minicpmv4_6-tiny")
    ids, ref = oracle_logits(case)

    def llava(k):
        if k.startswith("model.language_model."):
            return "language_model.model." + k.removeprefix("model.language_model.")
        if k == "lm_head.weight":
            return "language_model.lm_head.weight"
        return k

    src = _rewrite(case, tmp_path / "llava", llava)
    assert_logits_close(_logits(src, ids), ref)


def test_published_omni_config_llm_config(tmp_path):
    """Nemotron-H omni as released: the language model's config under
    ``llm_config`` with ``hybrid_override_pattern`` (transformers reads both)."""
    case = hybrid_case("wave3/nemotron_h_omni-tiny")
    ids, ref = oracle_logits(case)

    def released(c):
        text = dict(c.pop("text_config"))
        kinds = text.pop("layers_block_type")
        text["hybrid_override_pattern"] = "".join({"linear_attention": "M", "moe": "E", "full_attention": "*",
                                                   "mlp": "-"}[k] for k in kinds)
        text.pop("mtp_layers_block_type", None)
        c["llm_config"] = text
        return c

    src = _rewrite(case, tmp_path / "released", config=released)
    assert_logits_close(_logits(src, ids), ref)


def test_unknown_component_is_not_dropped_silently(tmp_path):
    case = hybrid_case("wave3/lfm2_vl-tiny")
    src = _rewrite(case, tmp_path / "odd",
                   lambda k: k.replace("model.multi_modal_projector.", "model.frobnicator."))
    with pytest.raises(LedgerError, match="model.frobnicator") as err:
        plan(resolve(str(src)))
    assert "no known component of LFM2-VL" in str(err.value)
    assert "config.json" not in str(err.value)


def test_stray_tensors_do_not_blame_the_config(tmp_path):
    """Tensors of no known layout: the error names them and says the checkpoint
    holds tensors this model does not have, not that config.json is wrong."""
    case = hybrid_case("qwen3_5-tiny")
    src = _rewrite(case, tmp_path / "stray", lambda k: k.replace("model.", "decoder.", 1) if ".layers.3." in k else k)
    with pytest.raises(HybridconvError) as err:
        plan(resolve(str(src)))
    text = str(err.value)
    assert "decoder.layers.3" in text and "not part of this model" in text and "check config.json" not in text


def test_inspect_counts_each_tensor_once(tmp_path):
    """inspect's rule table counts what each rule does to the tensors that reach
    it, under the name they have there: the prefix rename counts every
    language-model tensor, the vision drops their tensors, the norm offset the
    renamed norms (Qwen3.5 inside MiniCPM-V), and a dropped tensor is not
    counted by later rules."""
    from hybridconv.inspect import describe

    info = describe(plan(resolve(str(hybrid_case("wave3/minicpmv4_6-tiny")))))
    by = {r["description"]: r for r in info["rules"]}
    offset = next(r for r in info["rules"] if r["rule"] == "add-offset")
    assert offset["matches"] == offset["changes"] == 4 * 2 + 1 + 2  # input/post norms, final norm, q/k norm
    assert all(t.startswith("model.language_model.") for t in offset["tensors"])
    drops = [r for r in info["rules"] if r["rule"] == "drop" and "vision" in r["description"]]
    dropped = {t for r in drops for t in r["tensors"]}
    for r in info["rules"]:
        if r["rule"] != "drop":
            assert not dropped & set(r["tensors"]), r["description"]
    assert sum(len(r["tensors"]) for r in info["rules"] if r["rule"] == "drop") == len(info["dropped"])
    assert len(by) == len(info["rules"])
    # what a model card counts (the vision tower too) beside the converted language model
    vision = sum(t.numel for n, t in plan(resolve(str(hybrid_case("wave3/minicpmv4_6-tiny")))).index.tensors.items()
                 if not n.startswith(("model.language_model.", "lm_head.")))
    assert info["source_parameters"] == info["parameters"] + vision
