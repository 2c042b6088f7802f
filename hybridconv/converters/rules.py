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
from ..safetensors_io import FLOAT_DTYPES, to_float32


# --- rule texts in words (inspect, conversion.json) -----------------------------------
#
# Rules are written with regular expressions and re.sub templates; what inspect
# shows a user is the tensor names they mean: ``*.feed_forward.experts.down_proj``
# rather than ``/^(?P<pre>.*\.feed_forward)\.experts\.down_proj$/``, and
# ``….switch_mlp.down_proj.weight`` (the source's own prefix kept) rather than
# ``\g<pre>.switch_mlp.down_proj.weight``.


def readable_target(template: str, regex: str | None = None) -> str:
    r"""A ``re.sub`` template as a tensor name: ``\g<pre>`` (the source name's prefix,
    kept) becomes ``…``, another named group ``{name}``, a numbered group what it
    matches (``{q,k,v}``). With the rule's ``regex``: where it matches only part of
    a name, the parts kept before and after are shown as ``…`` too."""
    groups = _groups(regex) if regex else []
    out = re.sub(r"\\g<pre>", "…", template)
    out = re.sub(r"\\g<(\w+)>", r"{\1}", out)
    out = re.sub(r"\\(\d+)", lambda m: groups[int(m.group(1)) - 1] if int(m.group(1)) <= len(groups)
                 else "{" + m.group(1) + "}", out)
    if regex is not None:
        if not regex.startswith("^") and not template.startswith("\\g<"):
            out = "…" + out
        if not regex.endswith("$"):
            # a literal prefix rename keeps the rest of the name: ``*``, as the pattern shows it
            out += "*" if "\\" not in template and not out.startswith("…") else "…"
    return out


def _groups(regex: str) -> list[str]:
    """The numbered (capturing) groups of ``regex``, in order, in words."""
    out, starts, i = [], [], 0
    while i < len(regex):
        c = regex[i]
        if c == "\\":
            i += 2
            continue
        if c == "(":
            starts.append((i, regex.startswith("(?", i) and not regex.startswith("(?P<", i)))
        elif c == ")" and starts:
            start, plain = starts.pop()
            if not plain:
                body = regex[start + 1 : i]
                body = re.sub(r"^\?P<\w+>", "", body)
                if re.fullmatch(r"(?:\w|\\\.)+(?:\|(?:\w|\\\.)+)+", body):  # a|b|c: one of these words
                    out.append((start, _alternatives(body.replace("\\.", "."))))
                else:
                    out.append((start, readable_pattern("^" + body + "$")))
        i += 1
    return [text if not text.startswith("/") else "{…}" for _, text in sorted(out)]


def readable_pattern(regex: str) -> str:
    """A tensor-name regular expression as a glob-like pattern (``*`` any text, ``N``
    a number, ``{name}`` a captured part, ``{a,b}`` alternatives) where it is that
    simple; otherwise the expression itself between slashes."""
    text = regex[1:] if regex.startswith("^") else "*" + regex
    text = text[:-1] if text.endswith("$") and not text.endswith("\\$") else text + "*"
    text = re.sub(r"\(\?P<(\w+)>\\d\+\)", r"{\1}", text)
    for _ in range(3):  # named and plain groups around simple text: their content
        text = re.sub(r"\(\?P<\w+>([^()]*)\)", r"\1", text)
        text = re.sub(r"\(\?:([^()]*)\)|\(([^()?][^()]*)\)",
                      lambda m: _alternatives(m.group(1) if m.group(1) is not None else m.group(2)), text)
    text = text.replace(r"\.", "\0")
    text = re.sub(r"\.[*+]", "*", text).replace(r"\d+", "N")
    text = re.sub(r"\*+", "*", text)
    if re.search(r"[.^$()\[\]?+|\\]", text):
        return f"/{regex}/"
    return text.replace("\0", ".")


def _alternatives(body: str) -> str:
    parts = body.split("|")
    return "{" + ",".join(parts) + "}" if len(parts) > 1 else body


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
    # Stacked experts (StackExperts): on a source's step, (expert index, count, the
    # source name with "{}" at the index); on the merged output step, the sources
    # in expert order (``source`` is then the first of them).
    stack: tuple[int, int, str] | None = None
    parts: tuple[str, ...] | None = None
    # Split: (axis, start, stop) of the source that this output takes.
    select: tuple[int, int, int] | None = None
    split: tuple | None = None  # planned by Split: (axis, [(target, start, stop)]), expanded by plan_tensors
    add: float | None = None  # AddOffset: a constant added to every value
    # Scale: every value times a constant (float), or row i (axis 0) times scale[i] (tuple)
    scale: float | tuple[float, ...] | None = None
    # Regroup: on a source's step, (group key, piece index); on an output step,
    # rows [a, b) along axis 0 of the concatenation of ``parts``.
    regroup: tuple[str, int] | None = None
    rows: tuple[int, int] | None = None
    dequantized: bool = False  # read from an FP8 block-scaled source (Dequantize)
    # Indices (in the plan's rule list) of the rules this tensor reached and matched,
    # and of those that changed it: what ``inspect`` counts, once per tensor.
    matched: list[int] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)


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
        return f"drop {self.what or readable_pattern(self.regex)}: {self.reason}"


@dataclass
class Dequantize(Rule):
    """FP8 block-scaled weights (``names``, the source's, paired with their
    ``weight_scale_inv`` by :func:`hybridconv.checkpoint.attach_scales`) are
    read dequantized — each block's codes times its scale, in float32 — and
    then cast to the output dtype like any float tensor. Matched by exact name
    (first in the rules, on the source names); an output holds no FP8 tensor,
    so converting it again finds none."""

    names: frozenset
    block: tuple[int, int] | None
    name = "dequantize-fp8"

    def matches(self, name: str) -> bool:
        return name in self.names

    def plan(self, step: Step, meta: Meta) -> Meta:
        kind = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}.get(meta.dtype, meta.dtype)
        blocks = f"{self.block[0]}x{self.block[1]} blocks" if self.block else "one scale per tensor"
        step.dequantized = True
        step.actions.append(f"dequantize {kind} ({blocks}, scales '{meta.name}_scale_inv') -> float32")
        step.applied.append(self.name)
        return Meta(meta.name, "F32", meta.shape)

    def describe(self) -> str:
        blocks = f"{self.block[0]}x{self.block[1]} blocks" if self.block else "one scale per tensor"
        return f"dequantize the {len(self.names)} FP8 weights ({blocks}, their *_scale_inv) in float32"


@dataclass
class Consume(Rule):
    """Tensors used up by another rule (FP8 block scales, multiplied into their
    weight by :class:`Dequantize`) or not needed once it has run (FP8
    activation scales): not written, with ``reason`` (a format string with
    ``{owner}``: the tensor it belongs to) in the ledger."""

    owners: dict  # tensor -> the tensor it belongs to
    reason: str
    what: str
    summary: str = ""  # what happens to them, for the rule table
    name = "consume"

    def matches(self, name: str) -> bool:
        return name in self.owners

    def plan(self, step: Step, meta: Meta) -> Meta:
        step.target = None
        step.dropped_because = self.reason.format(owner=self.owners[meta.name])
        step.actions.append(f"consumed: {step.dropped_because}")
        step.applied.append(self.name)
        return meta

    def describe(self) -> str:
        return f"{self.what} ({len(self.owners)}): {self.summary or self.reason.format(owner='their tensor')}"


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
        return f"rename {readable_pattern(self.regex)} -> {readable_target(self.replacement, self.regex)}"


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
        return f"{self.what or readable_pattern(self.regex)} stay float32: {self.reason}"


@dataclass
class AddOffset(Rule):
    """Add a constant to every value (norm weights stored as ``scale - offset``
    in the checkpoint, e.g. Qwen3-Next's zero-centred ``1 + w`` RMSNorms, folded
    into the plain scale that mlx-lm's ``nn.RMSNorm`` reads). Not idempotent by
    itself: the converter records in the written config.json that the offset is
    folded and adds this rule only when the source config does not say so."""

    regex: str
    offset: float
    what: str = ""
    name = "add-offset"

    def __post_init__(self):
        self.pattern = re.compile(self.regex)

    def plan(self, step: Step, meta: Meta) -> Meta:
        if meta.dtype not in FLOAT_DTYPES:
            raise LedgerError(f"tensor '{meta.name}': {meta.dtype}, expected a float tensor to add {self.offset} to")
        step.add = (step.add or 0.0) + self.offset
        step.actions.append(f"add {self.offset:g} (fold the norm offset into the weight)")
        step.applied.append(self.name)
        return meta

    def describe(self) -> str:
        return f"{self.what or readable_pattern(self.regex)}: add {self.offset:g} (stored as scale - {self.offset:g})"


@dataclass
class Scale(Rule):
    """Multiply by a constant (``factor``: a number) or each row along axis 0 by
    its own constant (``factor``: one number per row), computed in float32 and
    cast once: folding a constant that the reference applies to a linear map's
    input or output into its weight (and bias), exact up to float rounding
    (e.g. Falcon-H1's µP multipliers). Not idempotent by itself: the converter
    writes the folded multipliers as 1 in the output's config.json, so a second
    conversion folds 1."""

    regex: str
    factor: float | tuple[float, ...]
    what: str = ""
    name = "scale"

    def __post_init__(self):
        self.pattern = re.compile(self.regex)

    def plan(self, step: Step, meta: Meta) -> Meta:
        if meta.dtype not in FLOAT_DTYPES:
            raise LedgerError(f"tensor '{meta.name}': {meta.dtype}, expected a float tensor to scale")
        f = self.factor
        if isinstance(f, tuple):
            if not meta.shape or meta.shape[0] != len(f):
                raise LedgerError(
                    f"tensor '{meta.name}': shape {list(meta.shape)}, expected {len(f)} rows to scale one by one",
                    "config.json and the weights disagree; check the sizes in config.json",
                )
        if step.scale is not None or step.add is not None or step.stack is not None or step.split is not None:
            raise LedgerError(f"tensor '{meta.name}': a scaled tensor cannot also be scaled again, offset, stacked or split")
        if f == 1.0:
            return meta
        step.scale = f
        shown = f"{f:g}" if not isinstance(f, tuple) else "per row (" + ", ".join(f"{v:g}" for v in sorted(set(f))) + ")"
        step.actions.append(f"scale by {shown} ({self.what or 'fold a multiplier'})")
        step.applied.append(self.name)
        return meta

    def describe(self) -> str:
        f = self.factor
        shown = f"{f:g}" if not isinstance(f, tuple) else f"per row ({len(f)} factors)"
        return f"{self.what or readable_pattern(self.regex)}: times {shown}"


def scale_rows(x: np.ndarray, scale, r0: int = 0) -> np.ndarray:
    """``x`` (float32, rows ``r0 ..`` of the tensor along axis 0, or a flat chunk
    for a per-tensor scale) times ``scale`` (see :class:`Scale`)."""
    if isinstance(scale, tuple):
        f = np.asarray(scale[r0 : r0 + x.shape[0]], dtype=np.float32)
        return x * f.reshape((-1,) + (1,) * (x.ndim - 1))
    return x * np.float32(scale)


@dataclass
class Regroup(Rule):
    """Several tensors concatenated along axis 0, then cut along axis 0 into
    others: OLMo-Hybrid's q/k/v conv kernels, which transformers 5 saves as
    three *equal* thirds of its fused ``conv1d`` (``[2·Kd + Vd, 1, K]`` chunked in
    3) while the original checkpoints and mlx-lm have them sized ``Kd, Kd, Vd``.
    Concatenating in ``order`` and re-cutting at ``parts`` (``[(replacement,
    rows)]``) reads both layouts; converting an output again re-cuts at the same
    places, so nothing changes.

    ``regex`` matches each piece and names it in the group ``(?P<piece>...)``;
    ``order`` lists the pieces in concatenation order. With ``kernel_size``
    the pieces are depthwise conv kernels in the PyTorch ``[C, 1, K]`` or the
    MLX ``[C, K, 1]`` layout, written in the MLX one (moving a size-1 axis
    leaves the bytes in place). All pieces must be present once, with one
    dtype, and their rows must add up to the parts' (else an error naming the
    tensors)."""

    regex: str
    order: list
    parts: list
    kernel_size: int | None = None
    what: str = ""
    name = "regroup"

    def __post_init__(self):
        self.pattern = re.compile(self.regex)
        if "piece" not in self.pattern.groupindex:
            raise ValueError(f"Regroup /{self.regex}/: needs a (?P<piece>...) group")

    def plan(self, step: Step, meta: Meta) -> Meta:
        m = self.pattern.search(meta.name)
        piece = m.group("piece")
        if piece not in self.order:
            raise LedgerError(f"tensor '{meta.name}': piece {piece!r} is not one of {self.order}")
        k, shape = self.kernel_size, meta.shape
        if k is not None and not (len(shape) == 3 and shape[1:] in ((1, k), (k, 1))):
            raise LedgerError(
                f"tensor '{meta.name}': shape {list(shape)} is neither the PyTorch conv1d layout "
                f"[C, 1, {k}] nor the MLX layout [C, {k}, 1] (kernel width {k} from config.json)",
                "the config's conv width does not match the weights; check config.json",
            )
        key = meta.name[: m.start()] + "{regroup}" + meta.name[m.end() :]
        step.regroup = (key, self.order.index(piece))
        step.actions.append(f"piece {piece!r} of a concatenation re-cut into " + ", ".join(r for r, _ in self.parts))
        step.applied.append(self.name)
        return Meta(key, meta.dtype, (shape[0], k, 1) if k is not None else shape)

    def describe(self) -> str:
        return (f"{self.what or readable_pattern(self.regex)}: concatenate {', '.join(self.order)} along axis 0, "
                "cut into " + ", ".join(f"{readable_target(r, self.regex)} ({n})" for r, n in self.parts))


def merge_regroups(steps: list[Step], rules: list[Rule]) -> list[Step]:
    """Replace the pieces of each :class:`Regroup` by the re-cut output steps
    (in place of the first piece)."""
    groups: dict[str, dict[int, Step]] = {}
    for s in steps:
        if s.regroup is not None:
            key, i = s.regroup
            g = groups.setdefault(key, {})
            if i in g:
                raise LedgerError(f"tensors '{g[i].source}' and '{s.source}' are the same piece of '{key}'")
            g[i] = s
    if not groups:
        return steps
    out: list[Step] = []
    for s in steps:
        if s.regroup is None:
            out.append(s)
            continue
        key, i = s.regroup
        g = groups.pop(key, None)
        if g is None:
            continue  # already emitted with the group's first piece
        rule = next(r for r in rules if isinstance(r, Regroup) and r.matches(s.source))
        missing = [p for j, p in enumerate(rule.order) if j not in g]
        if missing:
            raise LedgerError(f"tensor '{s.source}': no tensor for piece {missing[0]!r} of {rule.order}")
        pieces = [g[j] for j in range(len(rule.order))]
        first = pieces[0]
        for p in pieces:
            if p.dtype != first.dtype or p.shape[1:] != first.shape[1:]:
                raise LedgerError(f"tensor '{p.source}': {p.dtype} {list(p.shape)} does not concatenate with "
                                  f"'{first.source}' ({first.dtype} {list(first.shape)})")
        total, want = sum(p.shape[0] for p in pieces), sum(n for _, n in rule.parts)
        if total != want:
            raise LedgerError(
                f"tensors {', '.join(repr(p.source) for p in pieces)}: {total} rows in all, but config.json implies "
                f"{want} (= {' + '.join(str(n) for _, n in rule.parts)})",
                "config.json and the weights disagree; check the sizes in config.json",
            )
        # The name the rules before this one gave the first piece (a renamed
        # prefix, e.g. a wrapper's) is the group key with the piece put back.
        m = rule.pattern.search(first.source)
        named = key.replace("{regroup}", m.group(0)) if m is not None else first.source
        a = 0
        for repl, n in rule.parts:
            target = rule.pattern.sub(repl, named)
            out.append(Step(
                source=first.source, target=target, dtype=first.dtype, shape=(n, *first.shape[1:]),
                actions=[f"rows {a}..{a + n} of the concatenation of " + ", ".join(p.source for p in pieces)],
                applied=list(dict.fromkeys(first.applied)), keep_float32=first.keep_float32,
                parts=tuple(p.source for p in pieces), rows=(a, a + n), dequantized=first.dequantized,
            ))
            a += n
    return out


@dataclass
class StackExperts(Rule):
    """Per-expert tensors -> one stacked ``[E, ...]`` tensor (mlx-lm's SwitchLinear layout).

    ``regex`` matches one expert's tensor and captures its index in the group
    ``(?P<expert>\\d+)``; ``target`` is the replacement (``re.sub`` syntax,
    e.g. ``\\g<pre>.switch_mlp.gate_proj.weight``) naming the stacked tensor.
    Each source is recorded in the ledger as expert ``i`` of its target; the
    plan then checks that experts ``0 .. E-1`` are each present exactly once
    with one shape and dtype (a missing or duplicate expert fails naming the
    tensor). An already stacked tensor does not match ``regex`` and passes
    through unchanged, so converting an output again is a no-op. Stacking
    along axis 0 is concatenation of the experts' bytes: the writer streams
    the sources one after another into the target."""

    regex: str
    target: str
    num_experts: int
    what: str = ""
    name = "stack-experts"

    def __post_init__(self):
        self.pattern = re.compile(self.regex)
        if "expert" not in self.pattern.groupindex:
            raise ValueError(f"StackExperts /{self.regex}/: needs a (?P<expert>...) group")

    def plan(self, step: Step, meta: Meta) -> Meta:
        m = self.pattern.search(meta.name)
        e = int(m.group("expert"))
        n = self.num_experts
        if e >= n:
            raise LedgerError(
                f"tensor '{meta.name}': expert {e}, but config.json says {n} experts (0..{n - 1})",
                "config.json and the weights disagree; check the expert count in config.json",
            )
        a, b = m.span("expert")
        target = self.pattern.sub(self.target, meta.name)
        step.stack = (e, n, meta.name[:a].replace("{", "{{").replace("}", "}}") + "{}" + meta.name[b:].replace("{", "{{").replace("}", "}}"))
        step.actions.append(f"stack as expert {e} of {n} -> {target}")
        step.applied.append(self.name)
        return Meta(target, meta.dtype, meta.shape)

    def describe(self) -> str:
        return f"stack {self.what or readable_pattern(self.regex)} of {self.num_experts} experts -> [E, ...] ({readable_target(self.target, self.regex)})"


@dataclass
class Split(Rule):
    """One fused tensor -> several, cut along ``axis`` (e.g. GraniteMoeHybrid's
    expert ``input_linear [E, 2I, H]`` -> ``gate_proj`` and ``up_proj``, each
    ``[E, I, H]``). ``parts``: ``[(replacement, size), ...]`` in order along the
    axis; the sizes must add up to the tensor's extent there (else an error
    naming the tensor). The fused name never reappears in the output, so an
    already split tensor passes through unchanged."""

    regex: str
    axis: int
    parts: list
    what: str = ""
    name = "split"

    def __post_init__(self):
        self.pattern = re.compile(self.regex)

    def plan(self, step: Step, meta: Meta) -> Meta:
        shape = meta.shape
        total = sum(size for _, size in self.parts)
        if not -len(shape) <= self.axis < len(shape) or shape[self.axis] != total:
            raise LedgerError(
                f"tensor '{meta.name}': shape {list(shape)}; expected {total} "
                f"(= {' + '.join(str(s) for _, s in self.parts)}) along axis {self.axis}",
                "config.json and the weights disagree; check the sizes in config.json",
            )
        pieces, start = [], 0
        for repl, size in self.parts:
            pieces.append((self.pattern.sub(repl, meta.name), start, start + size))
            start += size
        step.split = (self.axis % len(shape), pieces)
        step.actions.append(f"split along axis {self.axis} -> " + ", ".join(t for t, _, _ in pieces))
        step.applied.append(self.name)
        return meta

    def describe(self) -> str:
        return f"split {self.what or readable_pattern(self.regex)} along axis {self.axis} into " + ", ".join(
            f"{readable_target(r, self.regex)} ({s})" for r, s in self.parts
        )


def plan_tensors(meta: Meta, rules: list[Rule], dtype: str | None) -> list[Step]:
    """:func:`plan_tensor`, with a split source expanded into one step per part."""
    step = plan_tensor(meta, rules, dtype)
    if not step.split:
        return [step]
    axis, pieces = step.split
    if step.stack is not None or step.transpose is not None:
        raise LedgerError(f"tensor '{meta.name}': a split tensor cannot also be stacked or transposed")
    out = []
    for target, a, b in pieces:
        shape = list(step.shape)
        shape[axis] = b - a
        out.append(Step(step.source, target, step.dtype, tuple(shape), list(step.actions), list(step.applied),
                        keep_float32=step.keep_float32, select=(axis, a, b), dequantized=step.dequantized,
                        matched=step.matched, changed=step.changed))
    return out


def merge_stacks(steps: list[Step]) -> list[Step]:
    """The written tensors: kept steps, with the experts of each stacked target
    merged into one step (in place of its first expert). Fails naming the tensor
    when an expert is missing or duplicated, or the experts disagree in shape
    or dtype."""
    out: list[Step] = []
    groups: dict[str, dict[int, Step]] = {}
    for s in steps:
        if s.target is None:
            continue
        if s.stack is None:
            out.append(s)
            continue
        g = groups.get(s.target)
        if g is None:
            g = groups[s.target] = {}
            out.append(Step(source=s.source, target=s.target))  # placeholder, filled below
        e = s.stack[0]
        if e in g:
            raise LedgerError(f"tensors '{g[e].source}' and '{s.source}' are both expert {e} of '{s.target}'")
        g[e] = s
    for i, placeholder in enumerate(out):
        if placeholder.target not in groups or placeholder.shape is not None:
            continue
        g = groups[placeholder.target]
        first = next(iter(g.values()))
        n, template = first.stack[1], first.stack[2]
        missing = [e for e in range(n) if e not in g]
        if missing:
            raise LedgerError(
                f"'{placeholder.target}': no tensor for expert {missing[0]} of {n} (expected '{template.format(missing[0])}')"
                + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""),
                "the checkpoint is incomplete, or config.json gives the wrong number of experts",
            )
        pieces = [g[e] for e in range(n)]
        for p in pieces:
            if p.shape != first.shape or p.dtype != first.dtype:
                raise LedgerError(
                    f"tensor '{p.source}': {p.dtype} {list(p.shape)}, but '{first.source}' (another expert of "
                    f"'{placeholder.target}') is {first.dtype} {list(first.shape)}"
                )
            if p.transpose is not None or p.select is not None:
                raise LedgerError(f"tensor '{p.source}': a stacked expert cannot also be transposed or split")
        shape = (n, *first.shape)
        out[i] = Step(
            source=pieces[0].source,
            target=placeholder.target,
            dtype=first.dtype,
            shape=shape,
            actions=[f"stack {n} experts ('{template.format(0)}' ...) -> {list(shape)}"]
            + [a for a in first.actions if not a.startswith("stack as expert")],
            applied=list(dict.fromkeys(first.applied)),
            keep_float32=first.keep_float32,
            parts=tuple(p.source for p in pieces),
            dequantized=first.dequantized,
        )
    return out


def plan_tensor(meta: Meta, rules: list[Rule], dtype: str | None) -> Step:
    """Run ``meta`` through the matching rules (each sees the name the rules
    before it left), then cast floats to ``dtype``."""
    step = Step(source=meta.name, target=meta.name)
    for i, rule in enumerate(rules):
        if rule.matches(meta.name):
            before = len(step.applied)
            meta = rule.plan(step, meta)
            step.matched.append(i)
            if len(step.applied) > before:
                step.changed.append(i)
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


def apply_whole(raw: np.ndarray, step: Step, dtype: str) -> tuple[np.ndarray, str]:
    """The whole-tensor data transforms of ``step`` (transpose, then a scale,
    then an added offset, computed in float32); returns the array and its
    safetensors dtype."""
    raw = apply_transpose(raw, step)
    if step.scale is not None:
        raw, dtype = np.ascontiguousarray(scale_rows(to_float32(raw, dtype), step.scale)), "F32"
    if step.add is not None:
        return np.ascontiguousarray(to_float32(raw, dtype) + np.float32(step.add)), "F32"
    return raw, dtype
