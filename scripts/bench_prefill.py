#!/usr/bin/env python
"""Benchmark: RecurrentGemma prefill in hybridconv's MLX model vs transformers' PyTorch model.

Builds (once, in --workdir) a random RecurrentGemma checkpoint with transformers
(hidden 512 by default, float32, saved with ``save_pretrained``), converts it with
``hybridconv convert --dtype float32``, and times one prefill of T tokens (2048 by
default, batch 1, logits for every position) on the same weights and tokens:

* MLX: ``hybridconv.load(OUT)(ids)`` evaluated, in a fresh process (so that the
  BLAS loading before ``import mlx`` is what a user gets); with ``--blas-off`` a
  second run with ``HYBRIDCONV_BLAS=off`` shows MLX on its bundled reference BLAS;
* PyTorch: ``AutoModelForCausalLM.from_pretrained(SRC)(ids).logits`` under
  ``torch.inference_mode``.

Each side: one warm-up, then the best of --repeat runs. Prints the BLAS in use,
both times and the ratio (target: MLX <= 1.5x torch), and checks that the two
logits agree (max |diff| relative to max |logit|). ``--profile`` also times
the MLX model's parts, each evaluated alone on the activations it gets in the
prefill (best of --repeat): every block's temporal mixer and MLP (with their
norms), the head's matmul and its soft-cap, and their sum.

Usage: python scripts/bench_prefill.py [--tokens 2048] [--hidden 512] [--layers 6]
       [--vocab 32000] [--repeat 3] [--blas-off] [--profile] [--workdir bench-data]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(src: Path, out: Path, hidden: int, layers: int, vocab: int) -> None:
    if not (src / "config.json").is_file():
        import torch
        from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

        cfg = RecurrentGemmaConfig(
            hidden_size=hidden, lru_width=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
            num_attention_heads=max(1, hidden // 128), num_key_value_heads=1, vocab_size=vocab,
            attention_window_size=2048,
        )
        torch.manual_seed(0)
        model = RecurrentGemmaForCausalLM(cfg).float().eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():  # away from the initial values, as the test fixtures
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        model.save_pretrained(src)
        print(f"built {src}", flush=True)
    if not (out / "config.json").is_file():
        from hybridconv.convert import convert

        convert(str(src), out, dtype="float32")
        print(f"converted to {out}", flush=True)


def ids_for(vocab: int, tokens: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, vocab, size=(1, tokens)).astype(np.int32)


def best_of(fn, repeat: int) -> tuple[float, list[float], object]:
    """(best, all timed runs, last result) of ``mx.eval(fn())``, after one warm-up."""
    import mlx.core as mx

    times, out = [], None
    for i in range(repeat + 1):
        t = time.perf_counter()
        out = fn()
        mx.eval(out)
        if i:
            times.append(time.perf_counter() - t)
    return min(times), times, out


def profile_mlx(model, ids, repeat: int) -> list[tuple[str, float]]:
    """Seconds per part of one prefill, each part evaluated alone on its real input."""
    import mlx.core as mx

    rows = []
    h = model.embed(ids)
    for i, layer in enumerate(model.layers):
        mx.eval(h)
        rows.append((f"layer {i} {layer.kind}", best_of(lambda: layer.temporal_block(layer.temporal_pre_norm(h)), repeat)[0]))
        mid = h + layer.temporal_block(layer.temporal_pre_norm(h))
        mx.eval(mid)
        rows.append((f"layer {i} mlp", best_of(lambda: layer.mlp_block(layer.channel_pre_norm(mid)), repeat)[0]))
        h = mid + layer.mlp_block(layer.channel_pre_norm(mid))
    mx.eval(h)

    def matmul():
        hn = model.final_norm(h)
        return model.trunk.embed_tokens.as_linear(hn) if model.tied else model.lm_head(hn)

    t_head, _, raw = best_of(matmul, repeat)
    rows.append(("final norm + head matmul", t_head))
    # the soft-cap on a fresh copy of the raw logits (which it may overwrite, as
    # in the model), less the time of making that copy
    copy = best_of(lambda: raw + 0, repeat)[0]
    rows.append(("soft-cap", best_of(lambda: model.scale_logits(raw + 0), repeat)[0] - copy))
    return rows


def time_mlx(out: Path, vocab: int, tokens: int, repeat: int, save: Path | None, profile: bool = False) -> dict:
    import hybridconv  # first: the BLAS before mlx
    import mlx.core as mx
    import numpy as np

    from hybridconv import blas

    model = hybridconv.load(out)
    ids = mx.array(ids_for(vocab, tokens))
    best, times, logits = best_of(lambda: model(ids), repeat)
    if save is not None:
        np.save(save, np.array(logits[0].astype(mx.float32)))
    res = {"best_s": best, "runs_s": times, "blas": blas.status(), "device": str(mx.default_device())}
    if profile:
        del logits
        res["profile"] = profile_mlx(model, ids, repeat)
    return res


def time_torch(src: Path, vocab: int, tokens: int, repeat: int, device: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval().to(device)
    ids = torch.tensor(ids_for(vocab, tokens), dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(repeat + 1):
            t = time.perf_counter()
            logits = model(ids).logits
            sync()
            if i:
                times.append(time.perf_counter() - t)
    return {"best_s": min(times), "runs_s": times, "threads": torch.get_num_threads(), "device": device,
            "version": torch.__version__}, logits[0].float().cpu().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-data")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--torch-device", default="cpu", help="cpu, or cuda where a GPU is (MLX uses its default device)")
    ap.add_argument("--blas-off", action="store_true", help="also time MLX with HYBRIDCONV_BLAS=off (its bundled reference BLAS)")
    ap.add_argument("--profile", action="store_true", help="also time the MLX model's parts (blocks, head, soft-cap)")
    ap.add_argument("--mlx-only", type=Path, help=argparse.SUPPRESS)  # internal: one MLX timing, JSON to stdout
    args = ap.parse_args()
    name = f"recurrent_gemma-h{args.hidden}-l{args.layers}-v{args.vocab}"
    src, out = args.workdir / name, args.workdir / (name + "-mlx-f32")
    if args.mlx_only is not None:
        res = time_mlx(out, args.vocab, args.tokens, args.repeat, args.mlx_only, args.profile)
        print(json.dumps(res))
        return
    build(src, out, args.hidden, args.layers, args.vocab)
    import numpy as np

    def mlx_run(env_extra: dict, profile: bool = False) -> tuple[dict, np.ndarray]:
        save = args.workdir / f"{name}-mlx-logits.npy"
        cmd = [sys.executable, __file__, "--workdir", str(args.workdir), "--tokens", str(args.tokens),
               "--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab),
               "--repeat", str(args.repeat), "--mlx-only", str(save)] + (["--profile"] if profile else [])
        env = {**os.environ, **env_extra}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode:
            raise SystemExit(res.stderr)
        out_ = json.loads(res.stdout.strip().splitlines()[-1])
        return out_, np.load(save)

    mlx_fast, mlx_logits = mlx_run({}, args.profile)
    tr, torch_logits = time_torch(src, args.vocab, args.tokens, args.repeat, args.torch_device)
    scale = float(np.abs(torch_logits).max())
    diff = float(np.abs(mlx_logits - torch_logits).max())
    rows = [("hybridconv MLX", mlx_fast)]
    if args.blas_off:
        slow, _ = mlx_run({"HYBRIDCONV_BLAS": "off"})
        rows.append(("hybridconv MLX, HYBRIDCONV_BLAS=off", slow))
    print()
    print(f"RecurrentGemma prefill: T={args.tokens}, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"float32, batch 1; {os.cpu_count()} CPUs; best of {args.repeat} after a warm-up")
    print(f"MLX on {mlx_fast['device']}, BLAS: {mlx_fast['blas'].get('blas')} [{mlx_fast['blas'].get('kind')}]; "
          f"torch {tr['version']} on {tr['device']} ({tr['threads']} threads)")
    print(f"logits agree: max |MLX - torch| = {diff:.3g} (max |logit| {scale:.3g})")
    print("| implementation | best (s) | runs (s) | vs torch |")
    print("|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['best_s']:.3f} | {', '.join(f'{x:.3f}' for x in r['runs_s'])} | {r['best_s'] / tr['best_s']:.2f}x |")
    print(f"| transformers torch | {tr['best_s']:.3f} | {', '.join(f'{x:.3f}' for x in tr['runs_s'])} | 1.00x |")
    if "profile" in mlx_fast:
        parts = mlx_fast["profile"]
        print(f"\nMLX parts, each evaluated alone (best of {args.repeat}):")
        print("| part | s |")
        print("|---|---|")
        for label, sec in parts:
            print(f"| {label} | {sec:.3f} |")
        # timed alone, each part runs its own norm again and allocates its
        # output afresh, so the sum can exceed the whole prefill
        print(f"| sum of the parts (whole prefill: {mlx_fast['best_s']:.3f}) | {sum(sec for _, sec in parts):.3f} |")


if __name__ == "__main__":
    main()
