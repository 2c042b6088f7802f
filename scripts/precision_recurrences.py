#!/usr/bin/env python
"""Measure the precision policy of the RWKV-4, xLSTM and Zamba parameter kinds
(converters/rwkv.py, xlstm.py, zamba.py): what storing a kind in bfloat16
instead of float32, or quantizing it instead of keeping it in float, costs.

For each oracle case (``fixtures/wave3/{rwkv,xlstm,zamba}-tiny``) the float32
PyTorch reference (transformers, ``hybridconv.verify.reference``) is run on two
inputs: the case's own 24 tokens and 2 × ``--long`` random tokens (long contexts
are where a rounded decay compounds). Each variant is a hybridconv output folder:

* ``bf16`` — ``convert --dtype bfloat16`` (the policy: the kinds it keeps in
  float32 are float32), then the same folder with one kind rounded to bfloat16
  (e.g. ``time_decay bf16``) or stored float32 (e.g. ``conv f32``);
* ``float32, X bf16`` — the float32 conversion with one kind rounded to
  bfloat16: that kind's rounding alone, without bfloat16 activations;
* ``q4`` — ``quantize --bits 4`` (default plan, float32 output dtype), and the
  same with ``--bits-for``/``--keep`` for one role.

``xlstm-tiny:gates-x10`` is the xLSTM case with its input/forget gate
projections multiplied by 10 (a copy of the checkpoint; the reference is run on
it): the tiny model's gate weights are small noise around transformers' zero
initialisation, so its gates are set by the biases alone.

Printed per variant: mean KL(reference ‖ output) over all tokens, max |Δlogit|,
and bits per weight for the quantized ones.

Usage: python scripts/precision_recurrences.py [--long 512] [--cases rwkv-tiny ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import hybridconv  # noqa: E402
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

FIXTURES = Path(os.environ.get("HYBRIDCONV_FIXTURES", REPO.parent / "shared" / "fixtures")) / "wave3"

# case -> (kinds rounded to bf16 / stored f32 in the bf16 output, quantization variants)
VARIANTS = {
    "rwkv-tiny": {
        "bf16": [("time_decay bf16", r"\.time_decay$", "bf16"), ("time_first bf16", r"\.time_first$", "bf16"),
                 ("time_mix_* f32", r"\.time_mix_", "f32")],
        "q4": [("default", {}), ("channel_mix.value 8-bit", {"bits_for": ["channel_mix.value=8"]})],
    },
    "xlstm-tiny": {
        "bf16": [("gate biases bf16", r"gate_preact\.bias$", "bf16")],
        "q4": [("default (gate projections float)", {}),
               ("gate projections 4-bit", {"bits_for": ["mlstm.gates=4"]})],
    },
    # the same model with its gate projections scaled by 10: the tiny model's gate weights are noise around
    # transformers' zero init, so its gates hardly depend on the input; here they do (pre-activations spread
    # over several units, as a trained model's)
    "xlstm-tiny:gates-x10": {
        "bf16": [("gate biases bf16", r"gate_preact\.bias$", "bf16")],
        "q4": [("default (gate projections float)", {}),
               ("gate projections 4-bit", {"bits_for": ["mlstm.gates=4"]})],
    },
    "zamba-tiny": {
        "bf16": [("conv kernels f32", r"\.conv1d\.(weight|bias)$", "f32"),
                 ("A_log, D, dt_proj_bias bf16", r"\.mamba\.(A_log|D|dt_proj_bias)$", "bf16")],
        "q4": [("default", {})],
    },
}


def kl_and_diff(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    kls, diff = [], 0.0
    for r, g in zip(ref, got):
        r, g = r.astype(np.float64), g.astype(np.float64)
        lr = r - np.logaddexp.reduce(r, axis=-1, keepdims=True)
        lg = g - np.logaddexp.reduce(g, axis=-1, keepdims=True)
        kls.append((np.exp(lr) * (lr - lg)).sum(-1))
        diff = max(diff, float(np.abs(r - g).max()))
    return float(np.concatenate(kls).mean()), diff


def run(folder: Path, seqs: list[np.ndarray]) -> list[np.ndarray]:
    model = hybridconv.load(folder)
    return [np.array(model(mx.array(s[None]))[0].astype(mx.float32)) for s in seqs]


def edit(folder: Path, regex: str, to: str, f32_source: Path, dst: Path) -> int:
    """Copy ``folder`` to ``dst`` with the tensors matching ``regex`` rounded to
    bfloat16 (``to = "bf16"``) or replaced by their float32 values from the
    float32 conversion ``f32_source`` (``"f32"``). Returns how many changed."""
    import re
    import shutil

    shutil.copytree(folder, dst)
    weights = dict(mx.load(str(dst / "model.safetensors")))
    f32 = mx.load(str(f32_source / "model.safetensors"))
    n = 0
    for name in weights:
        if re.search(regex, name):
            weights[name] = weights[name].astype(mx.bfloat16) if to == "bf16" else f32[name]
            n += 1
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})
    return n


def main() -> None:
    from hybridconv.checkpoint import resolve
    from hybridconv.convert import convert
    from hybridconv.quant.run import quantize
    from hybridconv.verify.inputs import Inputs
    from hybridconv.verify.reference import compute_reference
    from safetensors.numpy import load_file

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", type=int, default=512)
    ap.add_argument("--cases", nargs="*", default=sorted(VARIANTS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    for case in args.cases:
        src = FIXTURES / case.split(":")[0]
        if case.endswith(":gates-x10"):
            import shutil

            from safetensors.numpy import save_file

            copy = Path(tempfile.mkdtemp(prefix="hc-prec-src-")) / "src"
            shutil.copytree(src, copy)
            t = load_file(str(copy / "model.safetensors"))
            t = {k: (v * 10 if k.endswith("gate_preact.weight") else v) for k, v in t.items()}
            save_file(t, str(copy / "model.safetensors"), metadata={"format": "pt"})
            src = copy
        ids = load_file(str(src / "expected.safetensors"))["input_ids"][0].astype(np.int32)
        vocab = json.loads((src / "config.json").read_text())["vocab_size"]
        rng = np.random.default_rng(0)
        inputs = {"24 tokens": [ids], f"2 x {args.long}": [rng.integers(0, vocab, args.long).astype(np.int32)
                                                           for _ in range(2)]}
        refs = {k: [np.asarray(o["logits"]) for o in compute_reference(
            resolve(str(src)), Inputs(sequences=v, description=k), keep_hidden=False).outputs]
            for k, v in inputs.items()}
        work = Path(tempfile.mkdtemp(prefix="hc-prec-"))
        f32, bf16 = work / "f32", work / "bf16"
        convert(str(src), f32, dtype="float32")
        convert(str(src), bf16, dtype="bfloat16")
        folders = [("float32", f32, None), ("bf16 (policy)", bf16, None)]
        for label, regex, to in VARIANTS[case]["bf16"]:
            dst = work / label.replace(" ", "_").replace(",", "").replace("*", "x")
            edit(bf16, regex, to, f32, dst)
            folders.append((f"bf16, {label}", dst, None))
            if to == "bf16":  # the same rounding with float32 activations: that kind alone
                edit(f32, regex, to, f32, dst.with_name(dst.name + "_f32"))
                folders.append((f"float32, {label}", dst.with_name(dst.name + "_f32"), None))
        for label, kw in VARIANTS[case]["q4"]:
            dst = work / ("q4_" + str(len(folders)))
            res = quantize(str(src), dst, 4, dtype="float32", **kw)
            folders.append((f"4-bit, {label}", dst, res.plan.bits_per_weight))
        for label, folder, bpw in folders:
            row = {"case": case, "variant": label, "bits_per_weight": bpw}
            for k, seqs in inputs.items():
                row[k] = kl_and_diff(refs[k], run(folder, seqs))
            rows.append(row)
            cells = " | ".join(f"{row[k][0]:.3g} / {row[k][1]:.2g}" for k in inputs)
            print(f"| {case} | {label} | {cells} | {'' if bpw is None else f'{bpw:.3f}'} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
