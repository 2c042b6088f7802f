"""``verify``: compare a converted MLX folder with its PyTorch original.

Order of work (memory): the reference outputs are computed first and kept
(logits in memory, block outputs on disk), the torch model is freed, and only
then is the MLX model loaded; block outputs are compared one block at a time.

The report (``verification.json``; schema ``hybridconv.verification/1``,
documented in the README) holds the tool and library versions, the source and
its revision, a hash of OUT's weights, the inputs, the thresholds, the metrics
(overall and per sequence), the per-block table, the decode check, every gate
with its value, and the verdict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__, interrupt
from ..converters import layer_of
from ..errors import OutputError, UsageError
from ..hashing import weights_hash
from ..loading import WeightMismatchError, load_config
from .gates import Gates, gates_for, precision_of
from .metrics import DECISIVE_GAP, relative_error, summarise, token_stats
from .reference import Reference

SCHEMA = "hybridconv.verification/1"
REPORT_NAME = "verification.json"


@dataclass
class Outcome:
    report: dict

    @property
    def passed(self) -> bool:
        return self.report["verdict"] == "pass"


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("mlx", "mlx-lm", "torch", "transformers", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _check(name: str, value: float, threshold: float, kind: str) -> dict:
    ok = value <= threshold if kind == "max" else value >= threshold
    return {"gate": name, "value": value, "threshold": threshold, "passed": bool(ok)}


def verify_folder(
    out: Path,
    reference: Reference,
    gates: Gates | None = None,
    gate_overrides: dict | None = None,
    decode_steps: int = 8,
    progress: Callable[[str], None] | None = None,
    activation_dtype: str | None = None,
) -> Outcome:
    """Compare ``out`` against a computed or loaded :class:`Reference`."""
    import mlx.core as mx

    from ..loading import load

    out = Path(out)
    arch, config = load_config(out)
    precision = precision_of(out)
    gates = gates or gates_for(precision, **(gate_overrides or {}))
    report: dict = {
        "schema": SCHEMA,
        "tool": {"name": "hybridconv", "version": __version__},
        "libraries": _versions(),
        "model": {
            "path": str(out),
            "model_type": arch.model_type,
            "precision": precision,
            "weights_hash": weights_hash(out),
        },
        "reference": {
            "mode": "file" if reference.file else "live",
            "implementation": reference.implementation,
            "source": reference.source,
            "source_revision": reference.source_revision,
            "dtype": reference.dtype,
            "file": reference.file,
        },
        "inputs": {
            "sequences": len(reference.sequences),
            "tokens": int(sum(len(s) for s in reference.sequences)),
            "lengths": [len(s) for s in reference.sequences],
        },
        "thresholds": gates.to_dict(),
    }
    if reference.model_type and reference.model_type != arch.model_type:
        raise UsageError(
            f"the reference was made from a {reference.model_type} checkpoint, {out} is {arch.model_type}",
            "pass the reference of this model's source checkpoint",
        )
    vocab = config["vocab_size"]
    if reference.vocab_size not in (-1, vocab):
        raise UsageError(
            f"the reference has {reference.vocab_size} logits per token, {out} has vocab_size {vocab}",
            "the reference was made from another model",
        )
    check_same_model(reference, arch, config, out)
    top_k = reference.top_k
    if top_k is not None:
        report["reference"]["top_k"] = top_k
        report["reference"]["note"] = (
            f"the reference file stores the top {top_k} logits per token: KL is computed over those "
            "and one bucket for the rest of the vocabulary, a lower bound of the full KL"
        )
    try:
        model = load(out, activation_dtype=activation_dtype)
    except WeightMismatchError as exc:
        # A conversion that produced weights the model cannot even take is a failed
        # verification, localised to the block of the offending tensor.
        report.update(
            metrics=None, blocks=[], decode=None, checks=[],
            first_divergent_block=layer_of(exc.parameter),
            verdict="fail", failure_reasons=[exc.message],
        )
        return Outcome(report)

    kinds = model.block_kinds()
    n_blocks = len(kinds)
    have_hidden = reference.hidden_files is not None
    sq_diff = np.zeros(n_blocks)
    sq_ref = np.zeros(n_blocks)
    stats, per_seq, decode_rows = [], [], []
    for s, ids in enumerate(reference.sequences):
        interrupt.check()  # a safe point: between sequences
        if progress:
            progress(f"sequence {s + 1}/{len(reference.sequences)}")
        hidden: list = [] if have_hidden else None
        logits = model(mx.array(ids[None]), hidden_states=hidden)
        got = np.array(logits[0].astype(mx.float32))
        if have_hidden:
            for b, h in enumerate(hidden):
                r = np.asarray(reference.hidden(s, b), dtype=np.float64)
                g = np.array(h[0].astype(mx.float32), dtype=np.float64)
                sq_diff[b] += float(((g - r) ** 2).sum())
                sq_ref[b] += float((r**2).sum())
            del hidden
        st = token_stats(reference.outputs[s], got, ids)
        stats.append(st)
        per_seq.append({"sequence": s, **summarise([st])})
        k = min(decode_steps, len(ids) - 1)
        if k > 0:
            decode_rows.append(_decode_check(model, ids, k, reference.outputs[s]))
    overall = summarise(stats)
    report["metrics"] = {"overall": overall, "per_sequence": per_seq}

    blocks, first = [], None
    if have_hidden:
        for b in range(n_blocks):
            err = relative_error(sq_diff[b], sq_ref[b])
            diverged = bool(err > gates.max_block_error)
            if diverged and first is None:
                first = b
            blocks.append({"block": b, "kind": kinds[b], "relative_error": err,
                           "threshold": gates.max_block_error, "diverged": diverged})
    report["blocks"] = blocks
    report["first_divergent_block"] = first
    report["block_comparison"] = (
        "hidden states after every block" if have_hidden
        else "not available: the reference file holds no hidden states (make it with --hidden-states, or use --reference)"
    )

    checks = [
        _check("max_kl_mean", overall["kl_mean"], gates.max_kl_mean, "max"),
        _check("max_kl_p99", overall["kl_p99"], gates.max_kl_p99, "max"),
    ]
    skipped = []
    if top_k is not None and top_k < 5:
        # top-5 overlap against fewer than 5 stored logits measures nothing
        overall["top5_overlap"] = overall["top5_overlap_decisive"] = None
        for row in per_seq:
            row["top5_overlap"] = row["top5_overlap_decisive"] = None
        skipped.append({"gate": "min_top5", "reason": f"the reference file stores only the top {top_k} logits"})
    decisive_note = (
        f"no token where the reference's two best logits differ by {DECISIVE_GAP} nats or more "
        "(a nearly uniform next-token distribution): which token ranks first is noise there; KL measures it"
    )
    for gate, key, threshold in (("min_top1", "top1_agreement_decisive", gates.min_top1),
                                 ("min_top5", "top5_overlap_decisive", gates.min_top5)):
        if any(sk["gate"] == gate for sk in skipped):
            continue
        if overall[key] is None:
            skipped.append({"gate": gate, "reason": decisive_note})
        else:
            checks.append(_check(gate, overall[key], threshold, "min"))
    if skipped:
        report["skipped_gates"] = skipped
    if have_hidden:
        worst = max((b["relative_error"] for b in blocks), default=0.0)
        checks.append(_check("max_block_error", worst, gates.max_block_error, "max"))
    if decode_rows:
        worst_kl = max(r["kl_max"] for r in decode_rows)
        report["decode"] = {
            "steps_per_sequence": decode_steps,
            "kl_max": worst_kl,
            "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in decode_rows),
            "top1_agreement": float(np.mean([r["top1_agreement"] for r in decode_rows])),
        }
        checks.append(_check("decode_kl_max", worst_kl, gates.max_kl_p99, "max"))
    else:
        report["decode"] = None
    report["checks"] = checks
    failed = [c for c in checks if not c["passed"]]
    report["verdict"] = "fail" if failed else "pass"
    report["failure_reasons"] = [
        f"{c['gate']}: {c['value']:.4g} vs threshold {c['threshold']:.4g}" for c in failed
    ]
    return Outcome(report)


def check_same_model(reference: Reference, arch, config: dict, out: Path) -> None:
    """Refuse (exit 2) a reference computed from another model: compare the
    architecture's layer schedule and, where stored, the block outputs' count and
    width with OUT's config before any work."""
    kinds = [k for k, _ in arch.schedule(config)]
    n = len(kinds)
    hint = "the reference was made from another model: pass this model's own source checkpoint, or a file made from it"
    if reference.block_kinds and list(reference.block_kinds) != kinds:
        raise UsageError(
            f"the reference's layer schedule ({len(reference.block_kinds)} blocks: "
            f"{_short(reference.block_kinds)}) differs from {out}'s ({n} blocks: {_short(kinds)})",
            hint,
        )
    if reference.hidden_files:
        stored = len(reference.hidden_files[0])
        if stored != n:
            raise UsageError(f"the reference stores the outputs of {stored} blocks, {out} has {n}", hint)
        width = reference.hidden(0, 0).shape[-1]
        if width != config.get("hidden_size", width):
            raise UsageError(
                f"the reference's block outputs are {width} wide, {out} has hidden_size {config['hidden_size']}", hint
            )


def _short(kinds: list[str]) -> str:
    return ", ".join(kinds[:6]) + (", …" if len(kinds) > 6 else "")


def _decode_check(model, ids: np.ndarray, k: int, ref_out: dict) -> dict:
    """Prefill all but the last ``k`` tokens through the caches, then step one token
    at a time; compare those ``k`` rows with the reference's full-sequence logits."""
    import mlx.core as mx

    T = len(ids)
    cache = model.make_cache()
    model(mx.array(ids[None, : T - k]), cache=cache)
    rows = []
    for t in range(T - k, T):
        interrupt.check()
        rows.append(np.array(model(mx.array(ids[None, t : t + 1]), cache=cache)[0, 0].astype(mx.float32)))
    got = np.stack(rows)
    ref_rows = {key: v[T - k :] for key, v in ref_out.items()}
    st = token_stats(ref_rows, got, ids[T - k :])
    return {
        "kl_max": float(st["kl"].max()),
        "max_abs_logit_diff": float(st["max_abs"].max()),
        "top1_agreement": float(st["top1"].mean()),
    }


def write_report(report: dict, path: Path) -> None:
    path = Path(path)
    interrupt.check()  # no report from an interrupted run
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        try:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the report ({exc.strerror or exc})") from None
