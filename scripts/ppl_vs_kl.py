#!/usr/bin/env python
"""Why a quantization with a lower KL can have a higher held-out perplexity: for one
trained checkpoint (scripts/train_tiny.py) and width, quantize it several ways and print,
per variant, on held-out windows of ``heldout.txt``:

* ``kl``: mean KL(float ‖ quantized) per token (fidelity to the float model);
* ``dnll``: the held-out NLL gap to the float model, nats per token (log of the
  perplexity ratio), and ``dnll_se`` its standard error (tokens taken as independent);
* ``dent``: how much higher the quantized distribution's entropy is than the float's
  (positive: flatter);
* ``slope``: the regression slope of the quantized logits on the float ones (below 1:
  a higher temperature).

``--temperatures T...`` first prints, for the float model itself, the held-out NLL gap of
its logits divided by each T (``float/T`` rows: no quantization): where a T above 1 has a
negative gap, the float model is over-confident on that text, and any change that
flattens its distributions lowers the held-out perplexity without being closer to it.

Variants: ``convert`` (``mlx_lm.convert -q``), ``default`` (``hybridconv quantize``),
``noshrink`` (hybridconv's range search with the min/max range only, refitted by least
squares), ``mlxrange`` (MLX's own range only, codes from the float32 source),
``mlxgptq`` (mlx-lm's ``gptq_quantize`` with the same 32 x 256 calibration windows, as
``compare_quant.py --trained`` runs it), ``cal:M1,M2`` (``--calibrate --calibrate-methods M1,M2``, 32 x 256 tokens of
calibration.txt, 200 learning steps or ``--learn-steps``), ``calmlx:M1,M2`` (the same with MLX's own range as
every group's grid, GPTQ's included); ``@N`` after the methods sets the calibration's seed
(the learned step's order of windows), e.g. ``cal:default@1``.

Usage: python scripts/ppl_vs_kl.py CHECKPOINT BITS [VARIANT...] [--windows 64] [--temperatures 1.05 1.1] [--learn-steps 200] [--text FILE]
e.g.   python scripts/ppl_vs_kl.py qwen3_5_text 4 convert mlxrange noshrink default cal:gptq calmlx:gptq
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from compare_trained import heldout_inputs, hybridconv_names, mlx_lm_input, run_mlx_gptq  # noqa: E402

from hybridconv.quant.calibration import DEFAULT_LEARN_STEPS, DEFAULT_LENGTH, DEFAULT_SAMPLES  # noqa: E402


def emit(variant: str, metrics: dict) -> None:
    print(json.dumps({"variant": variant, **{k: round(float(x), 6) for k, x in metrics.items()}}), flush=True)


def nll_entropy_gaps(lp, lq, ids):
    """Per position: the next-token NLL of ``lq`` minus ``lp``'s, and ``lq``'s entropy minus ``lp``'s."""
    t = np.arange(len(ids) - 1)
    return lp[t, ids[1:]] - lq[t, ids[1:]], (np.exp(lp) * lp).sum(-1) - (np.exp(lq) * lq).sum(-1)


def gap_summary(dn: list, de: list) -> dict:
    """Mean NLL gap (± its standard error over tokens) and mean entropy change of per-window gaps."""
    dn, de = np.concatenate(dn), np.concatenate(de)
    return {"dnll": dn.mean(), "dnll_se": dn.std() / math.sqrt(dn.size), "dent": de.mean()}


def measure(folder: Path, ref, seqs) -> dict:
    import mlx.core as mx

    from hybridconv.loading import load
    from hybridconv.verify.metrics import log_softmax

    model = load(folder, compute="float32")
    kl, dn, de, slopes = [], [], [], []
    for i, s in enumerate(seqs):
        ids = np.asarray(s)
        q = np.array(model(mx.array(ids[None]))[0].astype(mx.float32))
        r = np.asarray(ref.outputs[i]["logits"])
        lp, lq = log_softmax(r), log_softmax(q)
        kl.append((np.exp(lp) * (lp - lq)).sum(-1))
        n, e = nll_entropy_gaps(lp, lq, ids)
        dn.append(n)
        de.append(e)
        rc, qc = r - r.mean(-1, keepdims=True), q - q.mean(-1, keepdims=True)
        slopes.append((rc * qc).sum() / (rc * rc).sum())
    return {"kl": np.concatenate(kl).mean(), **gap_summary(dn, de), "slope": float(np.mean(slopes))}


def float_temperature(ref, seqs, temp: float) -> dict:
    """The float model's own held-out NLL gap and entropy change at softmax temperature ``temp``."""
    from hybridconv.verify.metrics import log_softmax

    dn, de = [], []
    for i, s in enumerate(seqs):
        ids = np.asarray(s)
        r = np.asarray(ref.outputs[i]["logits"], dtype=np.float64)
        n, e = nll_entropy_gaps(log_softmax(r), log_softmax(r / temp), ids)
        dn.append(n)
        de.append(e)
    return gap_summary(dn, de)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("bits", type=int)
    ap.add_argument("variants", nargs="*")
    ap.add_argument("--windows", type=int, default=64, help="held-out windows of 256 tokens")
    ap.add_argument("--text", help="measure on this text instead of the checkpoint's heldout.txt (e.g. its "
                    "calibration.txt: the windows the calibration uses are left out)")
    ap.add_argument("--temperatures", type=float, nargs="*", default=[],
                    help="also print the float model's own NLL gap at these softmax temperatures")
    ap.add_argument("--learn-steps", type=int, default=DEFAULT_LEARN_STEPS, help="the calibrated variants' learning steps per block")
    args = ap.parse_args()
    if not args.variants and not args.temperatures:
        ap.error("give at least one VARIANT or --temperatures")
    from hybridconv.checkpoint import resolve
    from hybridconv.convert import convert as hc_convert
    from hybridconv.convert import plan
    from hybridconv.quant import affine
    from hybridconv.quant.calibrate import CalibrationOptions, parse_methods
    from hybridconv.quant.calibration import calibration_tokens
    from hybridconv.quant.run import quantize
    from hybridconv.verify.inputs import Inputs
    from hybridconv.verify.reference import compute_reference

    ck = REPO / "tests" / "data" / "trained" / args.checkpoint
    src = resolve(str(ck))
    vocab = plan(src).config["vocab_size"]
    # the calibration windows every calibrated variant (and mlx-lm's GPTQ) uses
    cal_windows = calibration_tokens(ck, vocab, ck.parent / "calibration.txt", DEFAULT_SAMPLES, DEFAULT_LENGTH).sequences
    inputs = heldout_inputs(ck, vocab, Path(args.text) if args.text else ck.parent / "heldout.txt", args.windows, 256)
    if args.text:  # never a window the calibration itself uses
        used = {w.tobytes() for w in cal_windows}
        inputs = Inputs([w for w in inputs.sequences if w.tobytes() not in used], inputs.description)
        print(f"{len(inputs.sequences)} windows of {args.text} (calibration windows left out)", file=sys.stderr)
    ref = compute_reference(src, inputs, keep_hidden=False)
    for temp in args.temperatures:
        emit(f"float/{temp:g}", float_temperature(ref, inputs.sequences, temp))
    if not args.variants:
        return
    work = Path(tempfile.mkdtemp(prefix="ppl-vs-kl-"))
    shrink = affine.SHRINK
    try:
        float_copy = work / "float"
        hc_convert(str(ck), float_copy)
        for i, v in enumerate(args.variants):
            out = work / f"v{i}"
            affine.SHRINK = {"noshrink": (1.0,), "mlxrange": ()}.get(v, () if v.startswith("calmlx:") else shrink)
            try:
                if v == "convert":
                    from mlx_lm.convert import convert as mlx_lm_convert

                    mlx_lm_convert(str(mlx_lm_input(float_copy, work / "float-mlx-lm")), str(out), quantize=True,
                                   q_bits=args.bits, q_group_size=64)
                    hybridconv_names(out)
                elif v == "mlxgptq":
                    run_mlx_gptq(mlx_lm_input(float_copy, work / "float-mlx-lm"), out, args.bits, 64, cal_windows)
                    hybridconv_names(out)
                elif v in ("default", "noshrink", "mlxrange"):
                    quantize(str(ck), out, bits=args.bits, group_size=64)
                elif v.startswith(("cal:", "calmlx:")):
                    methods, _, seed = v.split(":", 1)[1].partition("@")
                    opts = CalibrationOptions(file=ck.parent / "calibration.txt", samples=DEFAULT_SAMPLES, length=DEFAULT_LENGTH,
                                              learn_steps=args.learn_steps, methods=parse_methods(methods), seed=int(seed or 0))
                    quantize(str(ck), out, bits=args.bits, group_size=64, calibration=opts)
                else:
                    raise SystemExit(f"unknown variant {v!r}")
            finally:
                affine.SHRINK = shrink
            row = measure(out, ref, inputs.sequences)
            emit(v, row)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
