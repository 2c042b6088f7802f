"""``hybridconv quantize`` (and the ``convert --quantize`` shortcut)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import EXIT_GATE_FAILED, UsageError
from ..quant.calibration import DEFAULT_LEARN_STEPS, DEFAULT_LENGTH, DEFAULT_SAMPLES
from . import app, console, err_console
from .options import (
    AllowNonfiniteOpt,
    AllowPickleOpt,
    BitsOpt,
    DtypeOpt,
    ForceOpt,
    GroupOpt,
    MlxLmCode,
    MlxLmCodeOpt,
    Mode,
    ModeOpt,
    OutOpt,
    RecipeOpt,
    RevisionOpt,
    SourceArg,
    StreamOpt,
    refuse_unused,
)
from .render import byte_progress, human_bytes, mlx_lm_line, output_notes

BitsForOpt = Annotated[
    Optional[list[str]],
    typer.Option("--bits-for", help="PATTERN=BITS: this width for matching tensors (glob on tensor name, module path or role; 're:' for a regex). Repeatable.", show_default=False),
]
CalibrateOpt = Annotated[
    bool,
    typer.Option("--calibrate", help="Choose the widths and codes with the model's activations on calibration text "
                 "(affine): each free matrix one bit wider or narrower by its measured sensitivity at no more bits "
                 "per weight than the plan's, activation-aware scales folded exactly into the preceding norm or "
                 "projection, GPTQ, then scales and biases learned against the float model's block outputs. Same "
                 "MLX format; protected tensors, --bits-for and --keep as planned. "
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
    typer.Option("--calibrate-methods", help="Comma-separated, applied in this order: widths (each free matrix at "
                 "its width -1/+0/+1 chosen by measured sensitivity, total bits <= the plan's; leave it out for the "
                 "plan's widths), awq (activation-aware scales), gptq (Hessian error compensation), learn "
                 "(scales/biases learned per block); 'rtn' for none \\[default: widths,awq,gptq,learn].",
                 show_default=False),
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
        rows = []
        for r in qp.rows():
            stored = f"{r['bits']}-bit {r['mode']} g{r['group_size']}" if r["decision"] == "quantize" else f"{r['dtype']} ({r['decision']})"
            rows.append((r["tensor"], r["role"] or "", stored, r["reason"]))
        # Tensor names are never cut or folded: the tensor column takes its longest
        # name; where the terminal is too narrow for that and the rest, each tensor
        # gets a line of its own ("name" on one line, the rest indented below).
        name_width = max((len(r[0]) for r in rows), default=6)
        if console.width >= name_width + 50:
            t = Table(title="quantization plan")
            t.add_column("tensor", no_wrap=True, min_width=name_width)
            t.add_column("role", overflow="fold")
            t.add_column("stored as", overflow="fold")
            t.add_column("why", overflow="fold")
            for row in rows:
                t.add_row(*row)
            console.print(t)
        else:
            console.print("[bold]quantization plan[/] (tensor; role, stored as, why)")
            for name, role, stored, why in rows:
                console.print(escape(name), highlight=False, crop=False, overflow="ignore", no_wrap=True)
                console.print(f"    {escape(role or '-')}; {escape(stored)}; {escape(why)}", highlight=False)
    else:
        t = Table(title="quantization plan (by kind; --show-plan for every tensor)")
        t.add_column("stored as")
        t.add_column("tensors", justify="right")
        for k, v in s["tensors"].items():
            t.add_row(k, str(v))
        console.print(t)
    console.print(
        f"[bold]{escape(qp.label())}[/]: {s['bits_per_weight']:.3f} bits per weight overall "
        f"({s['quantized_layers_bits_per_weight']:.3f} in quantized layers), {human_bytes(s['bytes'])}"
    )
    for note in qp.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)


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
    verify: Annotated[bool, typer.Option("--verify", help="Verify the result (PyTorch reference of SOURCE, or --reference-logits) and store the report with it. A converted folder as SOURCE has no PyTorch original: --reference-logits is then required.")] = False,
    reference_logits: Annotated[Optional[Path], typer.Option("--reference-logits", help="Reference file for --verify / --target-kl (no torch needed).", show_default=False)] = None,
    target_kl: Annotated[Optional[float], typer.Option("--target-kl", help="Write the smallest plan whose mean KL on the verify inputs is <= this: candidate plans (uniform 2-8 bits, mixed recipes) are measured in increasing bits per weight (computed from each plan) and the first that meets the target is written, so every smaller candidate was measured and missed it (mean KL does not always fall as bits grow, so none is skipped). With --calibrate every candidate is quantized calibrated (the search costs one calibration per candidate).", show_default=False)] = None,
    calibrate: CalibrateOpt = False,
    calibration: CalibrationOpt = None,
    calibration_samples: CalibrationSamplesOpt = DEFAULT_SAMPLES,
    calibration_length: CalibrationLengthOpt = DEFAULT_LENGTH,
    calibrate_methods: CalibrateMethodsOpt = None,
    learn_steps: LearnStepsOpt = DEFAULT_LEARN_STEPS,
    allow_nonfinite: AllowNonfiniteOpt = False,
    allow_pickle: AllowPickleOpt = False,
    stream: StreamOpt = None,
    mlx_lm_code: MlxLmCodeOpt = MlxLmCode.auto,
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
    hybridconv's own model, block by block: widths by measured sensitivity (a free matrix
    one bit wider or narrower, the bits per weight at most the plan's; --bits-for and
    --keep choices and protected tensors unchanged), exact power-of-two activation-aware
    scales, GPTQ, learned scales and biases. The format is the same; the plan printed after
    writing (and conversion.json) has the chosen widths, --dry-run shows the planned ones.

    Exit codes: 0 done (and verified, with --verify); 1 verification failed or no plan meets
    --target-kl; 2 bad usage or input (also an existing OUT without --force, or one written by
    another run meanwhile); 3 OUT could not be written; 130/143 interrupted.
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
    if target_kl is not None and not (math.isfinite(target_kl) and target_kl > 0):
        raise UsageError(f"--target-kl {target_kl}: must be a positive number (a mean KL in nats, e.g. 0.02)")
    if (verify or target_kl is not None) and reference_logits is None:
        _refuse_converted_source(source, "--target-kl" if target_kl is not None else "--verify")
    if target_kl is not None:
        refuse_unused(ctx, ("bits", "recipe"), "--target-kl searches the widths and recipes itself",
                      "drop them; --bits-for, --keep and --group-size are honoured during the search")
        if mode is not Mode.affine:
            raise UsageError(f"--mode {mode.value}: --target-kl searches affine widths only", "drop --mode, or drop --target-kl")
        if allow_pickle:
            raise UsageError("--allow-pickle: not supported with --target-kl", "convert the pickle checkpoint first, then quantize the converted folder")
        ref = _reference(source, revision, reference_logits, stream=stream)
        rows = Table(title=f"plans explored for --target-kl {target_kl}")
        for col in ("plan", "bits/weight", "KL mean", "meets"):
            rows.add_column(col)
        def report(row):
            console.print(f"  tried {row['plan']:>14}: {row['bits_per_weight']:.3f} bits/weight, KL mean {row['kl_mean']:.4g}"
                          + (" [green]meets the target[/]" if row["meets_target"] else ""))

        with console.status("searching"):
            res = search_target_kl(source, out, target_kl, ref, group_size, dtype.value if dtype else None,
                                   revision, force, keep, report, bits_for=bits_for, dry_run=dry_run,
                                   allow_nonfinite=allow_nonfinite, mlx_lm_code=mlx_lm_code.value, stream=stream,
                                   calibration=cal)
        for r in res.search:
            rows.add_row(r["plan"], f"{r['bits_per_weight']:.3f}", f"{r['kl_mean']:.4g}", "yes" if r["meets_target"] else "no")
        console.print(rows)
        n, tried = len(res.candidates), len(res.search)
        searched = (f"searched {n} candidate plans (uniform 2-8 bits and mixed recipes), in increasing bits per "
                    f"weight ({res.candidates[0]['bits_per_weight']:.3f} to {res.candidates[-1]['bits_per_weight']:.3f})")
        if not any(r["meets_target"] for r in res.search):
            best = min(res.search, key=lambda r: r["kl_mean"])
            console.print(f"[bold red]no plan meets mean KL <= {target_kl}[/]: {searched}, all measured; the best "
                          f"was {best['plan']} with {best['kl_mean']:.4g} ({best['bits_per_weight']:.3f} bits/weight); "
                          "nothing written")
            raise typer.Exit(EXIT_GATE_FAILED)
        win = res.search[-1]
        why = (f"{win['plan']} ({win['bits_per_weight']:.3f} bits/weight, KL mean {win['kl_mean']:.4g}) is the smallest "
               f"plan meeting mean KL <= {target_kl}: {searched}; the {tried - 1} smaller one(s) were measured and "
               "missed it, the larger ones were not needed")
        print_plan(res.plan, show_plan or dry_run)
        if dry_run:
            console.print(f"[dim]--dry-run: nothing written.[/] {escape(why)}")
            return
        console.print(f"[green]wrote {escape(str(out))}[/]: {escape(why)}")
        output_notes(err_console, res.result)
        if verify:  # against the reference the search used: it runs once
            _verify(source, revision, reference_logits, out, ref=ref, stream=stream)
        return

    if cal is not None and not dry_run:
        def say(msg: str) -> None:
            console.print(f"  [dim]{escape(msg)}[/]")

        with console.status("calibrating"):
            res = quantize(source, out, bits, group_size, mode.value, recipe, bits_for, keep,
                           dtype.value if dtype else None, revision, force, dry_run,
                           allow_nonfinite=allow_nonfinite, allow_pickle=allow_pickle, mlx_lm_code=mlx_lm_code.value,
                           calibration=cal, report=say)
        c = res.calibration
        console.print(f"calibrated ({'+'.join(c['methods'])}) on {c['data']['sequences']} x {c['data']['length']} "
                      f"tokens in {c['seconds']:.0f} s")
    else:
        with byte_progress(console, "quantizing") as (on_plan, progress):
            res = quantize(source, out, bits, group_size, mode.value, recipe, bits_for, keep,
                           dtype.value if dtype else None, revision, force, dry_run, progress=progress,
                           on_plan=on_plan, allow_nonfinite=allow_nonfinite, allow_pickle=allow_pickle,
                           mlx_lm_code=mlx_lm_code.value)
    print_plan(res.plan, show_plan or dry_run)
    if dry_run:
        console.print("[dim]--dry-run: nothing written[/]")
        return
    console.print(f"[green]wrote {out}[/] ({human_bytes(res.result.bytes_written)})")
    output_notes(err_console, res.result)
    console.print(f"mlx-lm: {mlx_lm_line(out)}")
    if verify:
        _verify(source, revision, reference_logits, out, allow_pickle, stream=stream)


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
    if calibration is not None:
        from ..quant.calibration import read_text

        read_text(calibration)  # missing, unreadable, empty or malformed: refused before any work
    return CalibrationOptions(file=calibration, samples=samples, length=length,
                              methods=parse_methods(methods), learn_steps=learn_steps)


def _refuse_converted_source(source: str, option: str) -> None:
    """``option`` runs the PyTorch original of SOURCE, which a hybridconv output is
    not: refuse before any work, naming what works instead."""
    import json

    from ..convert import CONVERSION_RECORD, is_hybridconv_output

    folder = Path(source).expanduser()
    if not (folder.is_dir() and is_hybridconv_output(folder)):
        return
    try:
        original = json.loads((folder / CONVERSION_RECORD).read_text()).get("source") or "ORIGINAL"
    except (OSError, ValueError):
        original = "ORIGINAL"
    raise UsageError(
        f"{option}: {source} is a hybridconv output (MLX layout), and {option} needs the PyTorch original of SOURCE "
        "to compute its reference; nothing was written",
        f"make a reference file from the original once (`hybridconv reference {original} -o ref.safetensors`) and "
        f"add --reference-logits ref.safetensors; or quantize the original checkpoint ({original}) instead",
    )


def _reference(source, revision, reference_logits, allow_pickle=False, stream=None):
    from ..verify.reference import read_reference_file
    from .verify import _live_reference

    if reference_logits is not None:
        return read_reference_file(reference_logits)
    # verify's default inputs
    return _live_reference(source, revision, allow_pickle=allow_pickle, stream=stream)[0]


def _verify(source, revision, reference_logits, out: Path, allow_pickle: bool = False, ref=None,
            stream=None) -> None:
    from ..verify.run import REPORT_NAME, available_runtimes, verify_folder, write_report
    from .verify import render

    if ref is None:
        ref = _reference(source, revision, reference_logits, allow_pickle, stream)
    with console.status("verifying"):
        # as `verify` does by default: every installed runtime (the card says what mlx-lm does)
        outcome = verify_folder(out, ref, runtimes=available_runtimes(), stream=stream)
    write_report(outcome.report, out / REPORT_NAME)
    render(outcome.report)
    if not outcome.passed:
        raise typer.Exit(EXIT_GATE_FAILED)
