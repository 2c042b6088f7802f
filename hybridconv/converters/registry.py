"""The architecture registry, keyed by ``model_type`` and ``architectures``.

Each converter module registers one :class:`Architecture`. Lookup fails with
the list of supported architectures: there is no fallback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

from ..errors import ConfigError, UnsupportedArchitectureError
from .rules import Rule


@dataclass(frozen=True)
class Role:
    """A kind of quantizable weight matrix (a Linear or Embedding weight).

    ``sensitive`` roles get the higher width in mixed recipes; ``default`` is what
    the default plan does with it: ``"quantize"`` (at --bits) or ``"float"``."""

    name: str
    regex: str
    sensitive: bool = False
    default: str = "quantize"
    why: str = ""

    def matches(self, name: str) -> bool:
        return re.search(self.regex, name) is not None


@dataclass(frozen=True)
class Protected:
    """Tensors never quantized. Stored in float32 when ``float32`` is set or the
    conversion keeps them float32 (a ``keep-float32`` rule: the SSM / recurrence
    dynamics), otherwise in the output's float dtype: a bf16 output keeps its
    norms and conv kernels in bf16, as mlx-lm does, instead of paying 32 bits
    for them (measured: README, "Quantization")."""

    regex: str
    why: str
    float32: bool = False

    def matches(self, name: str) -> bool:
        return re.search(self.regex, name) is not None


@dataclass(frozen=True)
class MlxLm:
    """What mlx-lm does with hybridconv's output of a config, known before any
    conversion: ``computes`` (opens it and computes the reference's function),
    ``differs`` (opens it, computes something else), ``depends`` (differs only
    where the weights or inputs reach a case it treats differently),
    ``cannot open``, or ``unknown``; ``reason`` says why, ``measured_with`` the
    mlx-lm version."""

    status: str
    reason: str = ""
    measured_with: str | None = None

    LINES = {"computes": "opens and computes it", "differs": "opens but differs",
             "depends": "opens; may differ", "cannot open": "cannot open", "unknown": "unknown"}

    def line(self) -> str:
        head = self.LINES.get(self.status, self.status)
        return f"{head}: {self.reason}" if self.reason else head


NOT_MEASURED = MlxLm("unknown", "not measured")


@dataclass(frozen=True)
class Architecture:
    model_type: str
    architectures: tuple[str, ...]
    title: str
    normalize_config: Callable[[dict], dict]
    rules: Callable[[dict], list[Rule]]
    model_module: ModuleType  # provides ModelArgs, Model, layer_schedule
    roles: tuple[Role, ...] = field(default=())
    protected: tuple[Protected, ...] = field(default=())
    # What mlx-lm does with the output of a normalised config (see MlxLm); when
    # None, converters/_mlx_lm.py's entry for model_type, else "not measured".
    mlx_lm: Callable[[dict], MlxLm] | None = None

    def mlx_lm_support(self, config: dict) -> MlxLm:
        """mlx-lm's verdict on the output of the normalised ``config``, from the config alone."""
        check = self.mlx_lm
        if check is None:
            from . import _mlx_lm

            check = _mlx_lm.CHECKS.get(self.model_type)
        return check(config) if check is not None else NOT_MEASURED

    def role_of(self, name: str) -> Role | None:
        return next((r for r in self.roles if r.matches(name)), None)

    def protection_of(self, name: str) -> Protected | None:
        return next((p for p in self.protected if p.matches(name)), None)

    def model_args(self, config: dict):
        return self.model_module.ModelArgs.from_dict(config)

    def build_model(self, config: dict):
        try:
            return self.model_module.Model(self.model_args(config))
        except (OverflowError, ValueError, ZeroDivisionError, MemoryError) as exc:
            raise ConfigError(
                f"config.json describes a {self.title} model that cannot be built ({type(exc).__name__}: {exc})",
                "the sizes in config.json are inconsistent or absurd; compare it with the published one",
            ) from None

    def block_width(self, config: dict) -> int:
        """How wide a block's output is: ``hidden_size``, or what the model module's
        ``block_width(args)`` says (hyper-connection models carry several streams)."""
        fn = getattr(self.model_module, "block_width", None)
        return fn(self.model_args(config)) if fn is not None else config["hidden_size"]

    def schedule(self, config: dict) -> list[tuple[str, int | None]]:
        """(kind, attention window or None) for every layer."""
        args = self.model_args(config)
        return list(
            zip(self.model_module.layer_schedule(args), self.model_module.layer_windows(args))
        )


_LAYER = re.compile(r"\.layers\.(?:layers\.)?(\d+)\.")


def layer_of(name: str | None) -> int | None:
    """The decoder layer a tensor belongs to (``model.layers.3.…`` or PLaMo-2's
    ``model.layers.layers.3.…``), or None."""
    m = _LAYER.search(name or "")
    return int(m.group(1)) if m else None


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    _REGISTRY[arch.model_type] = arch
    _check_numbers(arch)
    return arch


def _check_numbers(arch: Architecture) -> None:
    """Every architecture's normalisation also refuses implausible shared values
    (epsilons, rope_theta, partial_rotary_factor, ...: config.check_plausible), in
    the raw config and in the normalised one, so no converter has to remember to."""
    from ..config import check_plausible

    inner = arch.normalize_config
    if getattr(inner, "_checks_plausible", False):
        return

    def normalize_config(raw: dict) -> dict:
        check_plausible(raw)
        return check_plausible(inner(raw), normalised=True)

    normalize_config._checks_plausible = True
    object.__setattr__(arch, "normalize_config", normalize_config)  # frozen dataclass: wrap in place


def supported() -> list[Architecture]:
    return sorted(_REGISTRY.values(), key=lambda a: a.model_type)


def supported_list() -> str:
    return ", ".join(f"{a.model_type} ({', '.join(a.architectures)})" for a in supported())


def lookup(config: dict) -> Architecture:
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in _REGISTRY:
        return _REGISTRY[model_type]
    names = config.get("architectures") or []
    if isinstance(names, list):
        for arch in _REGISTRY.values():
            if any(n in arch.architectures for n in names):
                return arch
    found = f"model_type={model_type!r}, architectures={names!r}"
    raise UnsupportedArchitectureError(
        f"config.json: unsupported architecture ({found}); supported: {supported_list()}",
        "hybridconv converts only the hybrid architectures listed; other models are served by mlx_lm.convert",
    )
