"""Calibration text for ``quantize --calibrate``: a local file or a built-in sample,
tokenised with the checkpoint's own tokenizer, cut into equal windows. Never a download.

* ``--calibration FILE``: plain UTF-8 text, or JSON Lines (``.jsonl``/``.ndjson``,
  or a file whose every non-empty line is a JSON value): each line a string, or an
  object with ``text``, or ``prompt``/``completion``, or ``messages`` (a list of
  ``{"content": ...}``) — the strings are joined with blank lines.
* no file: :func:`builtin_sample`, text of a few modules of the running Python's
  standard library (code, comments and docstrings). It is on every machine that
  runs hybridconv, so a calibrated quantization is reproducible offline; for a
  model of other text (chat, other languages) a file of that text is better.

Windows: the token stream is cut into ``length``-token windows, ``count`` of them
spread evenly over the text (deterministic, no sampling); a text too short for
``count`` windows gives as many as it holds (at least one of 16 tokens, or an error).
"""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError

DEFAULT_SAMPLES = 32
DEFAULT_LENGTH = 256
DEFAULT_LEARN_STEPS = 200  # Adam steps per block of the 'learn' method (here: the CLI imports no MLX)
MIN_LENGTH = 16

# Standard-library modules whose text makes the built-in sample (prose in docstrings,
# code, comments): varied, stable across Python versions, present in every install.
BUILTIN_MODULES = (
    "textwrap.py", "argparse.py", "functools.py", "heapq.py", "csv.py", "string.py",
    "random.py", "statistics.py", "calendar.py", "difflib.py", "fractions.py",
    "shlex.py", "pprint.py", "json/__init__.py", "collections/__init__.py", "dataclasses.py",
)
BUILTIN_CHARS = 400_000


@dataclass
class Calibration:
    sequences: np.ndarray  # int32 [count, length]
    description: str

    @property
    def tokens(self) -> int:
        return int(self.sequences.size)

    def to_dict(self) -> dict:
        return {"sequences": int(self.sequences.shape[0]), "length": int(self.sequences.shape[1]),
                "tokens": self.tokens, "text": self.description}


def builtin_sample() -> tuple[str, str]:
    """(text, description) of the built-in sample (module docstring)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, used = [], []
    for name in BUILTIN_MODULES:
        try:
            parts.append((root / name).read_text(encoding="utf-8"))
            used.append(name)
        except (OSError, UnicodeDecodeError):
            continue
    if not parts:
        raise UsageError(
            f"the built-in calibration sample needs the Python standard library's sources, not found under {root}",
            "pass --calibration FILE (text or JSONL)",
        )
    text = "\n\n".join(parts)[:BUILTIN_CHARS]
    return text, f"built-in sample: {len(used)} standard-library modules of Python at {root}"


def _json_text(value, path: Path, line: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if isinstance(value.get("text"), str):
            return value["text"]
        pc = [value[k] for k in ("prompt", "completion") if isinstance(value.get(k), str)]
        if pc:
            return "\n".join(pc)
        msgs = value.get("messages")
        if isinstance(msgs, list):
            got = [m["content"] for m in msgs if isinstance(m, dict) and isinstance(m.get("content"), str)]
            if got:
                return "\n".join(got)
    raise UsageError(
        f"{path}:{line}: a JSONL line must be a string or an object with 'text', 'prompt'/'completion' "
        f"or 'messages'; found {type(value).__name__}",
        "or pass plain text (a .txt file)",
    )


def read_text(path: Path) -> str:
    """The calibration text of ``path`` (plain text or JSON Lines, module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--calibration {path}: file not found")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--calibration {path}: cannot be read as UTF-8 text ({exc})") from None
    lines = [l for l in raw.splitlines() if l.strip()]
    if not lines:
        raise UsageError(f"--calibration {path}: the file is empty (no text to calibrate on)",
                         "pass text like the model's use (plain text, or JSONL), or drop --calibration for the built-in sample")
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    if not jsonl and lines and all(l.lstrip()[:1] in "{\"" for l in lines):
        try:
            [json.loads(l) for l in lines[:3]]
            jsonl = True
        except ValueError:
            jsonl = False
    if not jsonl:
        return raw
    texts = []
    for i, l in enumerate(raw.splitlines(), 1):
        if not l.strip():
            continue
        try:
            value = json.loads(l)
        except ValueError as exc:
            raise UsageError(f"{path}:{i}: not valid JSON ({exc})", "a .jsonl file holds one JSON value per line") from None
        texts.append(_json_text(value, path, i))
    if not any(t.strip() for t in texts):
        raise UsageError(f"--calibration {path}: every JSONL line holds empty text",
                         "pass lines with text (a string, 'text', 'prompt'/'completion' or 'messages')")
    return "\n\n".join(texts)


def calibration_tokens(folder: Path, vocab_size: int, file: Path | None = None,
                       count: int = DEFAULT_SAMPLES, length: int = DEFAULT_LENGTH) -> Calibration:
    """``count`` windows of ``length`` tokens of ``file`` (or the built-in sample),
    tokenised with ``folder``'s ``tokenizer.json``."""
    from ..verify.inputs import _tokenizer

    if count < 1:
        raise UsageError(f"--calibration-samples {count}: expected at least 1")
    if length < MIN_LENGTH:
        raise UsageError(f"--calibration-length {length}: expected at least {MIN_LENGTH}")
    if file is not None:
        text, what = read_text(file), str(file)
    else:
        text, what = builtin_sample()
    tok = _tokenizer(folder)
    ids = []
    step = 100_000  # the tokenizer's work in pieces: bounded memory for a large file
    for i in range(0, len(text), step):
        ids.extend(tok.encode(text[i : i + step], add_special_tokens=False).ids)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise UsageError(f"{what}: token id {int(ids.max())} is outside the model's vocabulary ({vocab_size})",
                         "the tokenizer does not belong to this checkpoint")
    windows = ids.size // length
    if windows == 0:
        if ids.size < MIN_LENGTH:
            raise UsageError(f"{what}: only {ids.size} tokens of calibration text; need at least {MIN_LENGTH}",
                             "pass a longer --calibration FILE")
        length, windows = int(ids.size), 1
    n = min(count, windows)
    picks = np.linspace(0, windows - 1, n).round().astype(int)
    seqs = np.stack([ids[w * length : (w + 1) * length] for w in picks]).astype(np.int32)
    note = "" if n == count else f" (the text holds only {windows} windows; {count} asked)"
    return Calibration(seqs, f"{what}: {n} x {length} tokens{note}")
