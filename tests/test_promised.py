"""README promises that had no test asserting their result (issue 15, "also
untested"): --prompt and --text-file inputs, --ref-dtype bfloat16, sequences of
different lengths in one reference file, the kl_by_position and perplexity
fields, mamba_enabled = false end to end, and the positive --trust-remote-code
path. (SIGINT/SIGTERM during release: tests/test_interrupt.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file

import hybridconv
from hybridconv.convert import convert
from hybridconv.verify.metrics import BUCKETS
from hybridconv.verify.reference import read_reference_file
from hybridconv.verify.run import verify_folder

from .conftest import assert_logits_close, plamo2_config, save_hf_plamo2, save_hf_recurrent_gemma
from .conftest import hc

PLAMO = "plamo2-tiny"
PROMPT = "The quick brown fox jumps over the lazy dog."
TEXT = "Hybrid models mix attention with state-space layers.\nThey are converted one tensor at a time.\n"


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def text_reference(fixtures_dir, tmp_path_factory):
    """A reference file from --prompt and --text-file (two sequences of different
    lengths), run in bfloat16 and in float32; a bf16 conversion of the source."""
    import _pytest.monkeypatch
    import _pytest.capture  # noqa: F401

    root = tmp_path_factory.mktemp("text-ref")
    (root / "t.txt").write_text(TEXT)
    mp = _pytest.monkeypatch.MonkeyPatch()

    class _Cap:  # hc() only needs readouterr()
        def readouterr(self):
            return type("o", (), {"out": "", "err": ""})()

    files = {}
    try:
        for dtype in ("bfloat16", "float32"):
            files[dtype] = root / f"ref-{dtype}.safetensors"
            rc, out = hc(mp, _Cap(), "reference", fixtures_dir / PLAMO, "-o", files[dtype], "--prompt", PROMPT,
                         "--text-file", root / "t.txt", "--ref-dtype", dtype, "--hidden-states")
            assert rc == 0, out
    finally:
        mp.undo()
    convert(str(fixtures_dir / PLAMO), root / "bf16", dtype="bfloat16")
    convert(str(fixtures_dir / PLAMO), root / "f32", dtype="float32")
    return files, root / "bf16"


def test_prompt_and_text_file_are_tokenised_with_the_checkpoints_tokenizer(fixtures_dir, text_reference):
    from tokenizers import Tokenizer

    files, _ = text_reference
    tok = Tokenizer.from_file(str(fixtures_dir / PLAMO / "tokenizer.json"))
    want = [tok.encode(PROMPT).ids, tok.encode(TEXT).ids]
    assert len(want[0]) != len(want[1])
    t = load_file(str(files["float32"]))
    # different lengths in one file: right-padded with 0, and `lengths` says how long
    assert t["lengths"].tolist() == [len(w) for w in want]
    assert t["input_ids"].shape == (2, max(len(w) for w in want))
    for row, w in zip(t["input_ids"], want):
        assert row[: len(w)].tolist() == w and not row[len(w):].any()
    ref = read_reference_file(files["float32"])
    assert [s.tolist() for s in ref.sequences] == want
    assert [o["logits"].shape[0] for o in ref.outputs] == [len(w) for w in want]
    assert [ref.hidden(i, 0).shape[0] for i in range(2)] == [len(w) for w in want]


def test_ref_dtype_bfloat16_really_runs_in_bfloat16(text_reference):
    files, bf16 = text_reference
    a, b = read_reference_file(files["bfloat16"]), read_reference_file(files["float32"])
    assert (a.dtype, b.dtype) == ("bfloat16", "float32")
    for x, y in zip(a.outputs, b.outputs):
        diff = np.abs(x["logits"] - y["logits"]).max()
        # bf16 arithmetic: clearly not the float32 run, and still close to it (measured 0.1-0.2)
        assert 1e-3 < diff < 0.03 * np.abs(y["logits"]).max(), diff
    report = verify_folder(bf16, a).report
    assert report["reference"]["dtype"] == "bfloat16" and report["verdict"] == "pass", report["failure_reasons"]


def test_lengths_perplexity_and_kl_by_position_are_what_they_say(text_reference):
    """Every field recomputed here from the reference file and the model's logits
    (a float32 conversion against the bfloat16 reference: KL well above zero)."""
    files, bf16 = text_reference
    f32 = bf16.parent / "f32"
    ref = read_reference_file(files["bfloat16"])
    report = verify_folder(f32, ref, decode_steps=0).report
    assert report["inputs"]["lengths"] == [len(s) for s in ref.sequences]
    assert report["inputs"]["tokens"] == sum(len(s) for s in ref.sequences)
    model = hybridconv.load(f32)
    kls, nll_ref, nll_mlx = [], [], []
    for ids, out in zip(ref.sequences, ref.outputs):
        got = np.array(model(mx.array(ids[None]))[0].astype(mx.float32))
        lp, lq = _log_softmax(out["logits"]), _log_softmax(got)
        kls.append((np.exp(lp) * (lp - lq)).sum(-1))
        nll_ref.append(-lp[np.arange(len(ids) - 1), ids[1:]])
        nll_mlx.append(-lq[np.arange(len(ids) - 1), ids[1:]])
    o = report["metrics"]["overall"]
    allkl = np.concatenate(kls)
    assert o["tokens"] == allkl.size and o["kl_mean"] == pytest.approx(allkl.mean(), rel=1e-6)
    assert allkl.mean() > 1e-7  # measurable (measured 9.6e-7)
    assert o["perplexity_ref"] == pytest.approx(np.exp(np.concatenate(nll_ref).mean()), rel=1e-9)
    assert o["perplexity_mlx"] == pytest.approx(np.exp(np.concatenate(nll_mlx).mean()), rel=1e-6)
    assert o["perplexity_ratio"] == pytest.approx(o["perplexity_mlx"] / o["perplexity_ref"])
    assert o["perplexity_ref"] > 1 and np.isfinite(o["perplexity_mlx"])
    buckets = {b["positions"]: b for b in o["kl_by_position"]}
    assert sum(b["tokens"] for b in buckets.values()) == allkl.size
    for lo, hi in BUCKETS:
        vals = [k[lo:hi] for k in kls if len(k) > lo]
        label = f"{lo}-{hi - 1}" if hi else f"{lo}+"
        if not vals:
            assert label not in buckets
            continue
        v = np.concatenate(vals)
        assert buckets[label]["tokens"] == v.size
        assert buckets[label]["kl_mean"] == pytest.approx(v.mean(), rel=1e-6)
    for row, k in zip(report["metrics"]["per_sequence"], kls):
        assert row["tokens"] == k.size and row["kl_mean"] == pytest.approx(k.mean(), rel=1e-6)


def test_mamba_disabled_end_to_end(tmp_path, monkeypatch, capsys):
    """mamba_enabled = false: every layer attention, in the oracle (mlx-lm's
    PLaMo-2), in hybridconv, in the PyTorch reference and in verify's report."""
    cfg = plamo2_config(mamba_enabled=False, num_hidden_layers=3)
    oracle = save_hf_plamo2(tmp_path / "src", cfg, seed=3)
    ids = np.random.default_rng(5).integers(0, 320, size=(1, 24)).astype(np.int32)
    out = tmp_path / "out"
    convert(str(tmp_path / "src"), out, dtype="float32")
    model = hybridconv.load(out)
    assert model.block_kinds() == ["attention"] * 3
    assert_logits_close(np.array(model(mx.array(ids))), np.array(oracle(mx.array(ids))))
    rc, text = hc(monkeypatch, capsys, "verify", out, "--reference", tmp_path / "src", "--random-tokens", "24")
    assert rc == 0, text
    report = json.loads((out / "verification.json").read_text())
    assert report["verdict"] == "pass" and [b["kind"] for b in report["blocks"]] == ["attention"] * 3
    assert report["metrics"]["overall"]["kl_mean"] < 1e-8


MODELING = '''
import os
from transformers import RecurrentGemmaForCausalLM


class TinyRecurrentGemma(RecurrentGemmaForCausalLM):
    """The checkpoint's own modeling code: transformers' class, and a trace."""

    def forward(self, *args, **kwargs):
        with open(os.environ["HC_REMOTE_CODE_MARKER"], "a") as f:
            f.write("forward\\n")
        return super().forward(*args, **kwargs)
'''


def test_trust_remote_code_runs_the_checkpoints_modeling_file(tmp_path):
    src = tmp_path / "src"
    save_hf_recurrent_gemma(src, seed=2)
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_tiny.TinyRecurrentGemma"}
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "modeling_tiny.py").write_text(MODELING)
    out = tmp_path / "out"
    convert(str(src), out, dtype="float32")
    marker = tmp_path / "ran"
    env = dict(os.environ, HC_REMOTE_CODE_MARKER=str(marker), HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_OFFLINE="1")
    # without the flag the file is never imported: transformers' own class runs
    from hybridconv.checkpoint import resolve
    from hybridconv.verify.inputs import build_inputs
    from hybridconv.verify.reference import compute_reference

    os.environ["HC_REMOTE_CODE_MARKER"] = str(marker)
    try:
        plain = compute_reference(resolve(str(src)), build_inputs(src, 320, random_tokens=16, num_sequences=1))
    finally:
        del os.environ["HC_REMOTE_CODE_MARKER"]
    assert plain.implementation == "transformers RecurrentGemmaForCausalLM" and not marker.exists()
    # with it (a fresh process, its own modules cache), the checkpoint's class runs
    r = subprocess.run([sys.executable, "-m", "hybridconv", "verify", str(out), "--reference", str(src),
                        "--random-tokens", "16", "--num-sequences", "2", "--no-report", "--json",
                        str(tmp_path / "v.json"), "--trust-remote-code"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["reference"]["implementation"] == "transformers TinyRecurrentGemma (remote code)"
    assert marker.read_text().split() == ["forward", "forward"]  # one forward per sequence
    assert report["verdict"] == "pass" and report["metrics"]["overall"]["kl_mean"] < 1e-8
