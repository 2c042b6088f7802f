"""Mamba family (issue 9): mamba, falcon_mamba and mamba2 on the shared
state-space core, against transformers' own classes.

Oracle cases: ``fixtures/hybrids/{mamba,falcon_mamba,mamba2}-tiny``; unseen
configurations built here with transformers (``save_hf_transformers``)."""

from __future__ import annotations

import json
import math
import shutil

import mlx.core as mx
import numpy as np
import pytest

import hybridconv
from hybridconv.checkpoint import resolve
from hybridconv.convert import convert
from hybridconv.errors import ConfigError
from hybridconv.inspect import describe, inspect_plan
from hybridconv.quant.run import quantize
from hybridconv.verify.inputs import build_inputs
from hybridconv.verify.reference import compute_reference
from hybridconv.verify.run import verify_folder

from .conftest import (
    assert_logits_close,
    decode_logits,
    hybrid_case,
    oracle_logits,
    random_ids,
    save_hf_transformers,
    torch_logits,
)

CASES = ["mamba-tiny", "falcon_mamba-tiny", "mamba2-tiny"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = {}
    for case in CASES:
        folder = tmp_path_factory.mktemp(case) / "out"
        convert(str(hybrid_case(case)), folder, dtype="float32")
        out[case] = folder
    return out


# -- oracle cases ---------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_oracle_through_hybridconv_load(converted, case):
    ids, ref = oracle_logits(hybrid_case(case))
    model = hybridconv.load(converted[case])
    assert model.block_kinds() == ["mamba"] * len(model.layers)
    assert_logits_close(np.array(model(mx.array(ids))), ref)


@pytest.mark.parametrize("case", CASES)
def test_oracle_through_mlx_lm(converted, case):
    # with n_groups = 1 (the fixture) mlx-lm computes all three correctly once
    # the config is normalised (mamba2: intermediate_size, numeric time_step_limit)
    from .conftest import load_builtin as load_model  # mlx-lm's own model

    ids, ref = oracle_logits(hybrid_case(case))
    model, _ = load_model(converted[case])
    assert_logits_close(np.array(model(mx.array(ids))), ref)


def test_mlx_lm_cannot_read_transformers5_mamba2_config():
    from mlx_lm.models import mamba2 as ref

    raw = json.loads((hybrid_case("mamba2-tiny") / "config.json").read_text())
    assert "intermediate_size" not in raw
    with pytest.raises(TypeError, match="intermediate_size"):
        ref.ModelArgs.from_dict(raw)


@pytest.mark.parametrize("case", CASES)
def test_output_layout_and_inspect(converted, case):
    cfg = json.loads((converted[case] / "config.json").read_text())
    weights = mx.load(str(converted[case] / "model.safetensors"))
    for name, w in weights.items():
        if name.endswith("conv1d.weight"):
            assert w.shape[1] == cfg["conv_kernel"] and w.shape[2] == 1, name
    info = describe(inspect_plan(str(hybrid_case(case))))
    assert [layer["kind"] for layer in info["layers"]] == ["mamba"] * cfg["num_hidden_layers"]
    rules = {r["rule"]: r for r in info["rules"]}
    assert rules["conv1d-to-mlx"]["changes"] == cfg["num_hidden_layers"]
    assert rules["keep-float32"]["matches"] == 3 * cfg["num_hidden_layers"]
    if case == "mamba2-tiny":
        assert cfg["intermediate_size"] == 128 and cfg["time_step_limit"] == [0.0, math.inf]


def test_conversion_is_idempotent(converted, tmp_path):
    for case in CASES:
        again = tmp_path / case
        convert(str(converted[case]), again, dtype="float32")
        a = mx.load(str(converted[case] / "model.safetensors"))
        b = mx.load(str(again / "model.safetensors"))
        assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)


def test_fixtures_prefill_equals_cached_decode(converted):
    for case in CASES:
        ids, ref = oracle_logits(hybrid_case(case))
        model = hybridconv.load(converted[case])
        # mamba2-tiny: SSD chunks of 8, so a prefill of 11 spans two of them
        assert_logits_close(decode_logits(model, ids, prefill=11), ref)


# -- config layouts -------------------------------------------------------------------


def _with_config(tmp_path, case, edit):
    folder = tmp_path / case
    shutil.copytree(hybrid_case(case), folder)
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))  # inf -> Infinity, as transformers 4 writes it
    return folder


def test_transformers4_mamba2_config(tmp_path):
    def edit(cfg):
        cfg["time_step_limit"] = [0.0, float("inf")]
        cfg["time_step_rank"] = "auto"
        cfg["torch_dtype"] = cfg.pop("dtype")

    src = _with_config(tmp_path, "mamba2-tiny", edit)
    assert "Infinity" in (src / "config.json").read_text()
    convert(str(src), tmp_path / "out", dtype="float32")
    ids, ref = oracle_logits(src)
    assert_logits_close(np.array(hybridconv.load(tmp_path / "out")(mx.array(ids))), ref)


def test_mamba_ssm_key_aliases(tmp_path):
    def edit(cfg):
        for old, new in [("hidden_size", "d_model"), ("num_hidden_layers", "n_layer"),
                         ("state_size", "d_state"), ("conv_kernel", "d_conv")]:
            cfg[new] = cfg.pop(old)
        cfg.pop("intermediate_size")  # expand · d_model
        cfg["time_step_rank"] = "auto"

    src = _with_config(tmp_path, "mamba-tiny", edit)
    convert(str(src), tmp_path / "out", dtype="float32")
    ids, ref = oracle_logits(src)
    assert_logits_close(np.array(hybridconv.load(tmp_path / "out")(mx.array(ids))), ref)


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c.update(num_heads=6), "num_heads"),
    (lambda c: c.update(n_groups=3), "n_groups"),
    (lambda c: c.update(time_step_limit=[0.1, 0.01]), "time_step_limit"),
    (lambda c: c.update(time_step_limit="wide"), "time_step_limit"),
    (lambda c: c.update(time_step_rank="big"), "time_step_rank"),
])
def test_mamba2_config_errors(tmp_path, edit, needle):
    from hybridconv.converters.mamba2 import normalize_config

    cfg = json.loads((hybrid_case("mamba2-tiny") / "config.json").read_text())
    edit(cfg)
    with pytest.raises(ConfigError, match=needle):
        normalize_config(cfg)


# -- unseen configurations (transformers builds them) -------------------------------------


def _mamba2(**over):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    base = dict(hidden_size=32, num_heads=8, head_dim=8, expand=2, n_groups=2, state_size=4, conv_kernel=2,
                chunk_size=8, time_step_rank=3, num_hidden_layers=2, vocab_size=256, tie_word_embeddings=False)
    base.update(over)
    return Mamba2Config(**base), Mamba2ForCausalLM


def _mamba(**over):
    from transformers import MambaConfig, MambaForCausalLM

    base = dict(hidden_size=32, intermediate_size=96, state_size=4, conv_kernel=2, time_step_rank=3,
                num_hidden_layers=2, vocab_size=256, use_bias=True, tie_word_embeddings=False)
    base.update(over)
    return MambaConfig(**base), MambaForCausalLM


def _falcon_mamba(**over):
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    base = dict(hidden_size=32, intermediate_size=64, state_size=12, conv_kernel=3, time_step_rank=5,
                num_hidden_layers=2, vocab_size=256, mixer_rms_eps=1e-5)
    base.update(over)
    return FalconMambaConfig(**base), FalconMambaForCausalLM


UNSEEN = {
    # groups 2, state 4, conv 2, rank 3; 29 tokens = 3 chunks of 8 and a partial one
    "mamba2-g2": (_mamba2, {}, 29),
    # groups 4, state 16, conv 3, biases, tied head; 37 tokens over 5 chunks
    "mamba2-g4": (_mamba2, dict(hidden_size=64, num_heads=8, head_dim=16, n_groups=4, state_size=16,
                                conv_kernel=3, use_bias=True, tie_word_embeddings=True), 37),
    # conv 4, one head per group (4 heads, 4 groups), state 8, chunks of 5, rank 7
    "mamba2-g4-conv4": (_mamba2, dict(num_heads=4, head_dim=16, n_groups=4, state_size=8, conv_kernel=4,
                                      chunk_size=5, time_step_rank=7), 23),
    # Mamba-1: state 4, conv 2, rank 3, expand 3, biases, untied; 70 tokens > one scan chunk (64)
    "mamba-s4-k2": (_mamba, {}, 70),
    "mamba-s16-k4": (_mamba, dict(state_size=16, conv_kernel=4, time_step_rank=6, intermediate_size=64,
                                  use_bias=False, tie_word_embeddings=True), 41),
    "falcon_mamba-s12-k3": (_falcon_mamba, {}, 70),
}


@pytest.fixture(scope="module")
def unseen(tmp_path_factory):
    built = {}
    for i, (name, (make, over, T)) in enumerate(sorted(UNSEEN.items())):
        root = tmp_path_factory.mktemp(name)
        config, cls = make(**over)
        ref_model = save_hf_transformers(root / "src", config, cls, seed=i + 1)
        ids = random_ids(config.vocab_size, T, batch=2, seed=i)
        ref = torch_logits(ref_model, ids)
        convert(str(root / "src"), root / "out", dtype="float32")
        built[name] = (root, ids, ref)
    return built


@pytest.mark.parametrize("name", sorted(UNSEEN))
def test_unseen_matches_transformers(unseen, name):
    root, ids, ref = unseen[name]
    model = hybridconv.load(root / "out")
    got = np.array(model(mx.array(ids)))
    assert_logits_close(got, ref)
    # prefill = cached decode, the prefill spanning more than one chunk
    prefill = min(ids.shape[1] - 3, 66 if name.startswith(("mamba-", "falcon")) else 17)
    assert_logits_close(decode_logits(model, ids, prefill=prefill), ref)


def test_mlx_lm_ignores_groups_in_the_gated_norm(unseen):
    """mlx-lm's Mamba-2 norm takes its statistics over the whole vector: with
    n_groups > 1 it is a different model (measured here: max |Δlogit| well
    above the tolerance)."""
    from .conftest import load_builtin as load_model  # mlx-lm's own model

    for name in ("mamba2-g2", "mamba2-g4"):
        root, ids, ref = unseen[name]
        model, _ = load_model(root / "out")
        diff = float(np.abs(np.array(model(mx.array(ids))) - ref).max())
        assert diff > 0.05, (name, diff)


# -- verify: bf16 and default 4-bit -------------------------------------------------------


def _reference(case):
    src = resolve(str(hybrid_case(case)))
    cfg = json.loads((src.path / "config.json").read_text())
    inputs = build_inputs(src.path, cfg["vocab_size"], random_tokens=32, num_sequences=2, seed=1)
    return src, cfg, compute_reference(src, inputs)


@pytest.mark.parametrize("case", CASES)
def test_bf16_and_4bit_verify(case, tmp_path):
    src, cfg, ref = _reference(case)
    assert ref.block_kinds == ["mamba"] * cfg["num_hidden_layers"]

    convert(str(src.path), tmp_path / "bf16", dtype="bfloat16")
    report = verify_folder(tmp_path / "bf16", ref).report
    assert report["verdict"] == "pass", report["failure_reasons"]
    assert report["model"]["precision"] == "bfloat16"
    assert len(report["blocks"]) == cfg["num_hidden_layers"]

    # a broken float32 conversion is caught and localised: layer 1's A_log
    # stored as A (= -exp(A_log)), the classic misreading of the checkpoint
    convert(str(src.path), tmp_path / "f32", dtype="float32")
    weights = mx.load(str(tmp_path / "f32" / "model.safetensors"))
    name = "backbone.layers.1.mixer.A_log"
    weights[name] = -mx.exp(weights[name])
    shutil.copytree(tmp_path / "f32", tmp_path / "broken")
    mx.save_safetensors(str(tmp_path / "broken" / "model.safetensors"), weights, metadata={"format": "mlx"})
    report = verify_folder(tmp_path / "broken", ref).report
    assert report["verdict"] == "fail" and report["first_divergent_block"] == 1, report.get("blocks")

    res = quantize(str(src.path), tmp_path / "q4", bits=4)  # default: affine, group 64
    protected = {t.step.target for t in res.plan.tensors if t.decision == "protected"}
    assert any(n.endswith("A_log") for n in protected) and any("conv1d" in n for n in protected)
    report = verify_folder(tmp_path / "q4", ref).report
    # (mamba2-tiny's reference logits are near-ties: mean top probability 0.035,
    # median top-2 gap 0.23; verify's top-1 gate counts decisive tokens only,
    # and the KL gates carry the rest: KL mean 3.6e-2 against a gate of 0.15)
    assert report["verdict"] == "pass", report["failure_reasons"]
