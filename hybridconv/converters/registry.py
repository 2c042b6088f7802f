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
    # Set on the architecture :func:`lookup` returns for a multimodal wrapper's
    # config: the :class:`Wrapper` whose language model this is.
    wrapper: "Wrapper | None" = None
    # Other ``model_type`` spellings of this architecture's configs (a multimodal
    # wrapper's type, the one written for mlx-lm when it differs): a config with one
    # of these and this architecture's class is consistent (see :func:`lookup`).
    model_types: tuple[str, ...] = ()

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
_WRAPPERS: dict[str, "Wrapper"] = {}


@dataclass(frozen=True)
class Wrapper:
    """A multimodal (or otherwise nested) release whose *language model* is an
    architecture hybridconv converts: only that language model is converted,
    and the output is the text model (its own ``model_type``).

    ``config_keys``: where the language model's config is nested (the first
    present wins; none present: a *flattened* config, read as the text config
    itself). ``tie``: which ``tie_word_embeddings`` decides whether the head is
    tied, as transformers' reference class computes it: ``"wrapper"`` (the
    wrapper's own flag, default ``tie_default``: a ``…ForConditionalGeneration``
    holds the head and ties it by its own config) or ``"text"`` (the text
    config's, the wrapper's when the text config has none). ``parts``: the
    wrapper's non-language components, ``{name: what}`` (e.g. ``{"mlp1":
    "vision projector"}``), added to the known ones of
    :mod:`hybridconv.converters._wrappers`; their tensors are dropped with that
    reason. Where the language model's tensors are is decided from the tensor
    names, never from the config (:func:`hybridconv.converters._wrappers.layout_rules`)."""

    model_type: str
    architectures: tuple[str, ...]
    text_model_type: str
    title: str
    config_keys: tuple[str, ...] = ("text_config",)
    tie: str = "wrapper"
    tie_default: bool = False
    parts: tuple[tuple[str, str], ...] = ()


def register_wrapper(wrapper: Wrapper) -> Wrapper:
    """Register a multimodal wrapper whose language model is ``wrapper.text_model_type``
    (registered by its own converter module, before or after this call)."""
    if wrapper.tie not in ("wrapper", "text"):
        raise ValueError(f"Wrapper {wrapper.model_type}: tie must be 'wrapper' or 'text'")
    _WRAPPERS[wrapper.model_type] = wrapper
    return wrapper


def _wrapped(wrapper: Wrapper) -> Architecture:
    """The text architecture, reading ``wrapper``'s config (:func:`unwrap_config`)."""
    from dataclasses import replace

    text = _REGISTRY.get(wrapper.text_model_type)
    if text is None:
        raise UnsupportedArchitectureError(
            f"config.json: {wrapper.title} ({wrapper.model_type}) wraps the language model "
            f"{wrapper.text_model_type!r}, which this version of hybridconv does not convert; "
            f"supported: {supported_list()}",
            "hybridconv converts only the hybrid architectures listed",
        )
    inner = text.normalize_config

    def normalize_config(raw: dict) -> dict:
        return inner(unwrap_config(raw, wrapper))

    return replace(text, normalize_config=normalize_config, wrapper=wrapper,
                   title=f"{text.title}, the language model of {wrapper.title}")


# Keys of a wrapper's config that its language model inherits when its nested
# config lacks them: the dtype (for the default output dtype) and the source's
# quantization (an FP8 release states it once, at the top).
_INHERITED = ("dtype", "torch_dtype", "quantization_config", "quantization")


def unwrap_config(raw: dict, wrapper: Wrapper) -> dict:
    """The language model's config inside ``wrapper``'s ``raw`` config (see
    :class:`Wrapper`): the nested config with the inherited keys, or ``raw``
    itself when flattened; ``tie_word_embeddings`` as transformers computes it."""
    key = next((k for k in wrapper.config_keys if raw.get(k) is not None), None)
    if key is None:
        return raw  # flattened (or a written output of the text model)
    text = raw[key]
    if not isinstance(text, dict):
        raise ConfigError(f"config.json: '{key}' must be an object, found {type(text).__name__}")
    text = dict(text)
    text.setdefault("model_type", wrapper.text_model_type)
    for k in _INHERITED:
        if k not in text and raw.get(k) is not None:
            text[k] = raw[k]
    # LFM2-VL's released configs spell it tie_embedding (transformers reads both).
    wrapper_tie = next((raw[k] for k in ("tie_word_embeddings", "tie_embedding") if raw.get(k) is not None), None)
    if wrapper.tie == "wrapper":
        text.pop("tie_embedding", None)
        text["tie_word_embeddings"] = wrapper.tie_default if wrapper_tie is None else wrapper_tie
    elif text.get("tie_word_embeddings") is None and wrapper_tie is not None:
        text["tie_word_embeddings"] = wrapper_tie
    return text


def wrappers() -> list[Wrapper]:
    return sorted(_WRAPPERS.values(), key=lambda w: w.model_type)


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
    text = ", ".join(f"{a.model_type} ({', '.join(a.architectures)})" for a in supported())
    wrapped = [w for w in wrappers() if w.text_model_type in _REGISTRY]
    if wrapped:
        text += "; the language model of: " + ", ".join(
            f"{w.model_type} ({', '.join(w.architectures)}: {w.text_model_type})" for w in wrapped)
    return text


def lookup(config: dict) -> Architecture:
    """The architecture of a config, from ``model_type`` and ``architectures``; a
    registered multimodal wrapper gives its language model's architecture, reading
    the wrapper's config (:class:`Wrapper`).

    When both are given they must name the same architecture: a config whose
    ``model_type`` is one registered architecture and whose ``architectures``
    class is another's, or whose unregistered ``model_type`` is not a known
    spelling of the architecture its class names (:attr:`Architecture.model_types`,
    or the ``model_type`` of its ``text_config`` for a multimodal wrapper), is
    refused naming both fields: converting it would silently rewrite one of them."""
    model_type = config.get("model_type")
    names = config.get("architectures") or []
    by_class = wrapper_by_class = None
    if isinstance(names, list):
        by_class = next((a for a in _REGISTRY.values() if any(n in a.architectures for n in names)), None)
        wrapper_by_class = next((w for w in _WRAPPERS.values() if any(n in w.architectures for n in names)), None)
    if isinstance(model_type, str) and model_type in _REGISTRY:
        arch = _REGISTRY[model_type]
        if by_class is not None and by_class is not arch and not any(n in arch.architectures for n in names):
            raise _conflict(model_type, names, f"model_type {model_type!r} is {arch.title}, "
                            f"but architectures {names!r} is {by_class.title}")
        return arch
    if isinstance(model_type, str) and model_type in _WRAPPERS:
        return _wrapped(_WRAPPERS[model_type])
    if by_class is not None:
        text = config.get("text_config")
        text_type = text.get("model_type") if isinstance(text, dict) else None
        known = {by_class.model_type, *by_class.model_types}
        if isinstance(model_type, str) and model_type and model_type not in known and text_type not in known:
            raise _conflict(model_type, names, f"architectures {names!r} is {by_class.title} "
                            f"(model_type {by_class.model_type!r}), but model_type is {model_type!r}")
        return by_class
    if wrapper_by_class is not None:
        return _wrapped(wrapper_by_class)
    found = f"model_type={model_type!r}, architectures={names!r}"
    raise UnsupportedArchitectureError(
        f"config.json: unsupported architecture ({found}); supported: {supported_list()}",
        "hybridconv converts only the hybrid architectures listed; other models are served by mlx_lm.convert",
    )


def _conflict(model_type, names, what: str) -> ConfigError:
    return ConfigError(
        f"config.json: 'model_type' and 'architectures' disagree: {what}",
        "fix one of the two fields in config.json so that both name the checkpoint's architecture "
        "(compare with the published config); nothing is guessed",
    )
