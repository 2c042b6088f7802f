#!/usr/bin/env python
"""Benchmark: ``hybridconv quantize --calibrate`` on the RecurrentGemma-2B-shaped
checkpoint of scripts/bench_convert.py (built there if absent: random bf16
weights, 2.68 B parameters, 5.4 GB), against the default ``quantize``.

Prints wall time and peak RSS (of the command's largest process, getrusage) of

    hybridconv quantize SRC -o OUT --bits 4
    hybridconv quantize SRC -o OUT --bits 4 --calibrate [--calibration-samples N
        --calibration-length T --calibrate-methods M --learn-steps S]

The weights are random, so only time and memory mean anything here (quality is
measured on trained checkpoints: scripts/compare_quant.py --trained). The
calibration text is the built-in sample, tokenised with the checkpoint's
(tiny) tokenizer. Run it on a quiet machine, with ``nice``.

Usage: python scripts/bench_calibrate.py [--workdir bench-data] [--samples 8] [--length 256]
       [--methods widths,awq,gptq,learn] [--learn-steps 20] [--skip-default] [--log FILE]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from bench_convert import build, measure  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-data")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--methods", default="widths,awq,gptq,learn")
    ap.add_argument("--learn-steps", type=int, default=20)
    ap.add_argument("--skip-default", action="store_true", help="time only the calibrated run")
    ap.add_argument("--log", type=Path, default=None,
                    help="append the calibrated run's output (its progress) to this file as it runs")
    args = ap.parse_args()
    src = args.workdir / "recurrentgemma-2b-synthetic"
    build(src)
    hc = [sys.executable, "-m", "hybridconv"]
    out = args.workdir / "out-calibrate"
    runs = {}
    if not args.skip_default:
        shutil.rmtree(out, ignore_errors=True)
        runs["quantize --bits 4"] = measure([*hc, "quantize", str(src), "-o", str(out), "--bits", "4"])
    shutil.rmtree(out, ignore_errors=True)
    label = (f"quantize --bits 4 --calibrate ({args.methods}; {args.samples} x {args.length} tokens"
             + (f", {args.learn_steps} learn steps" if "learn" in args.methods else "") + ")")
    runs[label] = measure([*hc, "quantize", str(src), "-o", str(out), "--bits", "4", "--calibrate",
                           "--calibration-samples", str(args.samples), "--calibration-length", str(args.length),
                           "--calibrate-methods", args.methods, "--learn-steps", str(args.learn_steps)],
                          log=args.log)
    shutil.rmtree(out, ignore_errors=True)
    print("| command | wall | peak RSS |")
    print("|---|---|---|")
    for name, (wall, rss) in runs.items():
        print(f"| {name} | {wall:.0f} s | {rss:.2f} GB |")


if __name__ == "__main__":
    main()
