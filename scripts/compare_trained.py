"""``compare_quant.py --trained``: every 4-/3-bit method on the trained checkpoints.

For each checkpoint of DIR (folders with ``training.json``, written by
scripts/train_tiny.py) and each width (group size 64, affine, output dtype as
the checkpoint: bfloat16):

* ``mlx_lm.convert -q``: mlx-lm's round-to-nearest;
* ``mlx-lm gptq``: ``mlx_lm.quant.gptq.gptq_quantize`` (fallback bits = the width,
  so every matrix is at the width; mlx-lm's GPTQ takes 2, 4 or 8 bits only);
* ``mlx-lm dwq``: ``mlx_lm.quant.dwq.dwq_quantize`` from mlx_lm.convert's
  quantization, learned against the float model's logits (temperature 2, its
  default), ``--dwq-epochs`` passes over the calibration windows at ``--dwq-lr``
  (its command's 1e-6 is for 2048 samples; it moves nothing in a few dozen steps);
* ``mlx-lm dynamic``: ``mlx_lm.quant.dynamic_quant`` — sensitivities, then
  widths ``bits - 1`` / ``bits + 1`` mixed to hybridconv default's bits per weight;
* ``hybridconv default``: ``hybridconv quantize`` (no calibration);
* ``hybridconv calibrated``: ``hybridconv quantize --calibrate`` (its default methods,
  ``widths,awq,gptq,learn``: widths by measured sensitivity at no more bits per weight
  than the plan's, then the codes); ``hc.cal:awq,gptq,learn`` is the same at the plan's
  uniform widths;
  ``hc.cal:M1,M2`` in ``--methods`` runs ``--calibrate-methods M1,M2`` (ablations; ``hc.cal:rtn``
  is the calibrated path with no method); a ``+mix`` suffix (``hc.default+mix``,
  ``hc.calibrated+mix``) uses ``--recipe mixed-(bits-1)-(bits+1)`` instead of uniform widths.

``--rows FILE...`` prints the table of earlier runs' ``--json`` rows (merged in order)
without running anything: the way to split a long comparison into runs per checkpoint.

mlx-lm's methods run on mlx-lm's own model of hybridconv's float conversion
(``mlx_lm.load``: what they run on in practice) and get the calibration windows
through their Python APIs (their commands download data); a method that fails
on an architecture is reported with its error. Every output is then measured the
same way: hybridconv's verified MLX model of the folder (the quantized tensors as
stored) against the float32 PyTorch reference on held-out text windows — mean
KL(float ‖ quantized) per token and the held-out perplexity — and bits per weight
= all stored tensor bits / parameters.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

METHODS = ("mlx_lm.convert", "mlx_lm.gptq", "mlx_lm.dwq", "mlx_lm.dynamic", "hc.default", "hc.calibrated")
LABELS = {
    "mlx_lm.convert": "mlx_lm.convert -q",
    "mlx_lm.gptq": "mlx-lm gptq",
    "mlx_lm.dwq": "mlx-lm dwq",
    "mlx_lm.dynamic": "mlx-lm dynamic_quant",
    "hc.default": "hybridconv default",
    "hc.calibrated": "hybridconv calibrated",
}


def label(method: str, bits: int | None = None) -> str:
    base, mix = split_mix(method)
    text = (f"hybridconv --calibrate-methods {base.split(':', 1)[1]}" if base.startswith("hc.cal:")
            else LABELS[base])
    if mix:
        text += f" --recipe mixed-{bits - 1}-{bits + 1}" if bits else " (mixed ±1 bit)"
    return text


def split_mix(method: str) -> tuple[str, bool]:
    """``hc.default+mix`` / ``hc.calibrated+mix`` (``hc.cal:M+mix``): hybridconv with
    ``--recipe mixed-(bits-1)-(bits+1)`` (sensitive roles one bit wider, the others one
    narrower: the widths mlx-lm's dynamic_quant mixes, by role instead of by measurement)."""
    if method.endswith("+mix"):
        return method[: -len("+mix")], True
    return method, False


def heldout_inputs(ckpt: Path, vocab: int, text_file: Path, count: int, length: int):
    from hybridconv.quant.calibration import calibration_tokens
    from hybridconv.verify.inputs import Inputs

    cal = calibration_tokens(ckpt, vocab, text_file, count, length)
    return Inputs([s for s in cal.sequences], f"held-out text {text_file.name}: {cal.description}")


def files_bpw(folder: Path, params: int) -> float:
    from hybridconv.checkpoint import index_weights
    from hybridconv.safetensors_io import ITEMSIZE

    index = index_weights(folder)
    return sum(math.prod(t.shape) * ITEMSIZE[t.dtype] * 8 for t in index.tensors.values()) / params


def mlx_lm_input(float_copy: Path, dst: Path) -> Path:
    """hybridconv's float conversion as mlx-lm's methods get it. Where the config holds an
    unbounded Mamba-2 ``time_step_limit`` (written ``[low, null]``: JSON has no infinity),
    mlx-lm's tokenizer loader (transformers 5's strict config) refuses it, so the copy says
    ``[low, 1e30]``: the same function, a bound no time step reaches."""
    cfg = json.loads((float_copy / "config.json").read_text())
    tsl = cfg.get("time_step_limit")
    if not (isinstance(tsl, list) and len(tsl) == 2 and tsl[1] is None):
        return float_copy
    if dst.is_dir():  # made by an earlier call
        return dst
    shutil.copytree(float_copy, dst)
    cfg["time_step_limit"] = [tsl[0], 1e30]
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return dst


def hybridconv_names(folder: Path) -> None:
    """mlx-lm saves a ``qwen3_5_text`` model under its multimodal layout
    (``language_model.model.*``, ``language_model.lm_head.*``); hybridconv's loader
    of a ``qwen3_5_text`` folder reads the text model's names. The same tensors are
    renamed in place (prefix dropped, values untouched), so every output is measured
    by the same model code."""
    import mlx.core as mx

    prefix = "language_model."
    files = sorted(folder.glob("model*.safetensors"))
    renamed = False
    for f in files:
        w = mx.load(str(f))
        if not any(k.startswith(prefix) for k in w):
            continue
        mx.save_safetensors(str(f), {k.removeprefix(prefix): v for k, v in w.items()}, metadata={"format": "mlx"})
        renamed = True
    if not renamed:
        return
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        idx = json.loads(index.read_text())
        idx["weight_map"] = {k.removeprefix(prefix): v for k, v in idx["weight_map"].items()}
        index.write_text(json.dumps(idx, indent=2))
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("quantization", "quantization_config"):
        if isinstance(cfg.get(key), dict):
            cfg[key] = {k.removeprefix(prefix): v for k, v in cfg[key].items()}
    cfg_path.write_text(json.dumps(cfg, indent=2))


def _mlx_lm_model(mlx_input: Path):
    """mlx-lm's model of ``mlx_input`` and a ``restore(model)`` to call before saving.

    On MLX's CPU backend ``GatherMM`` (stacked experts) computes in float32 only, so
    for a MoE model the float parameters are cast to float32 for the method and
    ``restore`` casts every float parameter back to the dtype it was loaded in
    (a new ``scales``/``biases`` takes its module's original weight dtype): the
    saved file is what the method writes on a backend that runs bfloat16."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import load

    model, tok, config = load(str(mlx_input), return_config=True)
    moe = any("Switch" in type(m).__name__ for _, m in model.named_modules())
    if not moe:
        return model, tok, config, lambda m: None
    dtypes = {k: v.dtype for k, v in tree_flatten(model.parameters())}
    model.set_dtype(mx.float32)

    def restore(m) -> None:
        back = []
        for k, v in tree_flatten(m.parameters()):
            if not mx.issubdtype(v.dtype, mx.floating):
                continue
            d = dtypes.get(k) or dtypes.get(k.rsplit(".", 1)[0] + ".weight") or v.dtype
            if d != v.dtype:
                back.append((k, v.astype(d)))
        m.update(tree_unflatten(back))
        mx.eval(m.parameters())

    return model, tok, config, restore


def run_mlx_gptq(mlx_input, out, bits, gs, windows):
    import mlx.core as mx
    from mlx_lm.quant.gptq import gptq_quantize
    from mlx_lm.utils import save

    model, tok, config, restore = _mlx_lm_model(mlx_input)
    model, config["quantization"] = gptq_quantize(model, mx.array(windows), bits, gs, bits, gs, batch_size=4)
    restore(model)
    save(str(out), str(mlx_input), model, tok, config)


def run_mlx_dwq(mlx_input, out, bits, gs, windows, lr, epochs):
    import mlx.core as mx
    import mlx.optimizers as optimizers
    from mlx_lm.quant.dwq import dwq_quantize
    from mlx_lm.utils import quantize_model, save

    model, tok, config, restore = _mlx_lm_model(mlx_input)
    q_model = copy.deepcopy(model)
    _, qconfig = quantize_model(q_model, config, gs, bits)
    rows = [(list(map(int, w)), 0) for w in windows]
    valid = rows[-4:]
    train = rows[:-4] * epochs
    dtype = next(v for _, v in __import__("mlx.utils", fromlist=["tree_flatten"]).tree_flatten(model.parameters())).dtype

    def target_fn(batch, idx, split):
        return model(batch)

    opt = optimizers.Adam(learning_rate=lr, bias_correction=True)
    dwq_quantize(q_model, target_fn, opt, train, valid, batch_size=4, max_seq_length=len(rows[0][0]) + 1,
                 seed=0, dtype=dtype)
    restore(q_model)
    save(str(out), str(mlx_input), q_model, tok, qconfig)


def run_mlx_dynamic(mlx_input, out, bits, gs, windows, target_bpw):
    import mlx.core as mx
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities, estimate_threshold
    from mlx_lm.utils import quantize_model, save

    low, high = bits - 1, bits + 1
    model, tok, config, restore = _mlx_lm_model(mlx_input)
    sens = dict(estimate_sensitivities(model, mx.array(windows), low, gs, high, gs, batch_size=4))
    restore(model)  # the search counts bits as they will be stored (bf16 scales), not float32's
    threshold = estimate_threshold(model, sens, target_bpw, low, gs, high, gs)

    def predicate(p, m):
        if not hasattr(m, "to_quantized"):
            return False
        if sens.get(p, -math.inf) > threshold:
            return {"bits": high, "group_size": gs}
        return True

    model, config = quantize_model(model, config, gs, low, quant_predicate=predicate)
    save(str(out), str(mlx_input), model, tok, config)


def is_calibrated(method: str) -> bool:
    return split_mix(method)[0] == "hc.calibrated" or method.startswith("hc.cal:")


def widths(method: str, bits: int) -> dict:
    if split_mix(method)[1]:
        return {"recipe": f"mixed-{bits - 1}-{bits + 1}"}
    return {"bits": bits}


def trained_main(args) -> None:
    if args.rows:  # print the table of earlier runs' --json rows (merged in the order given)
        rows = [r for f in args.rows for r in json.loads(f.read_text())]
        return print_table(rows, args)
    from mlx_lm.convert import convert as mlx_lm_convert

    from hybridconv.checkpoint import resolve
    from hybridconv.convert import convert as hc_convert
    from hybridconv.convert import plan
    from hybridconv.quant.calibrate import DEFAULT_METHODS, CalibrationOptions, parse_methods
    from hybridconv.quant.calibration import calibration_tokens
    from hybridconv.quant.run import quantize
    from hybridconv.verify.reference import compute_reference
    from hybridconv.verify.run import verify_folder

    root = args.trained
    bits_list = args.bits or [4, 3]
    methods = args.methods or list(METHODS)
    checkpoints = args.checkpoints or sorted(p for p in root.iterdir() if (p / "training.json").is_file())
    cal_file = root / "calibration.txt"
    held_file = root / "heldout.txt"
    gs = args.group_size
    rows = []
    work = Path(tempfile.mkdtemp(prefix="compare-trained-"))
    try:
        for ckpt in checkpoints:
            src = resolve(str(ckpt))
            p = plan(src)
            params = p.parameter_count
            inputs = heldout_inputs(ckpt, p.config["vocab_size"], held_file, args.sequences, args.tokens)
            ref = compute_reference(src, inputs, keep_hidden=False)
            windows = calibration_tokens(ckpt, p.config["vocab_size"], cal_file,
                                         args.calibration_samples, args.calibration_length).sequences
            float_copy = work / f"{ckpt.name}-float"
            hc_convert(str(ckpt), float_copy)
            mlx_input = mlx_lm_input(float_copy, work / f"{ckpt.name}-float-mlx-lm")
            act = json.loads((float_copy / "config.json").read_text())["dtype"]
            for bits in bits_list:
                default_bpw = None
                for method in methods:
                    out = work / f"{ckpt.name}-{method}-{bits}"
                    row = {"checkpoint": ckpt.name, "bits": bits, "group_size": gs, "method": method}
                    t0 = time.time()
                    try:
                        if method == "mlx_lm.convert":
                            mlx_lm_convert(str(mlx_input), str(out), quantize=True, q_bits=bits, q_group_size=gs)
                        elif method == "mlx_lm.gptq":
                            if bits not in (2, 4, 8):
                                raise RuntimeError(f"mlx-lm's GPTQ supports 2, 4 or 8 bits, not {bits}")
                            run_mlx_gptq(mlx_input, out, bits, gs, windows)
                        elif method == "mlx_lm.dwq":
                            run_mlx_dwq(mlx_input, out, bits, gs, windows, args.dwq_lr, args.dwq_epochs)
                        elif method == "mlx_lm.dynamic":
                            if default_bpw is None:
                                tmp = work / "bpw-probe"
                                quantize(str(ckpt), tmp, bits=bits, group_size=gs, force=True)
                                default_bpw = files_bpw(tmp, params)
                                shutil.rmtree(tmp)
                            run_mlx_dynamic(mlx_input, out, bits, gs, windows, default_bpw)
                        elif split_mix(method)[0] == "hc.default":
                            quantize(str(ckpt), out, group_size=gs, **widths(method, bits))
                        elif split_mix(method)[0] == "hc.calibrated" or method.startswith("hc.cal:"):
                            base = split_mix(method)[0]
                            chosen = parse_methods(base.split(":", 1)[1]) if ":" in base else DEFAULT_METHODS
                            opts = CalibrationOptions(file=cal_file, samples=args.calibration_samples,
                                                      length=args.calibration_length, learn_steps=args.learn_steps,
                                                      methods=chosen, seed=args.calibration_seed)
                            quantize(str(ckpt), out, group_size=gs, calibration=opts, **widths(method, bits))
                        row["seconds"] = round(time.time() - t0, 1)
                        if method.startswith("mlx_lm."):
                            hybridconv_names(out)
                        metrics = verify_folder(out, ref, decode_steps=0, activation_dtype=act).report["metrics"]
                        m = metrics["overall"]
                        row.update(bpw=files_bpw(out, params), kl_mean=m["kl_mean"], kl_p99=m["kl_p99"],
                                   ppl=m["perplexity_mlx"], ppl_float=m["perplexity_ref"],
                                   top1=m["top1_agreement"],
                                   # each window's mean NLL (log of its perplexity): the paired
                                   # comparison of two methods' perplexities (ppl_gap)
                                   nll_windows=[math.log(s["perplexity_mlx"]) for s in metrics["per_sequence"]])
                        if method == "hc.default":
                            default_bpw = row["bpw"]
                    except Exception as exc:  # a method that does not run here is a result, not a crash
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                        if args.debug:
                            traceback.print_exc()
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print_table(rows, args)


def ppl_gap(a: dict, b: dict) -> tuple[float, float | None]:
    """How much higher ``a``'s held-out log-perplexity is than ``b``'s (nats per token) and
    that gap in standard errors of the paired per-window differences (both measured on the
    same windows of equal length; None where the rows carry no per-window values)."""
    d = math.log(a["ppl"]) - math.log(b["ppl"])
    wa, wb = a.get("nll_windows"), b.get("nll_windows")
    if not wa or not wb or len(wa) != len(wb) or len(wa) < 2:
        return d, None
    diff = np.asarray(wa) - np.asarray(wb)
    se = float(diff.std(ddof=1) / math.sqrt(diff.size))
    return d, (d / se if se > 0 else None)


def print_table(rows, args) -> None:
    print()
    print(f"inputs: {args.sequences} x {args.tokens} held-out tokens; calibration: {args.calibration_samples} x "
          f"{args.calibration_length} tokens of calibration.txt; affine, group size {args.group_size}; reference: "
          "PyTorch float32 of the bf16 checkpoint")
    print("| checkpoint | bits | method | bits/weight | KL mean | KL / convert -q | held-out ppl (float) | verdict vs targets |")
    print("|---|---|---|---|---|---|---|---|")
    by = {}
    for r in rows:
        by.setdefault((r["checkpoint"], r["bits"]), []).append(r)
    for (ck, bits), rs in by.items():
        base = next((r for r in rs if r["method"] == "mlx_lm.convert" and "kl_mean" in r), None)
        mlx = [r for r in rs if r["method"].startswith("mlx_lm.") and "kl_mean" in r]
        for r in rs:
            if "error" in r:
                print(f"| {ck} | {bits} | {label(r['method'], bits)} | — | does not run: {r['error']} | | | |")
                continue
            ratio = f"{r['kl_mean'] / base['kl_mean']:.2f}" if base else "—"
            verdict = ""
            if is_calibrated(r["method"]):
                worse = [(x, ppl_gap(r, x)) for x in rs if "ppl" in x and x is not r and r["ppl"] > x["ppl"]]
                best = min(mlx, key=lambda x: x["kl_mean"]) if mlx else None
                same = [x for x in mlx if abs(x["bpw"] - r["bpw"]) <= 0.05]
                checks = [
                    (f"≤0.6x convert: {'yes' if r['kl_mean'] <= 0.6 * base['kl_mean'] else 'NO'}" if base
                     else "≤0.6x convert: — (no mlx_lm.convert row)"),
                    f"≤ best mlx-lm ({label(best['method'], bits)}): {'yes' if r['kl_mean'] <= best['kl_mean'] else 'NO'}" if best else "",
                    f"ppl ≤ all: {'yes' if not worse else 'NO'}"
                    + "".join(f" (+{d:.4f} nats/token vs {label(x['method'], bits)}, {z:.1f} SE)" if z is not None
                              else f" (vs {label(x['method'], bits)})" for x, (d, z) in worse),
                    f"bpw within ±0.05 of {len(same)}/{len(mlx)} mlx-lm",
                ]
                verdict = "; ".join(c for c in checks if c)
            print(f"| {ck} | {bits} | {label(r['method'], bits)} | {r['bpw']:.3f} | {r['kl_mean']:.4g} | {ratio} | "
                  f"{r['ppl']:.3f} ({r['ppl_float']:.3f}) | {verdict} |")
