"""``quantize``: convert (on the fly, when SOURCE is a Hugging Face checkpoint)
and quantize in one streamed pass, and optionally verify or search a plan.

The output follows mlx-lm: ``config.json`` carries ``quantization`` (and the
same under ``quantization_config``) with the default parameters and per-layer
entries where a layer differs, so ``mlx_lm.load`` opens it; ``conversion.json``
records the per-tensor plan and the bits per weight.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import interrupt
from ..checkpoint import resolve, source_folder
from ..convert import Result, WriteItem, check_output_path, plan, prepare_output, write_output
from ..errors import UsageError
from .modes import QuantSpec, validate
from .plan import QuantPlan, build_plan

# Candidate plans for --target-kl, from small to large (affine mode).
SEARCH_UNIFORM = (2, 3, 4, 5, 6, 8)
SEARCH_MIXED = ((2, 4), (2, 6), (3, 4), (3, 6), (4, 6), (4, 8), (5, 8), (6, 8))


@dataclass
class QuantResult:
    plan: QuantPlan
    result: Result | None  # None for --dry-run
    search: list[dict] = field(default_factory=list)
    calibration: dict | None = None  # the calibration record (quantize --calibrate)


def plan_quantization(
    source: str,
    spec: QuantSpec,
    recipe: str | None = None,
    bits_for: list[str] | None = None,
    keep: list[str] | None = None,
    dtype: str | None = None,
    revision: str | None = None,
):
    src = resolve(source, revision)
    return src, _plan_for(src, spec, recipe, bits_for, keep, dtype)


def _plan_for(src, spec, recipe, bits_for, keep, dtype) -> QuantPlan:
    return build_plan(plan(src, dtype), spec, recipe, bits_for, keep)


def write_quantized_output(qp: QuantPlan, out: Path, tmp: Path, progress=None, allow_nonfinite: bool = False) -> Result:
    from . import writer

    items = [WriteItem(t.step, t.entries, t.spec, writer if t.spec is not None else None) for t in qp.tensors]
    entry = qp.config_entry()
    summary = qp.summary()
    config_extra = {
        "quantization": entry,
        "quantization_config": entry,
        "hybridconv": {"recipe": qp.recipe, "bits_per_weight": summary["bits_per_weight"]},
    }
    record_extra = {"quantization": {**summary, "plan": qp.rows()}}
    return write_output(qp.conversion, out, tmp, progress, items, config_extra, record_extra, allow_nonfinite)


def quantize(
    source: str,
    out: Path,
    bits: int | None = None,
    group_size: int | None = None,
    mode: str = "affine",
    recipe: str | None = None,
    bits_for: list[str] | None = None,
    keep: list[str] | None = None,
    dtype: str | None = None,
    revision: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    progress=None,
    on_plan: Callable[[QuantPlan], None] | None = None,
    allow_nonfinite: bool = False,
    allow_pickle: bool = False,
    calibration=None,
    report: Callable[[str], None] | None = None,
) -> QuantResult:
    """`hybridconv quantize`: convert and quantize ``source`` into ``out`` in one streamed
    pass (``bits`` defaults to the mode's width: 4, or 8 for mxfp8). ``recipe``:
    "uniform" or "mixed-L-H"; ``bits_for``: ["PATTERN=BITS", ...]; ``keep``: [PATTERN, ...].
    With ``dry_run`` nothing is written. ``calibration``: a
    :class:`~hybridconv.quant.calibrate.CalibrationOptions` for calibrated codes
    (affine mode; the same plan), ``report`` its progress lines. Returns a :class:`QuantResult`."""
    spec = validate(bits, group_size, mode)
    if calibration is not None and spec.mode != "affine":
        raise UsageError(f"--calibrate: affine mode only (MLX's scale-and-bias format), not --mode {spec.mode}")
    with source_folder(source, revision, allow_pickle) as src:
        qp = _plan_for(src, spec, recipe, bits_for, keep, dtype)
        if on_plan:
            on_plan(qp)
        if dry_run:
            return QuantResult(qp, None)
        tmp = prepare_output(Path(out), force, src)
        if calibration is not None:
            from .calibrate import write_calibrated_output

            res, rep = write_calibrated_output(qp, src, Path(out), tmp, calibration, progress, report, allow_nonfinite)
            return QuantResult(qp, res, calibration=rep)
        return QuantResult(qp, write_quantized_output(qp, Path(out), tmp, progress, allow_nonfinite))


def search_target_kl(
    source: str,
    out: Path,
    target_kl: float,
    reference,
    group_size: int | None = None,
    dtype: str | None = None,
    revision: str | None = None,
    force: bool = False,
    keep: list[str] | None = None,
    report: Callable[[dict], None] | None = None,
    bits_for: list[str] | None = None,
    dry_run: bool = False,
    allow_nonfinite: bool = False,
    calibration=None,
) -> QuantResult:
    """The smallest candidate plan (by bits per weight) whose mean KL on the
    reference's inputs is <= ``target_kl``; every candidate tried is reported.
    With ``calibration`` (:class:`~hybridconv.quant.calibrate.CalibrationOptions`)
    every candidate is quantized with it: the search finds the smallest plan that
    the calibrated method brings under the target.

    Candidates: uniform widths and mixed recipes (sensitive roles wider), sorted by
    bits per weight; a binary search over that order (KL falls as the plan grows),
    so a large model costs log2(14) ≈ 4 trial quantizations, not 14."""
    from ..verify.run import verify_folder

    if target_kl <= 0:
        raise UsageError(f"--target-kl {target_kl}: must be positive")
    src = resolve(source, revision)
    if not dry_run:
        check_output_path(Path(out), force, src)  # fail before any work
    base = validate(4, group_size, "affine")
    candidates = []
    for b in SEARCH_UNIFORM:
        candidates.append(("uniform", validate(b, base.group_size, "affine")))
    for lo, hi in SEARCH_MIXED:
        candidates.append((f"mixed-{lo}-{hi}", validate(lo, base.group_size, "affine")))
    conversion = plan(src, dtype)  # the same for every candidate: read the headers once
    plans = sorted(
        (build_plan(conversion, spec, recipe, bits_for, keep) for recipe, spec in candidates),
        key=lambda q: q.bits_per_weight,
    )
    explored: list[dict] = []
    cache: dict[int, float] = {}

    def _write(qp, folder, tmp, allow: bool):
        if calibration is None:
            return write_quantized_output(qp, folder, tmp, allow_nonfinite=allow)
        from .calibrate import write_calibrated_output

        return write_calibrated_output(qp, src, folder, tmp, calibration, allow_nonfinite=allow)[0]

    parent = Path(out).resolve().parent
    workdir = Path(tempfile.mkdtemp(prefix="hybridconv-search-", dir=parent if parent.is_dir() else None))

    def kl_of(i: int) -> float:
        interrupt.check()  # a safe point: between candidates
        if i not in cache:
            qp = plans[i]
            folder = workdir / f"candidate-{i}"
            _write(qp, folder, prepare_output(folder, False, None), False)
            rep = verify_folder(folder, reference).report
            cache[i] = rep["metrics"]["overall"]["kl_mean"]
            row = {
                "plan": _plan_label(qp),
                "bits_per_weight": round(qp.bits_per_weight, 4),
                "kl_mean": cache[i],
                "meets_target": cache[i] <= target_kl,
            }
            explored.append(row)
            if report:
                report(row)
            shutil.rmtree(folder, ignore_errors=True)
        return cache[i]

    try:
        lo, hi = 0, len(plans) - 1
        best = None
        if kl_of(hi) <= target_kl:
            best = hi
            while lo < hi:
                mid = (lo + hi) // 2
                if kl_of(mid) <= target_kl:
                    best, hi = mid, mid
                else:
                    lo = mid + 1
    finally:
        with interrupt.critical():
            shutil.rmtree(workdir, ignore_errors=True)
    explored.sort(key=lambda r: r["bits_per_weight"])
    if best is None:
        return QuantResult(plans[-1], None, explored)
    qp = plans[best]
    if dry_run:
        return QuantResult(qp, None, explored)
    tmp = prepare_output(Path(out), force, src)
    return QuantResult(qp, _write(qp, Path(out), tmp, allow_nonfinite), explored)


def _plan_label(qp: QuantPlan) -> str:
    if qp.recipe == "uniform":
        return f"uniform {qp.base.bits}-bit"
    return qp.recipe
