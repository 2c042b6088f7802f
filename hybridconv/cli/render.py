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
