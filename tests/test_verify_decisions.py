"""verify's own decisions, each pinned by a case built to need it (issue 28):

* the gate table: :data:`hybridconv.verify.gates.GATES` is the one source, the
  README's table is generated from it and must match it;
* the rank gates over *decisive* tokens: a fixture-derived model with a
  sharpened head (its final norm scaled, so the next-token distributions are
  peaked and decisive tokens exist for top-1 and top-5), and references derived
  from its logits by known permutations, so that the decisive counts, top-1
  agreement and top-5 overlap have exact expected values computed here;
* the decode check: a fault injected only into the one-step (cached) path of the
  gated delta rule on Qwen3-Next fails verify naming the decode check, and the
  decode steps are shown to run through the caches;
* the second block stage (own errors) deciding the block gate on PLaMo-2 and
  Zamba2 at 4 bits (OLMo-Hybrid's case is in test_arch_olmo_hybrid.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from hybridconv.checkpoint import resolve
from hybridconv.convert import convert
from hybridconv.verify.inputs import build_inputs
from hybridconv.verify.reference import compute_reference, read_reference_file
from hybridconv.verify.run import verify_folder

from .conftest import REPO, hybrid_case

# --- the gate table: one source -----------------------------------------------------------

README_GATE_HEADER = "| precision | max KL mean |"
README_KEYS = ("max_kl_mean", "max_kl_p99", "min_top1", "min_top5", "max_block_error")
README_PRECISIONS = {"float32": ["float32"], "bfloat16 / float16": ["bfloat16", "float16"], "8-bit": ["8bit"],
                     "6-bit": ["6bit"], "5-bit": ["5bit"], "4-bit": ["4bit"], "3-bit": ["3bit"], "2-bit": ["2bit"]}


def readme_gate_table() -> list[str]:
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(README_GATE_HEADER))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return lines[start:end]


def readme_gates() -> dict[str, dict[str, float]]:
    """precision -> gates, as the README's table states them."""
    out = {}
    for line in readme_gate_table()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for precision in README_PRECISIONS[cells[0]]:
            out[precision] = dict(zip(README_KEYS, map(float, cells[1:])))
    return out


def test_readme_gate_table_is_generated_from_gates_py():
    from hybridconv.verify.gates import markdown_table

    assert "\n".join(readme_gate_table()) + "\n" == markdown_table(), (
        "README's gate table differs from hybridconv/verify/gates.py: regenerate it with "
        "`python -m hybridconv.verify.gates`"
    )


def test_gates_applied_are_the_readme_table():
    """What verify applies for each precision (gates_for) is the README's row, read
    as numbers: the formatting above cannot hide a changed gate."""
    from hybridconv.verify.gates import GATES, gates_for

    table = readme_gates()
    assert set(table) == set(GATES)
    for precision, row in table.items():
        assert gates_for(precision).to_dict() == pytest.approx(row, rel=1e-12), precision


# --- the rank gates over decisive tokens --------------------------------------------------

SHARPEN = 5.0  # final norm x5: median top-2 gap 0.2 -> 1.0 nats on mamba2-tiny
SHARP_CASE = "mamba2-tiny"
SHARP_NORM = "backbone.norm_f.weight"
GAP = 0.5  # README: decisive = the reference's two best (5th and 6th best) logits differ by >= 0.5 nats
MIN_DECISIVE = 16  # README: a rank gate with fewer decisive tokens is skipped
NO_KL = {"max_kl_mean": 1e9, "max_kl_p99": 1e9}  # the permuted references below are far from the model in KL


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """(float32 conversion, PyTorch reference) of mamba2-tiny with a sharpened head."""
    from safetensors.numpy import load_file, save_file

    root = tmp_path_factory.mktemp("sharp")
    src = root / "src"
    shutil.copytree(hybrid_case(SHARP_CASE), src)
    w = load_file(str(src / "model.safetensors"))
    w[SHARP_NORM] = w[SHARP_NORM] * np.float32(SHARPEN)
    save_file(w, str(src / "model.safetensors"), metadata={"format": "pt"})
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    ref = compute_reference(resolve(str(src)), build_inputs(src, vocab, random_tokens=48, num_sequences=2, seed=0),
                            keep_hidden=False)
    out = root / "f32"
    convert(str(src), out, dtype="float32")
    return out, ref


def _gaps(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = -np.sort(-np.asarray(logits, dtype=np.float64), axis=-1)
    return s[:, 0] - s[:, 1], s[:, 4] - s[:, 5]


def _checks(report) -> dict:
    return {c["gate"]: c for c in report["checks"]}


def test_decisive_tokens_counted_at_half_a_nat(sharp):
    """The sharpened model has tokens decisive for top-1 and top-5 (the rank gates
    run) and tokens whose gap lies between 0.5 and 5 nats: verify's counts are the
    counts at exactly 0.5 nats, computed here from the reference's logits."""
    out, ref = sharp
    logits = np.concatenate([o["logits"] for o in ref.outputs])
    g1, g5 = _gaps(logits)
    n1, n5 = int((g1 >= GAP).sum()), int((g5 >= GAP).sum())
    assert n1 >= MIN_DECISIVE and n5 >= MIN_DECISIVE, (n1, n5)  # measured 68 and 35 of 96
    assert int((g1 >= 10 * GAP).sum()) < n1 and int((g5 >= 10 * GAP).sum()) < n5  # a threshold moved shows
    report = verify_folder(out, ref).report
    assert report["verdict"] == "pass", report["failure_reasons"]
    o = report["metrics"]["overall"]
    assert (o["decisive_tokens"], o["decisive_tokens_top5"]) == (n1, n5)
    checks = _checks(report)
    assert "skipped_gates" not in report, report.get("skipped_gates")
    # a float32 conversion agrees on every decisive token
    assert checks["min_top1"]["value"] == 1.0 and checks["min_top5"]["value"] == 1.0
    assert checks["min_top1"]["threshold"] == 0.99 and checks["min_top5"]["threshold"] == 0.95


def _permuted(ref, how):
    """A reference whose logits are ``ref``'s with, per token, some values swapped
    between vocabulary entries (``how(i)`` -> (rank a, rank b) to swap, or None).
    Swapping permutes each row's values, so its sorted logits — and which tokens
    are decisive — stay ``ref``'s; only which tokens rank where changes."""
    outputs, i = [], 0
    for o in ref.outputs:
        lg = np.array(o["logits"], dtype=np.float32)
        order = np.argsort(-lg, axis=-1)
        for t in range(lg.shape[0]):
            swap = how(i)
            if swap is not None:
                a, b = order[t, swap[0]], order[t, swap[1]]
                lg[t, a], lg[t, b] = lg[t, b], lg[t, a]
            i += 1
        outputs.append({"logits": lg})
    return dataclasses.replace(ref, outputs=outputs, hidden_files=None, _tmp=None)


# token i: 0 unchanged; 1: the best two swapped (top-1 differs, the top-5 set is
# the same); 2: the best and the 6th swapped (top-1 differs, 4 of the top 5 shared)
CASES = {0: None, 1: (0, 1), 2: (0, 5)}
TOP1 = {0: 1.0, 1: 0.0, 2: 0.0}
TOP5 = {0: 1.0, 1: 1.0, 2: 0.8}


def _expected(ref):
    """The rank metrics verify must report against ``_permuted(ref, ...)``, from the
    construction: the float32 model ranks as ``ref`` does wherever ``ref`` is decisive."""
    logits = np.concatenate([o["logits"] for o in ref.outputs])
    g1, g5 = _gaps(logits)
    case = np.arange(len(logits)) % 3
    d1, d5 = g1 >= GAP, g5 >= GAP
    top1 = float(np.mean([TOP1[c] for c in case[d1]]))
    top5 = float(np.mean([TOP5[c] for c in case[d5]]))
    return int(d1.sum()), int(d5.sum()), top1, top5


def test_top1_and_top5_agreement_on_decisive_tokens(sharp):
    out, ref = sharp
    n1, n5, top1, top5 = _expected(ref)
    assert 0 < top1 < top5 < 1  # measured 0.35 and 0.94: top-5 overlap is not top-1 agreement
    permuted = _permuted(ref, lambda i: CASES[i % 3])
    report = verify_folder(out, permuted, gate_overrides={**NO_KL, "min_top1": 0.0, "min_top5": 0.0}).report
    o = report["metrics"]["overall"]
    assert (o["decisive_tokens"], o["decisive_tokens_top5"]) == (n1, n5)
    assert o["top1_agreement_decisive"] == pytest.approx(top1, abs=1e-12)
    assert o["top5_overlap_decisive"] == pytest.approx(top5, abs=1e-12)
    checks = _checks(report)
    assert checks["min_top1"]["value"] == pytest.approx(top1, abs=1e-12)
    assert checks["min_top5"]["value"] == pytest.approx(top5, abs=1e-12)
    assert report["verdict"] == "pass", report["failure_reasons"]


def test_the_top5_gate_decides(sharp):
    """top-1 agreement passes its gate, top-5 overlap is just under its own: verify
    fails, on min_top5 alone."""
    out, ref = sharp
    _, _, top1, top5 = _expected(ref)
    permuted = _permuted(ref, lambda i: CASES[i % 3])
    gates = {**NO_KL, "min_top1": top1 - 0.01, "min_top5": top5 + 0.01}
    report = verify_folder(out, permuted, gate_overrides=gates).report
    assert report["verdict"] == "fail"
    assert [r.split(":")[0] for r in report["failure_reasons"]] == ["min_top5"], report["failure_reasons"]
    gates = {**NO_KL, "min_top1": top1 + 0.01, "min_top5": top5 - 0.01}
    report = verify_folder(out, permuted, gate_overrides=gates).report
    assert [r.split(":")[0] for r in report["failure_reasons"]] == ["min_top1"], report["failure_reasons"]


def test_rank_gates_skipped_without_enough_decisive_tokens(sharp):
    """The same logits un-sharpened (divided by 5): too few decisive tokens, so
    the rank gates are skipped and the report says why."""
    out, ref = sharp
    flat = dataclasses.replace(ref, outputs=[{"logits": np.asarray(o["logits"]) / SHARPEN} for o in ref.outputs],
                               hidden_files=None, _tmp=None)
    g1, g5 = _gaps(np.concatenate([o["logits"] for o in flat.outputs]))
    assert int((g5 >= GAP).sum()) < MIN_DECISIVE
    report = verify_folder(out, flat, gate_overrides=NO_KL).report
    skipped = {s["gate"]: s["reason"] for s in report.get("skipped_gates", [])}
    assert "min_top5" in skipped and "min_top5" not in _checks(report)
    assert "0.5 nats" in skipped["min_top5"], skipped
    assert ("min_top1" in skipped) == (int((g1 >= GAP).sum()) < MIN_DECISIVE)


# --- the decode check: a fault only in the cached one-step path ---------------------------

QN = "qwen3_next-tiny"


@pytest.fixture(scope="module")
def qwen3_next(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen3_next") / "f32"
    convert(str(hybrid_case(QN)), out, dtype="float32")
    return out


def _spy_step(monkeypatch, fault=None):
    """Wrap the gated delta rule's one-step recurrence (decode only: prefill runs the
    chunked form); ``fault(call_index, args)`` may change its arguments. Returns the
    list of calls (query shape, whether a state came in from a cache)."""
    import hybridconv.models.gated_delta as gd

    real = gd.gated_delta_step
    calls: list = []

    def step(q, k, v, g, beta, state, *, scale=None):
        calls.append((tuple(q.shape), state is not None))
        if fault is not None:
            q, k, v, g, beta = fault(len(calls), (q, k, v, g, beta))
        return real(q, k, v, g, beta, state, scale=scale)

    monkeypatch.setattr(gd, "gated_delta_step", step)
    return calls


def _delta_layers(folder: Path) -> int:
    import hybridconv

    return hybridconv.load(folder).block_kinds().count("delta")


def test_decode_steps_run_through_the_caches(qwen3_next, monkeypatch):
    """A correct model passes; the decode check's steps ran one token at a time
    through the caches (the delta rule's one-step form, with the prefill's state),
    and the decode gate is among the checks."""
    ref = read_reference_file(hybrid_case(QN) / "expected.safetensors")
    calls = _spy_step(monkeypatch)
    report = verify_folder(qwen3_next, ref, decode_steps=8).report
    assert report["verdict"] == "pass", report["failure_reasons"]
    n_delta = _delta_layers(qwen3_next)
    assert n_delta >= 1
    # one call per decode step and delta layer, each a single token continuing a cached state
    assert len(calls) == 8 * n_delta * len(ref.sequences), calls
    assert all(shape[1] == 1 and cached for shape, cached in calls), calls
    assert report["decode"]["steps_per_sequence"] == 8
    gate = _checks(report)["decode_kl_max"]
    assert gate["threshold"] == report["thresholds"]["max_kl_p99"] and gate["passed"]


def test_a_decode_only_fault_fails_verify_naming_the_decode_check(qwen3_next, monkeypatch):
    """The delta rule's decode step with β halved: prefill is untouched, generation
    is wrong. verify must fail it, and say the decode check failed."""
    ref = read_reference_file(hybrid_case(QN) / "expected.safetensors")
    calls = _spy_step(monkeypatch, fault=lambda i, a: (*a[:4], a[4] * 0.5))
    report = verify_folder(qwen3_next, ref, decode_steps=8).report
    assert calls, "the decode steps never reached the one-step recurrence"
    assert report["verdict"] == "fail"
    assert any(r.startswith("decode_kl_max:") for r in report["failure_reasons"]), report["failure_reasons"]
    assert report["decode"]["kl_max"] > 1e-3  # measured 0.147


def test_the_decode_gate_alone_catches_one_bad_step(qwen3_next, monkeypatch):
    """A fault in the very last call of the one-step recurrence (the last decode
    step of the last delta layer: v scaled by 4), on 2 x 128 tokens: at most two
    bad tokens among 256 move neither the mean nor the p99 (the 99th percentile of
    256 values interpolates between the 253rd and 254th), so with those gates at
    1e-3 the decode gate alone must fail it. Measured: decode KL 0.013, mean 6e-5,
    p99 4e-12."""
    src = resolve(str(hybrid_case(QN)))
    vocab = json.loads((src.path / "config.json").read_text())["vocab_size"]
    ref = compute_reference(src, build_inputs(src.path, vocab, random_tokens=128, num_sequences=2, seed=3),
                            keep_hidden=False)
    gates = {"max_kl_mean": 1e-3, "max_kl_p99": 1e-3}
    calls = _spy_step(monkeypatch)
    assert verify_folder(qwen3_next, ref, decode_steps=8, gate_overrides=gates).report["verdict"] == "pass"
    total = len(calls)  # however the sequences are batched and the layers ordered, the last call is the last step
    assert total >= 8 * _delta_layers(qwen3_next)
    monkeypatch.undo()
    calls = _spy_step(monkeypatch, fault=lambda i, a: (a[0], a[1], a[2] * 4, *a[3:]) if i == total else a)
    report = verify_folder(qwen3_next, ref, decode_steps=8, gate_overrides=gates).report
    assert len(calls) == total
    assert [r.split(":")[0] for r in report["failure_reasons"]] == ["decode_kl_max"], report["failure_reasons"]


# --- the second block stage on more architectures ------------------------------------------

# (case, 4-bit block gate between the largest own error and the largest chained
# error, a Mamba block whose conv kernel is then reversed). Measured (group 32,
# 2 x 32 random tokens): PLaMo-2 chained 0.175 0.198 0.291 0.312, own 0.175 0.055
# 0.172 0.045; Zamba2 chained 0.142 0.174 0.199 0.221, own 0.142 0.077 0.066 0.058.
STAGE2 = {
    "plamo2-tiny": (0.24, 2, "model.layers.layers.2.mixer.conv1d.weight"),
    "zamba2-tiny": (0.18, 2, "model.layers.2.mamba.conv1d.weight"),
}


@pytest.mark.parametrize("case", sorted(STAGE2))
def test_own_errors_decide_the_block_gate(case, tmp_path):
    """At 4 bits the chained block errors pass the block gate set here while every
    block's own error stays under it: verify passes and says why (block_note). The
    same folder with one block's conv kernel reversed fails on that block."""
    from hybridconv.quant.run import quantize

    from .conftest import FIXTURES

    gate, broken_block, conv = STAGE2[case]
    path = FIXTURES / case if (FIXTURES / case).is_dir() else hybrid_case(case)
    src = resolve(str(path))
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    ref = compute_reference(src, build_inputs(src.path, vocab, random_tokens=32, num_sequences=2, seed=0))
    out = tmp_path / "q4"
    quantize(str(path), out, bits=4, group_size=32)
    report = verify_folder(out, ref, gate_overrides={"max_block_error": gate}).report
    chained = [b["relative_error"] for b in report["blocks"]]
    own = [b.get("own_error") for b in report["blocks"]]
    assert max(chained) > gate and None not in own and max(own) < gate, (chained, own)
    assert report["verdict"] == "pass", report["failure_reasons"]
    assert report["first_divergent_block"] is None and "accumulated" in report["block_note"]
    assert not any(b["diverged"] for b in report["blocks"])

    broken = tmp_path / "q4-broken"
    shutil.copytree(out, broken)
    w = mx.load(str(broken / "model.safetensors"))
    w[conv] = w[conv][:, ::-1, :]
    mx.save_safetensors(str(broken / "model.safetensors"), w, metadata={"format": "mlx"})
    report = verify_folder(broken, ref, gate_overrides={"max_block_error": gate}).report
    own = [b["own_error"] for b in report["blocks"]]
    assert report["verdict"] == "fail" and not _checks(report)["max_block_error"]["passed"]
    assert report["first_divergent_block"] == broken_block, report["blocks"]
    assert own[broken_block] > gate > max(own[:broken_block] + own[broken_block + 1:]), own
    assert any(r.startswith("max_block_error:") for r in report["failure_reasons"]), report["failure_reasons"]
