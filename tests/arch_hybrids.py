"""Helpers for the Mamba + attention hybrid tests (test_arch_jamba, test_arch_bamba,
test_arch_granitemoehybrid): conversion of an oracle case or of an unseen
transformers-built model, the checks every architecture repeats, and mlx-lm's
result measured against the reference."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

import hybridconv
from hybridconv.checkpoint import resolve
from hybridconv.convert import convert
from hybridconv.quant.run import quantize
from hybridconv.verify.inputs import build_inputs
from hybridconv.verify.reference import compute_reference
from hybridconv.verify.run import verify_folder

from .conftest import assert_logits_close, decode_logits, random_ids, save_hf_transformers, torch_logits


def max_diff(got, ref) -> float:
    return float(np.abs(np.asarray(got, np.float32) - np.asarray(ref, np.float32)).max())


def unseen_case(tmp: Path, config, model_cls, seed: int = 0, T: int = 21, batch: int = 2, rewrite=None):
    """Build ``model_cls(config)`` with transformers (perturbed weights), save it,
    optionally rewrite its config.json with ``rewrite(dict) -> dict`` (the
    layouts published with the original checkpoints), convert it (float32) and
    return ``(ids, reference logits, hybridconv logits, output folder)``."""
    src = tmp / "src"
    model = save_hf_transformers(src, config, model_cls, seed=seed)
    ids = random_ids(config.vocab_size, T, batch=batch, seed=seed)
    ref = torch_logits(model, ids)
    if rewrite is not None:
        path = src / "config.json"
        path.write_text(json.dumps(rewrite(json.loads(path.read_text())), indent=2))
    out = tmp / "out"
    convert(str(src), out, dtype="float32")
    got = np.array(hybridconv.load(out)(mx.array(ids)))
    return ids, ref, got, out


def check_unseen(tmp: Path, config, model_cls, seed: int = 0, **kw) -> Path:
    ids, ref, got, out = unseen_case(tmp, config, model_cls, seed, **kw)
    assert_logits_close(got, ref)
    return out


def check_decode(out: Path, ids: np.ndarray, prefill: int) -> None:
    """Prefill of ``prefill`` tokens then one-token cached steps = one full pass (float32)."""
    model = hybridconv.load(out)
    full = np.array(model(mx.array(ids)))
    assert_logits_close(decode_logits(model, ids, prefill), full)


def mlx_lm_logits(out: Path, ids) -> np.ndarray:
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(out))
    return np.array(model(mx.array(ids)).astype(mx.float32))


def verify_bf16_and_4bit(src: Path, tmp: Path) -> dict:
    """``hybridconv verify`` (the library functions the CLI calls) of a bf16
    conversion and a default 4-bit quantization of ``src`` against the
    transformers reference. Returns the two reports.

    bf16 and 4-bit must both pass with the default gates. The random-weight
    oracle models predict a near-uniform distribution (reference perplexity
    close to the vocabulary size, median top-2 logit gap ~0.1): all-token top-1
    agreement at 4 bits is a coin toss between near-tied tokens (0.5-0.75), so
    verify gates top-1/top-5 on decisive tokens only (best two logits >= 0.5
    nats apart) and measures the rest by KL."""
    source = resolve(str(src))
    cfg = json.loads((src / "config.json").read_text())
    inputs = build_inputs(source.path, cfg["vocab_size"], random_tokens=24, num_sequences=2, seed=1)
    ref = compute_reference(source, inputs)
    reports = {}
    bf16 = tmp / "bf16"
    convert(str(src), bf16, dtype="bfloat16")
    q4 = tmp / "q4"
    res = quantize(str(src), q4)
    assert any(t.decision == "quantize" for t in res.plan.tensors)
    for name, folder in (("bf16", bf16), ("q4", q4)):
        report = verify_folder(folder, ref).report
        reasons = report["failure_reasons"]
        assert report["verdict"] == "pass", (name, reasons)
        assert [b["kind"] for b in report["blocks"]] == ref.block_kinds
        reports[name] = report
    return reports


def assert_reconvert_is_noop(out: Path, tmp: Path) -> None:
    """Converting an output again changes nothing (every rule is idempotent)."""
    again = tmp / "again"
    convert(str(out), again, dtype="float32")
    a, b = mx.load(str(out / "model.safetensors")), mx.load(str(again / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and mx.array_equal(a[name], b[name]), name
    ca = json.loads((out / "config.json").read_text())
    cb = json.loads((again / "config.json").read_text())
    assert ca == cb
