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



def positive_int(cfg: dict, *names: str, default: Any = REQUIRED) -> int:
    """``pick(cfg, *names, kind=int)`` (``default`` when none is set), checked by
    :func:`positive` under the name ``names[0]``: a required or defaulted size."""
    return positive(names[0], pick(cfg, *names, default=default, kind=int))


# --- plausibility of the numbers every architecture shares -------------------------
#
# A config can be well typed and still describe a model that cannot compute:
# rms_norm_eps = -1 or rope_theta = -5 convert and give NaN logits,
# partial_rotary_factor = 4 converts and then fails to load. Checked once for every
# architecture (the registry runs it on the raw config and on the normalised one,
# see converters.registry.register), by key name, wherever the key sits (nested
# rope_parameters / text_config tables included).

def _rule(parent: str, key: str):
    """(lower bound, lower inclusive, upper bound, upper inclusive, what) for a key, or None."""
    if key.endswith(("eps", "epsilon")):
        return 0.0, False, 1.0, False, "a small positive number (0 < eps < 1)"
    if key in ("rope_theta", "rope_base", "rotary_emb_base"):
        # published models use 1e4..1e8; far outside, float32 frequencies overflow
        return 1.0, True, 1e12, True, "between 1 and 1e12 (published models use 1e4 to 1e8)"
    if key == "partial_rotary_factor":
        return 0.0, False, 1.0, True, "in (0, 1]: the fraction of each head's dimensions rotated"
    if key in ("logits_soft_cap", "final_logit_softcapping", "attn_logit_softcapping", "logit_softcapping"):
        return 0.0, False, math.inf, False, "positive (or null for no cap)"
    if key == "factor" and parent.rsplit(".", 1)[-1] in ("rope_scaling", "rope_parameters"):
        return 0.0, False, math.inf, False, "positive"
    return None


def _walk(node: dict, prefix: str = ""):
    for k, v in node.items():
        if not isinstance(k, str):
            continue
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _walk(v, path + ".")
        else:
            yield prefix.rstrip("."), k, path, v


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_plausible(cfg: dict, normalised: bool = False) -> dict:
    """Refuse (ConfigError, exit 2, naming the key) values no working model has:
    epsilons outside (0, 1), rope_theta outside [1, 1e12], partial_rotary_factor outside (0, 1],
    soft caps or RoPE scaling factors <= 0, a time_step_limit that is not
    0 <= low < high. On the raw config only numbers are judged (a converter may
    accept other spellings); on the ``normalised`` one a non-number is refused too."""
    if not isinstance(cfg, dict):
        return cfg
    for parent, key, path, value in _walk(cfg):
        if value is None:
            continue
        if key == "time_step_limit":
            _check_time_step_limit(path, value, normalised)
            continue
        rule = _rule(parent, key)
        if rule is None:
            continue
        if not _number(value):
            if normalised:
                raise ConfigError(f"config.json: '{path}' must be a number, found {value!r}")
            continue
        lo, lo_incl, hi, hi_incl, what = rule
        ok = math.isfinite(value) and (value >= lo if lo_incl else value > lo) and (value <= hi if hi_incl else value < hi)
        if not ok:
            raise ConfigError(
                f"config.json: '{path}' = {value!r} is implausible: expected {what}",
                "compare config.json with the checkpoint's published one",
            )
    if normalised:
        _check_rotary_dims(cfg)
    return cfg


def _check_rotary_dims(cfg: dict) -> None:
    """RoPE rotates pairs: int(head_dim · partial_rotary_factor) must be even and >= 2."""
    factor = cfg.get("partial_rotary_factor")
    if not _number(factor):
        return
    head_dim = cfg.get("head_dim") or cfg.get("hidden_size_per_head")
    if not _number(head_dim):
        h, n = cfg.get("hidden_size"), cfg.get("num_attention_heads")
        if not (isinstance(h, int) and isinstance(n, int) and n > 0):
            return
        head_dim = h // n
    rotary = int(head_dim * factor)
    if rotary < 2 or rotary % 2:
        raise ConfigError(
            f"config.json: 'partial_rotary_factor' = {factor!r} is implausible: it rotates {rotary} of "
            f"{head_dim} head dimensions, and RoPE needs an even number, at least 2",
            "compare config.json with the checkpoint's published one",
        )


def _check_time_step_limit(path: str, value, normalised: bool) -> None:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        if normalised:
            raise ConfigError(f"config.json: '{path}' must be [low, high], found {value!r}")
        return
    low, high = value
    if not all(v is None or _number(v) for v in value):
        return  # an encoded infinity ({"__float__": "Infinity"}) in a raw config: the converter reads it
    low = 0.0 if low is None else low
    high = math.inf if high is None else high
    if math.isnan(low) or math.isnan(high) or low < 0 or not high > low:
        raise ConfigError(
            f"config.json: '{path}' = {list(value)!r} is implausible: expected [low, high] with 0 <= low < high",
            "compare config.json with the checkpoint's published one",
        )
