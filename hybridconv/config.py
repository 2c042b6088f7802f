"""Reading config.json and looking up fields under their aliases.

Hugging Face configs drift between releases: transformers 5 nests
``rope_theta`` in ``rope_parameters`` and writes ``dtype`` where transformers 4
wrote ``torch_dtype``; RecurrentGemma's published configs say ``_block_types``
where the library says ``block_types``. :func:`pick` tries every alias (dotted
names reach into nested dicts) and, when a required field is absent, fails
naming all the aliases it tried.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import ConfigError

REQUIRED: Any = object()


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"{path}: not found",
            "a Hugging Face checkpoint folder holds config.json next to its weights",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    return cfg


def _lookup(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            return None
        node = node[part]
    return node


def pick(cfg: dict, *names: str, default: Any = REQUIRED, kind: type | None = None) -> Any:
    """The first non-null value among ``names`` (dotted = nested), else ``default``.

    ``kind`` checks the type (``int`` rejects bools and floats with a fraction;
    ``float`` accepts ints)."""
    for name in names:
        value = _lookup(cfg, name)
        if value is not None:
            return _check(name, value, kind)
    if default is REQUIRED:
        tried = ", ".join(f"'{n}'" for n in names)
        raise ConfigError(
            f"config.json: required field '{names[0]}' is missing (tried {tried})",
            "the checkpoint's config.json is incomplete; compare it with the published one",
        )
    return default


def _check(name: str, value: Any, kind: type | None) -> Any:
    if kind is None:
        return value
    if kind is int:
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole:
            raise ConfigError(f"config.json: '{name}' must be an integer, found {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"config.json: '{name}' must be a finite number, found {value!r}")
        return float(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config.json: '{name}' must be true or false, found {value!r}")
        return value
    if not isinstance(value, kind):
        raise ConfigError(
            f"config.json: '{name}' must be a {kind.__name__}, found {value!r}"
        )
    return value


# Far above any real model, far below what would exhaust memory or time merely
# building the (lazy) model: a config beyond these is corrupt or hostile.
LIMITS = {"num_hidden_layers": 4096, "vocab_size": 1 << 24}
DEFAULT_LIMIT = 1 << 20  # widths, heads, state sizes, windows


def positive(name: str, value: int) -> int:
    if value <= 0:
        raise ConfigError(f"config.json: '{name}' must be positive, found {value}")
    limit = LIMITS.get(name, DEFAULT_LIMIT)
    if value > limit:
        raise ConfigError(f"config.json: '{name}' = {value} is implausibly large (limit {limit})")
    return value
