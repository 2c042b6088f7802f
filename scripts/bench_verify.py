#!/usr/bin/env python
"""Benchmark: `hybridconv verify` of a RecurrentGemma-2B-shaped checkpoint, phase by phase.

Builds (or reuses) the synthetic checkpoint of scripts/bench_convert.py (2.68 B
parameters, random bfloat16 weights; ``--size small`` builds a small one with the
same layout for trying this out), converts it to bf16 (``hybridconv convert``)
and 4-bit (``hybridconv quantize --bits 4``), then times, each in a fresh process:

* ``hybridconv reference SRC -o FILE`` alone (the PyTorch side: load, float32
  forward, save): the baseline;
* ``hybridconv verify OUT --reference SRC --runtime hybridconv`` for each variant,
  with default inputs, split into: reference load, reference forward (torch),
  MLX load, MLX forward (prefill, evaluated), decode check (one-token steps,
  evaluated), metrics and the rest (block comparisons, report), plus the total
  wall and the peak RSS of the process.

The verify process is the real CLI with timers wrapped around library functions
(``verify.reference.load_torch_model`` and its forward, ``loading.load`` and the
model's calls); each model call is evaluated inside its timer, which costs nothing
extra (verify evaluates every result anyway). ``--slow`` adds runs on the old
path (``HYBRIDCONV_BLAS=off``, ``--compute native``) for comparison: 15 minutes
each at 2B on 2 cores, so meant for ``--size small``.

Targets (issue 12, 2-core Linux): verify wall <= 3x the reference's; MLX forward
<= 1.5x the PyTorch forward; peak RSS <= 1.1x the reference's.

Usage: python scripts/bench_verify.py [--size 2b|small] [--workdir bench-data]
       [--variants bf16,4bit] [--slow] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

SMALL = {"hidden_size": 512, "intermediate_size": 3072, "num_hidden_layers": 6, "vocab_size": 32000,
         "num_attention_heads": 4, "lru_width": 512}

# --- the instrumented verify process ------------------------------------------------------

CHILD = r'''
import atexit, json, os, resource, sys, time
T0 = time.perf_counter()
import hybridconv  # the BLAS before mlx, as the CLI
import hybridconv.loading as loading
import hybridconv.verify.reference as reference
import hybridconv.verify.run as run

phases = {"reference_load": 0.0, "reference_forward": 0.0, "mlx_load": 0.0, "mlx_forward": 0.0,
          "decode_check": 0.0, "verify_folder": 0.0}
counts = {"mlx_forward_tokens": 0, "decode_steps": 0}

def timed(key, fn):
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            phases[key] += time.perf_counter() - t
    return wrapper

orig_ltm = reference.load_torch_model
def load_torch_model(*a, **kw):
    t = time.perf_counter()
    run_, *rest = orig_ltm(*a, **kw)
    phases["reference_load"] += time.perf_counter() - t
    return (timed("reference_forward", run_), *rest)
reference.load_torch_model = load_torch_model

class Timed:
    def __init__(self, model):
        self.model = model
    def __getattr__(self, name):
        return getattr(self.model, name)
    def __call__(self, inputs, cache=None, hidden_states=None):
        import mlx.core as mx
        t = time.perf_counter()
        out = self.model(inputs, cache=cache, hidden_states=hidden_states)
        mx.eval(out, *(hidden_states or []))
        key = "decode_check" if inputs.shape[1] == 1 and cache is not None else "mlx_forward"
        phases[key] += time.perf_counter() - t
        if key == "decode_check":
            counts["decode_steps"] += 1
        else:
            counts["mlx_forward_tokens"] += int(inputs.shape[1])
        return out

orig_load = loading.load
def load(*a, **kw):
    t = time.perf_counter()
    m = orig_load(*a, **kw)
    phases["mlx_load"] += time.perf_counter() - t
    return Timed(m)
loading.load = load
run.verify_folder = timed("verify_folder", run.verify_folder)

def dump():
    phases["metrics_and_rest"] = phases["verify_folder"] - phases["mlx_load"] - phases["mlx_forward"] - phases["decode_check"]
    rec = {"phases": phases, "counts": counts, "wall_in_process": time.perf_counter() - T0,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}
    with open(os.environ["BENCH_VERIFY_OUT"], "w") as f:
        json.dump(rec, f)
atexit.register(dump)
from hybridconv.cli import main
sys.argv = ["hybridconv", *sys.argv[1:]]
main()
'''


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall seconds, exit code and peak RSS (GB) of a command's largest process."""
    wrapper = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter()\n"
        "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
        "wall = time.perf_counter() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
        "print(json.dumps({'rc': rc.returncode, 'wall': wall, 'rss': rss / 1e9, 'stderr': rc.stderr[-2000:]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_source(workdir: Path, size: str) -> Path:
    import bench_convert

    if size == "small":
        bench_convert.CONFIG = {**bench_convert.CONFIG, **SMALL}
    src = workdir / ("recurrentgemma-2b-synthetic" if size == "2b" else "recurrentgemma-small-synthetic")
    bench_convert.build(src)
    return src


def prepare(src: Path, workdir: Path, variant: str, hc: list[str]) -> Path:
    out = workdir / f"{src.name}-{variant}"
    if (out / "config.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    cmd = ([*hc, "convert", str(src), "-o", str(out), "--dtype", "bfloat16"] if variant == "bf16"
           else [*hc, "quantize", str(src), "-o", str(out), "--bits", "4"])
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr}")
    print(f"prepared {out.name} in {time.perf_counter() - t:.1f} s", flush=True)
    return out


def verify_run(out: Path, src: Path, workdir: Path, slow: bool) -> dict:
    rec_path = workdir / "bench-verify-child.json"
    rec_path.unlink(missing_ok=True)
    report = workdir / f"{out.name}-verification{'-slow' if slow else ''}.json"
    cmd = [sys.executable, "-c", CHILD, "verify", str(out), "--reference", str(src), "--runtime", "hybridconv",
           "--no-report", "--json", str(report)]
    env = {"BENCH_VERIFY_OUT": str(rec_path)}
    if slow:
        cmd += ["--compute", "native"]
        env["HYBRIDCONV_BLAS"] = "off"
    m = measure(cmd, env)
    if m["rc"] not in (0, 1):
        raise SystemExit(f"verify failed ({m['rc']}):\n{m['stderr']}")
    rec = json.loads(rec_path.read_text())
    rep = json.loads(report.read_text())
    return {"wall": m["wall"], "peak_rss_gb": m["rss"], **rec, "verdict": rep["verdict"],
            "compute": {k: rep["compute"][k] for k in ("path", "weights", "activations")},
            "blas": rep["compute"]["blas"].get("kind"),
            "kl_mean": rep["metrics"]["overall"]["kl_mean"], "decode_kl_max": (rep.get("decode") or {}).get("kl_max")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-data")
    ap.add_argument("--size", choices=("2b", "small"), default="2b")
    ap.add_argument("--variants", default="bf16,4bit")
    ap.add_argument("--slow", action="store_true", help="also time the old path (HYBRIDCONV_BLAS=off, --compute native)")
    ap.add_argument("--json", type=Path, help="write all figures here")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    hc = [sys.executable, "-m", "hybridconv"]
    src = build_source(args.workdir, args.size)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    outs = {v: prepare(src, args.workdir, v, hc) for v in variants}
    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "load_average_before": os.getloadavg()},
                     "size": args.size, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    ref_file = args.workdir / "bench-reference.safetensors"
    r = measure([*hc, "reference", str(src), "-o", str(ref_file), "--force"])
    if r["rc"]:
        raise SystemExit(f"reference failed:\n{r['stderr']}")
    results["reference_alone"] = {"wall": r["wall"], "peak_rss_gb": r["rss"]}
    print(f"hybridconv reference alone: {r['wall']:.1f} s, peak RSS {r['rss']:.2f} GB", flush=True)
    for v in variants:
        for slow in ([False, True] if args.slow else [False]):
            label = v + (" (old path)" if slow else "")
            res = verify_run(outs[v], src, args.workdir, slow)
            results[label] = res
            p = res["phases"]
            print(f"verify {label}: {res['wall']:.1f} s, peak RSS {res['peak_rss_gb']:.2f} GB, {res['verdict']}; "
                  f"{res['compute']['path']} arithmetic, BLAS {res['blas']}", flush=True)
            print("   " + ", ".join(f"{k} {x:.1f} s" for k, x in p.items() if k != "verify_folder"), flush=True)
    base = results["reference_alone"]
    print()
    print(f"machine: {results['machine']['platform']}, {results['machine']['cpus']} CPUs; command: {results['command']}")
    print("| run | wall (s) | x reference | reference load / forward (s) | MLX load / forward / decode (s) | metrics+rest (s) | MLX fwd / torch fwd | peak RSS (GB) | x reference RSS | verdict | arithmetic |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| hybridconv reference | {base['wall']:.1f} | 1.00 | | | | | {base['peak_rss_gb']:.2f} | 1.00 | | |")
    for label, res in results.items():
        if not isinstance(res, dict) or "phases" not in res:
            continue
        p = res["phases"]
        ratio_fwd = p["mlx_forward"] / p["reference_forward"] if p["reference_forward"] else float("nan")
        print(f"| verify {label} | {res['wall']:.1f} | {res['wall'] / base['wall']:.2f} | "
              f"{p['reference_load']:.1f} / {p['reference_forward']:.1f} | "
              f"{p['mlx_load']:.1f} / {p['mlx_forward']:.1f} / {p['decode_check']:.1f} | {p['metrics_and_rest']:.1f} | "
              f"{ratio_fwd:.2f} | {res['peak_rss_gb']:.2f} | {res['peak_rss_gb'] / base['peak_rss_gb']:.2f} | "
              f"{res['verdict']} (KL {res['kl_mean']:.3g}) | {res['compute']['path']}, BLAS {res['blas']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
