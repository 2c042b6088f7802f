"""quantize: every fixture at every width and mode opens in hybridconv and
mlx-lm, protected tensors stay float32 and untouched, KL rises as bits fall,
bits per weight are what is stored; recipes, overrides, errors, --target-kl."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file

import hybridconv
from hybridconv.checkpoint import index_weights
from hybridconv.convert import convert
from hybridconv.errors import UsageError
from hybridconv.quant.run import quantize, search_target_kl
from hybridconv.safetensors_io import ITEMSIZE
from hybridconv.verify.reference import read_reference_file
from hybridconv.verify.run import verify_folder

from .conftest import FIXTURE_CASES

HC = [sys.executable, "-m", "hybridconv"]


def _kl(folder, fixtures_dir, case) -> float:
    ref = read_reference_file(fixtures_dir / case / "expected.safetensors")
    return verify_folder(folder, ref, decode_steps=0).report["metrics"]["overall"]["kl_mean"]


def _stored_bits(folder) -> int:
    return sum(math.prod(t.shape) * ITEMSIZE[t.dtype] * 8 for t in index_weights(folder).tensors.values())


@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_every_width_opens_everywhere_and_degrades_monotonically(fixtures_dir, tmp_path, case):
    from .conftest import load_builtin as load_model  # mlx-lm's own model

    src = fixtures_dir / case
    source_tensors = load_file(str(src / "model.safetensors"))
    expected = mx.load(str(src / "expected.safetensors"))
    kls = []
    for bits in (8, 6, 4, 3, 2):
        out = tmp_path / f"q{bits}"
        res = quantize(str(src), out, bits=bits, group_size=32)
        ours = np.array(hybridconv.load(out)(expected["input_ids"]).astype(mx.float32))
        theirs = np.array(load_model(out)[0](expected["input_ids"]).astype(mx.float32))
        assert np.abs(ours - theirs).max() < 1e-3 * max(1.0, np.abs(ours).max())
        # protected tensors: float32 and bit-identical to the (float32) source
        stored = mx.load(str(out / "model.safetensors"))
        protected = [t for t in res.plan.tensors if t.decision == "protected"]
        assert protected
        for t in protected:
            arr = stored[t.step.target]
            assert arr.dtype == mx.float32
            want = source_tensors[t.step.source]
            if t.step.transpose:
                want = want.transpose(t.step.transpose)
            assert np.array_equal(np.array(arr), want), t.step.target
        # bits per weight: what is stored, over the model's parameters
        bpw = _stored_bits(out) / res.plan.parameters
        assert bpw == pytest.approx(res.plan.bits_per_weight)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["hybridconv"]["bits_per_weight"] == pytest.approx(bpw, abs=1e-3)
        assert cfg["quantization"]["bits"] == bits and cfg["quantization"]["group_size"] == 32
        kls.append(_kl(out, fixtures_dir, case))
    assert all(a < b for a, b in zip(kls, kls[1:])), kls


@pytest.mark.parametrize("mode,bits,group", [("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)])
@pytest.mark.parametrize("case", ["plamo2-tiny", "recurrent_gemma-tiny"])
def test_other_modes(fixtures_dir, tmp_path, case, mode, bits, group):
    from .conftest import load_builtin as load_model  # mlx-lm's own model

    out = tmp_path / "q"
    quantize(str(fixtures_dir / case), out, bits=bits, group_size=group, mode=mode)
    expected = mx.load(str(fixtures_dir / case / "expected.safetensors"))
    ours = np.array(hybridconv.load(out)(expected["input_ids"]).astype(mx.float32))
    theirs = np.array(load_model(out)[0](expected["input_ids"]).astype(mx.float32))
    assert np.abs(ours - theirs).max() < 1e-3 * max(1.0, np.abs(ours).max())
    assert json.loads((out / "config.json").read_text())["quantization"]["mode"] == mode
    # twice the KL a correct build measures (a 0.5 bound let an 8-bit mode quantized
    # as 4-bit pass: 0.0015 -> 0.03)
    assert _kl(out, fixtures_dir, case) <= 2 * MODE_KL[case, mode]


MODE_KL = {  # measured mean KL vs the oracle (CPU, MLX 0.32)
    ("plamo2-tiny", "mxfp4"): 0.0335, ("plamo2-tiny", "nvfp4"): 0.0314, ("plamo2-tiny", "mxfp8"): 0.00154,
    ("recurrent_gemma-tiny", "mxfp4"): 0.00524, ("recurrent_gemma-tiny", "nvfp4"): 0.00337,
    ("recurrent_gemma-tiny", "mxfp8"): 0.000244,
}


def test_mixed_recipe_per_layer_entries(fixtures_dir, tmp_path):
    from .conftest import load_builtin as load_model  # mlx-lm's own model

    out = tmp_path / "mixed"
    res = quantize(str(fixtures_dir / "plamo2-tiny"), out, bits=4, recipe="mixed-4-6", group_size=32)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["bits"] == 4
    assert q["model.layers.layers.1.mlp.down_proj"] == {"group_size": 32, "bits": 6, "mode": "affine"}
    assert q["model.embed_tokens"]["bits"] == 6
    assert "model.layers.layers.1.mlp.gate_up_proj" not in q
    uniform = quantize(str(fixtures_dir / "plamo2-tiny"), tmp_path / "u4", bits=4, group_size=32)
    assert res.plan.bits_per_weight > uniform.plan.bits_per_weight
    expected = mx.load(str(fixtures_dir / "plamo2-tiny" / "expected.safetensors"))
    ours = np.array(hybridconv.load(out)(expected["input_ids"]).astype(mx.float32))
    theirs = np.array(load_model(out)[0](expected["input_ids"]).astype(mx.float32))
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(ours).max()
    assert _kl(out, fixtures_dir, "plamo2-tiny") < _kl(tmp_path / "u4", fixtures_dir, "plamo2-tiny")


def test_overrides_and_keep(fixtures_dir, tmp_path):
    res = quantize(str(fixtures_dir / "recurrent_gemma-tiny"), tmp_path / "o", bits=4, group_size=32,
                   bits_for=["mlp.down_proj=8"], keep=["re:layers\\.2\\..*q_proj"], dry_run=True)
    rows = {r["tensor"]: r for r in res.plan.rows()}
    assert rows["model.layers.0.mlp_block.down_proj.weight"]["bits"] == 8
    assert rows["model.layers.2.temporal_block.q_proj.weight"]["decision"] == "float"
    assert rows["model.layers.0.temporal_block.rg_lru.recurrent_param"]["decision"] == "protected"
    assert rows["model.layers.0.temporal_block.conv_1d.weight"]["dtype"] == "float32"
    assert not (tmp_path / "o").exists()  # dry run writes nothing
    # a quantizable layer kept in float is recorded for mlx-lm as False
    out = tmp_path / "k"
    quantize(str(fixtures_dir / "recurrent_gemma-tiny"), out, bits=4, group_size=32, keep=["attn.q_proj"])
    assert json.loads((out / "config.json").read_text())["quantization"]["model.layers.2.temporal_block.q_proj"] is False
    hybridconv.load(out)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(bits=7), "not supported by mode affine"),
        (dict(bits=4, group_size=48), "--group-size 48"),
        (dict(bits=4, mode="mxfp4", group_size=64), "allowed 32"),
        (dict(bits=8, mode="nvfp4"), "allowed 4"),
        (dict(bits=4, mode="int4"), "--mode 'int4'"),
        (dict(bits=4, recipe="mixed-4-7"), "--recipe mixed-4-7: 7 bits"),
        (dict(bits=4, recipe="fancy"), "unknown"),
        (dict(bits=4, bits_for=["*A_log=8"]), "never quantized"),
        (dict(bits=4, bits_for=["nothing*=8"]), "matches no tensor"),
        (dict(bits=4, bits_for=["oops"]), "PATTERN=BITS"),
    ],
)
def test_bad_options(fixtures_dir, tmp_path, kwargs, needle):
    with pytest.raises(UsageError, match=needle.replace("*", r"\*").replace("(", r"\(")):
        quantize(str(fixtures_dir / "plamo2-tiny"), tmp_path / "x", dry_run=True, **kwargs)


def test_already_quantized_source_refused(fixtures_dir, tmp_path):
    quantize(str(fixtures_dir / "plamo2-tiny"), tmp_path / "q", bits=4)
    with pytest.raises(UsageError, match="already quantized"):
        quantize(str(tmp_path / "q"), tmp_path / "qq", bits=4)


def test_from_converted_folder_equals_from_source(fixtures_dir, tmp_path):
    convert(str(fixtures_dir / "recurrent_gemma-tiny-hf5"), tmp_path / "f", dtype="float32")
    quantize(str(tmp_path / "f"), tmp_path / "a", bits=4)
    quantize(str(fixtures_dir / "recurrent_gemma-tiny-hf5"), tmp_path / "b", bits=4)
    a, b = mx.load(str(tmp_path / "a" / "model.safetensors")), mx.load(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_no_worse_than_mlx_lm_at_equal_bits(fixtures_dir, tmp_path):
    """Against mlx_lm.convert at 4 bits, group 64, on plamo2-tiny: the same
    tensors in the same format (names, shapes, dtypes; mlx-lm reads ours), the
    float tensors identical except the SSM dynamics, which the bf16 policy keeps
    float32 where mlx-lm rounds them to bf16; the quantized ones hold
    hybridconv's error-minimising ranges (quant/affine.py), and the KL to the
    reference is lower in both dtypes, on 4 x 128 random tokens against the
    PyTorch float32 reference (measured: float32 0.0084 vs 0.0138, bfloat16
    0.0091 vs 0.0118; the fixture's own 24 oracle tokens are too few:
    one peaked token of the 24 holds most of the KL, 2.8 for ours against 0.36
    for mlx-lm's at float32 while the other 23 are no worse). Quantizing with
    mx.quantize's ranges (or storing the dynamics in bf16) fails it."""
    from mlx_lm.convert import convert as mlx_lm_convert

    from hybridconv.checkpoint import resolve
    from hybridconv.verify.inputs import build_inputs
    from hybridconv.verify.reference import compute_reference

    case = "plamo2-tiny"
    source = resolve(str(fixtures_dir / case))
    vocab = json.loads((source.path / "config.json").read_text())["vocab_size"]
    ref = compute_reference(source, build_inputs(source.path, vocab, random_tokens=128, num_sequences=4, seed=0),
                            keep_hidden=False)

    def kl(folder):
        return verify_folder(folder, ref, decode_steps=0).report["metrics"]["overall"]["kl_mean"]

    kls = {}
    for dtype in ("float32", "bfloat16"):
        f, m, h = (tmp_path / f"{n}-{dtype}" for n in "fmh")
        convert(str(fixtures_dir / case), f, dtype=dtype)
        mlx_lm_convert(str(f), str(m), quantize=True, q_bits=4, q_group_size=64, trust_remote_code=True)
        res = quantize(str(fixtures_dir / case), h, bits=4, group_size=64, dtype=dtype)
        ours, theirs = mx.load(str(h / "model.safetensors")), mx.load(str(m / "model.safetensors"))
        assert ours.keys() == theirs.keys()
        assert all(ours[k].shape == theirs[k].shape for k in ours)
        quantized = {k[: -len(".scales")] for k in ours if k.endswith(".scales")}
        assert quantized
        floats = [k for k in ours if k.rsplit(".", 1)[0] not in quantized]
        differ = sorted(k for k in floats if ours[k].dtype != theirs[k].dtype or not mx.array_equal(ours[k], theirs[k]).item())
        protected = sorted(t.step.target for t in res.plan.tensors if t.decision == "protected" and t.step.target.endswith(("A_log", ".D", "dt_bias")))
        if dtype == "float32":
            assert differ == []
        else:
            assert differ == protected and len(protected) == 6, differ
            assert all(ours[k].dtype == mx.float32 and theirs[k].dtype == mx.bfloat16 for k in differ)
        for k in quantized:  # same format, other ranges
            for part in ("weight", "scales", "biases"):
                assert ours[f"{k}.{part}"].dtype == theirs[f"{k}.{part}"].dtype, (k, part)
        kls[dtype] = (kl(h), kl(m))
        params = res.plan.parameters
        assert _stored_bits(h) / params - _stored_bits(m) / params <= 0.1
    print(kls)
    for dtype, (ours_kl, theirs_kl) in kls.items():
        assert ours_kl < 0.95 * theirs_kl, (dtype, kls)


def test_target_kl_search(fixtures_dir, tmp_path):
    case = "recurrent_gemma-tiny"
    ref = read_reference_file(fixtures_dir / case / "expected.safetensors")
    res = search_target_kl(str(fixtures_dir / case), tmp_path / "t", 0.003, ref)
    assert res.result is not None and res.search
    met = [r for r in res.search if r["meets_target"]]
    assert met and _kl(tmp_path / "t", fixtures_dir, case) <= 0.003
    # the chosen plan is the smallest explored plan that meets the target
    assert res.plan.bits_per_weight == pytest.approx(min(r["bits_per_weight"] for r in met), abs=1e-3)
    none = search_target_kl(str(fixtures_dir / case), tmp_path / "n", 1e-12, ref)
    assert none.result is None and not (tmp_path / "n").exists()
    assert all(not r["meets_target"] for r in none.search)


def test_cli_quantize_dry_run_and_target_kl(fixtures_dir, tmp_path):
    r = subprocess.run([*HC, "quantize", fixtures_dir / "plamo2-tiny", "-o", tmp_path / "o", "--bits", "4",
                        "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 0 and "bits per weight" in r.stdout and "protected" in r.stdout
    assert not (tmp_path / "o").exists()
    ref = fixtures_dir / "plamo2-tiny" / "expected.safetensors"
    r = subprocess.run([*HC, "quantize", fixtures_dir / "plamo2-tiny", "-o", tmp_path / "t", "--target-kl", "1e-12",
                        "--reference-logits", ref], capture_output=True, text=True)
    assert r.returncode == 1 and "no plan meets" in r.stdout
    r = subprocess.run([*HC, "quantize", fixtures_dir / "plamo2-tiny", "-o", tmp_path / "v", "--bits", "8",
                        "--verify", "--reference-logits", ref], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((tmp_path / "v" / "verification.json").read_text())["verdict"] == "pass"
    r = subprocess.run([*HC, "quantize", fixtures_dir / "plamo2-tiny", "-o", tmp_path / "w", "--bits", "7"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_inspect_estimate_is_what_quantize_writes(fixtures_dir, tmp_path):
    from hybridconv.inspect import describe, inspect_plan

    estimates = describe(inspect_plan(str(fixtures_dir / "plamo2-tiny")))["estimated_output_bytes"]
    for bits in (8, 4, 2):
        out = tmp_path / f"q{bits}"
        quantize(str(fixtures_dir / "plamo2-tiny"), out, bits=bits, group_size=64)
        files = sorted(out.glob("model*.safetensors"))
        on_disk = sum(f.stat().st_size for f in files)
        # weights exactly; the header too, up to the page alignment of each shard's data
        assert estimates[f"{bits}-bit"] <= on_disk <= estimates[f"{bits}-bit"] + 4096 * len(files)
        assert on_disk - _stored_bits(out) // 8 >= estimates[f"{bits}-bit"] - _stored_bits(out) // 8 > 0
