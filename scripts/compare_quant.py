#!/usr/bin/env python
"""hybridconv's default quantization vs mlx_lm.convert -q, same checkpoints, same inputs.

For each checkpoint and each width, both tools quantize the same float weights
at the same bits and group size (affine). mlx_lm.convert is given hybridconv's
float conversion of the checkpoint (same weights, config normalised) because it
cannot read some of the original configs (transformers 5's rope_parameters); both outputs are then compared with
the same float32 PyTorch reference (hybridconv's verify machinery) on the same
random-token inputs, both run with the same activation dtype. Printed: mean and p99 KL(ref || quantized) and bits per
weight (all stored tensor bits / parameters) of each, and the differences.

Usage: python scripts/compare_quant.py [--checkpoints DIR ...] [--bits 8 6 4 3 2]
       [--group-size 64] [--tokens 256] [--sequences 4] [--dtype bfloat16] [--no-kl]
--no-kl compares bits per weight only (no PyTorch reference, no MLX forward): for the
RecurrentGemma-2B-shaped checkpoint of scripts/bench_convert.py, where a KL run costs
minutes per variant on a CPU.
Default checkpoints: the oracle fixtures in ../shared/fixtures.

--trained [DIR] (default tests/data/trained, written by scripts/train_tiny.py): the
trained checkpoints instead, inputs = held-out text (DIR/heldout.txt), and every
method at --bits (default 4 3): mlx_lm.convert -q, mlx-lm's gptq / dwq /
dynamic_quant where they run on the architecture (calibration = DIR/calibration.txt,
the same windows for every method, given to their Python APIs: never a download),
hybridconv default and hybridconv --calibrate. Printed per row: bits per weight,
mean KL to the float model, held-out perplexity; see trained_main. --methods picks
some (names in compare_trained.py), --json FILE saves the rows, --rows FILE... prints
the table of saved rows without running.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import hybridconv  # noqa: E402,F401  (before mlx: its import loads the fast BLAS on Linux)
from hybridconv.quant.calibration import DEFAULT_LEARN_STEPS, DEFAULT_LENGTH, DEFAULT_SAMPLES  # noqa: E402


def bits_per_weight(folder: Path, params: int) -> float:
    from hybridconv.checkpoint import index_weights
    from hybridconv.safetensors_io import ITEMSIZE

    index = index_weights(folder)
    bits = sum(math.prod(t.shape) * ITEMSIZE[t.dtype] * 8 for t in index.tensors.values())
    return bits / params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trained", nargs="?", const=REPO / "tests" / "data" / "trained", type=Path, default=None,
                    help="compare every method on the trained checkpoints of this folder (train_tiny.py)")
    ap.add_argument("--methods", nargs="*", default=None, help="--trained: the methods to run [default: all]")
    ap.add_argument("--calibration-samples", type=int, default=DEFAULT_SAMPLES)
    ap.add_argument("--calibration-length", type=int, default=DEFAULT_LENGTH)
    ap.add_argument("--learn-steps", type=int, default=DEFAULT_LEARN_STEPS)
    ap.add_argument("--calibration-seed", type=int, default=0,
                    help="--trained: hybridconv calibrated's seed (the learned step's order of windows) [default: 0]")
    ap.add_argument("--dwq-lr", type=float, default=1e-5)
    ap.add_argument("--dwq-epochs", type=int, default=8)
    ap.add_argument("--debug", action="store_true", help="--trained: print the traceback of a method that fails")
    ap.add_argument("--json", type=Path, default=None, help="--trained: also write the rows here")
    ap.add_argument("--rows", nargs="*", type=Path, default=None,
                    help="--trained: print the table of these --json files (merged) instead of running")
    ap.add_argument("--checkpoints", nargs="*", type=Path)
    ap.add_argument("--bits", nargs="*", type=int, default=None, help="[default: 8 6 4 3 2; --trained: 4 3]")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="float dtype of both outputs (scales, unquantized tensors) [default: the source's]")
    ap.add_argument("--no-kl", action="store_true", help="bits per weight only: no reference, no verify")
    args = ap.parse_args()
    if args.trained is not None:
        from compare_trained import trained_main

        return trained_main(args)

    args.bits = args.bits or [8, 6, 4, 3, 2]
    from mlx_lm.convert import convert as mlx_lm_convert

    from hybridconv.checkpoint import resolve
    from hybridconv.convert import convert as hc_convert
    from hybridconv.convert import plan
    from hybridconv.quant.run import quantize
    from hybridconv.verify.inputs import inputs_for
    from hybridconv.verify.reference import compute_reference
    from hybridconv.verify.run import verify_folder

    fixtures = REPO.parent / "shared" / "fixtures"
    checkpoints = args.checkpoints or sorted(p for p in fixtures.iterdir() if (p / "config.json").is_file())
    rows = []
    work = Path(tempfile.mkdtemp(prefix="compare-quant-"))
    try:
        for ckpt in checkpoints:
            src = resolve(str(ckpt))
            params = plan(src).parameter_count
            inputs = None if args.no_kl else inputs_for(src.path, random_tokens=args.tokens,
                                                        num_sequences=args.sequences, seed=0)
            ref = None if args.no_kl else compute_reference(src, inputs, keep_hidden=False)
            float_copy = work / f"{ckpt.name}-float"
            hc_convert(str(ckpt), float_copy)
            for bits in args.bits:
                ours = work / f"{ckpt.name}-hc-{bits}"
                theirs = work / f"{ckpt.name}-mlxlm-{bits}"
                quantize(str(ckpt), ours, bits=bits, group_size=args.group_size, dtype=args.dtype)
                # the float copy may carry hybridconv's model file (model_file): mlx_lm.convert
                # builds the model from it, as mlx-lm users of the copy would
                mlx_lm_convert(str(float_copy), str(theirs), quantize=True, q_bits=bits,
                               q_group_size=args.group_size, dtype=args.dtype, trust_remote_code=True)
                # Same activation dtype for both (mlx_lm's config keeps the source's
                # torch_dtype label even when it casts the weights).
                act = args.dtype or json.loads((ours / "config.json").read_text())["dtype"]
                if ref is None:
                    r_ours = r_theirs = {"kl_mean": float("nan"), "kl_p99": float("nan")}
                else:
                    r_ours = verify_folder(ours, ref, decode_steps=0, activation_dtype=act).report["metrics"]["overall"]
                    r_theirs = verify_folder(theirs, ref, decode_steps=0, activation_dtype=act).report["metrics"]["overall"]
                row = {
                    "checkpoint": ckpt.name, "bits": bits, "group_size": args.group_size,
                    "hc_kl_mean": r_ours["kl_mean"], "hc_kl_p99": r_ours["kl_p99"],
                    "hc_bpw": bits_per_weight(ours, params),
                    "mlxlm_kl_mean": r_theirs["kl_mean"], "mlxlm_kl_p99": r_theirs["kl_p99"],
                    "mlxlm_bpw": bits_per_weight(theirs, params),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(ours)
                shutil.rmtree(theirs)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    kl = "no KL (--no-kl)" if args.no_kl else (
        f"inputs: {args.sequences} x {args.tokens} random tokens (seed 0); reference: PyTorch float32")
    print(f"{kl}; affine, group size {args.group_size}; output dtype {args.dtype or 'as the source'}")
    print("| checkpoint | bits | hybridconv KL mean | mlx_lm KL mean | hybridconv KL p99 | mlx_lm KL p99 "
          "| hybridconv bpw | mlx_lm bpw | extra bpw | KL no worse |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        extra = r["hc_bpw"] - r["mlxlm_bpw"]
        ok = r["hc_kl_mean"] <= r["mlxlm_kl_mean"] if not args.no_kl else None
        print(f"| {r['checkpoint']} | {r['bits']} | {r['hc_kl_mean']:.3g} | {r['mlxlm_kl_mean']:.3g} | "
              f"{r['hc_kl_p99']:.3g} | {r['mlxlm_kl_p99']:.3g} | {r['hc_bpw']:.3f} | {r['mlxlm_bpw']:.3f} | "
              f"{extra:+.3f} | {'n/a' if ok is None else 'yes' if ok else 'NO'} |")


if __name__ == "__main__":
    main()
