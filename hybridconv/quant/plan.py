"""The per-tensor quantization plan: which weights are quantized at which width,
which stay in float, which are protected (float32, never quantized), and why.

Order of decisions for each tensor of the converted model:

1. protected by the architecture's policy -> never quantized (``--bits-for`` on it is an
   error): float32 for the dynamics the conversion keeps float32, the output dtype for
   the rest (norms, conv kernels);
2. not a quantizable role (biases, ...) -> the output dtype;
3. the recipe: ``uniform`` (every role at ``--bits``, except roles whose default is
   float) or ``mixed-L-H`` (sensitive roles at H bits, the others at L);
4. ``--bits-for PATTERN=BITS`` overrides, then ``--keep PATTERN`` (keep in float);
5. a matrix whose input dimension does not fit the group size stays in float.

Patterns are globs (``*.mlp.down_proj*``) matched against the tensor name, its
module path and its role name (``mlp.down_proj``); a ``re:`` prefix makes a
regular expression (searched).
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field, replace

from ..convert import DTYPE_LABELS, Plan
from ..converters.rules import Step
from ..errors import UsageError
from .modes import MODES, QuantSpec, can_quantize, quantized_entries, storage_bits

RECIPE_RE = re.compile(r"^mixed-(\d)-(\d)$")
RECIPES_HELP = "uniform (every role at --bits), mixed-L-H (sensitive roles at H bits, others at L), e.g. mixed-4-6, mixed-3-6, mixed-4-8"


@dataclass
class TensorPlan:
    step: Step
    role: str | None
    decision: str  # "quantize" | "float" | "protected"
    reason: str
    spec: QuantSpec | None = None
    entries: list = field(default_factory=list)  # [(name, dtype, shape)] written

    @property
    def module(self) -> str:
        return self.step.target[: -len(".weight")] if self.step.target.endswith(".weight") else self.step.target


@dataclass
class QuantPlan:
    conversion: Plan
    base: QuantSpec
    recipe: str
    tensors: list[TensorPlan]
    # What the user should know about the plan: --bits-for patterns that overlap
    # (the last one given wins for a tensor matched by several).
    notes: list[str] = field(default_factory=list)

    @property
    def widths(self) -> list[int]:
        """The widths of the quantized weights, narrowest first (e.g. [4, 6] for mixed-4-6)."""
        return sorted({t.spec.bits for t in self.tensors if t.decision == "quantize"})

    def label(self) -> str:
        """What the weights are, in words: ``4-bit affine g64``, ``mixed-4-6 (4/6-bit affine g64)``."""
        widths = "/".join(map(str, self.widths)) or str(self.base.bits)
        if self.base.mode != "affine":
            return f"{self.base.mode} g{self.base.group_size}"
        text = f"{widths}-bit affine g{self.base.group_size}"
        return text if self.recipe == "uniform" else f"{self.recipe} ({text})"

    @property
    def parameters(self) -> int:
        return self.conversion.parameter_count

    @property
    def total_bits(self) -> int:
        return sum(storage_bits(t.entries) for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.parameters

    @property
    def quantized_bits_per_weight(self) -> float:
        q = [t for t in self.tensors if t.decision == "quantize"]
        n = sum(math.prod(t.step.shape) for t in q)
        return sum(storage_bits(t.entries) for t in q) / n if n else 0.0

    def config_entry(self) -> dict:
        """mlx-lm's ``quantization`` config: defaults plus per-layer entries where a
        layer differs (other parameters, or ``False`` for a quantizable layer kept in float)."""
        entry: dict = self.base.to_config()
        for t in self.tensors:
            if t.role is None:
                continue
            if t.decision == "quantize" and t.spec != self.base:
                entry[t.module] = t.spec.to_config()
            elif t.decision != "quantize":
                entry[t.module] = False
        return entry

    def summary(self) -> dict:
        counts: dict[str, int] = {}
        for t in self.tensors:
            key = t.spec.label() if t.decision == "quantize" else t.decision
            counts[key] = counts.get(key, 0) + 1
        return {
            "recipe": self.recipe,
            "base": self.base.to_config(),
            "bits_per_weight": round(self.bits_per_weight, 4),
            "widths": self.widths,
            "quantized_layers_bits_per_weight": round(self.quantized_bits_per_weight, 4),
            "parameters": self.parameters,
            "bytes": self.total_bits // 8,
            "tensors": counts,
        }

    def rows(self) -> list[dict]:
        return [
            {
                "tensor": t.step.target,
                "role": t.role,
                "decision": t.decision,
                "bits": t.spec.bits if t.spec else None,
                "group_size": t.spec.group_size if t.spec else None,
                "mode": t.spec.mode if t.spec else None,
                "dtype": None if t.decision == "quantize" else DTYPE_LABELS[t.entries[0][1]],
                "reason": t.reason,
            }
            for t in self.tensors
        ]


def _matcher(pattern: str, option: str = "--bits-for"):
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as exc:
            raise UsageError(
                f"{option} {pattern!r}: not a valid regular expression ({exc})",
                "after 're:' comes a Python regular expression; or drop 're:' for a glob such as '*.down_proj*'",
            ) from None
        return lambda *names: any(rx.search(n) for n in names if n)
    return lambda *names: any(fnmatch.fnmatchcase(n, pattern) for n in names if n)


def parse_bits_for(items: list[str] | None) -> list[tuple[str, int]]:
    out = []
    for item in items or []:
        pattern, sep, bits = item.rpartition("=")
        if not sep or not pattern or not bits.strip().isdigit():
            raise UsageError(f"--bits-for {item!r}: expected PATTERN=BITS, e.g. '*.down_proj*=6'")
        out.append((pattern, int(bits)))
    return out


def is_mixed(recipe: str | None) -> bool:
    """A ``mixed-L-H`` recipe (it sets the widths itself: ``--bits`` does not apply)."""
    return recipe not in (None, "", "uniform")


def recipe_widths(recipe: str | None, base: QuantSpec) -> tuple[int, int]:
    """(bits for ordinary roles, bits for sensitive roles)."""
    if recipe in (None, "", "uniform"):
        return base.bits, base.bits
    m = RECIPE_RE.match(recipe)
    if not m:
        raise UsageError(f"--recipe {recipe!r}: unknown; recipes: {RECIPES_HELP}")
    low, high = int(m.group(1)), int(m.group(2))
    if low >= high:
        raise UsageError(
            f"--recipe {recipe}: in mixed-L-H the sensitive roles get H bits, more than the others' L; "
            f"{'L = H is uniform' if low == high else 'this one is reversed'}",
            f"did you mean --recipe mixed-{min(low, high)}-{max(low, high)}?" if low != high
            else f"use --recipe uniform --bits {low}",
        )
    if base.mode != "affine":
        raise UsageError(f"--recipe {recipe}: mixed widths need --mode affine (mode {base.mode} has one width)")

    for b in (low, high):
        allowed = MODES["affine"][0]
        if b not in allowed:
            raise UsageError(
                f"--recipe {recipe}: {b} bits is not a supported width; allowed {', '.join(map(str, allowed))}",
                f"recipes: {RECIPES_HELP}",
            )
    return low, high


def build_plan(
    conversion: Plan,
    base: QuantSpec,
    recipe: str | None = None,
    bits_for: list[str] | None = None,
    keep: list[str] | None = None,
) -> QuantPlan:
    """The per-tensor quantization plan of a conversion plan (order of decisions: the
    module docstring); refuses a plan that would quantize nothing."""

    arch = conversion.arch
    low, high = recipe_widths(recipe, base)
    if is_mixed(recipe):
        # The recipe sets the widths: the plan's default width (config's
        # quantization.bits, the labels, verify's gates) is its narrower one, L.
        base = replace(base, bits=low)
    overrides = [(p, _matcher(p), _width(p, b, base)) for p, b in parse_bits_for(bits_for)]
    keeps = [(p, _matcher(p, "--keep")) for p in keep or []]
    both = sorted({p for p, _, _ in overrides} & {p for p, _ in keeps})
    if both:
        raise UsageError(
            f"pattern {both[0]!r} is given to both --bits-for and --keep: one tensor cannot be both quantized and kept in float",
            "give the pattern to one of the two options",
        )
    used: set[str] = set()
    notes: dict[str, list[str]] = {}
    float_dtype = conversion.dtype
    tensors: list[TensorPlan] = []
    for step in conversion.kept:
        name = step.target
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        protection = arch.protection_of(name)
        role = arch.role_of(name)
        role_name = role.name if role else None
        hits = [p for p, match, _ in overrides if match(name, module, role_name)]
        if protection:
            if hits:
                raise UsageError(f"--bits-for {hits[0]!r} matches '{name}', which is never quantized ({protection.why})")
            # float32 for the dynamics (kept float32 by the conversion, or marked so);
            # other never-quantized tensors stay in the output dtype
            dtype = "F32" if (protection.float32 or step.keep_float32) else step.dtype
            s = replace(step, dtype=dtype)
            tensors.append(TensorPlan(s, None, "protected", protection.why, None, [(name, dtype, s.shape)]))
            used.update(p for p, match in keeps if match(name, module, role_name))
            continue
        if role is None:
            if hits:
                raise UsageError(f"--bits-for {hits[0]!r} matches '{name}', which is not a weight matrix")
            tensors.append(TensorPlan(step, None, "float", "not a weight matrix", None, [(name, step.dtype, step.shape)]))
            continue
        bits, reason = (high if role.sensitive else low), ("sensitive role" if role.sensitive and high != low else "recipe")
        decision = "quantize" if role.default == "quantize" else "float"
        if decision == "float":
            reason = role.why or "kept in float by the architecture's policy"
        matched = [(p, b) for p, match, b in overrides if match(name, module, role_name)]
        for p, b in matched:
            bits, decision, reason = b, "quantize", f"--bits-for {p}"
            used.add(p)
        if len(matched) > 1:
            # the last pattern given wins; say so in the plan and once per overlap
            reason += " (last of " + ", ".join(f"{p}={b}" for p, b in matched) + ")"
            overlap = ", ".join(f"'{p}={b}'" for p, b in matched)
            notes.setdefault(overlap, []).append(name)
        for p, match in keeps:
            if match(name, module, role_name):
                decision, reason = "float", f"--keep {p}"
                used.add(p)
        spec = replace(base, bits=bits)
        if decision == "quantize":
            why_not = can_quantize(step.shape, spec)
            if why_not:
                decision, reason = "float", why_not
        if decision == "quantize":
            entries = quantized_entries(name, step.shape, spec, float_dtype)
            tensors.append(TensorPlan(step, role_name, "quantize", reason, spec, entries))
        else:
            tensors.append(TensorPlan(step, role_name, "float", reason, None, [(name, step.dtype, step.shape)]))
    unused = [p for p, _, _ in overrides if p not in used] + [p for p, _ in keeps if p not in used]
    if unused:
        roles = ", ".join(r.name for r in arch.roles)
        raise UsageError(
            f"pattern {unused[0]!r} matches no tensor of this model",
            f"patterns match tensor names, module paths or roles ({roles}); prefix re: for a regular expression",
        )
    qp = QuantPlan(conversion, base, recipe or "uniform", tensors, [
        f"--bits-for {overlap} all match {len(names)} tensor(s) (e.g. {names[0]}): the last given wins, "
        f"{overlap.rsplit(', ', 1)[-1]}"
        for overlap, names in notes.items()
    ])
    if not any(t.decision == "quantize" for t in tensors):
        reasons = sorted({t.reason for t in tensors if t.role is not None and t.decision == "float"})
        raise UsageError(
            f"nothing would be quantized: no weight matrix of this model can be stored as {base.label()}"
            + (f" ({'; '.join(reasons[:3])})" if reasons else ""),
            "choose a smaller --group-size that divides the layers' input dimensions, or check --keep",
        )
    return qp


def _width(pattern: str, bits: int, base: QuantSpec) -> int:
    allowed = MODES[base.mode][0]
    if bits not in allowed:
        raise UsageError(
            f"--bits-for {pattern}={bits}: {bits} bits is not supported by mode {base.mode}; "
            f"allowed {', '.join(map(str, allowed))}"
        )
    return bits
