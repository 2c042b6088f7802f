"""Small rendering helpers."""

from __future__ import annotations

import contextlib


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


@contextlib.contextmanager
def byte_progress(console, label: str):
    """A Rich progress bar over the source's bytes. Yields ``(on_plan, progress)``
    callbacks for the library: ``on_plan(plan)`` sets the total (a conversion or a
    quantization plan), ``progress(n, tensor)`` advances. Not a terminal (CI logs,
    pipes): no bar, and no blank line left where it was."""
    if not console.is_terminal:
        yield (lambda plan: None), (lambda n, name: None)
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[tensor]}", style="dim"),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None, tensor="planning")

        def on_plan(plan):
            conversion = getattr(plan, "conversion", plan)
            bar.update(task, total=conversion.index.total_bytes)

        def progress(n, name):
            bar.update(task, advance=n, tensor=name)

        yield on_plan, progress


# What a file left out of a replaced output was, for the note that names it.
_REPLACED_WHAT = {
    "README.md": "its model card, perhaps edited by hand",
    "verification.json": "the verification of the old weights",
    ".gitattributes": "from an earlier upload",
}


def output_notes(console, result) -> None:
    """Say what writing an output did besides writing it: parent folders created
    (``-o`` under folders that did not exist) and, with ``--force``, the files of
    the replaced output that the new one does not hold (removed with it)."""
    from rich.markup import escape

    created = getattr(result, "created", None) or []
    if created:
        console.print(f"[yellow]note:[/] created the missing folder(s) {escape(', '.join(created))} for the output",
                      highlight=False, soft_wrap=True)
    replaced = getattr(result, "replaced", None) or []
    if replaced:
        named = ", ".join(f"{n} ({_REPLACED_WHAT[n]})" if n in _REPLACED_WHAT else n for n in replaced)
        console.print(f"[yellow]--force:[/] replaced the previous {escape(str(result.out))}; removed with it, as the "
                      f"new output does not hold them: {escape(named)}", highlight=False, soft_wrap=True)


def mlx_lm_line(out) -> str:
    """What mlx-lm users run on OUT: the model file it carries (and --trust-remote-code), or mlx-lm's own."""
    import json
    from pathlib import Path

    try:
        code = json.loads((Path(out) / "conversion.json").read_text()).get("mlx_lm_code") or {}
    except (OSError, ValueError):
        return "-"
    if code.get("carried"):
        return (f"carries hybridconv's model ({code['file']}; {code['reason']}): "
                "run with --trust-remote-code")
    return f"mlx-lm's own model ({code.get('reason', '?')}); nothing carried"
