"""What mlx-lm does with hybridconv's output of every oracle case, measured.

For each case in ``../shared/fixtures`` and ``../shared/fixtures/hybrids``
(or the folders given): convert it in float32, then run ``verify`` with both
runtimes (hybridconv and mlx-lm, through ``mlx_lm.utils.load_model``) against
the case's stored oracle logits, and print the README's table: per case,
hybridconv's and mlx-lm's verdicts with max |Δlogit| and mean KL, mlx-lm's
message when it cannot load or run the output, and what ``inspect`` predicts
from the config alone (``converters/_mlx_lm.py``), flagged where the
prediction and the measurement disagree.

    .venv/bin/python scripts/mlx_lm_runtimes.py [CASE_FOLDER ...] [--bits N] [--json PATH]

``--bits N`` measures hybridconv's default N-bit quantization instead (gates
of that width; the oracle logits are float32).

Exit status 1 when a prediction disagrees with a measurement or hybridconv
fails a case.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FIXTURES = Path(os.environ.get("HYBRIDCONV_FIXTURES", ROOT.parent / "shared" / "fixtures"))

# measured status -> the prediction class it confirms
AGREES = {"pass": ("computes", "depends"), "fail": ("differs", "depends"), "cannot load": ("cannot open",),
          "cannot run": ("cannot open",)}


def cases() -> list[Path]:
    found = []
    for base in (FIXTURES, FIXTURES / "hybrids"):
        found += sorted(p for p in base.iterdir() if (p / "expected.safetensors").is_file())
    return found


def measure(case: Path, work: Path, bits: int | None = None) -> dict:
    from hybridconv.convert import convert
    from hybridconv.loading import load_config
    from hybridconv.verify.reference import read_reference_file
    from hybridconv.verify.run import verify_folder

    out = work / case.name
    if bits:
        from hybridconv.quant.run import quantize

        quantize(str(case), out, bits, dtype="float32", force=True)
    else:
        convert(str(case), out, "float32", force=True)
    arch, config = load_config(out)
    report = verify_folder(out, read_reference_file(case / "expected.safetensors"),
                           runtimes=("hybridconv", "mlx-lm")).report
    row = {"case": case.name, "model_type": arch.model_type, "expected": arch.mlx_lm_support(config).line()}
    for name, r in report["runtimes"].items():
        o = (r.get("metrics") or {}).get("overall") or {}
        row[name] = {"verdict": r["verdict"], "max_abs_logit_diff": o.get("max_abs_logit_diff"),
                     "kl_mean": o.get("kl_mean"), "message": r.get("message"),
                     "decode_kl_max": (r.get("decode") or {}).get("kl_max")}
    predicted = arch.mlx_lm_support(config).status
    row["agrees"] = predicted in AGREES.get(row["mlx-lm"]["verdict"], ())
    if bits and predicted == "differs" and row["mlx-lm"]["verdict"] == "pass":
        row["agrees"] = True  # the difference is within the N-bit gates (verify notes it)
        row["mlx-lm"]["verdict"] = f"pass (within the {bits}-bit gates; differs in float32)"
    return row


def _num(x) -> str:
    return "–" if x is None else f"{x:.2g}"


def table(rows: list[dict]) -> str:
    lines = ["| case | model_type | hybridconv | mlx-lm | mlx-lm max \\|Δlogit\\| / KL mean | inspect says (from the config) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        h, m = r["hybridconv"], r["mlx-lm"]
        if m["verdict"] in ("cannot load", "cannot run"):
            measured = f"{m['verdict']}: {m['message'][:120]}"
            nums = "–"
        else:
            measured = m["verdict"]
            nums = f"{_num(m['max_abs_logit_diff'])} / {_num(m['kl_mean'])}"
        flag = "" if r["agrees"] else " **(disagrees)**"
        lines.append(f"| {r['case']} | {r['model_type']} | {h['verdict']} ({_num(h['max_abs_logit_diff'])}) "
                     f"| {measured} | {nums} | {r['expected'].replace('|', chr(92) + '|')}{flag} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", type=Path, help="oracle case folders (default: every fixture)")
    ap.add_argument("--bits", type=int, help="measure the default N-bit quantization instead of float32")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args()
    import importlib.metadata as md

    rows = []
    with tempfile.TemporaryDirectory(prefix="hybridconv-runtimes-") as work:
        for case in args.cases or cases():
            try:
                rows.append(measure(case, Path(work), args.bits))
            except Exception as exc:  # noqa: BLE001  (one case failing should not hide the others)
                print(f"{case.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                rows.append({"case": case.name, "model_type": "?", "expected": "?", "agrees": False,
                             "hybridconv": {"verdict": f"error: {exc}", "max_abs_logit_diff": None},
                             "mlx-lm": {"verdict": "not run", "max_abs_logit_diff": None, "kl_mean": None, "message": None}})
            print(f"{case.name}: done", file=sys.stderr)
    what = f"default {args.bits}-bit quantizations" if args.bits else "float32 conversions"
    print(f"mlx-lm {md.version('mlx-lm')}, mlx {md.version('mlx')}; {what} against each case's oracle logits\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    bad = [r for r in rows if not r["agrees"] or r["hybridconv"]["verdict"] != "pass"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
