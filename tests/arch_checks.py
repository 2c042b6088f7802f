"""Checks shared by the per-architecture tests of the Mamba-2 hybrids
(tests/test_arch_nemotron_h.py, test_arch_falcon_h1.py, test_arch_zamba2.py):
convert and compare with an oracle, verify a bf16 conversion and a default
4-bit quantization against the live transformers reference, measure what
mlx-lm computes."""

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

from .conftest import assert_logits_close, decode_logits, torch_logits


def convert_matches(src: Path, out: Path, ids: np.ndarray, ref: np.ndarray):
    """Convert ``src`` (float32), load with hybridconv, compare with ``ref``; the model."""
    convert(str(src), out, dtype="float32")
    model = hybridconv.load(out)
    assert_logits_close(np.array(model(mx.array(ids))), ref)
    return model


def transformers_case(tmp: Path, config, model_cls, ids: np.ndarray, seed: int = 0, rewrite=None):
    """A checkpoint saved by transformers (``save_hf_transformers``), optionally with
    its config.json rewritten by ``rewrite(dict) -> dict`` (a published layout);
    returns (source folder, oracle logits for ``ids``)."""
    from .conftest import save_hf_transformers

    src = tmp / "src"
    model = save_hf_transformers(src, config, model_cls, seed=seed)
    ref = torch_logits(model, ids)
    if rewrite is not None:
        path = src / "config.json"
        path.write_text(json.dumps(rewrite(json.loads(path.read_text())), indent=2))
    return src, ref


def prefill_equals_decode(model, ids: np.ndarray, prefill: int):
    full = np.array(model(mx.array(ids)).astype(mx.float32))
    stepped = decode_logits(model, ids, prefill)
    assert_logits_close(stepped, full)


def verify_bf16_and_q4(src: Path, tmp: Path, tokens: int = 24) -> dict:
    """bf16 conversion and default 4-bit quantization of ``src`` both pass
    ``hybridconv verify`` against the float32 transformers reference; the reports."""
    cfg = json.loads((Path(src) / "config.json").read_text())
    inputs = build_inputs(Path(src), cfg["vocab_size"], random_tokens=tokens, num_sequences=1, seed=1)
    ref = compute_reference(resolve(str(src)), inputs)
    convert(str(src), tmp / "bf16", dtype="bfloat16")
    quantize(str(src), tmp / "q4")
    reports = {}
    for name in ("bf16", "q4"):
        report = verify_folder(tmp / name, ref, decode_steps=4).report
        assert report["verdict"] == "pass", (name, report.get("failure_reasons"))
        reports[name] = report
    return reports


def mlx_lm_max_diff(out: Path, ids: np.ndarray, ref: np.ndarray) -> float:
    """max |Δlogit| of mlx-lm's model (``mlx_lm.utils.load_model``) on ``out``."""
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(out))
    return float(np.abs(np.array(model(mx.array(ids)).astype(mx.float32)) - ref).max())


def mlx_lm_agrees(out: Path, ids: np.ndarray) -> float:
    """max |Δlogit| between hybridconv's and mlx-lm's model on the same output
    folder (e.g. a quantized one: same weights, same quantized layers)."""
    from mlx_lm.utils import load_model

    ours = np.array(hybridconv.load(out)(mx.array(ids)).astype(mx.float32))
    theirs = np.array(load_model(Path(out))[0](mx.array(ids)).astype(mx.float32))
    return float(np.abs(ours - theirs).max())
