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

``--head`` times, each in a process of its own with its peak RSS, the two steps that
work on the whole tied 256000 x 2560 embedding of this checkpoint: the widths pass's
head (the KL of the float head and of each candidate width, 3/4/5 bits, on 8 x 256
random final hidden states; the head of hybridconv's lazily loaded float model) and
GPTQ of the embedding as the LM head (a Hessian from random correlated hidden states),
which ends a calibration with ``gptq``.

Usage: python scripts/bench_calibrate.py [--workdir bench-data] [--samples 8] [--length 256]
       [--methods widths,awq,gptq,learn] [--learn-steps 20] [--skip-default] [--log FILE]
       python scripts/bench_calibrate.py --head [--bits 4]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from bench_convert import CONFIG, build, measure  # noqa: E402


def widths_head_child(float_dir: str, bits: int) -> None:
    """The widths pass's head costs (widths.HeadKL) on the converted float checkpoint."""
    import hybridconv  # noqa: F401  (the fast BLAS before mlx's work)
    import mlx.core as mx

    from hybridconv.loading import load
    from hybridconv.quant.modes import QuantSpec
    from hybridconv.quant.widths import HeadKL

    model = load(float_dir, lazy=True)
    W = getattr(model.trunk, model.embedding_name)["weight"]
    h = CONFIG["hidden_size"]
    xf = [mx.random.normal((8, 256, h), key=mx.random.key(0))]
    xu = [xf[0] + 0.05 * mx.random.normal((8, 256, h), key=mx.random.key(1))]
    mx.eval(xf, xu)
    head = HeadKL(model, W, xf)
    # the planned stream's KL (for c) and the candidate widths', in one pass as widths.measure runs them
    head.kl_sums([(xu, None)] + [(xf, QuantSpec(b, 64)) for b in (bits - 1, bits, bits + 1)], "BF16")


def head_child(bits: int) -> None:
    """GPTQ of a random bf16-valued [vocab, hidden] matrix with a random correlated
    Hessian of 2048 hidden states (8 x 256 tokens), as calibrate's head step runs it."""
    import hybridconv  # noqa: F401  (the fast BLAS before mlx's and numpy's work)
    import mlx.core as mx
    import numpy as np

    from hybridconv.quant.gptq import gptq

    v, h = CONFIG["vocab_size"], CONFIG["hidden_size"]
    rng = np.random.default_rng(0)
    # the embedding as the calibration's lazily loaded model holds it: an MLX bf16 array
    W = mx.concatenate([mx.array(rng.standard_normal((16000, h), dtype=np.float32) * 0.02).astype(mx.bfloat16)
                        for _ in range(v // 16000)])
    mx.eval(W)
    X = rng.standard_normal((2048, h), dtype=np.float32) @ (np.eye(h, dtype=np.float32)
                                                            + 0.1 * rng.standard_normal((h, h), dtype=np.float32) / np.sqrt(h))
    gptq(W, X.T.astype(np.float64) @ X, bits, 64, "BF16", dequantized=False)


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
    ap.add_argument("--head", action="store_true", help="time only the two steps on the whole tied 2B embedding: "
                    "the widths pass's head and GPTQ of the head")
    ap.add_argument("--bits", type=int, default=4, help="--head: the width")
    args = ap.parse_args()
    src = args.workdir / "recurrentgemma-2b-synthetic"
    build(src)
    if args.head:
        float_dir = args.workdir / "float-2b"
        if not (float_dir / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "hybridconv", "convert", str(src), "-o", str(float_dir)], check=True)
        v, h = CONFIG["vocab_size"], CONFIG["hidden_size"]
        print("| step | wall | peak RSS |")
        print("|---|---|---|")
        wall, rss = measure([sys.executable, str(Path(__file__)), "--_widths-head-child", str(float_dir), str(args.bits)])
        print(f"| widths: the {v} x {h} tied head's KL, float and {args.bits - 1}/{args.bits}/{args.bits + 1} bits "
              f"(8 x 256 tokens) | {wall:.0f} s | {rss:.2f} GB |", flush=True)
        wall, rss = measure([sys.executable, str(Path(__file__)), "--_head-child", str(args.bits)])
        print(f"| GPTQ of the tied {v} x {h} embedding, {args.bits} bits | {wall:.0f} s | {rss:.2f} GB |")
        return
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
    if len(sys.argv) == 3 and sys.argv[1] == "--_head-child":
        head_child(int(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "--_widths-head-child":
        widths_head_child(sys.argv[2], int(sys.argv[3]))
    else:
        main()
