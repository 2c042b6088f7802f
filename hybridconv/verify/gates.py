"""Quality gates per precision of the converted model, and how they were chosen.

The gates bound how far a *correct* conversion at a given precision may drift
from the float32 PyTorch reference; a conversion bug (a transposed kernel, a
lost norm offset, ``A_log`` read as ``A``) moves these metrics by orders of
magnitude more. Reasoning, per precision:

* **float32** — the same function computed in the same precision with a
  different order of operations: per-token KL is at the level of float32
  rounding (≈1e-10 on the fixtures). Gates: mean KL ≤ 1e-5, p99 ≤ 1e-4, top-1
  agreement ≥ 0.99 (ties may flip), hidden-state relative error ≤ 1e-3 per block.
* **bfloat16 / float16** — weights and activations carry 8 (bf16) or 11 (fp16)
  mantissa bits, a relative rounding of ~4e-3 / 5e-4 per operation, compounding
  through the blocks and along recurrent states. Gates: mean KL ≤ 0.01,
  p99 ≤ 0.1, top-1 ≥ 0.9, block error ≤ 0.15.
* **8 / 6 bits** — quantization noise comparable to or a few times above bf16:
  mean KL ≤ 0.02 / 0.05, p99 ≤ 0.2 / 0.5, top-1 ≥ 0.85 / 0.8.
* **4 / 3 / 2 bits** — noticeably lossy by design; the gates only catch
  conversions that are broken rather than coarse: mean KL ≤ 0.15 / 0.4 / 1.5,
  p99 ≤ 1.5 / 3 / 8, top-1 ≥ 0.7 / 0.55 / 0.3.

The block gate bounds the error *one block* makes. verify first compares the
chained block outputs (each block fed by the model's own previous block); only
when one of those is over the gate does it run every block on the reference's
input to it and gate on those own errors (``verify.onepass.own_block_errors``):
in a small model whose blocks add updates as large as their residual, correct
4-bit blocks compound each other's noise past the gate (OLMo-Hybrid's tiny
fixture: chained 0.94, own at most 0.30), while a wrong block has a large own
error wherever it sits (0.88 for a reversed conv kernel in the same model).

Every gate can be overridden on the command line (``--max-kl-mean`` …).
The decode check uses the p99 gate for its worst token.

:data:`GATES` is the one source of these numbers: the README's gate table is
:func:`markdown_table` (``python -m hybridconv.verify.gates`` prints it), and
tests/test_verify_decisions.py fails when the two differ.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from ..checkpoint import index_weights
from ..safetensors_io import FLOAT_DTYPES


@dataclass
class Gates:
    max_kl_mean: float
    max_kl_p99: float
    min_top1: float
    min_top5: float
    max_block_error: float

    def to_dict(self) -> dict:
        return asdict(self)


GATES: dict[str, Gates] = {
    "float32": Gates(1e-5, 1e-4, 0.99, 0.95, 1e-3),
    "bfloat16": Gates(0.01, 0.1, 0.9, 0.8, 0.15),
    "float16": Gates(0.01, 0.1, 0.9, 0.8, 0.15),
    "8bit": Gates(0.02, 0.2, 0.85, 0.75, 0.25),
    "6bit": Gates(0.05, 0.5, 0.8, 0.7, 0.35),
    "5bit": Gates(0.08, 0.8, 0.75, 0.65, 0.45),
    "4bit": Gates(0.15, 1.5, 0.7, 0.6, 0.6),
    "3bit": Gates(0.4, 3.0, 0.55, 0.5, 0.9),
    "2bit": Gates(1.5, 8.0, 0.3, 0.3, 2.0),
}


# The README's table: one row per precision (consecutive precisions with the same
# gates share a row), one column per gate, in this order.
LABELS = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "8bit": "8-bit", "6bit": "6-bit",
          "5bit": "5-bit", "4bit": "4-bit", "3bit": "3-bit", "2bit": "2-bit"}
COLUMNS = (("max KL mean", "max_kl_mean"), ("max KL p99", "max_kl_p99"), ("min top-1", "min_top1"),
           ("min top-5", "min_top5"), ("max block error", "max_block_error"))


def _number(v: float) -> str:
    """How the README writes a gate: ``1e-4`` under 0.01, else plainly (``0.15``, ``3``)."""
    if 0 < abs(v) < 0.01:
        mantissa, exp = f"{v:.6e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{v:g}"


def markdown_table() -> str:
    """The gate table of the README (section "verify"), generated from :data:`GATES`."""
    rows: list[tuple[list[str], Gates]] = []
    for precision, g in GATES.items():
        if rows and rows[-1][1] == g:
            rows[-1][0].append(LABELS[precision])
        else:
            rows.append(([LABELS[precision]], g))
    lines = ["| precision | " + " | ".join(c for c, _ in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for labels, g in rows:
        lines.append(f"| {' / '.join(labels)} | " + " | ".join(_number(getattr(g, k)) for _, k in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def precision_of(folder: Path) -> str:
    """The precision class of a converted folder: the narrowest width its quantized
    weights are stored at (the default ``bits`` of its ``quantization`` config and
    every per-layer entry: a mixed-4-6 folder is 4-bit, a 4-bit folder with one
    layer at 2 bits is 2-bit), else the commonest floating dtype of its weights."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    quant = cfg.get("quantization") or cfg.get("quantization_config")
    if isinstance(quant, dict) and isinstance(quant.get("bits"), int):
        widths = [quant["bits"]] + [v["bits"] for v in quant.values()
                                    if isinstance(v, dict) and isinstance(v.get("bits"), int)]
        return f"{min(widths)}bit"
    index = index_weights(Path(folder))
    counts = Counter(
        t.dtype for t in index.tensors.values() if t.dtype in FLOAT_DTYPES
    )
    code = counts.most_common(1)[0][0] if counts else "F32"
    return {"F32": "float32", "F64": "float32", "F16": "float16", "BF16": "bfloat16"}[code]


def check_overrides(overrides: dict, name=lambda key: "--" + key.replace("_", "-")) -> dict:
    """Refuse (UsageError, exit 2) gate overrides no gate can mean: a NaN or infinite
    value, a negative KL or block error, an agreement outside [0, 1] (``min_top1 2``
    would fail every model, ``max_kl_mean -1`` too). ``name(key)`` names the option
    (``--max-kl-mean``; a release plan names its key). Returns ``overrides``."""
    import math

    from ..errors import UsageError

    for key, value in overrides.items():
        if value is None:
            continue
        if key not in GATES["float32"].to_dict():
            raise UsageError(f"{name(key)}: unknown gate; gates: {', '.join(GATES['float32'].to_dict())}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UsageError(f"{name(key)} {value!r}: must be a finite number")
        if key.startswith("min_") and not 0 <= value <= 1:
            raise UsageError(f"{name(key)} {value!r}: an agreement, between 0 and 1")
        if key.startswith("max_") and value < 0:
            raise UsageError(f"{name(key)} {value!r}: must not be negative (a KL or a relative error)")
    return overrides


def gates_for(precision: str, **overrides) -> Gates:
    base = GATES.get(precision, GATES["2bit"])
    g = Gates(**base.to_dict())
    for k, v in overrides.items():
        if v is not None:
            setattr(g, k, v)
    return g


if __name__ == "__main__":  # regenerate the README's table: python -m hybridconv.verify.gates
    print(markdown_table(), end="")
