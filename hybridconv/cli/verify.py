"""``hybridconv verify`` and ``hybridconv reference``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..checkpoint import source_folder
from ..errors import EXIT_GATE_FAILED, UsageError
from . import app, console, err_console
from .options import AllowPickleOpt, MaxMemoryOpt, RevisionOpt, SourceArg, StreamOpt, given, refuse_unused

RefDtypeOpt = Annotated[
    str, typer.Option("--ref-dtype", help="dtype of the PyTorch reference: float32, bfloat16 or float16.")
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Run the checkpoint's own modeling .py files as the reference (never by default). "
        "Without it, PLaMo-2 uses hybridconv's own PyTorch implementation.",
    ),
]
PromptOpt = Annotated[Optional[list[str]], typer.Option("--prompt", help="A text input (repeatable).", show_default=False)]
TextFileOpt = Annotated[
    Optional[list[Path]], typer.Option("--text-file", help="A UTF-8 text file as one input (repeatable).", show_default=False)
]
RandomOpt = Annotated[
    Optional[int], typer.Option("--random-tokens", help="N random tokens per sequence (no tokenizer needed).", show_default=False)
]
NumSeqOpt = Annotated[
    Optional[int], typer.Option("--num-sequences", help="How many random sequences to run \\[default: 2 when no --prompt or --text-file is given, else 1].", show_default=False)
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for random tokens.")]


def _live_reference(source, revision, ref_dtype="float32", trust_remote_code=False, prompt=None, text_file=None,
                    random_tokens=None, num_sequences=None, seed=0, keep_hidden=True, max_memory=None,
                    allow_pickle=False, stream=None, check_inputs=None):
    from ..verify.inputs import inputs_for
    from ..verify.reference import compute_reference

    with source_folder(source, revision, allow_pickle) as src:
        inputs = inputs_for(src.path, prompts=prompt, text_files=text_file, random_tokens=random_tokens,
                            num_sequences=num_sequences, seed=seed)
        if check_inputs is not None:
            check_inputs(inputs.sequences)  # before the reference runs
        what = f"running the PyTorch reference on {inputs.description}"
        with console.status(what) as status:
            return compute_reference(src, inputs, ref_dtype, trust_remote_code, keep_hidden=keep_hidden,
                                     max_memory=max_memory, stream=stream,
                                     progress=lambda msg: status.update(f"{what}: {msg}")), inputs


@app.command("verify")
def verify_cmd(
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(help="The converted MLX folder to check.", show_default=False)],
    reference: Annotated[
        Optional[str],
        typer.Option("--reference", help="The original checkpoint (folder or Hub repo id): run it in PyTorch now.", show_default=False),
    ] = None,
    reference_logits: Annotated[
        Optional[Path],
        typer.Option("--reference-logits", help="A file from `hybridconv reference` (no torch needed).", show_default=False),
    ] = None,
    revision: RevisionOpt = None,
    ref_dtype: RefDtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    prompt: PromptOpt = None,
    text_file: TextFileOpt = None,
    random_tokens: RandomOpt = None,
    num_sequences: NumSeqOpt = None,
    seed: SeedOpt = 0,
    max_kl_mean: Annotated[Optional[float], typer.Option("--max-kl-mean", help="Gate: mean KL(ref || mlx), nats.", show_default=False)] = None,
    max_kl_p99: Annotated[Optional[float], typer.Option("--max-kl-p99", help="Gate: 99th percentile of per-token KL (also bounds the decode check).", show_default=False)] = None,
    min_top1: Annotated[Optional[float], typer.Option("--min-top1", help="Gate: top-1 agreement over decisive tokens (the reference's best two logits at least 0.5 nats apart), 0..1.", show_default=False)] = None,
    min_top5: Annotated[Optional[float], typer.Option("--min-top5", help="Gate: mean top-5 overlap over decisive tokens, 0..1.", show_default=False)] = None,
    max_block_error: Annotated[Optional[float], typer.Option("--max-block-error", help="Gate: relative error of one block's output (decided on each block's own error when the chained outputs exceed it).", show_default=False)] = None,
    decode_steps: Annotated[int, typer.Option("--decode-steps", min=0, help="Tokens per sequence run one at a time through the caches after a prefill of the rest (at most the shortest input's length - 1; the default 8 is lowered to fit short inputs, and the report records what ran).")] = 8,
    compute: Annotated[str, typer.Option("--compute", metavar="auto|native|float32", help=(
        "Arithmetic for bf16/fp16/N-bit weights: float32 uses the weights exactly as stored, upcast one layer at a "
        "time, with float32 activations (fast through the BLAS on the CPU); native uses MLX's own low-precision "
        "kernels and the folder's activation dtype; auto is float32 on the CPU (no fast low-precision kernels there) "
        "and native elsewhere (Metal, CUDA)."))] = "auto",
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the JSON report here; - writes it to stdout (the tables then go to stderr).", show_default=False)] = None,
    no_report: Annotated[bool, typer.Option("--no-report", help="Do not write OUT/verification.json.")] = False,
    max_memory: MaxMemoryOpt = None,
    stream: StreamOpt = None,
    allow_pickle: AllowPickleOpt = False,
    runtime: Annotated[
        Optional[str],
        typer.Option("--runtime", metavar="hybridconv|mlx-lm|all", help="Who runs OUT: hybridconv (its own model), mlx-lm (mlx_lm.utils.load_model "
                     "in a separate process, what mlx_lm.load users get: with trust_remote_code where OUT carries hybridconv's "
                     "model file) or all \\[default: all when mlx-lm is installed, else hybridconv].",
                     show_default=False),
    ] = None,
    require_runtime: Annotated[
        Optional[list[str]],
        typer.Option("--require-runtime", metavar="RUNTIME", help="Make this runtime's failure a failure of the command (exit 1), e.g. "
                     "mlx-lm for pipelines that publish for mlx-lm users (repeatable).", show_default=False),
    ] = None,
):
    """Check that OUT computes the same function as the original checkpoint.

    Runs the PyTorch reference (--reference) or reads stored reference logits
    (--reference-logits), runs OUT in MLX on the same tokens, and compares: |Δlogit|,
    per-token KL(ref || mlx) (mean, median, p99, max), top-1 and top-5 agreement,
    perplexities, KL by position, the output of every block (naming the first that
    diverges; when a block is over the gate, every block also runs on the reference's
    input to it, so one wrong block is told from noise accumulated through correct ones),
    and a decode check through the caches. Gates depend on OUT's precision
    (float32, bf16/fp16, N-bit) and can be overridden.

    Models of any size: each side (the PyTorch reference, the MLX model) runs whole when
    it fits in half the memory (faster), otherwise one block at a time (memory: the
    largest block with the embedding and head, not the model); --stream / --no-stream
    force it, and only a path that cannot fit is refused. The report records the path
    taken, why, the peak memory and the seconds per part (execution).

    With --runtime all (the default when mlx-lm is installed) the same inputs and gates
    also run through mlx-lm's model of OUT (the reference runs once), loaded as mlx-lm
    loads it in a process that cannot import hybridconv's model code: where OUT carries
    hybridconv's model (config.json model_file) with trust_remote_code, as a user passing
    --trust-remote-code runs it, after checking the file against conversion.json. Its
    result (pass, fail with its metrics, or cannot load / cannot run with mlx-lm's
    message) is reported loudly but is not a failure of the conversion unless
    --require-runtime mlx-lm. The exit code follows hybridconv's runtime when it runs; with
    --runtime mlx-lm alone, mlx-lm is the only runtime run and its result is the verdict
    (exit 1 when it cannot load or run OUT, or fails a gate).
    mlx-lm loads whole models: when the MLX side runs one block at a time, mlx-lm is not
    run and its result says so ("not run: larger than memory").

    OUT must be a folder hybridconv wrote (convert, quantize): the report is written into
    it, and a Hugging Face checkpoint is refused.

    Exit codes: 0 pass (hybridconv's runtime, or the only runtime run, and every
    --require-runtime); 1 a gate failed; 2 bad usage or input; 3 the report could not be
    written; 130/143 interrupted.
    """
    from ..verify.gates import check_overrides
    from ..verify.reference import read_reference_file
    from ..verify.run import REPORT_NAME, RUNTIMES, available_runtimes, verify_folder, write_report

    have = available_runtimes()
    if runtime in (None, "all"):
        runtimes = have
    elif runtime in RUNTIMES:
        runtimes = (runtime,)
    else:
        raise UsageError(f"--runtime {runtime!r}: expected one of {', '.join(RUNTIMES)} or all")
    require = tuple(dict.fromkeys(require_runtime or ()))
    for name in (*runtimes, *require):
        if name not in RUNTIMES:
            raise UsageError(f"--require-runtime {name!r}: expected one of {', '.join(RUNTIMES)}")
        if name not in have:
            raise UsageError(f"runtime {name}: mlx-lm is not installed", "pip install mlx-lm")
    not_run = [r for r in require if r not in runtimes]
    if not_run:
        raise UsageError(f"--require-runtime {', '.join(not_run)}: not run with --runtime {runtime}",
                         "use --runtime all")

    if (reference is None) == (reference_logits is None):
        raise UsageError("pass exactly one of --reference SOURCE or --reference-logits FILE")
    if not out.is_dir():
        raise UsageError(f"{out}: not a folder", "pass the folder written by `hybridconv convert`")
    from ..convert import is_hybridconv_output
    from ..loading import load_config

    load_config(out)  # a malformed or unsupported config is reported as such first
    if not is_hybridconv_output(out):
        # verify writes its report into OUT: never into a folder hybridconv did not write
        # (a Hugging Face source given as OUT would get a verification.json)
        raise UsageError(
            f"{out}: not a hybridconv output (no conversion.json written by hybridconv); verify checks what "
            "`hybridconv convert` or `hybridconv quantize` wrote, and writes its report into it",
            f"convert it first (hybridconv convert {out} -o {out}-mlx), then verify the output against {out}",
        )
    overrides = check_overrides(dict(max_kl_mean=max_kl_mean, max_kl_p99=max_kl_p99, min_top1=min_top1,
                                     min_top5=min_top5, max_block_error=max_block_error))
    steps_typed = bool(given(ctx, "decode_steps"))

    def check_inputs(sequences) -> None:
        shortest = min(len(q) for q in sequences)
        if steps_typed and decode_steps > shortest - 1:
            raise UsageError(
                f"--decode-steps {decode_steps}: the decode check runs each sequence's last steps one at a time after "
                f"a prefill of the rest, and the shortest input has {shortest} tokens: at most {shortest - 1} steps",
                "lower --decode-steps, or use longer inputs",
            )

    if reference_logits is not None:
        refuse_unused(ctx, ("prompt", "text_file", "random_tokens", "num_sequences", "seed"),
                      "--reference-logits fixes the inputs (they are stored in the file)", "drop them")
        refuse_unused(ctx, ("ref_dtype", "trust_remote_code", "revision", "allow_pickle"),
                      "these set up a live PyTorch reference; --reference-logits runs none", "drop them, or use --reference")
        ref = read_reference_file(reference_logits)
        check_inputs(ref.sequences)
    else:
        ref, _ = _live_reference(reference, revision, ref_dtype, trust_remote_code, prompt, text_file,
                                 random_tokens, num_sequences, seed, max_memory=max_memory,
                                 allow_pickle=allow_pickle, check_inputs=check_inputs, stream=stream)
    to_stdout = json_path is not None and str(json_path) == "-"
    screen = err_console if to_stdout else console  # stdout carries the JSON alone
    with screen.status("running the MLX model") as status:
        outcome = verify_folder(out, ref, gate_overrides=overrides, decode_steps=decode_steps, compute=compute,
                                runtimes=runtimes, require=require, stream=stream, max_memory=max_memory,
                                progress=lambda msg: status.update(f"running the MLX model: {msg}"))
    report = outcome.report
    if not no_report:
        write_report(report, out / REPORT_NAME)
    if to_stdout:
        print_json(report)
    elif json_path:
        write_report(report, json_path)
    render(report, screen)
    if not outcome.passed:
        raise typer.Exit(EXIT_GATE_FAILED)


def print_json(data: dict) -> None:
    """``--json -``: the JSON document alone on stdout (no Rich markup or wrapping)."""
    import json
    import sys

    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def render(report: dict, console=console) -> None:
    m = report.get("metrics")
    head = Table(title=f"verify {report['model']['path']} ({report['model']['precision']})", show_header=False)
    head.add_column(style="bold")
    head.add_column()
    r = report["reference"]
    head.add_row("reference", escape(f"{r['implementation']} [{r['dtype']}] — {r['source']}" + (f" ({r['file']})" if r["file"] else "")))
    head.add_row("inputs", f"{report['inputs']['sequences']} sequence(s), {report['inputs']['tokens']} tokens")
    for who, ex in (("reference run", r.get("execution")), ("MLX run", report.get("execution"))):
        if ex:
            head.add_row(who, escape(_execution_line(ex)))
    if report.get("compute"):
        c = report["compute"]
        head.add_row("arithmetic", escape(f"{c['path']}: weights {c['weights']}, activations {c['activations']}; "
                                          f"BLAS {c['blas'].get('kind')}"))
    if m:
        o = m["overall"]
        head.add_row("max / mean |Δlogit|", f"{o['max_abs_logit_diff']:.3g} / {o['mean_abs_logit_diff']:.3g}")
        head.add_row("KL mean / median / p99 / max", f"{o['kl_mean']:.3g} / {o['kl_median']:.3g} / {o['kl_p99']:.3g} / {o['kl_max']:.3g}")
        top5 = "n/a (top-k file)" if o["top5_overlap"] is None else f"{o['top5_overlap']:.3f}"
        head.add_row("top-1 / top-5 (all tokens)", f"{o['top1_agreement']:.3f} / {top5}")
        if o.get("top1_agreement_decisive") is not None:
            t5 = o.get("top5_overlap_decisive")
            head.add_row(f"top-1 / top-5 ({o['decisive_tokens']} decisive tokens)",
                         f"{o['top1_agreement_decisive']:.3f} / " + ("n/a" if t5 is None else f"{t5:.3f}"))
        else:
            head.add_row("decisive tokens", "none: the reference is nearly uniform everywhere (top-k gates skipped)")
        head.add_row("perplexity ref / mlx (ratio)", f"{o['perplexity_ref']:.4g} / {o['perplexity_mlx']:.4g} ({o['perplexity_ratio']:.4f})")
        head.add_row("KL by position", ", ".join(f"{b['positions']}: {b['kl_mean']:.2g}" for b in o["kl_by_position"]))
    if report.get("decode"):
        d = report["decode"]
        head.add_row("decode check", f"KL max {d['kl_max']:.3g}, max |Δlogit| {d['max_abs_logit_diff']:.3g}")
    console.print(head)
    if report.get("blocks"):
        t = Table(title="blocks")
        t.add_column("block", justify="right")
        t.add_column("kind")
        t.add_column("relative error", justify="right")
        own = any("own_error" in b for b in report["blocks"])
        if own:
            t.add_column("own error", justify="right")
        t.add_column("")
        for b in report["blocks"]:
            cells = [str(b["block"]), b["kind"], f"{b['relative_error']:.3g}"]
            if own:
                cells.append(f"{b['own_error']:.3g}")
            t.add_row(*cells, "[red]diverges[/]" if b["diverged"] else "")
        console.print(t)
        if report.get("block_note"):
            console.print(f"[yellow]blocks:[/] {escape(report['block_note'])}")
    elif report.get("block_comparison"):
        console.print(f"[dim]blocks: {report['block_comparison']}[/]")
    if r.get("note"):
        console.print(f"[yellow]note:[/] {escape(r['note'])}")
    for sk in report.get("skipped_gates") or []:
        console.print(f"[yellow]gate {sk['gate']} skipped:[/] {escape(sk['reason'])}")
    if report.get("checks"):
        g = Table(title="gates")
        g.add_column("gate")
        g.add_column("value", justify="right")
        g.add_column("threshold", justify="right")
        g.add_column("")
        for c in report["checks"]:
            g.add_row(c["gate"], f"{c['value']:.4g}", f"{c['threshold']:.4g}", "[green]ok[/]" if c["passed"] else "[red]FAIL[/]")
        console.print(g)
    fdb = report.get("first_divergent_block")
    if fdb is not None:
        console.print(f"first divergent block: [bold red]{fdb}[/]")
    render_runtimes(report, console)
    if report["verdict"] == "pass":
        console.print("[bold green]PASS[/]")
    else:
        console.print("[bold red]FAIL[/]: " + escape("; ".join(report["failure_reasons"])))


def _execution_line(ex: dict) -> str:
    """One line for how a side ran: path, why, peak memory, seconds per part."""
    parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in (ex.get("seconds") or {}).items())
    peak = ex.get("peak_rss_bytes")
    return (f"{ex['path']} ({ex.get('reason', '')})" + (f"; peak memory {peak / 1e9:.2f} GB" if peak else "")
            + (f"; {parts}" if parts else ""))


def render_runtimes(report: dict, console=console) -> None:
    """One row per runtime; a loud note for a runtime other than hybridconv that
    does not pass (what people who load OUT with it get)."""
    runs = report.get("runtimes") or {}
    if list(runs) in ([], ["hybridconv"]):
        return
    t = Table(title="runtimes")
    for col in ("runtime", "version", "verdict", "KL mean", "max |Δlogit|", "model code"):
        t.add_column(col, justify="right" if col in ("KL mean", "max |Δlogit|") else "left")
    for name, r in runs.items():
        o = (r.get("metrics") or {}).get("overall") or {}
        color = "green" if r["verdict"] == "pass" else "red"
        code = r.get("model_code") or {}
        what = ("hybridconv.models" if name == "hybridconv" else
                f"{code.get('file')} (carried, trust_remote_code)" if r.get("trust_remote_code") else
                "built-in" if code else "-")
        t.add_row(name, str(r.get("version") or "-"), f"[{color}]{r['verdict']}[/]",
                  "-" if o.get("kl_mean") is None else f"{o['kl_mean']:.3g}",
                  "-" if o.get("max_abs_logit_diff") is None else f"{o['max_abs_logit_diff']:.3g}", escape(what))
    console.print(t)
    required = set(report.get("required_runtimes") or ())
    for name, r in runs.items():
        if r.get("note"):
            console.print(f"[yellow]note ({name}):[/] " + escape(r["note"]))
        if name == report.get("runtime", "hybridconv") or r["verdict"] == "pass":
            continue
        why = r.get("message") or "; ".join(r.get("failure_reasons") or [])
        expected = (r.get("expected") or {}).get("reason")
        tail = ("[bold red]required (--require-runtime): the verification fails[/]" if name in required
                else f"not a failure of the conversion (--require-runtime {name} makes it one)")
        consequence = (f"what {name} computes with this folder was not measured" if r["verdict"] == "not run"
                       else f"people who load this folder with {name} do not get the reference's function")
        fix = ("\n  convert with --mlx-lm-code auto (the default) or always: the output then carries hybridconv's "
               "model, which mlx-lm runs with --trust-remote-code"
               if name == "mlx-lm" and not r.get("trust_remote_code") and r["verdict"] != "not run" else "")
        console.print(f"[bold yellow]WARNING: {name} {r['verdict']}[/]: " + escape(why)
                      + (f"\n  known: {escape(expected)}" if expected else "")
                      + f"\n  {consequence}; {tail}"
                      + fix)


@app.command("reference")
def reference_cmd(
    source: SourceArg,
    out: Annotated[Path, typer.Option("-o", "--out", help="The reference-logits file to write (.safetensors); missing parent folders are created (and named).", show_default=False)],
    revision: RevisionOpt = None,
    ref_dtype: RefDtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    prompt: PromptOpt = None,
    text_file: TextFileOpt = None,
    random_tokens: RandomOpt = None,
    num_sequences: NumSeqOpt = None,
    seed: SeedOpt = 0,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Store only the top-k logits per token (large vocabularies).", show_default=False)] = None,
    hidden_states: Annotated[bool, typer.Option("--hidden-states", help="Also store every block's output (lets verify localise divergence).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing reference file.")] = False,
    max_memory: MaxMemoryOpt = None,
    stream: StreamOpt = None,
    allow_pickle: AllowPickleOpt = False,
):
    """Run the PyTorch reference once and store its logits, to verify many variants later without torch.

    Writes input_ids int32 [B, T] and logits float32 [B, T, V] (the fixtures' format), or the
    top-k form with --top-k; --hidden-states adds every block's output. The model runs whole
    when it fits in half the memory, otherwise one block at a time (--stream / --no-stream
    force it); the file is written one tensor and one sequence at a time.

    Exit codes: 0 written; 2 bad usage or input; 3 the file could not be written (a full disk:
    the path, the space needed and the space free are named); 130/143 interrupted.
    """
    from ..verify.reference import write_reference_file

    if out.is_dir():
        raise UsageError(f"{out}: is a folder; -o names the reference file to write",
                         f"e.g. -o {out / 'reference.safetensors'}")
    if out.exists() and not force:
        raise UsageError(f"{out}: already exists", "choose another -o, or pass --force")
    from ..convert import make_parents, remove_parents

    ref, inputs = _live_reference(source, revision, ref_dtype, trust_remote_code, prompt, text_file,
                                  random_tokens, num_sequences, seed, keep_hidden=hidden_states,
                                  max_memory=max_memory, allow_pickle=allow_pickle, stream=stream)
    created = make_parents(out.parent)  # only now, and removed again if writing fails
    try:
        write_reference_file(ref, out, top_k=top_k, with_hidden=hidden_states)
    except BaseException:
        remove_parents(created)
        raise
    console.print(escape(f"wrote {out}: {inputs.description}; reference: {ref.implementation} [{ref_dtype}]; "
                         f"{_execution_line(ref.execution)}"))
    if created:
        err_console.print(f"[yellow]note:[/] created the missing folder(s) {escape(', '.join(map(str, created)))}",
                          highlight=False, soft_wrap=True)
