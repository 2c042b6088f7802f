#!/usr/bin/env python
"""Benchmark: hybridconv convert vs mlx_lm.convert vs cp -r on a RecurrentGemma-2B-shaped checkpoint.

Builds (once, if absent) a synthetic checkpoint with the shapes of
google/recurrentgemma-2b — random bfloat16 weights, about 5.4 GB in 3 shards
with an index and a tokenizer — then times, in one run, each of:

    hybridconv convert SRC -o OUT
    python -m mlx_lm convert --hf-path SRC --mlx-path OUT
    cp -r SRC OUT

and prints wall time and peak RSS (of the command's largest process, from
getrusage) with the ratios. Targets: hybridconv's peak RSS <= 0.3x
mlx_lm.convert's, wall time <= 1.3x cp -r. The source is read once while
it is built, so all three read it from the page cache; `sync` runs before each
measurement so that no tool pays for another's pending writes.

Usage: python scripts/bench_convert.py [--workdir bench-data] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hybridconv.safetensors_io import from_float32, header_bytes  # noqa: E402

CONFIG = {
    "architectures": ["RecurrentGemmaForCausalLM"],
    "model_type": "recurrent_gemma",
    "torch_dtype": "bfloat16",
    "hidden_size": 2560,
    "intermediate_size": 15360,
    "num_hidden_layers": 26,
    "vocab_size": 256000,
    "num_attention_heads": 10,
    "num_key_value_heads": 1,
    "lru_width": 2560,
    "attention_window_size": 2048,
    "conv1d_width": 4,
    "logits_soft_cap": 30.0,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,
    "block_types": ["recurrent", "recurrent", "attention"],
    "attention_bias": False,
    "embeddings_scale_by_sqrt_dim": True,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, lru, heads = cfg["hidden_size"], cfg["lru_width"], cfg["num_attention_heads"]
    mlp = cfg["intermediate_size"] // 2
    hd = h // heads
    bw = lru // heads
    kinds = cfg["block_types"]
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.final_norm.weight": (h,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "temporal_pre_norm.weight"] = (h,)
        shapes[p + "channel_pre_norm.weight"] = (h,)
        for name, shape in (("gate_proj", (mlp, h)), ("up_proj", (mlp, h)), ("down_proj", (h, mlp))):
            shapes[p + f"mlp_block.{name}.weight"] = shape
            shapes[p + f"mlp_block.{name}.bias"] = (shape[0],)
        t = p + "temporal_block."
        if kinds[i % len(kinds)] == "recurrent":
            for name, shape in (("linear_x", (lru, h)), ("linear_y", (lru, h)), ("linear_out", (h, lru))):
                shapes[t + f"{name}.weight"] = shape
                shapes[t + f"{name}.bias"] = (shape[0],)
            shapes[t + "conv_1d.weight"] = (lru, 1, cfg["conv1d_width"])
            shapes[t + "conv_1d.bias"] = (lru,)
            shapes[t + "rg_lru.recurrent_param"] = (lru,)
            for g in ("input_gate", "recurrent_gate"):
                shapes[t + f"rg_lru.{g}_weight"] = (heads, bw, bw)
                shapes[t + f"rg_lru.{g}_bias"] = (heads, bw)
        else:
            shapes[t + "q_proj.weight"] = (h, h)
            shapes[t + "k_proj.weight"] = (hd, h)
            shapes[t + "v_proj.weight"] = (hd, h)
            shapes[t + "o_proj.weight"] = (h, h)
            shapes[t + "o_proj.bias"] = (h,)
    return shapes


def build(src: Path, n_shards: int = 3) -> None:
    if (src / "model.safetensors.index.json").is_file():
        return
    print(f"building synthetic RecurrentGemma-2B-shaped checkpoint in {src} ...", flush=True)
    tmp = src.with_name(src.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = tensor_shapes(CONFIG)
    total = sum(math.prod(s) * 2 for s in shapes.values())
    target = total / n_shards
    groups, cur, size = [], [], 0
    for name, shape in shapes.items():
        cur.append(name)
        size += math.prod(shape) * 2
        if size >= target and len(groups) < n_shards - 1:
            groups.append(cur)
            cur, size = [], 0
    groups.append(cur)
    rng = np.random.default_rng(0)
    pool = from_float32((rng.standard_normal(1 << 24) * 0.02).astype(np.float32), "BF16")
    weight_map = {}
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        with open(tmp / fname, "wb") as f:
            f.write(header_bytes([(n, "BF16", shapes[n]) for n in names], {"format": "pt"}))
            for n in names:
                count = math.prod(shapes[n])
                start = int(rng.integers(0, pool.size))
                while count:
                    take = min(count, pool.size - start)
                    f.write(pool[start : start + take])
                    count -= take
                    start = 0
                weight_map[n] = fname
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2))
    demo = REPO / "examples" / "checkpoints" / "recurrent_gemma-tiny"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(demo / name, tmp / name)
    os.replace(tmp, src)
    print(f"built: {total / 1e9:.2f} GB in {len(groups)} shards", flush=True)


def measure(cmd: list[str], log: Path | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of the command's largest process; ``log``: a file
    that receives the command's output (its progress) as it runs, for long commands."""
    wrapper = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter()\n"
        "log = open(sys.argv[1], 'a') if sys.argv[1] else None\n"
        "rc = subprocess.run(sys.argv[2:], stdout=log or subprocess.DEVNULL, stderr=log).returncode\n"
        "wall = time.perf_counter() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
        "print(json.dumps({'rc': rc, 'wall': wall, 'rss': rss}))\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, str(log) if log else "", *cmd], capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise SystemExit(f"command failed ({res['rc']}): {' '.join(cmd)}\n{out.stderr}"
                         + (f"(its output: {log})" if log else ""))
    return res["wall"], res["rss"] / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-data")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the best wall time of each tool is kept")
    ap.add_argument("--keep-outputs", action="store_true")
    args = ap.parse_args()
    src = args.workdir / "recurrentgemma-2b-synthetic"
    build(src)
    bindir = Path(sys.executable).parent
    tools = {
        "hybridconv convert": lambda out: [str(bindir / "hybridconv"), "convert", str(src), "-o", str(out)],
        "mlx_lm.convert": lambda out: [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(out)],
        "cp -r": lambda out: ["cp", "-r", str(src), str(out)],
    }
    best: dict[str, tuple[float, float]] = {name: (float("inf"), 0.0) for name in tools}
    walls: dict[str, list[float]] = {name: [] for name in tools}
    # Interleaved rounds: every tool meets the same page-cache and writeback state.
    for round_ in range(args.repeat):
        for name, make in tools.items():
            out = args.workdir / ("out-" + name.split()[0].replace(".", "_"))
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"])  # start each run with no dirty pages pending
            wall, rss = measure(make(out))
            best[name] = (min(best[name][0], wall), max(best[name][1], rss))
            walls[name].append(wall)
            print(f"round {round_ + 1}: {name:20s} wall {wall:7.2f} s   peak RSS {rss:6.2f} GB", flush=True)
            if not args.keep_outputs:
                shutil.rmtree(out, ignore_errors=True)
    results = best
    size = sum(f.stat().st_size for f in src.iterdir()) / 1e9
    hc, ml, cp = results["hybridconv convert"], results["mlx_lm.convert"], results["cp -r"]
    print()
    print(f"checkpoint: {size:.2f} GB, {os.cpu_count()} cores")
    med = {name: float(np.median(w)) for name, w in walls.items()}
    print("| tool | best wall (s) | median wall (s) | peak RSS (GB) |")
    print("|---|---|---|---|")
    for name, (wall, rss) in results.items():
        print(f"| {name} | {wall:.2f} | {med[name]:.2f} | {rss:.2f} |")
    print(f"hybridconv / mlx_lm.convert peak RSS: {hc[1] / ml[1]:.3f} (target <= 0.3)")
    print(f"hybridconv / cp -r wall time, best:   {hc[0] / cp[0]:.3f} (target <= 1.3)")
    print(f"hybridconv / cp -r wall time, median: {med['hybridconv convert'] / med['cp -r']:.3f}")
    print(f"hybridconv / mlx_lm.convert wall:     {hc[0] / ml[0]:.3f} (best), "
          f"{med['hybridconv convert'] / med['mlx_lm.convert']:.3f} (median)")


if __name__ == "__main__":
    main()
