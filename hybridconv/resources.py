"""Memory checks before work that would obviously not fit."""

from __future__ import annotations

import os
import re

from .errors import UsageError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", text or "")
    if not m or m.group(2).upper() not in _UNITS:
        raise UsageError(f"--max-memory {text!r}: expected a size such as 16GB, 512MiB or 2000000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _fmt(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def check_fits(what: str, needed: int, max_memory: str | None, hint: str) -> None:
    limit = parse_size(max_memory) if max_memory else available_memory()
    if limit is not None and needed > limit:
        source = "--max-memory" if max_memory else "available memory"
        raise UsageError(
            f"{what} needs about {_fmt(needed)}; {source} is {_fmt(limit)}",
            hint + "; or raise --max-memory if you know better",
        )
