"""Mutation check of verify's decisions, quantize's precision policy and two safety
paths (issue 28): each mutant is one deliberate bug, applied to a scratch copy of
the working tree; the tests named for it must then fail.

    python scripts/check_mutants.py                 # every mutant, its tests
    python scripts/check_mutants.py --only gap5     # one (or several) by name
    python scripts/check_mutants.py --all-new-tests # every mutant against all the new test files
    python scripts/check_mutants.py --list

For each mutant: the tree (tracked and untracked, not ignored files) is copied to a
temporary folder, the one edit applied (it must match exactly once: a mutant that
no longer applies is reported as STALE, so the list is kept up to date with the
code), and pytest runs the mutant's tests there with the copy first on PYTHONPATH
(the oracle fixtures found as usual, through HYBRIDCONV_FIXTURES). A first run on
the unmutated copy must pass. Prints, per mutant, CAUGHT (pytest failed) with the
failing tests, or SURVIVED; exits 1 if any survived or is stale.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DECISIONS = "tests/test_verify_decisions.py"
POLICY = "tests/test_precision_policy.py"
SAFETY = "tests/test_safety_paths.py"
NEW_TESTS = (DECISIONS, POLICY, SAFETY)


@dataclass
class Mutant:
    name: str
    what: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    # the nine of issue 28, "Done means"
    Mutant("decode-no-cache", "run_sequence treats every sequence as k == 0 (the decode check stops using the caches)",
           "hybridconv/verify/onepass.py", "k = max(0, min(k, T - 1))\n    if k == 0:", "k = 0\n    if k == 0:",
           (DECISIONS + "::test_decode_steps_run_through_the_caches",
            DECISIONS + "::test_a_decode_only_fault_fails_verify_naming_the_decode_check")),
    Mutant("gap5", "decisive-token gap 0.5 -> 5 nats", "hybridconv/verify/metrics.py",
           "DECISIVE_GAP = 0.5", "DECISIVE_GAP = 5", (DECISIONS,)),
    Mutant("top5-as-top1", "top-5 overlap computed as top-1 agreement", "hybridconv/verify/metrics.py",
           "k = min(5, ref_top.shape[1])", "k = 1", (DECISIONS,)),
    Mutant("no-top5-gate", "the top-5 gate removed", "hybridconv/verify/run.py",
           '        ("min_top5", "top5_overlap_decisive", "decisive_tokens_top5", "5th and 6th best logits"),\n', "",
           (DECISIONS,)),
    Mutant("4bit-10x-looser", "4-bit gates 10x looser", "hybridconv/verify/gates.py",
           '"4bit": Gates(0.15, 1.5, 0.7, 0.6, 0.6)', '"4bit": Gates(1.5, 15.0, 0.07, 0.06, 6.0)', (DECISIONS,)),
    Mutant("granite-router-quantized", "Granite-4.0-H MoE router quantized by default",
           "hybridconv/converters/granitemoehybrid.py",
           'Role("moe.router", r"\\.block_sparse_moe\\.router\\.layer\\.weight$", default="float",',
           'Role("moe.router", r"\\.block_sparse_moe\\.router\\.layer\\.weight$",', (POLICY,)),
    Mutant("rglru-param-not-f32", "RG-LRU recurrent_param stored in the output dtype",
           "hybridconv/converters/recurrent_gemma.py", "errors change the memory length\",\n              float32=True)",
           "errors change the memory length\",\n              float32=False)", (POLICY,)),
    Mutant("release-ignores-require", "release ignores require_runtimes", "hybridconv/publish/release.py",
           "runtimes=runtimes, require=v.require_runtimes).report", "runtimes=runtimes, require=()).report",
           (SAFETY + "::test_release_never_uploads_a_variant_its_required_runtime_cannot_load",)),
    Mutant("no-nan-scan-chunked-cast", "NaN scan skipped on convert's chunked cast path", "hybridconv/convert.py",
           "bad = bad or has_nonfinite(chunk, info.dtype)", "bad = False",
           (SAFETY + "::test_nonfinite_refused_when_the_dtype_changes",)),
    # lower impact (issue 28, item 7) and the second block stage
    Mutant("no-decode-gate", "the decode KL gate never appended", "hybridconv/verify/run.py",
           'checks.append(_check("decode_kl_max", worst_kl, gates.max_kl_p99, "max"))', "pass", (DECISIONS,)),
    Mutant("no-interrupt-between-tensors", "no interrupt check between tensors written", "hybridconv/convert.py",
           "interrupt.check()  # a safe point: between tensors", "pass  # a safe point: between tensors",
           (SAFETY + "::test_a_signal_stops_convert_at_the_next_tensor",)),
    Mutant("own-error-ignored", "the block gate decided on chained errors, own errors ignored",
           "hybridconv/verify/run.py", "decisive = own[b] if own is not None else chained[b]", "decisive = chained[b]",
           (DECISIONS + "::test_own_errors_decide_the_block_gate",)),
]


def copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst / rel)  # fresh mtimes: no stale bytecode can stand in for the mutant


def pytest(tree: Path, tests, timeout: int) -> tuple[int, str, float]:
    fixtures = os.environ.get("HYBRIDCONV_FIXTURES", str(REPO.parent / "shared" / "fixtures"))
    env = {**os.environ, "PYTHONPATH": str(tree), "HYBRIDCONV_FIXTURES": fixtures, "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", "--tb=line",
                            *tests], cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timed out", time.time() - t0
    return r.returncode, r.stdout + r.stderr, time.time() - t0


def failures(output: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^FAILED (\S+)", output, re.M)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="mutant names (see --list)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--all-new-tests", action="store_true", help="run every mutant against all of " + ", ".join(NEW_TESTS))
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--no-baseline", action="store_true", help="skip the run on the unmutated copy")
    args = ap.parse_args()
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:30s} {m.what}  [{m.file}]")
        return 0
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or []) - {m.name for m in MUTANTS}
    if unknown:
        print(f"unknown mutant(s): {', '.join(sorted(unknown))}; see --list")
        return 2
    bad = 0
    with tempfile.TemporaryDirectory(prefix="hybridconv-mutants-") as tmp:
        tree = Path(tmp) / "tree"
        if not args.no_baseline:
            tree.mkdir()
            copy_tree(tree)
            tests = sorted({t for m in chosen for t in (NEW_TESTS if args.all_new_tests else m.tests)})
            rc, out, secs = pytest(tree, tests, args.timeout)
            print(f"baseline (no mutant): {'pass' if rc == 0 else 'FAIL'} in {secs:.0f} s")
            if rc != 0:
                print(out[-3000:])
                return 1
            shutil.rmtree(tree)
        for m in chosen:
            tree.mkdir()
            copy_tree(tree)
            path = tree / m.file
            text = path.read_text()
            if text.count(m.old) != 1:
                print(f"STALE     {m.name}: the text to mutate occurs {text.count(m.old)} times in {m.file}; update "
                      "scripts/check_mutants.py")
                bad += 1
                shutil.rmtree(tree)
                continue
            path.write_text(text.replace(m.old, m.new))
            tests = NEW_TESTS if args.all_new_tests else m.tests
            rc, out, secs = pytest(tree, tests, args.timeout)
            if rc == 0:
                print(f"SURVIVED  {m.name}: {m.what} ({secs:.0f} s)")
                bad += 1
            else:
                failed = failures(out)
                print(f"CAUGHT    {m.name}: {m.what} ({secs:.0f} s)")
                for f in failed or [f"pytest exit {rc}: {out.strip().splitlines()[-1] if out.strip() else ''}"]:
                    print(f"            {f}")
                for line in re.findall(r"^\S+\.py:\d+: (?:AssertionError|assert|E ).*$", out, re.M)[:3]:
                    print(f"              {line[:200]}")
            shutil.rmtree(tree)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
