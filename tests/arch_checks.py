"""Checks the per-architecture tests share (test_arch_bamba, _granitemoehybrid,
_jamba, _falcon_h1, _nemotron_h, _zamba2, ...): an oracle case converted and
compared, an unseen transformers-built model converted and compared (optionally
with its config.json rewritten to a published layout), prefill = cached decode,
a bf16 conversion and a default 4-bit quantization verified against the live
transformers reference, re-conversion as a no-op, and what mlx-lm computes."""

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

from .conftest import (
    assert_logits_close,
    decode_logits,
    hybrid_case,
    oracle_logits,
    random_ids,
    save_hf_transformers,
    torch_logits,
)


def max_diff(got, ref) -> float:
    return float(np.abs(np.asarray(got, np.float32) - np.asarray(ref, np.float32)).max())


# --- oracle cases ---------------------------------------------------------------


def convert_case(tmp_path_factory, case: str) -> Path:
    """The oracle case ``case`` converted (float32) into a fresh folder (for a
    module-scoped fixture)."""
    out = tmp_path_factory.mktemp(Path(case).name) / "out"
    convert(str(hybrid_case(case)), out, dtype="float32")
    return out


def oracle_matches(out: Path, case: str, kinds: list[str]) -> dict:
    """The converted oracle case ``out`` loads through hybridconv with the block
    kinds ``kinds`` and matches the oracle logits; the stored tensors
    (``mx.load``), for layout checks."""
    ids, ref = oracle_logits(hybrid_case(case))
    model = hybridconv.load(out)
    assert model.block_kinds() == kinds
    assert_logits_close(np.array(model(mx.array(ids))), ref)
    return mx.load(str(out / "model.safetensors"))


def convert_matches(src: Path, out: Path, ids: np.ndarray, ref: np.ndarray):
    """Convert ``src`` (float32), load with hybridconv, compare with ``ref``; the model."""
    convert(str(src), out, dtype="float32")
    model = hybridconv.load(out)
    assert_logits_close(np.array(model(mx.array(ids))), ref)
    return model


def oracle_case(tmp_path_factory, case: str):
    """The oracle case converted and matched (:func:`convert_matches`):
    ``(source folder, output folder, model, ids, oracle logits)``."""
    src = hybrid_case(case)
    ids, ref = oracle_logits(src)
    out = tmp_path_factory.mktemp(Path(case).name) / "out"
    return src, out, convert_matches(src, out, ids, ref), ids, ref


# --- unseen configurations --------------------------------------------------------


def transformers_case(tmp: Path, config, model_cls, ids: np.ndarray, seed: int = 0, rewrite=None):
    """A checkpoint saved by transformers (``save_hf_transformers``, perturbed
    weights), optionally with its config.json rewritten by ``rewrite(dict) ->
    dict`` (the layouts published with the original checkpoints); returns
    ``(source folder, reference logits for ids)``."""
    src = tmp / "src"
    model = save_hf_transformers(src, config, model_cls, seed=seed)
    ref = torch_logits(model, ids)
    if rewrite is not None:
        path = src / "config.json"
        path.write_text(json.dumps(rewrite(json.loads(path.read_text())), indent=2))
    return src, ref


def unseen_case(tmp: Path, config, model_cls, seed: int = 0, T: int = 21, batch: int = 2, rewrite=None):
    """:func:`transformers_case` on random ids, converted (float32): ``(ids,
    reference logits, hybridconv logits, output folder)``."""
    ids = random_ids(config.vocab_size, T, batch=batch, seed=seed)
    src, ref = transformers_case(tmp, config, model_cls, ids, seed=seed, rewrite=rewrite)
    out = tmp / "out"
    convert(str(src), out, dtype="float32")
    got = np.array(hybridconv.load(out)(mx.array(ids)))
    return ids, ref, got, out


def check_unseen(tmp: Path, config, model_cls, seed: int = 0, **kw) -> Path:
    """:func:`unseen_case` matches its reference; the output folder."""
    ids, ref, got, out = unseen_case(tmp, config, model_cls, seed, **kw)
    assert_logits_close(got, ref)
    return out


# --- decoding and re-conversion ----------------------------------------------------


def prefill_equals_decode(model, ids: np.ndarray, prefill: int) -> None:
    """Prefill of ``prefill`` tokens then one-token cached steps = one full pass
    (float32). ``model``: a loaded model or a converted folder."""
    if isinstance(model, Path):
        model = hybridconv.load(model)
    full = np.array(model(mx.array(ids)).astype(mx.float32))
    assert_logits_close(decode_logits(model, ids, prefill), full)


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


# --- hybridconv verify ---------------------------------------------------------------


def verify_bf16_and_4bit(src: Path, tmp: Path, sequences: int = 2, decode_steps: int = 8, tokens: int = 24,
                         seed: int = 1, with_reference: bool = False):
    """``hybridconv verify`` (the library functions the CLI calls) of a bf16
    conversion and a default 4-bit quantization of ``src`` against the float32
    transformers reference (``tokens`` random tokens per sequence, ``sequences``
    of them; ``decode_steps`` cached steps). Returns the two reports (and the
    reference, ``with_reference``).

    bf16 and 4-bit must both pass with the default gates — no gate waived —
    with the reference's block kinds. The random-weight oracle models predict a
    near-uniform distribution (reference perplexity close to the vocabulary
    size, median top-2 logit gap ~0.1): all-token top-1 agreement at 4 bits is
    a coin toss between near-tied tokens (0.5-0.75), so verify gates top-1/top-5
    on decisive tokens only (best two logits >= 0.5 nats apart) and measures the
    rest by KL."""
    source = resolve(str(src))
    cfg = json.loads((source.path / "config.json").read_text())
    vocab = cfg.get("unpadded_vocab_size") or cfg.get("vocab_size") or cfg["text_config"]["vocab_size"]
    inputs = build_inputs(source.path, vocab, random_tokens=tokens, num_sequences=sequences, seed=seed)
    ref = compute_reference(source, inputs)
    bf16 = tmp / "bf16"
    convert(str(src), bf16, dtype="bfloat16")
    q4 = tmp / "q4"
    res = quantize(str(src), q4)
    assert any(t.decision == "quantize" for t in res.plan.tensors)
    reports = {}
    for name, folder in (("bf16", bf16), ("q4", q4)):
        report = verify_folder(folder, ref, decode_steps=decode_steps).report
        assert report["verdict"] == "pass", (name, report.get("failure_reasons"))
        if name == "q4":
            assert report["model"]["precision"] == "4bit"
        assert [b["kind"] for b in report["blocks"]] == ref.block_kinds
        reports[name] = report
    return (reports, ref) if with_reference else reports


# --- mlx-lm ---------------------------------------------------------------------------


def mlx_lm_logits(out: Path, ids) -> np.ndarray:
    """mlx-lm's logits on the folder ``out``, from its OWN model (a model file the
    folder carries is ignored: conftest.load_builtin)."""
    from .conftest import load_builtin

    model, _ = load_builtin(Path(out))
    return np.array(model(mx.array(ids)).astype(mx.float32))


def mlx_lm_max_diff(out: Path, ids: np.ndarray, ref: np.ndarray) -> float:
    """max |Δlogit| of mlx-lm's model on ``out`` against ``ref``."""
    return max_diff(mlx_lm_logits(out, ids), ref)


def mlx_lm_agrees(out: Path, ids: np.ndarray) -> float:
    """max |Δlogit| between hybridconv's and mlx-lm's model on the same output
    folder (e.g. a quantized one: same weights, same quantized layers)."""
    ours = np.array(hybridconv.load(out)(mx.array(ids)).astype(mx.float32))
    return max_diff(ours, mlx_lm_logits(out, ids))
