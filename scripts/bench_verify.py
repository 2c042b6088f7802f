#!/usr/bin/env python
"""Benchmark: `hybridconv verify` of a RecurrentGemma-2B- or Granite-4.0-H-Tiny-shaped checkpoint, part by part.

Builds (or reuses) a synthetic checkpoint with random bfloat16 weights:

* ``--size 2b``: the RecurrentGemma-2B-shaped one of scripts/bench_convert.py
  (2.68 B parameters, 5.4 GB); ``--size small``: the same layout, small;
* ``--size granite-7b``: shaped like ibm-granite/granite-4.0-h-tiny — 40 layers
  (attention without position embedding at 5, 15, 25, 35; Mamba-2 elsewhere: 48
  heads x 64, state 128, 1 group, conv 4), hidden 1536, 64 experts of width 512
  with top-6 routing and a shared MLP of 1024 in every layer, vocabulary 100352,
  tied embeddings: 6.93 B parameters, 13.9 GB in 3 shards as on the Hub, larger
  than the float32 reference on a 24 GB machine; ``--size granite-small``: the
  same layout, 8 layers and hidden 512, for trying this out;

converts it to bf16 (``hybridconv convert``) and 4-bit (``hybridconv quantize
--bits 4``), then times, each in a fresh process:

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

Whole model or one block at a time: each command chooses as it does for users
(``--stream on|off`` passes ``--stream`` / ``--no-stream``); the parts each
report records (``execution``: path, seconds per part, peak memory) are printed
beside the outside measurements.

Targets (issue 12, 2-core Linux): verify wall <= 3x the reference's; MLX forward
<= 1.5x the PyTorch forward; peak RSS <= 1.1x the reference's. Issue 21, for
``granite-7b`` on a 24 GB machine: ``reference`` runs, bf16 ``verify`` passes,
4-bit ``verify`` gives a verdict, each with peak RSS <= 6 GB; verify wall <= 3x
the reference's.

Usage: python scripts/bench_verify.py [--size 2b|small|granite-7b|granite-small]
       [--workdir bench-data] [--variants bf16,4bit] [--slow] [--stream auto|on|off]
       [--json results.json]
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
    # the streamed path runs the model block by block (its report has the parts)
    return m if kw.get("lazy") else Timed(m)
loading.load = load
run.verify_folder = timed("verify_folder", run.verify_folder)
executions = {}
orig_cr = reference.compute_reference
def compute_reference(*a, **kw):
    ref = orig_cr(*a, **kw)
    executions["reference"] = ref.execution
    return ref
reference.compute_reference = compute_reference

def dump():
    phases["metrics_and_rest"] = phases["verify_folder"] - phases["mlx_load"] - phases["mlx_forward"] - phases["decode_check"]
    rec = {"phases": phases, "counts": counts, "wall_in_process": time.perf_counter() - T0, "executions": executions,
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


# Granite-4.0-H-Tiny (ibm-granite/granite-4.0-h-tiny, config.json), random weights.
GRANITE = {
    "architectures": ["GraniteMoeHybridForCausalLM"],
    "model_type": "granitemoehybrid",
    "torch_dtype": "bfloat16",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attention_multiplier": 0.0078125,
    "bos_token_id": 100257,
    "eos_token_id": 100257,
    "pad_token_id": 100256,
    "embedding_multiplier": 12,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "initializer_range": 0.1,
    "intermediate_size": 512,
    "layer_types": ["mamba" if i % 10 != 5 else "attention" for i in range(40)],
    "logits_scaling": 6,
    "mamba_chunk_size": 256,
    "mamba_conv_bias": True,
    "mamba_d_conv": 4,
    "mamba_d_head": 64,
    "mamba_d_state": 128,
    "mamba_expand": 2,
    "mamba_n_groups": 1,
    "mamba_n_heads": 48,
    "mamba_proj_bias": False,
    "max_position_embeddings": 131072,
    "normalization_function": "rmsnorm",
    "num_attention_heads": 12,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 40,
    "num_key_value_heads": 4,
    "num_local_experts": 64,
    "output_router_logits": False,
    "position_embedding_type": "nope",
    "residual_multiplier": 0.22,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000,
    "router_aux_loss_coef": 0.0,
    "shared_intermediate_size": 1024,
    "tie_word_embeddings": True,
    "vocab_size": 100352,
}
GRANITE_SMALL = {"hidden_size": 512, "num_hidden_layers": 8, "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0, "mamba_n_heads": 16, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "num_local_experts": 16, "vocab_size": 32000,
                 "layer_types": ["mamba" if i % 4 != 1 else "attention" for i in range(8)]}


def granite_shapes(cfg: dict) -> dict:
    """Tensor names and shapes of a GraniteMoeHybrid checkpoint as published (experts fused)."""
    h, e, i_e, i_s = cfg["hidden_size"], cfg["num_local_experts"], cfg["intermediate_size"], cfg["shared_intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = h // heads
    nh, dh, n, g, k = cfg["mamba_n_heads"], cfg["mamba_d_head"], cfg["mamba_d_state"], cfg["mamba_n_groups"], cfg["mamba_d_conv"]
    inner = nh * dh
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h)}
    for layer, kind in enumerate(cfg["layer_types"]):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if kind == "mamba":
            m = p + "mamba."
            shapes[m + "in_proj.weight"] = (2 * inner + 2 * g * n + nh, h)
            shapes[m + "conv1d.weight"] = (inner + 2 * g * n, 1, k)
            shapes[m + "conv1d.bias"] = (inner + 2 * g * n,)
            for name in ("A_log", "D", "dt_bias"):
                shapes[m + name] = (nh,)
            shapes[m + "norm.weight"] = (inner,)
            shapes[m + "out_proj.weight"] = (h, inner)
        else:
            a = p + "self_attn."
            shapes[a + "q_proj.weight"] = (heads * hd, h)
            shapes[a + "k_proj.weight"] = (kv * hd, h)
            shapes[a + "v_proj.weight"] = (kv * hd, h)
            shapes[a + "o_proj.weight"] = (h, heads * hd)
        shapes[p + "block_sparse_moe.input_linear.weight"] = (e, 2 * i_e, h)
        shapes[p + "block_sparse_moe.output_linear.weight"] = (e, h, i_e)
        shapes[p + "block_sparse_moe.router.layer.weight"] = (e, h)
        shapes[p + "shared_mlp.input_linear.weight"] = (2 * i_s, h)
        shapes[p + "shared_mlp.output_linear.weight"] = (h, i_s)
    shapes["model.norm.weight"] = (h,)
    return shapes


def build_granite(src: Path, cfg: dict, n_shards: int = 3) -> None:
    """Random bfloat16 weights (N(0, 0.02); norms 1, A_log log(1..H), D 1, dt_bias 0 as the
    model initialises them, so activations stay finite through 40 blocks), written shard
    by shard with an index; the tokenizer of the tiny example."""
    import math

    import numpy as np

    from hybridconv.safetensors_io import from_float32, header_bytes

    if (src / "model.safetensors.index.json").is_file():
        return
    print(f"building synthetic {cfg['model_type']} checkpoint in {src} ...", flush=True)
    tmp = src.with_name(src.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = granite_shapes(cfg)
    total = sum(math.prod(s) * 2 for s in shapes.values())
    groups, cur, size = [], [], 0
    for name, shape in shapes.items():
        cur.append(name)
        size += math.prod(shape) * 2
        if size >= total / n_shards and len(groups) < n_shards - 1:
            groups.append(cur)
            cur, size = [], 0
    groups.append(cur)
    rng = np.random.default_rng(0)
    pool = from_float32((rng.standard_normal(1 << 24) * 0.02).astype(np.float32), "BF16")

    def special(name: str, shape) -> np.ndarray | None:
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            return np.ones(shape, np.float32)
        if name.endswith("A_log"):
            return np.log(np.arange(1, shape[0] + 1, dtype=np.float32))
        if name.endswith(".D"):
            return np.ones(shape, np.float32)
        if name.endswith("dt_bias") or name.endswith("conv1d.bias"):
            return np.zeros(shape, np.float32)
        return None

    weight_map = {}
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        with open(tmp / fname, "wb") as f:
            f.write(header_bytes([(n, "BF16", shapes[n]) for n in names], {"format": "pt"}))
            for n in names:
                fixed = special(n, shapes[n])
                if fixed is not None:
                    f.write(from_float32(fixed.reshape(-1), "BF16").tobytes())
                else:
                    count = math.prod(shapes[n])
                    start = int(rng.integers(0, pool.size))
                    while count:
                        take = min(count, pool.size - start)
                        f.write(pool[start : start + take].tobytes())
                        count -= take
                        start = 0
                weight_map[n] = fname
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    demo = REPO / "examples" / "checkpoints" / "recurrent_gemma-tiny"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(demo / name, tmp / name)
    os.replace(tmp, src)
    print(f"built: {total / 1e9:.2f} GB in {len(groups)} shards", flush=True)


def build_source(workdir: Path, size: str) -> Path:
    if size.startswith("granite"):
        src = workdir / ("granite-4.0-h-tiny-synthetic" if size == "granite-7b" else "granite-small-synthetic")
        build_granite(src, GRANITE if size == "granite-7b" else {**GRANITE, **GRANITE_SMALL})
        return src
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
    m = measure(cmd)
    if m["rc"]:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{m['stderr']}")
    print(f"prepared {out.name} in {time.perf_counter() - t:.1f} s (peak RSS {m['rss']:.2f} GB)", flush=True)
    return out


def _parts(ex: dict | None) -> str:
    if not ex:
        return ""
    secs = " / ".join(f"{v:.1f}" for k, v in ex.get("seconds", {}).items() if k != "total")
    keys = " / ".join(k for k in ex.get("seconds", {}) if k != "total")
    return f"{ex['path']}: {keys} = {secs} s"


def reference_run(src: Path, workdir: Path, stream_flag: list[str]) -> dict:
    rec_path = workdir / "bench-verify-child.json"
    rec_path.unlink(missing_ok=True)
    ref_file = workdir / "bench-reference.safetensors"
    m = measure([sys.executable, "-c", CHILD, "reference", str(src), "-o", str(ref_file), "--force", *stream_flag],
                {"BENCH_VERIFY_OUT": str(rec_path)})
    if m["rc"]:
        raise SystemExit(f"reference failed:\n{m['stderr']}")
    rec = json.loads(rec_path.read_text())
    return {"wall": m["wall"], "peak_rss_gb": m["rss"], "execution": rec["executions"].get("reference")}


def verify_run(out: Path, src: Path, workdir: Path, slow: bool, stream_flag: list[str]) -> dict:
    rec_path = workdir / "bench-verify-child.json"
    rec_path.unlink(missing_ok=True)
    report = workdir / f"{out.name}-verification{'-slow' if slow else ''}.json"
    cmd = [sys.executable, "-c", CHILD, "verify", str(out), "--reference", str(src), "--runtime", "hybridconv",
           "--no-report", "--json", str(report), *stream_flag]
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
            "failure_reasons": rep["failure_reasons"],
            "reference_execution": rep["reference"].get("execution"), "mlx_execution": rep.get("execution"),
            "compute": {k: rep["compute"][k] for k in ("path", "weights", "activations")},
            "blas": rep["compute"]["blas"].get("kind"),
            "kl_mean": rep["metrics"]["overall"]["kl_mean"], "decode_kl_max": (rep.get("decode") or {}).get("kl_max"),
            "first_divergent_block": rep.get("first_divergent_block"), "block_note": rep.get("block_note")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-data")
    ap.add_argument("--size", choices=("2b", "small", "granite-7b", "granite-small"), default="2b")
    ap.add_argument("--variants", default="bf16,4bit")
    ap.add_argument("--slow", action="store_true", help="also time the old path (HYBRIDCONV_BLAS=off, --compute native)")
    ap.add_argument("--stream", dest="stream_flag", default="", choices=("auto", "on", "off"),
                    help="on / off: pass --stream / --no-stream to reference and verify (default auto: they choose)")
    ap.add_argument("--json", type=Path, help="write all figures here")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    flag = {"on": ["--stream"], "off": ["--no-stream"]}.get(args.stream_flag, [])
    hc = [sys.executable, "-m", "hybridconv"]
    src = build_source(args.workdir, args.size)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    outs = {v: prepare(src, args.workdir, v, hc) for v in variants}
    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "load_average_before": os.getloadavg()},
                     "size": args.size, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    r = reference_run(src, args.workdir, flag)
    results["reference_alone"] = r
    print(f"hybridconv reference alone: {r['wall']:.1f} s, peak RSS {r['peak_rss_gb']:.2f} GB; "
          f"{_parts(r['execution'])}", flush=True)
    for v in variants:
        for slow in ([False, True] if args.slow else [False]):
            label = v + (" (old path)" if slow else "")
            res = verify_run(outs[v], src, args.workdir, slow, flag)
            results[label] = res
            p = res["phases"]
            print(f"verify {label}: {res['wall']:.1f} s, peak RSS {res['peak_rss_gb']:.2f} GB, {res['verdict']} "
                  f"{'; '.join(res['failure_reasons'])}; {res['compute']['path']} arithmetic, BLAS {res['blas']}",
                  flush=True)
            print(f"   reference {_parts(res['reference_execution'])}", flush=True)
            print(f"   MLX {_parts(res['mlx_execution'])}", flush=True)
            print("   " + ", ".join(f"{k} {x:.1f} s" for k, x in p.items() if k != "verify_folder"), flush=True)
    results["machine"]["load_average_after"] = os.getloadavg()
    base = results["reference_alone"]
    print()
    print(f"machine: {results['machine']['platform']}, {results['machine']['cpus']} CPUs, load average "
          f"{results['machine']['load_average_before'][0]:.1f} before, {results['machine']['load_average_after'][0]:.1f} "
          f"after; command: {results['command']}")
    print("| run | wall (s) | x reference | reference: path, parts (s) | MLX: path, parts (s) | peak RSS (GB) | x reference RSS | verdict | arithmetic |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| hybridconv reference | {base['wall']:.1f} | 1.00 | {_parts(base['execution'])} | | {base['peak_rss_gb']:.2f} | 1.00 | | |")
    for label, res in results.items():
        if not isinstance(res, dict) or "phases" not in res:
            continue
        print(f"| verify {label} | {res['wall']:.1f} | {res['wall'] / base['wall']:.2f} | "
              f"{_parts(res['reference_execution'])} | {_parts(res['mlx_execution'])} | "
              f"{res['peak_rss_gb']:.2f} | {res['peak_rss_gb'] / base['peak_rss_gb']:.2f} | "
              f"{res['verdict']} (KL {res['kl_mean']:.3g}) | {res['compute']['path']}, BLAS {res['blas']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
