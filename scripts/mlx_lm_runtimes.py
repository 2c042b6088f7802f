"""What mlx-lm does with hybridconv's output of every oracle case, measured.

For each case in ``../shared/fixtures``, ``../shared/fixtures/hybrids`` and
``../shared/fixtures/wave3`` (or the folders given): convert it in float32 twice, with ``--mlx-lm-code
never`` (mlx-lm's OWN model runs it: what every output was before outputs could
carry hybridconv's model) and with the default ``--mlx-lm-code auto`` (what
mlx-lm users get now: the output carries hybridconv's model where mlx-lm's own
cannot run it right, and mlx-lm runs that with trust_remote_code). Each is
verified with both runtimes (hybridconv, and mlx-lm in a separate process
through ``mlx_lm.utils.load_model``) against the case's stored oracle logits.
The README's table: per case, hybridconv's verdict; mlx-lm's own model's
verdict with max |Δlogit| and mean KL (or its message when it cannot load or
run the output); what ``inspect`` predicts from the config alone
(``converters/_mlx_lm.py``), flagged where prediction and measurement disagree;
and mlx-lm's verdict on the default output, with what it ran.

    .venv/bin/python scripts/mlx_lm_runtimes.py [CASE_FOLDER ...] [--bits N] [--json PATH]

``--bits N`` measures hybridconv's default N-bit quantization instead (gates
of that width; the oracle logits are float32).

Exit status 1 when a prediction disagrees with a measurement, hybridconv fails a
case, or mlx-lm does not pass a default output.
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
    for base in (FIXTURES, FIXTURES / "hybrids", FIXTURES / "wave3"):
        if base.is_dir():
            found += sorted(p for p in base.iterdir() if (p / "expected.safetensors").is_file())
    return found


def _build(case: Path, out: Path, bits: int | None, policy: str) -> None:
    from hybridconv.convert import convert

    if bits:
        from hybridconv.quant.run import quantize

        quantize(str(case), out, bits, dtype="float32", force=True, mlx_lm_code=policy)
    else:
        convert(str(case), out, "float32", force=True, mlx_lm_code=policy)


def _result(r: dict) -> dict:
    o = (r.get("metrics") or {}).get("overall") or {}
    return {"verdict": r["verdict"], "max_abs_logit_diff": o.get("max_abs_logit_diff"),
            "kl_mean": o.get("kl_mean"), "message": r.get("message"),
            "decode_kl_max": (r.get("decode") or {}).get("kl_max"),
            "trust_remote_code": r.get("trust_remote_code"), "model_code": r.get("model_code")}


def measure(case: Path, work: Path, bits: int | None = None) -> dict:
    from hybridconv.loading import load_config
    from hybridconv.verify.reference import read_reference_file
    from hybridconv.verify.run import verify_folder

    ref = read_reference_file(case / "expected.safetensors")
    own = work / f"{case.name}-never"
    _build(case, own, bits, "never")
    arch, config = load_config(own)
    report = verify_folder(own, ref, runtimes=("hybridconv", "mlx-lm")).report
    row = {"case": case.name, "model_type": arch.model_type, "expected": arch.mlx_lm_support(config).line()}
    for name, r in report["runtimes"].items():
        row[name] = _result(r)
    default = work / f"{case.name}-auto"
    _build(case, default, bits, "auto")
    row["mlx-lm (auto)"] = _result(verify_folder(default, ref, runtimes=("mlx-lm",)).report["runtimes"]["mlx-lm"])
    predicted = arch.mlx_lm_support(config).status
    row["agrees"] = predicted in AGREES.get(row["mlx-lm"]["verdict"], ())
    if bits and predicted == "differs" and row["mlx-lm"]["verdict"] == "pass":
        row["agrees"] = True  # the difference is within the N-bit gates (verify notes it)
        row["mlx-lm"]["verdict"] = f"pass (within the {bits}-bit gates; differs in float32)"
    return row


def _num(x) -> str:
    return "–" if x is None else f"{x:.2g}"


def table(rows: list[dict]) -> str:
    lines = ["| case | model_type | hybridconv | mlx-lm's own model | its max \\|Δlogit\\| / KL mean "
             "| inspect says (from the config) | mlx-lm on the default output (max \\|Δlogit\\|) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        h, m, a = r["hybridconv"], r["mlx-lm"], r.get("mlx-lm (auto)") or {"verdict": "not run"}
        if m["verdict"] in ("cannot load", "cannot run"):
            measured = f"{m['verdict']}: {(m['message'] or '')[:120]}"
            nums = "–"
        else:
            measured = m["verdict"]
            nums = f"{_num(m['max_abs_logit_diff'])} / {_num(m['kl_mean'])}"
        ran = "carried hybridconv_model.py, trust_remote_code" if a.get("trust_remote_code") else "its own model"
        after = f"{a['verdict']} ({_num(a.get('max_abs_logit_diff'))}; {ran})"
        flag = "" if r["agrees"] else " **(disagrees)**"
        lines.append(f"| {r['case']} | {r['model_type']} | {h['verdict']} ({_num(h['max_abs_logit_diff'])}) "
                     f"| {measured} | {nums} | {r['expected'].replace('|', chr(92) + '|')}{flag} | {after} |")
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
    bad = [r for r in rows if not r["agrees"] or r["hybridconv"]["verdict"] != "pass"
           or (r.get("mlx-lm (auto)") or {}).get("verdict") != "pass"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
