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


# Whole-model runs are chosen when their estimate is at most this share of the
# memory limit: they are faster (no per-block round trips), but an estimate is
# an estimate, and the machine runs other things (README, "verify: memory").
WHOLE_MODEL_SHARE = 0.5

PATHS = ("whole-model", "streamed")


def memory_limit(max_memory: str | None) -> tuple[int | None, str]:
    """(bytes, where the figure comes from): ``--max-memory`` when given, else the
    memory available now (None when unknown)."""
    if max_memory:
        return parse_size(max_memory), "--max-memory"
    return available_memory(), "available memory"


def choose_path(what: str, whole: int, streamed: int, stream: bool | None, max_memory: str | None,
                hint: str, unit: str = "one block") -> dict:
    """Whole-model or streamed (block by block) for ``what``: ``stream`` True / False
    forces it (``--stream`` / ``--no-stream``); None chooses whole-model when its
    estimate ``whole`` is at most :data:`WHOLE_MODEL_SHARE` of the limit, streamed
    otherwise. Refuses (UsageError, exit 2) only when the path taken cannot fit:
    a streamed run when ``streamed`` (the largest block with what stays resident)
    exceeds the limit. Returns the decision as a JSON-ready dict: ``path``,
    ``reason``, ``estimated_bytes`` ({whole-model, streamed}) and the limit."""
    limit, source = memory_limit(max_memory)
    est = {"whole-model": int(whole), "streamed": int(streamed)}
    out = {"estimated_bytes": est, "memory_limit_bytes": limit, "memory_limit_source": source}
    if stream is False:
        check_fits(f"{what} (whole model)", whole, max_memory,
                   hint + f"; or drop --no-stream (streamed, {unit} at a time: about {_fmt(streamed)})")
        return {"path": "whole-model", "reason": "asked for (--no-stream)", **out}
    if stream is None and (limit is None or whole <= WHOLE_MODEL_SHARE * limit):
        why = ("the memory available is unknown" if limit is None else
               f"fits: about {_fmt(whole)}, within {WHOLE_MODEL_SHARE:.0%} of {source} ({_fmt(limit)})")
        return {"path": "whole-model", "reason": why, **out}
    check_fits(f"{what} ({unit} at a time)", streamed, max_memory, hint)
    why = ("asked for (--stream)" if stream else
           f"the whole model needs about {_fmt(whole)}, more than {WHOLE_MODEL_SHARE:.0%} of {source} "
           f"({_fmt(limit)}); {unit} at a time needs about {_fmt(streamed)}")
    return {"path": "streamed", "reason": why, **out}


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def is_full_disk(exc: BaseException) -> bool:
    """A write that failed for lack of space (numpy's short write says only
    "N requested and M written": then the disk is full too)."""
    import errno

    if not isinstance(exc, OSError):
        return False
    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or (exc.errno is None and "requested and" in str(exc))


def full_disk_error(exc: BaseException, folder, needed: int | None = None):
    """An :class:`~hybridconv.errors.OutputError` (exit 3) naming ``folder`` and the
    space needed when ``exc`` is a write that failed for lack of space
    (:func:`is_full_disk`), else None."""
    from .errors import OutputError

    if not is_full_disk(exc):
        return None
    need = f"; about {_fmt(needed)} needed" if needed else ""
    return OutputError(f"{folder}: no space left on the device for verify's temporary outputs{need}",
                       "free space there, or point TMPDIR at a folder with more room")
