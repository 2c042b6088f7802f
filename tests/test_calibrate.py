"""Calibrated quantization (quant/calibrate.py, scaling.py, gptq.py, learned.py,
calibration.py): the MLX packing bit for bit, the exact folding of scales, each
method's error below round-to-nearest's on a trained checkpoint, the default
path unchanged, the output opening in mlx-lm, and the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from hybridconv.quant import gptq as G
from hybridconv.quant import scaling
from hybridconv.quant.affine import pack

from .conftest import FIXTURES, REPO

TRAINED = REPO / "tests" / "data" / "trained"
HYBRIDS = FIXTURES / "hybrids"
FAST = dict(samples=4, length=64, learn_steps=20)


# --- packing and GPTQ's outputs --------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_and_unpack_are_mlx_packing_bit_for_bit(bits):
    w = mx.array(np.random.default_rng(bits).normal(size=(8, 128)).astype(np.float32))
    wq, s, b = mx.quantize(w, group_size=64, bits=bits)
    codes = G.unpack(np.array(wq), bits, 128)
    assert codes.max() <= 2**bits - 1
    assert np.array_equal(pack(codes, bits), np.array(wq))
    deq = G.dequantize(np.array(wq), np.array(s), np.array(b), bits, 64)
    assert np.array_equal(deq, np.array(mx.dequantize(wq, s, b, group_size=64, bits=bits)))


@pytest.mark.parametrize("n", [64, 300, 700])
def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse(n):
    """GPTQ's U: upper, positive diagonal, UᵀU = (H + λI)⁻¹ (λ = 1% of the mean diagonal);
    sizes above the triangular inverse's 256-row base case take its halving path."""
    rng = np.random.default_rng(n)
    X = rng.normal(size=(n // 2, n))  # fewer tokens than columns: H singular, the damping decides
    X[:, :3] *= 30
    H = X.T @ X
    U = G.inverse_cholesky(H)
    assert np.array_equal(U, np.triu(U)) and (np.diag(U) > 0).all()
    Hd = H + G.DAMP * np.mean(np.diag(H)) * np.eye(n)
    assert np.abs(U.T @ U @ Hd - np.eye(n)).max() < 1e-8


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_output_is_mlx_affine_and_beats_round_to_nearest(bits):
    rng = np.random.default_rng(0)
    n, cols, rows = 2048, 128, 32
    # correlated inputs with a few heavy channels, as trained activations have
    X = rng.normal(size=(n, cols)) @ (np.eye(cols) + 0.3 * rng.normal(size=(cols, cols)) / np.sqrt(cols))
    X[:, :4] *= 8
    X = X.astype(np.float32)
    W = rng.normal(size=(rows, cols)).astype(np.float32) * 0.05
    H = X.T.astype(np.float64) @ X
    packed, sc, bi, deq = G.gptq(W, H, bits, 64, "BF16")
    # the stored parts are MLX's format: mx.dequantize gives exactly the weights GPTQ used
    assert np.array_equal(sc, np.array(mx.array(sc).astype(mx.bfloat16).astype(mx.float32)))  # bf16 values
    got = mx.dequantize(mx.array(packed), mx.array(sc), mx.array(bi), group_size=64, bits=bits)
    assert np.array_equal(np.array(got), deq)
    # and nn.QuantizedLinear computes with them
    import mlx.nn as nn

    layer = nn.QuantizedLinear(cols, rows, bias=False, group_size=64, bits=bits)
    layer.weight, layer.scales, layer.biases = mx.array(packed), mx.array(sc), mx.array(bi)
    x = mx.array(X[:16])
    assert np.allclose(np.array(layer(x)), X[:16] @ deq.T, rtol=1e-4, atol=1e-4)
    err = lambda Q: float(((X @ (W - Q).T) ** 2).sum())
    _, _, _, rtn = G.rtn(W, bits, 64, "BF16")
    assert err(deq) < 0.9 * err(rtn)


# --- exact folding ---------------------------------------------------------------------


def _float_model(case: str):
    from hybridconv.loading import load

    return load(case)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Float32 conversions of three fixtures (Mamba-2 + MoE, gated DeltaNet, RecurrentGemma)."""
    from hybridconv.convert import convert

    out = {}
    for case in ("hybrids/granitemoehybrid-tiny", "hybrids/qwen3_5-tiny", "recurrent_gemma-tiny"):
        dst = tmp_path_factory.mktemp("conv") / case.split("/")[-1]
        convert(str(FIXTURES / case), dst, dtype="float32")
        out[case] = dst
    return out


@pytest.mark.parametrize("case,expected", [
    ("hybrids/granitemoehybrid-tiny", {"input_layernorm -> mamba.in_proj", "mamba.norm -> mamba.out_proj",
                                       "block_sparse_moe.switch_mlp.up_proj -> block_sparse_moe.switch_mlp.down_proj",
                                       "self_attn.v_proj -> self_attn.o_proj",
                                       "shared_mlp.input_linear (up half) -> shared_mlp.output_linear"}),
    ("hybrids/qwen3_5-tiny", {"linear_attn.norm -> linear_attn.out_proj", "mlp.up_proj -> mlp.down_proj",
                              "self_attn.v_proj -> self_attn.o_proj"}),
    ("recurrent_gemma-tiny", {"mlp_block.up_proj -> mlp_block.down_proj",
                              "temporal_block.v_proj -> temporal_block.o_proj"}),
])
def test_folds_leave_float_logits_unchanged(converted, case, expected):
    """Every fold the table finds, with random power-of-two scales in every block at once:
    the float model's logits are unchanged (bit for bit where the norm has no offset)."""
    model = _float_model(converted[case])
    ids = mx.array(np.random.default_rng(1).integers(0, model.args.vocab_size, size=(2, 24)))
    before = np.array(model(ids))
    rng = np.random.default_rng(2)
    labels = set()
    offset = False
    for layer in model.layers:
        for g in scaling.resolve(layer):
            labels.add(g.label)
            offset |= bool(getattr(scaling.get_module(layer, getattr(g.fold, "norm", "")), "offset", None))
            scaling.apply(layer, g, scaling.random_pow2(g, rng))
    mx.eval(model.parameters())
    after = np.array(model(ids))
    assert expected <= labels
    # the pre-norms feed every projection of the mixer / MLP (the float ones too)
    assert any(l.startswith(("input_layernorm ->", "temporal_pre_norm ->")) for l in labels)
    if case.startswith("hybrids/qwen3_5"):
        assert any("in_proj_b" in l and "in_proj_a" in l and "in_proj_qkv" in l for l in labels)
    if offset:  # (1 + w)/s - 1 rounds in float32
        assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()
    else:
        assert np.array_equal(after, before)


def test_a_fold_missing_a_reader_is_caught(converted):
    """Leaving out one consumer of a norm changes the block: the check refuses the fold."""
    from hybridconv.quant.calibrate import _check_exact

    model = _float_model(converted["hybrids/qwen3_5-tiny"])
    layer = model.layers[0]
    g = next(g for g in scaling.resolve(layer) if g.label.startswith("input_layernorm"))
    g.consumers = [c for c in g.consumers if not c.endswith("in_proj_b")]  # b still reads the unscaled input
    x = mx.array(np.random.default_rng(0).normal(size=(1, 16, model.args.hidden_size)).astype(np.float32))
    assert _check_exact(model, layer, g, [x], [x], np.random.default_rng(0)) > 1e-3


# --- on trained checkpoints ------------------------------------------------------------


def _trained(name: str) -> Path:
    path = TRAINED / name
    if not (path / "training.json").is_file():
        pytest.fail(f"trained checkpoint {path} missing (scripts/train_tiny.py writes it)")
    return path


# Calibration for the KL tests: 16 windows of 128 tokens of calibration.txt (training text),
# 20 learning steps per block; KL measured on 4 x 128 tokens of held-out text.
KL_CAL = dict(samples=16, length=128, learn_steps=20)


@pytest.fixture(scope="module")
def trained_case(tmp_path_factory):
    """Per trained checkpoint (built on first use): its float32 PyTorch reference on
    held-out text and the KL of hybridconv's default 3-bit quantization (round to
    nearest, with the error-minimising ranges: the stronger baseline than mx.quantize's)."""
    from hybridconv.checkpoint import resolve
    from hybridconv.quant.calibration import calibration_tokens
    from hybridconv.quant.run import quantize
    from hybridconv.verify.inputs import Inputs
    from hybridconv.verify.reference import compute_reference

    cache = {}

    def get(name: str):
        if name not in cache:
            ckpt = _trained(name)
            held = calibration_tokens(ckpt, 1024, TRAINED / "heldout.txt", 4, 128)
            ref = compute_reference(resolve(str(ckpt)), Inputs(list(held.sequences), "held-out"), keep_hidden=False)
            out = tmp_path_factory.mktemp("rtn") / name
            quantize(str(ckpt), out, bits=3)
            cache[name] = (ckpt, ref, _kl(out, ref), out)
        return cache[name]

    return get


def _kl(folder: Path, ref) -> float:
    from hybridconv.verify.run import verify_folder

    return verify_folder(folder, ref, decode_steps=0).report["metrics"]["overall"]["kl_mean"]


# Each method where it pays on these checkpoints (measured: README, "Calibrated quantization"):
# GPTQ on both; the activation-aware scales and the learned scales on the Mamba-2/MoE hybrid
# (on the DeltaNet hybrid neither lowers the KL of the default quantizer alone). The three
# together: scripts/compare_quant.py --trained (minutes per row: a benchmark, not a test).
@pytest.mark.parametrize("name,methods", [
    ("qwen3_5_text", ("gptq",)),
    ("granitemoehybrid", ("awq",)),
    ("granitemoehybrid", ("learn",)),
])
def test_each_method_lowers_kl_below_round_to_nearest(trained_case, tmp_path, name, methods):
    from hybridconv.quant.calibrate import CalibrationOptions
    from hybridconv.quant.run import quantize

    ckpt, ref, rtn_kl, default_out = trained_case(name)
    out = tmp_path / "q"
    opts = CalibrationOptions(file=TRAINED / "calibration.txt", methods=methods, **KL_CAL)
    res = quantize(str(ckpt), out, bits=3, calibration=opts)
    kl = _kl(out, ref)
    assert kl < rtn_kl, f"{name} {methods}: KL {kl} not below round-to-nearest's {rtn_kl}"
    record = json.loads((out / "conversion.json").read_text())["quantization"]["calibration"]
    assert record["methods"] == list(methods)
    assert json.loads((out / "config.json").read_text())["hybridconv"]["calibration"] == "+".join(methods)
    blocks = record["blocks"]
    if "awq" in methods:  # every fold applied lowered its consumers' rounding error, and kept the block exact
        folds = [f for b in blocks for f in b.get("folds", [])]
        assert folds and all(f["error_ratio"] < 1 for f in folds)
        assert all(b.get("fold_relative_change", 0) < 1e-5 for b in blocks)
    if "learn" in methods:  # kept only where the held-back windows' block error fell
        learned = [b["learn"] for b in blocks if "learn" in b]
        assert any(r["kept"] for r in learned)
        assert all(r["held_out_error_after"] < r["held_out_error_before"] for r in learned if r["kept"])
    # same plan, same bits per weight as without calibration
    assert res.plan.summary()["bits_per_weight"] == pytest.approx(
        json.loads((out / "config.json").read_text())["hybridconv"]["bits_per_weight"])
    _protected_as_default(out, default_out)


def test_gptq_chooses_a_tied_embeddings_codes_for_the_head(trained_case, tmp_path):
    """RecurrentGemma's head is its embedding matrix: with ``gptq`` its codes come from GPTQ
    on the final norm's outputs, so the logits' error on held-out text (the float model's
    final hidden states times the rounding error of the matrix) is below round-to-nearest's,
    and the model's KL too; the record names the tensor and the tokens."""
    from hybridconv.convert import convert
    from hybridconv.loading import load
    from hybridconv.quant.calibrate import CalibrationOptions
    from hybridconv.quant.calibration import calibration_tokens
    from hybridconv.quant.run import quantize

    ckpt, ref, rtn_kl, default_out = trained_case("recurrent_gemma")
    out = tmp_path / "q"
    quantize(str(ckpt), out, bits=3,
             calibration=CalibrationOptions(file=TRAINED / "calibration.txt", methods=("gptq",), **KL_CAL))
    head = json.loads((out / "conversion.json").read_text())["quantization"]["calibration"]["head"]
    name = "model.embed_tokens.weight"
    assert head["method"] == "gptq" and head["tied"] is True and head["tensor"] == name
    assert head["tokens"] == KL_CAL["samples"] * KL_CAL["length"]
    _protected_as_default(out, default_out)
    convert(str(ckpt), tmp_path / "float")
    model = load(tmp_path / "float", compute="float32")
    E = np.array(model.model.embed_tokens.weight.astype(mx.float32))
    hs = []
    for ids in calibration_tokens(ckpt, 1024, TRAINED / "heldout.txt", 4, 128).sequences:
        h = x0 = model.embed(mx.array(np.asarray(ids)[None]))
        for layer in model.layers:
            h = model.call_layer(layer, h, None, x0)
        hs.append(np.array(model.final_norm(h.astype(mx.float32), mx.float32)).reshape(-1, E.shape[1]))
    h = np.concatenate(hs)

    def head_error(folder):
        w = mx.load(str(folder / "model.safetensors"))
        base = name.removesuffix(".weight")
        deq = mx.dequantize(w[name], w[base + ".scales"], w[base + ".biases"], group_size=64, bits=3)
        return float((((E - np.array(deq.astype(mx.float32))) @ h.T) ** 2).sum())

    assert head_error(out) < head_error(default_out)
    kl = _kl(out, ref)
    assert kl < rtn_kl, f"KL {kl} not below round-to-nearest's {rtn_kl}"


def test_gptq_in_pieces_of_rows_is_gptq_whole(monkeypatch):
    """Rows go through GPTQ a piece at a time (bounded memory for a 256k-row embedding):
    the same codes, scales and biases as all rows at once."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(512, 128)).astype(np.float32)
    X[:, :3] *= 10
    H = X.T.astype(np.float64) @ X
    W = (rng.normal(size=(37, 128)) * 0.05).astype(np.float32)
    whole = G.gptq(W, H, 4, 64, "BF16")
    monkeypatch.setattr(G, "ROW_BYTES", 5 * 128 * 8)  # 5 rows a piece: 8 pieces, the last of 2
    pieces = G.gptq(W, H, 4, 64, "BF16")
    for a, b in zip(whole, pieces):
        assert np.array_equal(a, b)


# --- widths by measured sensitivity -----------------------------------------------------


def test_allocation_fits_the_budget_and_is_optimal_on_small_cases():
    """The width choice never exceeds the budget, is never worse than the planned widths,
    and on small cases (2-5 matrices, where a knapsack heuristic has least room) finds the
    brute force's optimum in most cases and stays within 1.5x of it in all."""
    import itertools

    from hybridconv.quant.widths import allocate

    rng = np.random.default_rng(0)
    optimal = 0
    for trial in range(40):
        n = int(rng.integers(2, 6))
        options = {}
        for i in range(n):
            size = int(rng.integers(1, 20))
            sens = float(rng.lognormal(0, 2))
            options[f"m{i}"] = [(b, size * b, sens * 4.0 ** -b) for b in (2, 3, 4)]
        budget = sum(size_b for size_b in (o[1][1] for o in options.values()))  # everything at 3 bits
        got = allocate(options, budget)
        bits = lambda ch: sum(next(o[1] for o in options[k] if o[0] == w) for k, w in ch.items())
        cost = lambda ch: sum(next(o[2] for o in options[k] if o[0] == w) for k, w in ch.items())
        assert bits(got) <= budget
        best = min((dict(zip(options, ws)) for ws in itertools.product((2, 3, 4), repeat=n)
                    if bits(dict(zip(options, ws))) <= budget), key=cost)
        assert cost(got) <= cost(best) * 1.5, (trial, got, best)
        optimal += cost(got) <= cost(best) * (1 + 1e-9)
        assert cost(got) <= cost({k: 3 for k in options}) + 1e-12  # never worse than the planned widths
    assert optimal >= 32


@pytest.fixture(scope="module")
def widths_output(tmp_path_factory):
    """The trained Mamba-2/MoE hybrid at 3 bits, widths only (round to nearest), with a
    user's --bits-for and --keep; and the default output of the same plan."""
    from hybridconv.quant.calibrate import CalibrationOptions
    from hybridconv.quant.run import quantize

    ckpt = _trained("granitemoehybrid")
    base = tmp_path_factory.mktemp("widths")
    plan = dict(bits=3, bits_for=["*.layers.1.shared_mlp.output_linear*=5"], keep=["*.self_attn.q_proj*"])
    res = quantize(str(ckpt), base / "w", calibration=CalibrationOptions(
        file=TRAINED / "calibration.txt", samples=8, length=128, methods=("widths",)), **plan)
    default = quantize(str(ckpt), base / "d", **plan)
    return base / "w", base / "d", res, default


def test_widths_stay_within_the_plans_bits_and_keep_fixed_tensors(widths_output):
    from hybridconv.loading import load

    out, default_out, res, default = widths_output
    planned = default.plan.bits_per_weight
    rec = json.loads((out / "conversion.json").read_text())["quantization"]
    w = rec["calibration"]["widths"]
    # bits per weight: never above the plan's, within 0.05 of it
    assert res.plan.bits_per_weight <= planned and planned - res.plan.bits_per_weight <= 0.05
    assert w["bits_per_weight"] == pytest.approx(res.plan.bits_per_weight, abs=1e-4)
    assert w["moved"]["up"] > 0 and w["moved"]["down"] > 0
    assert w["estimated_cost_chosen"] < w["estimated_cost_planned"]
    rows = {r["tensor"]: r for r in rec["plan"]}
    want = {r["tensor"]: r for r in json.loads((default_out / "conversion.json").read_text())["quantization"]["plan"]}
    moved = {r["tensor"] for r in w["tensors"] if r["bits"] != r["planned_bits"]}
    for name, r in want.items():
        if r["decision"] != "quantize" or r["reason"].startswith("--bits-for"):
            # protected, float, --keep and --bits-for tensors: as planned
            assert rows[name] == r, name
            assert name not in moved
        else:
            assert abs(rows[name]["bits"] - 3) <= 1
            assert (rows[name]["bits"] != 3) == (name in moved)
    assert rows["model.layers.1.shared_mlp.output_linear.weight"]["bits"] == 5
    assert rows["model.layers.1.self_attn.q_proj.weight"]["decision"] == "float"
    _protected_as_default(out, default_out, widths=True)
    # config.json's per-layer entries are the chosen widths (mlx-lm's convention), and the folder loads
    q = json.loads((out / "config.json").read_text())["quantization"]
    for name in moved:
        assert q[name.removesuffix(".weight")] == {"group_size": 64, "bits": rows[name]["bits"], "mode": "affine"}
    # mlx-lm's own granitemoehybrid opens it (the per-layer entries) and computes what
    # hybridconv's model of the folder computes (both in float32: the bf16 activations'
    # rounding aside)
    from mlx_lm.utils import load_model

    ids = mx.array(np.random.default_rng(0).integers(0, 1024, size=(1, 32)))
    ours = np.array(load(out, compute="float32")(ids).astype(mx.float32))
    theirs_model, _ = load_model(out)
    assert type(theirs_model).__module__ == "mlx_lm.models.granitemoehybrid"
    theirs_model.set_dtype(mx.float32)
    theirs = np.array(theirs_model(ids).astype(mx.float32))
    assert np.abs(ours - theirs).max() < 1e-5 * np.abs(ours).max()


def test_widths_head_kl_in_pieces_measures_what_it_measures_whole(tmp_path, monkeypatch):
    """The head's KL goes a few tokens at a time (a 256k vocabulary's logits are 1 MB per
    token) and its matrix a few rows at a time (each candidate kept packed): pieces of 3
    tokens and of 100 rows (the last one short) give the costs that whole batches and the
    whole matrix give."""
    from hybridconv.quant import widths as W
    from hybridconv.quant.calibrate import CalibrationOptions
    from hybridconv.quant.run import quantize

    got = []
    real = W.measure
    monkeypatch.setattr(W, "measure", lambda *a, **k: got.append(real(*a, **k)) or got[-1])
    ckpt = _trained("qwen3_5_text")  # an untied head: its own candidates' KL
    opts = CalibrationOptions(file=TRAINED / "calibration.txt", samples=4, length=64, methods=("widths",))
    quantize(str(ckpt), tmp_path / "whole", bits=3, calibration=opts)
    monkeypatch.setattr(W, "LOGIT_BYTES", 4 * 1024 * 3)  # vocabulary 1024: 3 tokens per piece
    monkeypatch.setattr(W, "ROW_CHUNK", 100)  # 11 pieces of the head, the last of 24 rows
    quantize(str(ckpt), tmp_path / "pieces", bits=3, calibration=opts)
    whole, pieces = got
    assert pieces["costs"].keys() == whole["costs"].keys() and "lm_head.weight" in whole["costs"]
    for name, row in whole["costs"].items():
        for bits, cost in row.items():
            assert pieces["costs"][name][bits] == pytest.approx(cost, rel=1e-4, abs=1e-9), (name, bits)
    assert pieces["kl_per_squared_error"] == pytest.approx(whole["kl_per_squared_error"], rel=1e-4)


def test_widths_head_kl_of_several_candidates_in_one_pass_is_each_alone(tmp_path, monkeypatch):
    """The widths pass measures the planned stream's KL and every head candidate's in one
    pass over the tokens (the float logits computed once per piece of tokens): each sum is
    the one that job gives alone, to the last bit, in pieces of tokens and of rows."""
    import mlx.core as mx

    from hybridconv.convert import convert
    from hybridconv.loading import load
    from hybridconv.quant import widths as W
    from hybridconv.quant.modes import QuantSpec

    convert(str(_trained("recurrent_gemma")), tmp_path / "float", dtype="float32")
    model = load(tmp_path / "float", lazy=True)
    weight = getattr(model.trunk, model.embedding_name)["weight"]  # tied: the head
    h = weight.shape[1]
    xf = [mx.random.normal((2, 5, h), key=mx.random.key(0)), mx.random.normal((1, 7, h), key=mx.random.key(1))]
    xu = [x + 0.1 * mx.random.normal(x.shape, key=mx.random.key(2)) for x in xf]
    monkeypatch.setattr(W, "LOGIT_BYTES", 4 * int(weight.shape[0]) * 3)  # 3 tokens per piece
    monkeypatch.setattr(W, "ROW_CHUNK", 300)  # pieces of the head's rows, the last short
    head = W.HeadKL(model, weight, xf)
    jobs = [(xu, None)] + [(xf, QuantSpec(b, 32)) for b in (3, 4, 5)]
    calls = []
    together = head.kl_sums(jobs, "F32", check=lambda: calls.append(1))
    alone = [head.kl_sum(stream, spec, "F32") for stream, spec in jobs]
    assert together == alone
    assert all(v > 0 for v in together) and together[1] > together[2] > together[3]  # fewer bits, more KL
    assert len(calls) == 4 + 3  # the check once per piece of 3 tokens: 10 tokens in 4, 7 in 3


@pytest.mark.parametrize("name", ["granitemoehybrid", "qwen3_5_text"])
def test_widths_lower_the_kl_of_calibrated_uniform_widths(trained_case, tmp_path, name):
    """On a trained checkpoint at 3 bits: GPTQ with widths by sensitivity has a lower KL
    than GPTQ at the plan's uniform widths, at no more bits per weight."""
    from hybridconv.quant.calibrate import CalibrationOptions
    from hybridconv.quant.run import quantize

    ckpt, ref, rtn_kl, default_out = trained_case(name)
    kl, bpw = {}, {}
    for methods in (("gptq",), ("widths", "gptq")):
        out = tmp_path / "+".join(methods)
        opts = CalibrationOptions(file=TRAINED / "calibration.txt", methods=methods, **KL_CAL)
        bpw[methods] = quantize(str(ckpt), out, bits=3, calibration=opts).plan.bits_per_weight
        kl[methods] = _kl(out, ref)
    assert bpw[("widths", "gptq")] <= bpw[("gptq",)]
    assert kl[("widths", "gptq")] < kl[("gptq",)], kl


def _protected_as_default(out: Path, default_out: Path, widths: bool = False) -> None:
    """The calibrated output keeps the default output's plan: the same quantization config
    (with ``widths``: the same defaults and float entries, a free matrix's width at most one
    bit off the plan's), every tensor the policy keeps in float32 (SSM / recurrence dynamics)
    identical, bit for bit, and every other unquantized tensor unquantized (a fold may change
    a norm's values, exactly compensated: test_folds_leave_float_logits_unchanged)."""
    cfg = json.loads((out / "config.json").read_text())
    want_q = json.loads((default_out / "config.json").read_text())["quantization"]
    if widths:
        got_q = cfg["quantization"]
        assert {k: v for k, v in got_q.items() if not isinstance(v, dict)} == \
            {k: v for k, v in want_q.items() if not isinstance(v, dict)}
        assert all(abs(v["bits"] - want_q.get(k, want_q)["bits"]) <= 1 for k, v in got_q.items() if isinstance(v, dict))
    else:
        assert cfg["quantization"] == want_q
    plan = json.loads((default_out / "conversion.json").read_text())["quantization"]["plan"]
    got = mx.load(str(out / "model.safetensors"))
    want = mx.load(str(default_out / "model.safetensors"))
    kept32 = [r["tensor"] for r in plan if r["decision"] != "quantize" and r["dtype"] == "float32"]
    assert kept32
    for name in kept32:
        assert got[name].dtype == mx.float32 and np.array_equal(np.array(got[name]), np.array(want[name])), name
    for r in plan:
        if r["decision"] != "quantize":
            assert r["tensor"].removesuffix(".weight") + ".scales" not in got, r["tensor"]


def test_no_method_is_the_default_quantizer_byte_for_byte(tmp_path):
    """The calibrated path with no method writes exactly the default output's weights:
    the store and its writer add nothing of their own."""
    from hybridconv.quant.calibrate import CalibrationOptions
    from hybridconv.quant.run import quantize

    src = str(HYBRIDS / "granitemoehybrid-tiny")
    quantize(src, tmp_path / "a", bits=4)
    quantize(src, tmp_path / "b", bits=4, calibration=CalibrationOptions(methods=(), samples=2, length=32))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_calibrated_output_opens_in_mlx_lm_and_passes_verify(tmp_path):
    """A calibrated 4-bit trained RecurrentGemma (bf16): mlx-lm, running the model the
    folder carries (--mlx-lm-code always), computes what hybridconv computes, and verify
    passes its default gates against the PyTorch reference. (mlx-lm's own
    recurrent_gemma refuses any bf16 hybridconv output, calibrated or not: its RG-LRU
    scan asserts the float32 ``recurrent_param`` has the activations' dtype.)"""
    from hybridconv.checkpoint import resolve
    from hybridconv.loading import load
    from hybridconv.quant.calibrate import CalibrationOptions
    from hybridconv.quant.run import quantize
    from hybridconv.verify.inputs import inputs_for
    from hybridconv.verify.reference import compute_reference
    from hybridconv.verify.run import verify_folder
    from mlx_lm.utils import load_model

    ckpt = _trained("recurrent_gemma")
    out = tmp_path / "q"
    quantize(str(ckpt), out, bits=4, mlx_lm_code="always",
             calibration=CalibrationOptions(file=TRAINED / "calibration.txt", **FAST))
    quantize(str(ckpt), tmp_path / "default", bits=4)
    _protected_as_default(out, tmp_path / "default", widths=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hybridconv"]["calibration"] == "widths+awq+gptq+learn"
    # the widths chosen are mlx-lm's per-layer entries ({"group_size", "bits"} per module), both ways
    per_layer = {k: v["bits"] for k, v in cfg["quantization"].items() if isinstance(v, dict)}
    assert {3, 5} <= set(per_layer.values())
    ids = mx.array(np.random.default_rng(0).integers(0, 1024, size=(1, 32)))
    ours = np.array(load(out)(ids).astype(mx.float32))
    theirs_model, _ = load_model(out, trust_remote_code=True)
    theirs = np.array(theirs_model(ids).astype(mx.float32))
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(ours).max()
    ref = compute_reference(resolve(str(ckpt)), inputs_for(ckpt))
    outcome = verify_folder(out, ref)
    assert outcome.passed, [g for g in outcome.report["gates"] if not g["passed"]]


# --- calibration text ------------------------------------------------------------------


def test_calibration_text_and_jsonl(tmp_path):
    from hybridconv.errors import UsageError
    from hybridconv.quant.calibration import builtin_sample, calibration_tokens, read_text

    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "alpha beta"}\n"gamma"\n{"prompt": "p", "completion": "c"}\n'
                 '{"messages": [{"role": "user", "content": "m1"}, {"content": "m2"}]}\n')
    assert read_text(f) == "alpha beta\n\ngamma\n\np\nc\n\nm1\nm2"
    t = tmp_path / "c.txt"
    t.write_text("plain text, {not json}\n")
    assert read_text(t) == "plain text, {not json}\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"other": 1}\n')
    with pytest.raises(UsageError, match=r"bad.jsonl:2"):
        read_text(bad)
    text, what = builtin_sample()
    assert len(text) > 10_000 and "standard-library" in what
    cal = calibration_tokens(HYBRIDS / "qwen3_5-tiny", 256, None, 3, 32)
    assert cal.sequences.shape == (3, 32) and cal.sequences.dtype == np.int32
    short = tmp_path / "short.txt"
    short.write_text("hi")
    with pytest.raises(UsageError, match="need at least"):
        calibration_tokens(HYBRIDS / "qwen3_5-tiny", 256, short, 3, 32)


def test_cli_calibration_options(tmp_path):
    import subprocess
    import sys

    def run(*args):
        r = subprocess.run([sys.executable, "-m", "hybridconv", "quantize", *map(str, args)],
                           capture_output=True, text=True)
        return r.returncode, r.stdout + r.stderr

    src = HYBRIDS / "qwen3_5-tiny"
    code, out = run(src, "-o", tmp_path / "a", "--calibration-samples", "4")
    assert code == 2 and "need --calibrate" in out
    code, out = run(src, "-o", tmp_path / "a", "--calibrate", "--mode", "mxfp4")
    assert code == 2 and "affine mode only" in out
    code, out = run(src, "-o", tmp_path / "a", "--calibrate", "--calibrate-methods", "awq,foo")
    assert code == 2 and "foo" in out
    code, out = run(src, "-o", tmp_path / "a", "--calibration", tmp_path / "none.txt")
    assert code == 2 and "not found" in out
    (tmp_path / "empty.txt").write_text("\n  \n")
    code, out = run(src, "-o", tmp_path / "a", "--calibration", tmp_path / "empty.txt")
    assert code == 2 and "empty.txt: the file is empty" in out and "Traceback" not in out
    assert not (tmp_path / "a").exists()
    text = tmp_path / "cal.txt"
    text.write_text((REPO / "README.md").read_text()[:20000])
    code, out = run(src, "-o", tmp_path / "b", "--bits", "4", "--calibration", text, "--calibration-samples", "2",
                    "--calibration-length", "32", "--calibrate-methods", "gptq")
    assert code == 0, out
    assert "calibrated (gptq)" in out and "Traceback" not in out
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["hybridconv"]["calibration"] == "gptq"


def test_target_kl_searches_with_calibration(tmp_path):
    """--target-kl with --calibrate: the candidate measured is the calibrated one (its KL
    is the written output's), and the output records the calibration."""
    from hybridconv.checkpoint import resolve
    from hybridconv.quant.calibrate import CalibrationOptions
    from hybridconv.quant.run import search_target_kl
    from hybridconv.verify.inputs import inputs_for
    from hybridconv.verify.reference import compute_reference

    src = HYBRIDS / "qwen3_5-tiny"
    ref = compute_reference(resolve(str(src)), inputs_for(src), keep_hidden=False)
    opts = CalibrationOptions(methods=("widths", "gptq"), samples=2, length=32)
    res = search_target_kl(str(src), tmp_path / "q", 10.0, ref, calibration=opts)
    assert res.result is not None and len(res.search) == 1  # the smallest candidate meets a loose target
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["hybridconv"]["calibration"] == "widths+gptq"
    # the written winner is the candidate measured (its widths chosen again from the plan's, not moved twice)
    assert _kl(tmp_path / "q", ref) == pytest.approx(res.search[0]["kl_mean"], rel=1e-6)
    assert cfg["hybridconv"]["bits_per_weight"] <= res.search[0]["bits_per_weight"]
    base = cfg["quantization"]["bits"]
    assert all(abs(v["bits"] - base) <= 1 for v in cfg["quantization"].values() if isinstance(v, dict))
