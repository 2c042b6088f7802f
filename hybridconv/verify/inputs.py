"""Verify inputs: prompts, text files, or random tokens.

Text is tokenised with the checkpoint's own ``tokenizer.json`` through the
``tokenizers`` library (no transformers, no torch). Random tokens need no
tokenizer. The default, when no input is given, is :data:`DEFAULT_RANDOM`
sequences of random tokens with seed 0: it works offline for any checkpoint.
Sequences of different lengths are kept apart (run one at a time), never padded
into each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError

DEFAULT_RANDOM = (2, 128)  # sequences x tokens
MAX_TOKENS = 16384


@dataclass
class Inputs:
    sequences: list[np.ndarray]  # int32 [T_i]
    description: str

    @property
    def total_tokens(self) -> int:
        return int(sum(len(s) for s in self.sequences))


def _tokenizer(folder: Path):
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise UsageError(
            f"{folder}: no tokenizer.json to tokenise the prompt or text",
            "use --random-tokens N, which needs no tokenizer",
        )
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises plain Exceptions
        raise UsageError(f"{path}: cannot be read by the tokenizers library ({exc})") from None


def build_inputs(
    folder: Path,
    vocab_size: int,
    prompts: list[str] | None = None,
    text_files: list[Path] | None = None,
    random_tokens: int | None = None,
    num_sequences: int | None = None,
    seed: int = 0,
    max_tokens: int = MAX_TOKENS,
) -> Inputs:
    texts: list[tuple[str, str]] = [(f"prompt {i + 1}", p) for i, p in enumerate(prompts or [])]
    for f in text_files or []:
        try:
            texts.append((str(f), Path(f).read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{f}: cannot be read as UTF-8 text ({exc})") from None
    sequences: list[np.ndarray] = []
    parts: list[str] = []
    if texts:
        tok = _tokenizer(folder)
        for label, text in texts:
            ids = np.array(tok.encode(text).ids, dtype=np.int32)[:max_tokens]
            if len(ids) < 2:
                raise UsageError(f"{label}: tokenises to {len(ids)} token(s); need at least 2")
            sequences.append(ids)
        parts.append(f"{len(texts)} text(s), tokenised with the checkpoint's tokenizer")
    if random_tokens is not None or not texts:
        n = random_tokens if random_tokens is not None else DEFAULT_RANDOM[1]
        count = num_sequences if num_sequences is not None else (DEFAULT_RANDOM[0] if random_tokens is None or not texts else 1)
        if not 2 <= n <= max_tokens:
            raise UsageError(f"--random-tokens {n}: expected 2..{max_tokens}")
        if count < 1:
            raise UsageError(f"--num-sequences {count}: expected at least 1")
        rng = np.random.default_rng(seed)
        for _ in range(count):
            sequences.append(rng.integers(0, vocab_size, size=n).astype(np.int32))
        parts.append(f"{count} x {n} random tokens (seed {seed})")
    for s in sequences:
        if s.size and (s.min() < 0 or s.max() >= vocab_size):
            raise UsageError(f"token id {int(s.max())} is outside the vocabulary (size {vocab_size})")
    return Inputs(sequences, "; ".join(parts))


def inputs_for(folder: Path, **options) -> Inputs:
    """:func:`build_inputs` for the checkpoint in ``folder``: its tokenizer, its vocabulary."""
    from ..loading import load_config

    _, cfg = load_config(Path(folder))
    # random tokens from the tokens the model predicts (Inkling pads its vocabulary
    # beyond unpadded_vocab_size; a padding id has no logit to score it by)
    return build_inputs(Path(folder), cfg.get("unpadded_vocab_size") or cfg["vocab_size"], **options)
