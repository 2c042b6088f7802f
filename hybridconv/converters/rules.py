"""Tensor rules: small, named, declarative steps from a Hugging Face tensor to an
MLX one, and the ledger that accounts for every tensor.

A rule is decided from the config and known shapes, never guessed: the conv1d
rule knows the kernel width from the config and recognises the PyTorch layout
``[C, 1, K]`` and the MLX layout ``[C, K, 1]`` exactly; anything else is an
error naming the tensor. Every rule is idempotent — applied to already
converted weights it changes nothing — so converting a converted folder is a
no-op (a test checks this).

Rules act on metadata first (:meth:`Rule.plan`): the whole conversion is
planned, checked against the model's parameters and shown by ``inspect``
before any data is read. Data rules then transform raw arrays one tensor at a
time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import LedgerError
from ..safetensors_io import FLOAT_DTYPES


@dataclass(frozen=True)
class Meta:
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class Step:
    """One planned tensor: where it comes from, where it goes, what happens."""

    source: str
    target: str | None  # None: dropped
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    actions: list[str] = field(default_factory=list)  # what changed, in words
    applied: list[str] = field(default_factory=list)  # names of the rules that changed it
    transpose: tuple[int, ...] | None = None  # axes, applied to the source shape
    dropped_because: str | None = None
    keep_float32: bool = False


class Rule:
    name = "rule"
    pattern: re.Pattern

    def matches(self, name: str) -> bool:
        return bool(self.pattern.search(name))

    def plan(self, step: Step, meta: Meta) -> Meta:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class Drop(Rule):
    regex: str
    reason: str
    what: str = ""  # the tensors, in words (default: the pattern)
    name = "drop"

    def __post_init__(self):
        self.pattern = re.compile(self.regex)

    def plan(self, step: Step, meta: Meta) -> Meta:
        step.target = None
        step.dropped_because = self.reason
        step.actions.append(f"drop: {self.reason}")
        step.applied.append(self.name)
        return meta

    def describe(self) -> str:
        return f"drop {self.what or '/' + self.regex + '/'}: {self.reason}"


@dataclass
class Rename(Rule):
    regex: str
    replacement: str
    name = "rename"

    def __post_init__(self):
        self.pattern = re.compile(self.regex)

    def plan(self, step: Step, meta: Meta) -> Meta:
        new = self.pattern.sub(self.replacement, meta.name)
        if new != meta.name:
            step.actions.append(f"rename -> {new}")
            step.applied.append(self.name)
        return Meta(new, meta.dtype, meta.shape)

    def describe(self) -> str:
        return f"rename /{self.regex}/ -> {self.replacement}"


@dataclass
class ConvToMLX(Rule):
    """Depthwise conv1d weight: PyTorch ``[C, 1, K]`` -> MLX ``[C, K, 1]``."""

    regex: str
    kernel_size: int
    what: str = "conv1d weights"
    name = "conv1d-to-mlx"

    def __post_init__(self):
        self.pattern = re.compile(self.regex)

    def plan(self, step: Step, meta: Meta) -> Meta:
        k = self.kernel_size
        shape = meta.shape
        if len(shape) == 3 and shape[1:] == (k, 1):
            return meta  # already MLX layout (K == 1 lands here too: both layouts agree)
        if len(shape) == 3 and shape[1:] == (1, k):
            step.transpose = (0, 2, 1)
            step.actions.append(f"transpose conv1d [C, 1, {k}] -> [C, {k}, 1]")
            step.applied.append(self.name)
            return Meta(meta.name, meta.dtype, (shape[0], k, 1))
        raise LedgerError(
            f"tensor '{meta.name}': shape {list(shape)} is neither the PyTorch conv1d layout "
            f"[C, 1, {k}] nor the MLX layout [C, {k}, 1] (kernel width {k} from config.json)",
            "the config's conv width does not match the weights; check config.json",
        )

    def describe(self) -> str:
        k = self.kernel_size
        return f"{self.what}: PyTorch [C, 1, {k}] -> MLX [C, {k}, 1]"


@dataclass
class KeepFloat32(Rule):
    """Store in float32 whatever ``--dtype`` says (why: in ``reason``)."""

    regex: str
    reason: str
    what: str = ""
    name = "keep-float32"

    def __post_init__(self):
        self.pattern = re.compile(self.regex)

    def plan(self, step: Step, meta: Meta) -> Meta:
        step.keep_float32 = True
        if meta.dtype != "F32":
            step.actions.append(f"keep in float32 ({self.reason})")
            step.applied.append(self.name)
        return Meta(meta.name, "F32", meta.shape)

    def describe(self) -> str:
        return f"{self.what or '/' + self.regex + '/'} stay float32: {self.reason}"


def plan_tensor(meta: Meta, rules: list[Rule], dtype: str | None) -> Step:
    """Run ``meta`` through the matching rules, then cast floats to ``dtype``."""
    step = Step(source=meta.name, target=meta.name)
    for rule in rules:
        if rule.matches(meta.name):
            meta = rule.plan(step, meta)
            if step.target is None:
                return step
    if dtype and meta.dtype in FLOAT_DTYPES and not step.keep_float32 and meta.dtype != dtype:
        step.actions.append(f"cast {meta.dtype} -> {dtype}")
        step.applied.append("cast")
        meta = Meta(meta.name, dtype, meta.shape)
    step.target, step.dtype, step.shape = meta.name, meta.dtype, meta.shape
    return step


def apply_transpose(raw: np.ndarray, step: Step) -> np.ndarray:
    return np.ascontiguousarray(raw.transpose(step.transpose)) if step.transpose else raw
