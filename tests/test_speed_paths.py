"""Issue 12: verify at the hardware's speed. Correctness only (no timed assertions):

* the optimised BLAS is loaded before mlx (on / off / too late / not found) and
  MLX's products agree with the reference BLAS's to float32 noise;
* ``hybridconv doctor`` reports the BLAS, measured GFLOP/s and the fix on the
  slow path;
* the float32 compute path (weights as stored, upcast one layer at a time,
  float32 activations) gives the slow path's verdict and metrics within float32
  noise, leaves the stored weights untouched, and upcasts per layer, not the model;
* verify runs one MLX pass per sequence (the decode check reuses its caches).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from hybridconv import blas
from hybridconv.convert import convert
from hybridconv.loading import compute_path, load, use_float32_compute
from hybridconv.quant.run import quantize
from hybridconv.verify.inputs import build_inputs
from hybridconv.verify.onepass import run_sequence
from hybridconv.verify.reference import compute_reference
from hybridconv.checkpoint import resolve
from hybridconv.verify.run import verify_folder

CASE = "recurrent_gemma-tiny"


def _system_openblas() -> bool:
    try:
        return hasattr(ctypes.CDLL("libopenblas.so.0"), "cblas_sgemm")
    except OSError:
        return False


def _status_in_subprocess(code_before: str = "", env: dict | None = None) -> dict:
    """blas.status() of a fresh interpreter, after ``code_before`` and an mlx product
    checked against numpy (float64)."""
    script = (
        f"{code_before}\n"
        "import json, numpy as np, hybridconv, mlx.core as mx\n"
        "from hybridconv import blas\n"
        "rng = np.random.default_rng(0)\n"
        "a, b = rng.standard_normal((96, 200)).astype(np.float32), rng.standard_normal((200, 64)).astype(np.float32)\n"
        "got = np.array(mx.array(a) @ mx.array(b))\n"
        "ref = a.astype(np.float64) @ b.astype(np.float64)\n"
        "print(json.dumps({**blas.status(), 'rel_err': float(np.abs(got - ref).max() / np.abs(ref).max())}))\n"
    )
    full_env = {**os.environ, **(env or {})}
    if env is None or blas.ENV not in env:
        full_env.pop(blas.ENV, None)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=full_env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or blas.bundled_blas() is None,
                    reason="MLX bundles the reference BLAS on Linux only")
def test_blas_loaded_before_mlx_or_said_why():
    default = _status_in_subprocess()
    if _system_openblas():
        assert default["kind"] == "optimised" and "openblas" in default["blas"].lower()
        assert default["action"].startswith("loaded") and "fix" not in default
    else:  # works all the same, slower, and says what to install
        assert default["kind"] == "reference" and "apt-get install libopenblas0-pthread" in default["fix"]
    off = _status_in_subprocess(env={blas.ENV: "off"})
    assert off["kind"] == "reference" and off["action"] == f"not loaded: {blas.ENV}=off"
    assert "unset" in off["fix"]
    late = _status_in_subprocess("import mlx.core")
    assert late["kind"] == "reference" and late["action"].startswith("too late")
    assert "import hybridconv before mlx" in late["fix"]
    missing = _status_in_subprocess(env={blas.ENV: "/nonexistent/libblas.so"})
    assert missing["kind"] == "reference" and missing["action"].startswith("not found")
    # the same products either way, to float32 rounding
    for s in (default, off, late, missing):
        assert s["rel_err"] < 1e-5, s


def test_this_process_records_its_blas():
    s = blas.status()
    assert {"setting", "action", "blas", "kind"} <= set(s)
    assert s["kind"] in ("optimised", "reference", "platform", "unknown")
    json.dumps(s)


def test_doctor_reports_blas_speed_and_fix(monkeypatch):
    from typer.testing import CliRunner

    from hybridconv.cli import app
    from hybridconv.cli import doctor as _doctor  # noqa: F401  (registers the command)
    from hybridconv.verify import speed

    small = dict(shape=(16, 128, 128), budget=0.01)
    rep = speed.doctor(**small, with_torch=True)
    assert rep["blas"]["kind"] == blas.status()["kind"]
    assert set(rep["gflops"]["mlx"]) == {"float32", "bfloat16", "4bit", "4bit_as_float32"}
    assert all(v > 0 for v in rep["gflops"]["mlx"].values())
    assert rep["gflops"]["torch"]["float32"] > 0
    assert rep["verify_compute"]["low_precision_folders"] == "float32"  # the CPU
    assert rep["slow_path"] == bool(rep["findings"])

    orig = speed.doctor
    monkeypatch.setattr(speed, "doctor", lambda with_torch=True: orig(**small, with_torch=with_torch))
    res = CliRunner().invoke(app, ["doctor", "--no-torch"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "BLAS for MLX" in res.output and "measured GFLOP/s" in res.output and "not measured (--no-torch)" in res.output
    # on the slow path: the problem and its fix
    monkeypatch.setattr(blas, "status", lambda: {"setting": "off", "action": "not loaded: HYBRIDCONV_BLAS=off",
                                                  "blas": "libblas-x.so", "kind": "reference",
                                                  "fix": "unset HYBRIDCONV_BLAS (or set it to auto)"})
    res = CliRunner().invoke(app, ["doctor", "--no-torch"], terminal_width=200)
    assert res.exit_code == 0
    assert "slow:" in res.output and "reference (netlib) BLAS" in res.output and "fix: unset HYBRIDCONV_BLAS" in res.output
    res = CliRunner().invoke(app, ["doctor", "--no-torch", "--json"], terminal_width=200)
    data = json.loads(res.output)
    assert data["slow_path"] is True and data["findings"][0]["fix"].startswith("unset")


# --- the float32 compute path ---------------------------------------------------------


@pytest.fixture(scope="module")
def folders(fixtures_dir, tmp_path_factory):
    """bf16 and 4-bit conversions of one fixture, from a bfloat16 copy of the source
    (so that the 4-bit folder's scales and native activations are bf16, as in practice)."""
    src = fixtures_dir / CASE
    tmp = tmp_path_factory.mktemp("speed")
    out = {"bfloat16": tmp / "bf16"}
    convert(str(src), out["bfloat16"], dtype="bfloat16")
    out["4bit"] = tmp / "q4"
    quantize(str(src), out["4bit"], bits=4, group_size=32, dtype="bfloat16")
    out["float32"] = tmp / "f32"
    convert(str(src), out["float32"], dtype="float32")
    cfg = json.loads((src / "config.json").read_text())
    inputs = build_inputs(src, cfg["vocab_size"], random_tokens=40, num_sequences=2, seed=3)
    return out, compute_reference(resolve(str(src)), inputs)


def test_compute_path_choice(folders):
    out, _ = folders
    for name in ("bfloat16", "4bit"):
        c = compute_path(out[name], "auto")
        assert c["path"] == "float32" and c["activations"] == "float32" and c["device"] == "cpu"
        assert "as stored" in c["weights"] and "one layer at a time" in c["weights"]
        n = compute_path(out[name], "native")
        assert n["path"] == "native" and n["activations"] == "bfloat16"
    assert compute_path(out["float32"], "auto")["path"] == "native"
    with pytest.raises(Exception, match="unknown compute path"):
        compute_path(out["bfloat16"], "fast")


def test_float32_path_keeps_stored_weights(folders):
    out, _ = folders
    q = load(out["4bit"], compute="float32")
    layers = [m for _, m in q.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert layers and all(type(m).__name__.startswith("Float32") for m in layers)
    stored = mx.load(str(out["4bit"] / "model.safetensors"))
    from mlx.utils import tree_flatten

    quantized = {f"{path}.{k}" for path, m in q.named_modules() if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding)
                 for k in ("weight", "scales", "biases")}
    for name, p in tree_flatten(q.parameters()):
        # the same values everywhere; the quantized layers' own arrays untouched
        assert mx.array_equal(p.astype(mx.float32), stored[name].astype(mx.float32)), name
        if name in quantized:
            assert p.dtype == stored[name].dtype, name
    b = load(out["bfloat16"], compute="float32")
    assert b.activation_dtype == mx.float32
    assert {p.dtype for _, p in tree_flatten(b.parameters())} <= {mx.bfloat16, mx.float32}


def _dense_float32(model):
    """The slow path, whole-model: every quantized layer replaced by a float32 dense one
    holding its dequantized weight (``scale·q + bias`` in float32)."""
    from hybridconv.loading import _dequantize_f32

    for path, m in list(model.named_modules()):
        if isinstance(m, nn.QuantizedLinear):
            new = nn.Linear(1, 1, bias="bias" in m)
            new.weight = _dequantize_f32(m)
            if "bias" in m:
                new.bias = m["bias"]
        elif isinstance(m, nn.QuantizedEmbedding):
            new = nn.Embedding(1, 1)
            new.weight = _dequantize_f32(m)
        else:
            continue
        *parents, last = path.split(".")
        owner = model
        for p in parents:
            owner = owner[int(p)] if isinstance(owner, list) else getattr(owner, p)
        if isinstance(owner, list):
            owner[int(last)] = new
        else:
            setattr(owner, last, new)
    model.set_dtype(mx.float32)  # and every other float parameter
    return model


@pytest.mark.parametrize("name", ["bfloat16", "4bit"])
def test_float32_path_same_verdict_and_metrics_as_slow_path(folders, name, monkeypatch):
    """float32 path vs the same arithmetic done the slow way (bf16: MLX's own kernels with
    float32 activations; 4-bit: the whole model dequantized to float32 dense layers):
    metrics equal to float32 noise; and vs the native low-precision run (bf16
    activations, MLX's quantized kernels): the same verdict."""
    import hybridconv.loading as loading

    from hybridconv.verify.reference import read_reference_file, write_reference_file

    out, ref = folders
    fast = verify_folder(out[name], ref, compute="float32").report  # live float32 reference: weights held in float32
    assert "held in float32" in fast["compute"]["weights"]
    write_reference_file(ref, out[name].parent / f"{name}-ref.safetensors", with_hidden=True)
    file_ref = read_reference_file(out[name].parent / f"{name}-ref.safetensors")
    per_layer = verify_folder(out[name], file_ref, compute="float32").report  # reference file: upcast per layer
    assert "one layer at a time" in per_layer["compute"]["weights"]
    orig = loading.load
    monkeypatch.setattr(loading, "load", lambda *a, **kw: _dense_float32(orig(*a, **kw)))
    slow = verify_folder(out[name], ref, activation_dtype="float32").report
    monkeypatch.setattr(loading, "load", orig)
    native = verify_folder(out[name], ref, compute="native").report
    assert fast["compute"]["path"] == "float32" and slow["compute"]["path"] == "native"
    assert fast["compute"]["activations"] == slow["compute"]["activations"] == "float32"
    assert native["compute"]["activations"] == "bfloat16"
    assert fast["compute"]["blas"]["kind"] == blas.status()["kind"]
    assert fast["verdict"] == slow["verdict"] == native["verdict"] == "pass"
    assert per_layer["verdict"] == "pass"
    assert per_layer["metrics"]["overall"]["kl_mean"] == pytest.approx(fast["metrics"]["overall"]["kl_mean"], rel=1e-4, abs=1e-9)
    fo, so = fast["metrics"]["overall"], slow["metrics"]["overall"]
    assert abs(fo["kl_mean"] - so["kl_mean"]) <= 1e-6 + 1e-3 * so["kl_mean"]
    assert abs(fo["max_abs_logit_diff"] - so["max_abs_logit_diff"]) <= 1e-4
    assert fo["top1_agreement_decisive"] == so["top1_agreement_decisive"]
    for fb, sb in zip(fast["blocks"], slow["blocks"]):
        assert abs(fb["relative_error"] - sb["relative_error"]) <= 1e-5 + 1e-3 * sb["relative_error"]
    assert abs(fast["decode"]["kl_max"] - slow["decode"]["kl_max"]) <= 1e-6 + 1e-3 * slow["decode"]["kl_max"]
    # auto is the float32 path here (the CPU)
    auto = verify_folder(out[name], ref).report
    assert auto["compute"]["path"] == "float32" and auto["metrics"]["overall"]["kl_mean"] == fo["kl_mean"]


def test_float32_path_upcasts_one_layer_at_a_time():
    """Peak memory of a forward pass through many 4-bit layers on the float32 path stays
    far below the size of the whole model in float32 (each layer is dequantized when it
    runs, and freed after)."""
    d, n = 512, 32
    layers = []
    for i in range(n):
        lin = nn.Linear(d, d)
        lin.set_dtype(mx.bfloat16)
        layers.append(nn.QuantizedLinear.from_linear(lin, group_size=64, bits=4))

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = layers

        def __call__(self, x):
            for lin in self.layers:
                x = x + nn.gelu(lin(x))
            return x

    model = Stack()
    assert use_float32_compute(model) == n
    mx.eval(model.parameters())
    x = mx.random.normal((1, 16, d))
    mx.eval(x)
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    y = model(x)
    mx.eval(y)
    assert y.dtype == mx.float32
    whole_model_f32 = n * d * d * 4
    assert mx.get_peak_memory() - base < whole_model_f32 / 4


# --- one MLX pass per sequence -------------------------------------------------------


class _Counting:
    """A model wrapper that counts the tokens it is given."""

    def __init__(self, model):
        self.model, self.tokens = model, 0

    def __call__(self, inputs, cache=None, hidden_states=None):
        self.tokens += inputs.shape[0] * inputs.shape[1]
        return self.model(inputs, cache=cache, hidden_states=hidden_states)

    def make_cache(self):
        return self.model.make_cache()

    def block_kinds(self):
        return self.model.block_kinds()


def test_one_pass_per_sequence_equals_plain_forward(folders):
    out, ref = folders
    model = _Counting(load(out["float32"]))
    ids = ref.sequences[0]
    T = len(ids)
    got, hidden, k = run_sequence(model, ids, 8, want_hidden=True)
    assert k == 8 and model.tokens == T  # one pass: every token once
    plain_hidden: list = []
    plain = np.array(model.model(mx.array(ids[None]), hidden_states=plain_hidden)[0])
    assert got.shape == plain.shape
    assert np.abs(got - plain).max() <= 1e-4 + 1e-5 * np.abs(plain).max()
    assert len(hidden) == len(plain_hidden)
    for h, p in zip(hidden, plain_hidden):
        assert h.shape == p.shape
        assert float(mx.abs(h - p).max()) <= 1e-4 + 1e-5 * float(mx.abs(p).max())
    model.tokens = 0
    run_sequence(model, ids, 0, want_hidden=False)
    assert model.tokens == T


def test_verify_runs_each_token_once(folders, monkeypatch):
    out, ref = folders
    import hybridconv.loading as loading

    seen = []
    orig = loading.load

    def counting_load(*a, **kw):
        m = _Counting(orig(*a, **kw))
        seen.append(m)
        return m

    monkeypatch.setattr(loading, "load", counting_load)
    report = verify_folder(out["float32"], ref, decode_steps=8).report
    assert report["verdict"] == "pass" and report["decode"]["steps_per_sequence"] == 8
    assert "one pass per sequence" in report["decode"]["method"]
    assert seen[0].tokens == sum(len(s) for s in ref.sequences)


def _all_cases():
    from .conftest import FIXTURE_CASES, FIXTURES, HYBRIDS

    cases = [FIXTURES / c for c in FIXTURE_CASES]
    if HYBRIDS.is_dir():
        cases += [p for p in sorted(HYBRIDS.iterdir()) if (p / "config.json").is_file()]
    return cases


@pytest.mark.parametrize("case", _all_cases(), ids=lambda p: p.name)
def test_batched_sequences_equal_one_at_a_time(case, tmp_path):
    """verify batches sequences of one length (prefill and decode steps at B > 1):
    every architecture gives each sequence's logits and block outputs as alone."""
    from hybridconv.verify.onepass import run_sequences

    out = tmp_path / "out"
    convert(str(case), out, dtype="float32")
    model = load(out)
    V = json.loads((out / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(5)
    seqs = [rng.integers(0, V, 20).astype(np.int32) for _ in range(3)] + [rng.integers(0, V, 9).astype(np.int32)]
    n_blocks = len(model.block_kinds())
    alone = list(run_sequences(model, seqs, 4, True, V, batch=False))
    together = list(run_sequences(model, seqs, 4, True, V, 8, n_blocks, batch=True))
    for (g1, h1, k1), (g2, h2, k2) in zip(alone, together):
        assert k1 == k2 == 4 and g1.shape == g2.shape
        assert np.abs(g1 - g2).max() <= 1e-4 + 1e-5 * np.abs(g1).max(), case.name
        assert len(h1) == len(h2) == n_blocks
        for a, b in zip(h1, h2):
            assert a.shape == b.shape
            assert float(mx.abs(a - b).max()) <= 1e-4 + 1e-5 * float(mx.abs(a).max()), case.name


def test_upcast_model_never_holds_both_copies():
    """Weights held in float32 (verify after a float32 reference): each low-precision
    tensor is freed as its float32 copy is made; memory ends at the float32 model."""
    from hybridconv.loading import upcast_model

    d, n = 512, 16
    layers = []
    for i in range(n):
        lin = nn.Linear(d, d, bias=False)
        lin.set_dtype(mx.bfloat16)
        layers.append(lin if i % 2 else nn.QuantizedLinear.from_linear(lin, group_size=64, bits=4))

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = layers

    model = Stack()
    del layers, lin
    mx.eval(model.parameters())
    mx.synchronize()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    assert upcast_model(model) == n
    f32 = n * d * d * 4
    assert all(type(m) is nn.Linear and m.weight.dtype == mx.float32 for m in model.layers)
    after = mx.get_active_memory()
    assert after - before < f32  # the low-precision copies are gone
    assert mx.get_peak_memory() < before + f32 + 2 * d * d * 4  # never both copies at once


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_float32_dequantize_equals_mlx_bit_for_bit(bits):
    """The float32 path's dequantization (shifts and masks for 2/4/8 bits, MLX's kernel
    otherwise) gives mx.dequantize's float32 values exactly, for stacked experts and
    plain matrices, every scale dtype and group size."""
    from hybridconv.float32_compute import _dequantize_f32

    class Layer(dict):
        pass

    for shape, group, dtype in [((3, 16, 256), 64, mx.bfloat16), ((40, 128), 32, mx.float16),
                                ((8, 512), 128, mx.float32)]:
        w = mx.random.normal(shape, key=mx.random.key(bits)).astype(dtype)
        q, s, b = mx.quantize(w, group_size=group, bits=bits)
        layer = Layer(weight=q, scales=s, biases=b)
        layer.group_size, layer.bits, layer.mode = group, bits, "affine"
        want = mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=group, bits=bits)
        got = _dequantize_f32(layer)
        assert got.dtype == mx.float32 and got.shape == want.shape
        assert mx.array_equal(got, want).item(), (bits, shape, group, dtype)
        rows = mx.array([2, 0]) if len(shape) == 3 else mx.array([5, 1, 5])
        assert mx.array_equal(_dequantize_f32(layer, rows), want[rows]).item()


def test_float32_experts_per_expert_products_equal_gather_mm():
    """Rows sorted by expert go through one BLAS product per expert on the float32
    path: the same values as MLX's gather_mm to float32 rounding, experts without rows
    skipped, bias added per row; unsorted (decode) calls keep gather_mm."""
    from hybridconv.float32_compute import _experts_class

    E, O, I, P = 6, 24, 16, 70
    layer = _experts_class()()
    layer.weight = mx.random.normal((E, O, I), key=mx.random.key(1))
    layer.bias = mx.random.normal((E, O), key=mx.random.key(2))
    idx = mx.sort(mx.array(np.random.default_rng(0).choice([0, 2, 3, 5], P).astype(np.uint32)))
    x = mx.random.normal((P, 1, I), key=mx.random.key(3))
    want = mx.gather_mm(x, layer.weight.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=True) \
        + mx.expand_dims(layer.bias[idx], -2)
    got = layer(x, idx, sorted_indices=True)
    assert got.shape == want.shape == (P, 1, O)
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-5).item()
    xu = mx.random.normal((2, 1, 1, 1, I), key=mx.random.key(4))
    iu = mx.array([[[1, 4]], [[0, 0]]], dtype=mx.uint32)
    assert mx.array_equal(layer(xu, iu), mx.gather_mm(xu, layer.weight.swapaxes(-1, -2), rhs_indices=iu)
                          + mx.expand_dims(layer.bias[iu], -2)).item()
