"""``hybridconv quantize`` (and the ``convert --quantize`` shortcut)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import EXIT_GATE_FAILED, UsageError
from . import app, console
from .options import (
    AllowNonfiniteOpt,
    AllowPickleOpt,
    BitsOpt,
    DtypeOpt,
    ForceOpt,
    GroupOpt,
    Mode,
    ModeOpt,
    OutOpt,
    RecipeOpt,
    RevisionOpt,
    SourceArg,
    refuse_unused,
)
from .render import byte_progress, human_bytes

BitsForOpt = Annotated[
    Optional[list[str]],
    typer.Option("--bits-for", help="PATTERN=BITS: this width for matching tensors (glob on tensor name, module path or role; 're:' for a regex). Repeatable.", show_default=False),
]
CalibrateOpt = Annotated[
    bool,
    typer.Option("--calibrate", help="Choose the codes with the model's activations on calibration text (affine): "
                 "activation-aware scales folded exactly into the preceding norm or projection, GPTQ, then scales "
                 "and biases learned against the float model's block outputs. Same plan, same MLX format. "
                 "Without --calibration: a built-in sample (Python standard-library text)."),
]
CalibrationOpt = Annotated[
    Optional[Path],
    typer.Option("--calibration", help="Calibration text, a local file: plain text, or JSONL (a string, or 'text', "
                 "'prompt'/'completion' or 'messages' per line). Implies --calibrate. Never downloaded.",
                 show_default=False),
]
CalibrationSamplesOpt = Annotated[
    int, typer.Option("--calibration-samples", help="Calibration windows (spread evenly over the text).")
]
CalibrationLengthOpt = Annotated[
    int, typer.Option("--calibration-length", help="Tokens per calibration window.")
]
CalibrateMethodsOpt = Annotated[
    Optional[str],
    typer.Option("--calibrate-methods", help="Comma-separated, applied in this order: awq (activation-aware scales), "
                 "gptq (Hessian error compensation), learn (scales/biases learned per block); 'rtn' for none "
                 "\\[default: awq,gptq,learn].", show_default=False),
]
LearnStepsOpt = Annotated[
    int, typer.Option("--learn-steps", help="Adam steps per block of the 'learn' method.")
]
KeepOpt = Annotated[
    Optional[list[str]],
    typer.Option("--keep", help="PATTERN: keep matching weights in float. Repeatable.", show_default=False),
]


def print_plan(qp, full: bool) -> None:
    s = qp.summary()
    if full:
        t = Table(title="quantization plan")
        t.add_column("tensor", overflow="fold")  # names are never cut
        t.add_column("role", overflow="fold")
        t.add_column("stored as", overflow="fold")
        t.add_column("why", overflow="fold")
        for r in qp.rows():
            stored = f"{r['bits']}-bit {r['mode']} g{r['group_size']}" if r["decision"] == "quantize" else f"{r['dtype']} ({r['decision']})"
            t.add_row(r["tensor"], r["role"] or "", stored, r["reason"])
        console.print(t)
    else:
        t = Table(title="quantization plan (by kind; --show-plan for every tensor)")
        t.add_column("stored as")
        t.add_column("tensors", justify="right")
        for k, v in s["tensors"].items():
            t.add_row(k, str(v))
        console.print(t)
    console.print(
        f"recipe [bold]{escape(s['recipe'])}[/]: {s['bits_per_weight']:.3f} bits per weight overall "
        f"({s['quantized_layers_bits_per_weight']:.3f} in quantized layers), {human_bytes(s['bytes'])}"
    )


@app.command("quantize")
def quantize_cmd(
    ctx: typer.Context,
    source: SourceArg,
    out: OutOpt,
    bits: BitsOpt = None,
    group_size: GroupOpt = None,
    mode: ModeOpt = Mode.affine,
    recipe: RecipeOpt = None,
    bits_for: BitsForOpt = None,
    keep: KeepOpt = None,
    dtype: DtypeOpt = None,
    revision: RevisionOpt = None,
    force: ForceOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan, bits per weight and size; write nothing.")] = False,
    show_plan: Annotated[bool, typer.Option("--show-plan", help="Print the plan of every tensor.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Verify the result (PyTorch reference of SOURCE, or --reference-logits) and store the report with it.")] = False,
    reference_logits: Annotated[Optional[Path], typer.Option("--reference-logits", help="Reference file for --verify / --target-kl (no torch needed).", show_default=False)] = None,
    target_kl: Annotated[Optional[float], typer.Option("--target-kl", help="Search the smallest plan whose mean KL on the verify inputs is <= this, and write it.", show_default=False)] = None,
    calibrate: CalibrateOpt = False,
    calibration: CalibrationOpt = None,
    calibration_samples: CalibrationSamplesOpt = 32,
    calibration_length: CalibrationLengthOpt = 256,
    calibrate_methods: CalibrateMethodsOpt = None,
    learn_steps: LearnStepsOpt = 200,
    allow_nonfinite: AllowNonfiniteOpt = False,
    allow_pickle: AllowPickleOpt = False,
):
    """Quantize a checkpoint for MLX, keeping what hybrid models need in float32.

    SOURCE is a Hugging Face checkpoint (converted on the fly) or a float folder from
    `hybridconv convert`. The SSM / recurrence dynamics (A_log, D, dt_bias, RG-LRU
    recurrent_param) and MoE routers are never quantized and stay float32; conv kernels,
    norms and RG-LRU gate matrices are never quantized and keep the output dtype. Affine
    mode picks each group's range to minimise its squared error (never worse than
    mx.quantize), in MLX's format. The output opens in hybridconv and mlx_lm.load (mlx-lm's
    quantization config, per-layer entries when mixed).

    --calibrate (or --calibration FILE) chooses the codes with calibration text run through
    hybridconv's own model, block by block: exact power-of-two activation-aware scales,
    GPTQ, learned scales and biases. The plan, the widths and the format are the same.

    Exit codes: 0 done (and verified, with --verify); 1 verification failed or no plan meets
    --target-kl; 2 bad usage or input.
    """
    from ..quant.run import quantize, search_target_kl

    cal = _calibration_options(ctx, calibrate, calibration, calibration_samples, calibration_length,
                               calibrate_methods, learn_steps, mode)
    if reference_logits is not None and not (verify or target_kl is not None):
        raise UsageError(
            "--reference-logits is used by --verify and --target-kl, and neither was given",
            "add --verify to check the result against it",
        )
    if recipe not in (None, "", "uniform"):
        refuse_unused(ctx, ("bits",), f"--recipe {recipe} sets the widths itself (its L and H bits)",
                      "drop --bits, or use --recipe uniform")
    if target_kl is not None:
        refuse_unused(ctx, ("bits", "recipe"), "--target-kl searches the widths and recipes itself",
                      "drop them; --bits-for, --keep and --group-size are honoured during the search")
        if mode is not Mode.affine:
            raise UsageError(f"--mode {mode.value}: --target-kl searches affine widths only", "drop --mode, or drop --target-kl")
        if allow_pickle:
            raise UsageError("--allow-pickle: not supported with --target-kl", "convert the pickle checkpoint first, then quantize the converted folder")
        ref = _reference(source, revision, reference_logits)
        rows = Table(title=f"plans explored for --target-kl {target_kl}")
        for col in ("plan", "bits/weight", "KL mean", "meets"):
            rows.add_column(col)
        found = []

        def report(row):
            found.append(row)
            console.print(f"  tried {row['plan']:>14}: {row['bits_per_weight']:.3f} bits/weight, KL mean {row['kl_mean']:.4g}")

        with console.status("searching"):
            res = search_target_kl(source, out, target_kl, ref, group_size, dtype.value if dtype else None,
                                   revision, force, keep, report, bits_for=bits_for, dry_run=dry_run,
                                   allow_nonfinite=allow_nonfinite, calibration=cal)
        for r in res.search:
            rows.add_row(r["plan"], f"{r['bits_per_weight']:.3f}", f"{r['kl_mean']:.4g}", "yes" if r["meets_target"] else "no")
        console.print(rows)
        if not any(r["meets_target"] for r in res.search):
            best = min(res.search, key=lambda r: r["kl_mean"])
            console.print(f"[bold red]no plan meets mean KL <= {target_kl}[/]: the best tried was {best['plan']} "
                          f"with {best['kl_mean']:.4g} ({best['bits_per_weight']:.3f} bits/weight); nothing written")
            raise typer.Exit(EXIT_GATE_FAILED)
        print_plan(res.plan, show_plan or dry_run)
        if dry_run:
            console.print("[dim]--dry-run: the smallest plan meeting the target is shown above; nothing written[/]")
            return
        console.print(f"[green]wrote {out}[/]: the smallest plan meeting the target")
        if verify:
            _verify(source, revision, reference_logits, out)
        return

    if cal is not None and not dry_run:
        def say(msg: str) -> None:
            console.print(f"  [dim]{escape(msg)}[/]")

        with console.status("calibrating"):
            res = quantize(source, out, bits, group_size, mode.value, recipe, bits_for, keep,
                           dtype.value if dtype else None, revision, force, dry_run,
                           allow_nonfinite=allow_nonfinite, allow_pickle=allow_pickle, calibration=cal, report=say)
        c = res.calibration
        console.print(f"calibrated ({'+'.join(c['methods'])}) on {c['data']['sequences']} x {c['data']['length']} "
                      f"tokens in {c['seconds']:.0f} s")
    else:
        with byte_progress(console, "quantizing") as (on_plan, progress):
            res = quantize(source, out, bits, group_size, mode.value, recipe, bits_for, keep,
                           dtype.value if dtype else None, revision, force, dry_run, progress=progress,
                           on_plan=on_plan, allow_nonfinite=allow_nonfinite, allow_pickle=allow_pickle)
    print_plan(res.plan, show_plan or dry_run)
    if dry_run:
        console.print("[dim]--dry-run: nothing written[/]")
        return
    console.print(f"[green]wrote {out}[/] ({human_bytes(res.result.bytes_written)})")
    if verify:
        _verify(source, revision, reference_logits, out, allow_pickle)


def _calibration_options(ctx, calibrate, calibration, samples, length, methods, learn_steps, mode):
    """The CalibrationOptions of the command line, or None (no calibration); options
    that need --calibrate are refused without it."""
    from ..quant.calibrate import CalibrationOptions, parse_methods

    if not (calibrate or calibration is not None):
        refuse_unused(ctx, ("calibration_samples", "calibration_length", "calibrate_methods", "learn_steps"),
                      "calibration options need --calibrate (or --calibration FILE)", "add --calibrate")
        return None
    if mode is not Mode.affine:
        raise UsageError(f"--calibrate: affine mode only (MLX's scale-and-bias format), not --mode {mode.value}",
                         "drop --mode, or drop --calibrate")
    if learn_steps < 1:
        raise UsageError(f"--learn-steps {learn_steps}: expected at least 1", "or leave 'learn' out of --calibrate-methods")
    if calibration is not None and not calibration.is_file():
        raise UsageError(f"--calibration {calibration}: file not found")
    return CalibrationOptions(file=calibration, samples=samples, length=length,
                              methods=parse_methods(methods), learn_steps=learn_steps)


def _reference(source, revision, reference_logits, allow_pickle=False):
    from ..verify.reference import read_reference_file
    from .verify import _live_reference

    if reference_logits is not None:
        return read_reference_file(reference_logits)
    return _live_reference(source, revision, allow_pickle=allow_pickle)[0]  # verify's default inputs


def _verify(source, revision, reference_logits, out: Path, allow_pickle: bool = False) -> None:
    from ..verify.run import REPORT_NAME, available_runtimes, verify_folder, write_report
    from .verify import render

    ref = _reference(source, revision, reference_logits, allow_pickle)
    with console.status("verifying"):
        # as `verify` does by default: every installed runtime (the card says what mlx-lm does)
        outcome = verify_folder(out, ref, runtimes=available_runtimes())
    write_report(outcome.report, out / REPORT_NAME)
    render(outcome.report)
    if not outcome.passed:
        raise typer.Exit(EXIT_GATE_FAILED)
