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
