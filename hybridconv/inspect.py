"""``inspect``: what a conversion would do, from config.json and safetensors
headers only (no tensor data is read)."""

from __future__ import annotations

import math
from pathlib import Path

from .checkpoint import REPO_ID, remote_headers, resolve
from .convert import DTYPE_LABELS, Plan, plan
from .safetensors_io import ITEMSIZE

QUANT_BITS = (8, 6, 5, 4, 3, 2)
QUANT_GROUP = 64


def inspect_plan(source: str, revision: str | None = None, dtype: str | None = None) -> Plan:
    """The plan of a local folder, or of a Hub repo from its config and remote headers."""
    if Path(source).expanduser().exists() or not REPO_ID.match(source):
        return plan(resolve(source, revision), dtype)
    src, index = remote_headers(source, revision)
    return plan(src, dtype, index)


def _quantizable(step) -> bool:
    # Linear and embedding matrices; never the float32-kept SSM parameters.
    return (
        step.shape is not None
        and len(step.shape) == 2
        and step.target.endswith(".weight")
        and not step.keep_float32
        and step.shape[-1] % QUANT_GROUP == 0
    )


def size_estimates(p: Plan) -> dict:
    sizes: dict = {}
    for label, code in (("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16")):
        sizes[label] = sum(
            math.prod(s.shape) * (4 if s.keep_float32 else ITEMSIZE[code]) for s in p.kept
        )
    for bits in QUANT_BITS:
        total = 0.0
        for s in p.kept:
            n = math.prod(s.shape)
            if _quantizable(s):
                total += n * (bits + 32 / QUANT_GROUP) / 8  # fp16 scale + bias per group
            else:
                total += n * (4 if s.keep_float32 else 2)
        sizes[f"{bits}-bit"] = int(total)
    return sizes


def describe(p: Plan) -> dict:
    schedule = p.arch.schedule(p.config)
    rules = []
    for rule in p.arch.rules(p.config):
        touched = [s for s in p.steps if rule.matches(s.source)]
        changed = [s for s in touched if rule.name in s.applied]
        rules.append(
            {
                "rule": rule.name,
                "description": rule.describe(),
                "matches": len(touched),
                "tensors": [s.source for s in touched],
                "changes": len(changed),
            }
        )
    casts = [s.source for s in p.steps if "cast" in s.applied]
    rules.append(
        {
            "rule": "cast",
            "description": f"cast other floating tensors to {DTYPE_LABELS[p.dtype]}",
            "matches": len(casts),
            "tensors": casts,
            "changes": len(casts),
        }
    )
    return {
        "source": p.source.label,
        "source_revision": p.source.revision,
        "model_type": p.arch.model_type,
        "architecture": p.arch.title,
        "num_hidden_layers": p.config["num_hidden_layers"],
        "hidden_size": p.config["hidden_size"],
        "vocab_size": p.config["vocab_size"],
        "tie_word_embeddings": p.config["tie_word_embeddings"],
        "layers": [
            {"index": i, "kind": kind, "window": window}
            for i, (kind, window) in enumerate(schedule)
        ],
        "parameters": p.parameter_count,
        "source_tensors": len(p.steps),
        "source_bytes": p.index.total_bytes,
        "source_shards": [s.name for s in p.index.shards],
        "output_dtype": DTYPE_LABELS[p.dtype],
        "rules": rules,
        "dropped": [{"tensor": s.source, "reason": s.dropped_because} for s in p.dropped],
        "estimated_output_bytes": size_estimates(p),
        "estimate_note": f"N-bit: affine quantization of 2-D weight matrices, group size {QUANT_GROUP}; other tensors at 16 bits, SSM parameters at 32",
    }
