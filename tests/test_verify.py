"""verify: passes correct conversions, fails broken ones and names the first
divergent block; reference-logits files; the independent PLaMo-2 reference."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from hybridconv.checkpoint import resolve
from hybridconv.convert import convert
from hybridconv.verify.inputs import build_inputs
from hybridconv.verify.reference import (
    compute_reference,
    read_reference_file,
    write_reference_file,
)
from hybridconv.verify.run import verify_folder

from .conftest import FIXTURE_CASES, tolerance

HC = [sys.executable, "-m", "hybridconv"]


def _reference(fixtures_dir, case, **kw):
    src = resolve(str(fixtures_dir / case))
    cfg = json.loads((src.path / "config.json").read_text())
    inputs = build_inputs(src.path, cfg["vocab_size"], random_tokens=kw.pop("tokens", 40),
                          num_sequences=kw.pop("sequences", 2), seed=1)
    return compute_reference(src, inputs, **kw)


@pytest.fixture(scope="module")
def refs(fixtures_dir):
    return {case: _reference(fixtures_dir, case) for case in FIXTURE_CASES}


@pytest.fixture(scope="module")
def converted(fixtures_dir, tmp_path_factory):
    out = {}
    for case in FIXTURE_CASES:
        for dtype in ("float32", "bfloat16"):
            folder = tmp_path_factory.mktemp(f"{case}-{dtype}") / "out"
            convert(str(fixtures_dir / case), folder, dtype=dtype)
            out[case, dtype] = folder
    return out


def test_torch_plamo2_reference_matches_oracle(fixtures_dir):
    import torch

    from hybridconv.verify.torch_plamo2 import TorchPlamo2

    for case in [c for c in FIXTURE_CASES if c.startswith("plamo2")]:
        exp = mx.load(str(fixtures_dir / case / "expected.safetensors"))
        ref = np.array(exp["logits"])
        got = TorchPlamo2(fixtures_dir / case)(torch.tensor(np.array(exp["input_ids"]))).numpy()
        assert np.abs(got - ref).max() <= tolerance(ref), case


@pytest.mark.parametrize("case", FIXTURE_CASES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verify_passes_correct_conversions(refs, converted, case, dtype):
    report = verify_folder(converted[case, dtype], refs[case]).report
    assert report["verdict"] == "pass", report["failure_reasons"]
    assert report["model"]["precision"] == dtype
    assert report["first_divergent_block"] is None
    assert len(report["blocks"]) == len(refs[case].block_kinds)
    assert [b["kind"] for b in report["blocks"]] == refs[case].block_kinds
    o = report["metrics"]["overall"]
    if dtype == "float32":
        assert o["kl_mean"] < 1e-8 and o["top1_agreement"] == 1.0
    assert report["decode"]["kl_max"] <= report["thresholds"]["max_kl_p99"]
    assert report["model"]["weights_hash"].startswith("sha256:")


@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_reference_logits_file_mode(refs, converted, tmp_path, case):
    path = tmp_path / "ref.safetensors"
    write_reference_file(refs[case], path)
    loaded = read_reference_file(path)
    report = verify_folder(converted[case, "float32"], loaded).report
    assert report["verdict"] == "pass" and report["reference"]["mode"] == "file"
    assert report["blocks"] == [] and "not available" in report["block_comparison"]
    # the file has exactly the fixtures' layout
    t = mx.load(str(path))
    assert t["input_ids"].dtype == mx.int32 and t["logits"].dtype == mx.float32
    assert t["logits"].shape == (2, 40, 320)


def test_fixture_expected_file_is_a_reference(fixtures_dir, converted):
    case = FIXTURE_CASES[0]
    ref = read_reference_file(fixtures_dir / case / "expected.safetensors")
    assert verify_folder(converted[case, "float32"], ref).report["verdict"] == "pass"


def test_topk_and_hidden_reference_file(refs, converted, tmp_path):
    case = "plamo2-tiny"
    ref = refs[case]
    path = tmp_path / "ref-top.safetensors"
    write_reference_file(ref, path, top_k=20, with_hidden=True)
    loaded = read_reference_file(path)
    good = verify_folder(converted[case, "float32"], loaded).report
    assert good["verdict"] == "pass" and len(good["blocks"]) == 4
    # The top-k KL is a lower bound of the full KL (the top-k + rest partition
    # coarsens the vocabulary), and a coarser partition bounds a finer one: shown on
    # a bf16 conversion, where the KL is well above rounding noise (a float32
    # conversion's ~1e-13 cannot tell a bound from an equality).
    bf16 = converted[case, "bfloat16"]
    full = verify_folder(bf16, ref, decode_steps=0).report["metrics"]["overall"]["kl_mean"]
    kl = {}
    for k in (2, 20):
        path = tmp_path / f"ref-top{k}.safetensors"
        write_reference_file(ref, path, top_k=k)
        kl[k] = verify_folder(bf16, read_reference_file(path), decode_steps=0).report["metrics"]["overall"]["kl_mean"]
    assert full > 1e-5, full  # measured 3.8e-5; top-20 3.77e-5, top-2 1.29e-5
    assert kl[2] < kl[20] <= full * (1 + 1e-9), (kl, full)
    assert kl[20] >= 0.5 * full, (kl, full)  # 20 of 320 tokens hold most of the mass: close to the full KL


# --- deliberately broken conversions ----------------------------------------------------


def _break(folder: Path, tmp_path: Path, fn) -> Path:
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    w = mx.load(str(broken / "model.safetensors"))
    fn(w)
    mx.save_safetensors(str(broken / "model.safetensors"), w, metadata={"format": "mlx"})
    return broken


def _flip_conv(w):  # conv kernel reversed along K
    k = "model.layers.1.temporal_block.conv_1d.weight"
    w[k] = w[k][:, ::-1, :]


def _pytorch_layout_conv(w):  # conv kernel left as PyTorch [C, 1, K]
    k = "model.layers.layers.2.mixer.conv1d.weight"
    w[k] = w[k].transpose(0, 2, 1)


def _a_log_as_a(w):  # the converter wrote A = -exp(A_log) where A_log belongs
    k = "model.layers.layers.2.mixer.A_log"
    w[k] = -mx.exp(w[k])


def _norm_offset_lost(w):  # offset folded into the weight: the model adds it again
    k = "model.layers.2.temporal_pre_norm.weight"
    w[k] = w[k] + 1.0


def _swap_blocks(w):  # layers 0 and 2 (both Mamba) exchanged
    for k in [k for k in w if ".layers.layers.0." in k]:
        k2 = k.replace(".layers.layers.0.", ".layers.layers.2.")
        w[k], w[k2] = w[k2], w[k]


def _noise_one_block(w):
    rng = np.random.default_rng(0)
    for k in [k for k in w if k.startswith("model.layers.1.mlp_block.") and k.endswith("weight")]:
        w[k] = w[k] + mx.array(rng.normal(0, 0.2, w[k].shape).astype(np.float32))


BROKEN = {
    "conv-flipped-along-K": ("recurrent_gemma-tiny", _flip_conv, 1),
    "conv-pytorch-layout": ("plamo2-tiny", _pytorch_layout_conv, 2),
    "A_log-read-as-A": ("plamo2-tiny", _a_log_as_a, 2),
    "norm-offset-lost": ("recurrent_gemma-tiny", _norm_offset_lost, 2),
    "blocks-swapped": ("plamo2-tiny", _swap_blocks, 0),
    "noise-in-one-block": ("recurrent_gemma-tiny", _noise_one_block, 1),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_verify_fails_broken_conversion_and_localises(refs, converted, tmp_path, name):
    case, breaker, block = BROKEN[name]
    broken = _break(converted[case, "float32"], tmp_path, breaker)
    report = verify_folder(broken, refs[case]).report
    assert report["verdict"] == "fail"
    assert report["failure_reasons"]
    assert report["first_divergent_block"] == block, report.get("blocks")


def test_cli_exit_codes_and_report(fixtures_dir, converted, tmp_path):
    case = "plamo2-tiny"
    good = converted[case, "float32"]
    ref_file = tmp_path / "ref.safetensors"
    r = subprocess.run([*HC, "reference", fixtures_dir / case, "-o", ref_file, "--random-tokens", "24",
                        "--hidden-states"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*HC, "verify", good, "--reference-logits", ref_file, "--json", tmp_path / "v.json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((good / "verification.json").read_text())
    assert report == json.loads((tmp_path / "v.json").read_text())
    assert report["verdict"] == "pass" and report["schema"] == "hybridconv.verification/2"
    for key in ("tool", "libraries", "model", "reference", "inputs", "thresholds", "metrics",
                "blocks", "decode", "checks", "first_divergent_block", "verdict"):
        assert key in report
    # a gate made impossible -> 1 (an agreement above 1 is refused as bad usage: issue 26)
    r = subprocess.run([*HC, "verify", good, "--reference-logits", ref_file, "--max-kl-mean", "0",
                        "--no-report"], capture_output=True, text=True)
    assert r.returncode == 1 and "FAIL" in r.stdout
    # a broken conversion -> 1, live reference
    broken = _break(good, tmp_path, _a_log_as_a)
    r = subprocess.run([*HC, "verify", broken, "--reference", fixtures_dir / case, "--random-tokens", "16"],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert json.loads((broken / "verification.json").read_text())["first_divergent_block"] == 2
    # bad usage -> 2, without a traceback
    from safetensors.numpy import save_file

    wrong_vocab = tmp_path / "wrong-vocab.safetensors"
    save_file({"input_ids": np.zeros((1, 4), np.int32), "logits": np.zeros((1, 4, 100), np.float32)}, str(wrong_vocab))
    for args in (["verify", good], ["verify", good, "--reference", fixtures_dir / case, "--reference-logits", ref_file],
                 ["verify", tmp_path / "nope", "--reference-logits", ref_file],
                 ["verify", good, "--reference-logits", tmp_path / "missing.safetensors"],
                 ["verify", good, "--reference-logits", wrong_vocab, "--no-report"],
                 ["verify", converted["recurrent_gemma-tiny", "float32"], "--reference-logits", ref_file, "--no-report"]):
        r = subprocess.run([*HC, *map(str, args)], capture_output=True, text=True)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr


def test_remote_code_is_not_run_by_default(fixtures_dir, tmp_path, converted):
    src = tmp_path / "plamo"
    shutil.copytree(fixtures_dir / "plamo2-tiny", src)
    (src / "modeling_plamo.py").write_text("raise SystemExit('remote code must not run')\n")
    inputs = build_inputs(src, 320, random_tokens=16, num_sequences=1)
    ref = compute_reference(resolve(str(src)), inputs)
    assert "modeling_plamo.py was not run" in ref.implementation
    assert verify_folder(converted["plamo2-tiny", "float32"], ref).report["verdict"] == "pass"
    r = subprocess.run([*HC, "verify", converted["plamo2-tiny", "float32"], "--reference", src,
                        "--trust-remote-code", "--no-report"], capture_output=True, text=True)
    assert r.returncode == 2 and "auto_map" in r.stderr
