"""Options shared by several commands, defined once."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer


class Dtype(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


SourceArg = Annotated[
    str,
    typer.Argument(
        help="A local Hugging Face checkpoint folder, or a Hub repo id (ORG/NAME) to download "
        "into the Hugging Face cache (only the weight files its index names, config and tokenizer files).",
        show_default=False,
    ),
]
RevisionOpt = Annotated[
    Optional[str],
    typer.Option("--revision", help="Hub branch, tag or commit (repo ids only: refused with a local folder).", show_default=False),
]
DtypeOpt = Annotated[
    Optional[Dtype],
    typer.Option(
        "--dtype",
        help="Output dtype of floating tensors \\[default: the checkpoint's own]. "
        "SSM parameters (A_log, D, dt_bias) stay float32 whatever this says.",
        show_default=False,
    ),
]
OutOpt = Annotated[
    Path,
    typer.Option("-o", "--out", help="Output folder (must not exist unless --force; missing parent folders are created and named).", show_default=False),
]
ForceOpt = Annotated[
    bool,
    typer.Option("--force", help="Replace an existing output folder: only a previous hybridconv output holding nothing else, only once the new one is complete, checked again at that moment; files it held that the new one does not (a model card, verification.json) are named."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
AllowNonfiniteOpt = Annotated[
    bool,
    typer.Option("--allow-nonfinite", help="Convert even if some weights are NaN or infinite (refused by default, naming the tensors)."),
]
AllowPickleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Accept a checkpoint with only pickle weights (*.bin, *.pt), loaded with torch.load(weights_only=True). "
        "Refused by default: unpickling can run code.",
    ),
]
MaxMemoryOpt = Annotated[
    Optional[str],
    typer.Option("--max-memory", help="Memory verify may use (the PyTorch reference, the MLX model), e.g. 16GB: it decides "
                 "whole model or one block at a time, and what is refused \\[default: the memory available now].",
                 show_default=False),
]
StreamOpt = Annotated[
    Optional[bool],
    typer.Option("--stream/--no-stream", help="Run the models one block at a time (memory: the largest block, not the "
                 "model) or whole \\[default: whole when it fits in half the memory, else one block at a time].",
                 show_default=False),
]


class Mode(str, Enum):
    affine = "affine"
    mxfp4 = "mxfp4"
    nvfp4 = "nvfp4"
    mxfp8 = "mxfp8"


BitsOpt = Annotated[
    Optional[int],
    typer.Option("--bits", help="Width of quantized weights: 2, 3, 4, 5, 6 or 8 for affine; mxfp4/nvfp4: 4; mxfp8: 8 \\[default: 4; mxfp8: 8].", show_default=False),
]
GroupOpt = Annotated[
    Optional[int],
    typer.Option("--group-size", help="Weights per scale: 32, 64 or 128 for affine \\[default 64]; mxfp4/mxfp8 32, nvfp4 16.", show_default=False),
]
ModeOpt = Annotated[Mode, typer.Option("--mode", help="Quantization mode (MLX).")]
RecipeOpt = Annotated[
    Optional[str],
    typer.Option("--recipe", help="uniform (default: every role at --bits), or mixed-L-H with L < H: sensitive roles at H bits, the others at L (e.g. mixed-4-6); a mixed recipe sets the widths, so --bits is refused with it.", show_default=False),
]


def given(ctx: typer.Context, *params: str) -> list[str]:
    """The options among ``params`` (parameter names) that the user typed, as
    their flags (``--bits``), so that an option is never silently ignored."""
    out = []
    for name in params:
        source = ctx.get_parameter_source(name)
        # typer vendors its own click: compare by name, not by enum class
        if source is not None and source.name == "COMMANDLINE":
            param = next(p for p in ctx.command.params if p.name == name)
            out.append(max(param.opts, key=len))
    return out


def refuse_unused(ctx: typer.Context, params: tuple[str, ...], why: str, hint: str | None = None) -> None:
    """Exit 2 naming the typed options among ``params`` that would be ignored."""
    from ..errors import UsageError

    typed = given(ctx, *params)
    if typed:
        raise UsageError(f"{', '.join(typed)}: {why}", hint)


class MlxLmCode(str, Enum):
    auto = "auto"
    always = "always"
    never = "never"


MlxLmCodeOpt = Annotated[
    MlxLmCode,
    typer.Option(
        "--mlx-lm-code",
        help="Carry hybridconv's verified model in OUT as an mlx-lm model file (config.json model_file; "
        "run with --trust-remote-code in mlx_lm.generate/server/chat). auto: exactly where mlx-lm's own model "
        "cannot open OUT, computes another function, or may differ for this config (see `hybridconv inspect`); "
        "elsewhere mlx-lm's built-in model runs it and nothing is carried. always / never.",
    ),
]

