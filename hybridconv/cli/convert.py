"""``hybridconv convert``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..convert import DTYPE_LABELS, convert
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
    refuse_unused,
)
from .render import byte_progress, human_bytes, mlx_lm_line, output_notes


@app.command("convert")
def convert_cmd(
    ctx: typer.Context,
    source: SourceArg,
    out: OutOpt,
    dtype: DtypeOpt = None,
    revision: RevisionOpt = None,
    force: ForceOpt = False,
    quantize: Annotated[bool, typer.Option("--quantize", "-q", help="Quantize too: shortcut for `hybridconv quantize` (with --bits, --group-size, --mode, --recipe).")] = False,
    bits: BitsOpt = None,
    group_size: GroupOpt = None,
    mode: ModeOpt = Mode.affine,
    recipe: RecipeOpt = None,
    allow_nonfinite: AllowNonfiniteOpt = False,
    allow_pickle: AllowPickleOpt = False,
    mlx_lm_code: MlxLmCodeOpt = MlxLmCode.auto,
):
    """Convert a Hugging Face checkpoint to an MLX folder that hybridconv and mlx_lm.load open.

    Streams tensor by tensor (peak memory: a 64 MB chunk, not the model), accounts for every
    tensor (kept, transformed or dropped with a reason) and every model parameter, and writes
    into a temporary folder that is renamed to OUT only when complete, under the rules for an
    existing OUT checked again at that moment (another run may have written it meanwhile).

    A multimodal release converts its language model (vision tensors dropped, listed in the
    ledger); an FP8 block-scaled source (quant_method fp8) is dequantized exactly, bfloat16
    by default.

    Exit codes: 0 written; 2 bad usage or input (also an existing OUT without --force, or one
    another run wrote meanwhile); 3 OUT could not be written (disk full: path and space named);
    130/143 interrupted (temporary output removed).
    """
    if not quantize:
        refuse_unused(ctx, ("bits", "group_size", "mode", "recipe"), "quantization options need --quantize (-q)",
                      "add -q to quantize while converting, or use `hybridconv quantize`")
    if quantize:
        from ..quant.run import quantize as run_quantize
        from .quantize import print_plan

        with byte_progress(console, "quantizing") as (on_plan, progress):
            res = run_quantize(source, out, bits, group_size, mode.value, recipe, None, None,
                               dtype.value if dtype else None, revision, force, progress=progress,
                               on_plan=on_plan, allow_nonfinite=allow_nonfinite, allow_pickle=allow_pickle,
                               mlx_lm_code=mlx_lm_code.value)
        print_plan(res.plan, False)
        console.print(f"[green]wrote {out}[/] ({human_bytes(res.result.bytes_written)})")
        output_notes(err_console, res.result)
        return
    with byte_progress(console, "converting") as (on_plan, progress):
        result = convert(
            source,
            out,
            dtype=dtype.value if dtype else None,
            revision=revision,
            force=force,
            progress=progress,
            on_plan=on_plan,
            allow_nonfinite=allow_nonfinite,
            allow_pickle=allow_pickle,
            mlx_lm_code=mlx_lm_code.value,
        )
    p = result.plan
    table = Table(title=f"converted {p.source.label} -> {result.out}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("architecture", p.arch.title)
    table.add_row("layers", str(p.config["num_hidden_layers"]))
    table.add_row("parameters", f"{p.parameter_count:,}")
    table.add_row("dtype", DTYPE_LABELS[p.dtype])
    table.add_row("tensors", f"{len(p.kept)} written, {len(p.dropped)} dropped")
    for rule, count in _rule_counts(p).items():
        table.add_row(f"  {rule}", str(count))
    table.add_row("size", f"{human_bytes(p.index.total_bytes)} -> {human_bytes(result.bytes_written)}")
    table.add_row("files", ", ".join(result.files))
    table.add_row("mlx-lm", mlx_lm_line(result.out))
    console.print(table)
    output_notes(err_console, result)



def _rule_counts(p) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in p.steps:
        for name in s.applied:
            counts[name] = counts.get(name, 0) + 1
    return counts
