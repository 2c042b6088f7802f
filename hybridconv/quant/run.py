"""``quantize``: convert (on the fly, when SOURCE is a Hugging Face checkpoint)
and quantize in one streamed pass, and optionally verify or search a plan.

The output follows mlx-lm: ``config.json`` carries ``quantization`` (and the
same under ``quantization_config``) with the default parameters and per-layer
entries where a layer differs, so ``mlx_lm.load`` opens it; ``conversion.json``
records the per-tensor plan and the bits per weight.
"""

from __future__ import annotations

import math
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
from .plan import QuantPlan, build_plan, is_mixed, recipe_widths

# Candidate plans for --target-kl, from small to large (affine mode).
SEARCH_UNIFORM = (2, 3, 4, 5, 6, 8)
SEARCH_MIXED = ((2, 4), (2, 6), (3, 4), (3, 6), (4, 6), (4, 8), (5, 8), (6, 8))


@dataclass
class QuantResult:
    plan: QuantPlan
    result: Result | None  # None for --dry-run
    search: list[dict] = field(default_factory=list)  # --target-kl: the candidates measured, in order
    candidates: list[dict] = field(default_factory=list)  # --target-kl: every candidate, by bits per weight
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


def write_quantized_output(qp: QuantPlan, out: Path, tmp: Path, progress=None, allow_nonfinite: bool = False,
                           force: bool = False, mlx_lm_code: str = "auto") -> Result:
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
    return write_output(qp.conversion, out, tmp, progress, items, config_extra, record_extra, allow_nonfinite, force,
                        mlx_lm_code)


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
    mlx_lm_code: str = "auto",
    calibration=None,
    report: Callable[[str], None] | None = None,
) -> QuantResult:
    """`hybridconv quantize`: convert and quantize ``source`` into ``out`` in one streamed
    pass (``bits`` defaults to the mode's width: 4, or 8 for mxfp8). ``recipe``:
    "uniform" or "mixed-L-H" (it sets the widths: ``bits`` then is L or None);
    ``bits_for``: ["PATTERN=BITS", ...]; ``keep``: [PATTERN, ...].
    ``mlx_lm_code``: whether the output carries hybridconv's model for mlx-lm
    (``convert.carry_mlx_lm_code``). With ``dry_run`` nothing is written.
    ``calibration``: a :class:`~hybridconv.quant.calibrate.CalibrationOptions` for
    calibrated codes (affine mode; the same plan), ``report`` its progress lines.
    Returns a :class:`QuantResult`."""
    from ..mlx_lm_code import check_policy

    check_policy(mlx_lm_code)
    spec = validate(bits, group_size, mode)
    if calibration is not None and spec.mode != "affine":
        raise UsageError(f"--calibrate: affine mode only (MLX's scale-and-bias format), not --mode {spec.mode}",
                         "drop --mode, or drop --calibrate")
    if bits is not None and is_mixed(recipe) and bits != recipe_widths(recipe, spec)[0]:
        # the recipe sets the widths (the CLI and release plans refuse bits with it; here
        # a bits equal to its L, the plan's default width, is accepted as redundant)
        raise UsageError(f"--bits {bits}: --recipe {recipe} sets the widths itself (its L and H bits)",
                         "drop --bits, or use --recipe uniform")
    with source_folder(source, revision, allow_pickle) as src:
        qp = _plan_for(src, spec, recipe, bits_for, keep, dtype)
        if on_plan:
            on_plan(qp)
        if dry_run:
            return QuantResult(qp, None)
        tmp = prepare_output(Path(out), force, src)
        if calibration is not None:
            from .calibrate import write_calibrated_output

            res, rep = write_calibrated_output(qp, src, Path(out), tmp, calibration, progress, report, allow_nonfinite,
                                               force, mlx_lm_code)
            return QuantResult(qp, res, calibration=rep)
        return QuantResult(qp, write_quantized_output(qp, Path(out), tmp, progress, allow_nonfinite, force,
                                                      mlx_lm_code))


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
    stream: bool | None = None,
    mlx_lm_code: str = "auto",
    calibration=None,
) -> QuantResult:
    """The smallest candidate plan (by its bits per weight, computed from the plan)
    whose mean KL on the reference's inputs is <= ``target_kl``; every candidate
    measured is reported, in order. With ``calibration``
    (:class:`~hybridconv.quant.calibrate.CalibrationOptions`) every candidate is
    quantized with it: the search finds the smallest plan that the calibrated
    method brings under the target.

    Rule: the candidates (uniform 2…8 bits and the mixed recipes of
    :data:`SEARCH_MIXED`, with ``bits_for`` / ``keep`` applied; candidates whose
    plans are identical counted once) are measured in increasing order of their
    bits per weight, and the first that meets the target is the answer: every
    smaller candidate was measured and missed it. Mean KL does not always fall as
    bits grow (on plamo2-tiny mixed-3-6, 5.38 bits/weight, misses a target that
    uniform 4-bit, 5.30, meets), so no candidate is skipped by bisection. Cost: one
    trial quantization and one verify (KL only: no block comparison) per candidate
    up to the winner. ``QuantResult.search`` lists the rows; ``result`` is None when
    none meets the target (nothing is written) or with ``dry_run``. ``reference`` is
    computed once by the caller; each candidate's MLX model runs whole or one block at
    a time (``stream``: as ``verify_folder``)."""
    from dataclasses import replace as dc_replace

    from ..verify.run import verify_folder

    from ..mlx_lm_code import check_policy

    check_policy(mlx_lm_code)
    if not (isinstance(target_kl, (int, float)) and math.isfinite(target_kl) and target_kl > 0):
        raise UsageError(f"--target-kl {target_kl}: must be a positive number (a mean KL in nats, e.g. 0.02)")
    src = resolve(source, revision)
    if not dry_run:
        check_output_path(Path(out), force, src)  # fail before any work
    base = validate(4, group_size, "affine")
    conversion = plan(src, dtype)  # the same for every candidate: read the headers once
    plans = candidate_plans(conversion, base.group_size, bits_for, keep)
    # the KL only: block outputs would add a comparison (and maybe a second block stage) per candidate
    kl_reference = dc_replace(reference, hidden_files=None)
    explored: list[dict] = []

    def _write(qp, folder, tmp, allow: bool, force: bool = False, code: str = "auto"):
        if calibration is None:
            return write_quantized_output(qp, folder, tmp, allow_nonfinite=allow, force=force, mlx_lm_code=code)
        from .calibrate import write_calibrated_output

        return write_calibrated_output(qp, src, folder, tmp, calibration, allow_nonfinite=allow, force=force,
                                       mlx_lm_code=code)[0]

    parent = Path(out).resolve().parent
    workdir = Path(tempfile.mkdtemp(prefix="hybridconv-search-", dir=parent if parent.is_dir() else None))
    best = None
    try:
        for i, qp in enumerate(plans):
            interrupt.check()  # a safe point: between candidates
            folder = workdir / f"candidate-{i}"
            _write(qp, folder, prepare_output(folder, False, None), False)
            kl = verify_folder(folder, kl_reference, stream=stream).report["metrics"]["overall"]["kl_mean"]
            shutil.rmtree(folder, ignore_errors=True)
            row = {
                "plan": _plan_label(qp),
                "bits_per_weight": round(qp.bits_per_weight, 4),
                "kl_mean": kl,
                "meets_target": kl <= target_kl,
            }
            explored.append(row)
            if report:
                report(row)
            if row["meets_target"]:
                best = qp
                break
    finally:
        with interrupt.critical():
            shutil.rmtree(workdir, ignore_errors=True)
    result = QuantResult(best or plans[-1], None, explored)
    result.candidates = [{"plan": _plan_label(q), "bits_per_weight": round(q.bits_per_weight, 4)} for q in plans]
    if best is None or dry_run:
        return result
    tmp = prepare_output(Path(out), force, src)
    result.result = _write(best, Path(out), tmp, allow_nonfinite, force, mlx_lm_code)
    return result


def candidate_plans(conversion, group_size: int, bits_for=None, keep=None) -> list[QuantPlan]:
    """The --target-kl candidates for ``conversion``: uniform widths and mixed recipes,
    sorted by their bits per weight (ties: uniform first); candidates whose plans store
    every tensor alike (e.g. mixed-L-H of a model without sensitive roles, which is
    uniform L) are kept once."""
    candidates = [build_plan(conversion, validate(b, group_size, "affine"), "uniform", bits_for, keep)
                  for b in SEARCH_UNIFORM]
    candidates += [build_plan(conversion, validate(lo, group_size, "affine"), f"mixed-{lo}-{hi}", bits_for, keep)
                   for lo, hi in SEARCH_MIXED]
    seen, out = set(), []
    for qp in sorted(candidates, key=lambda q: (q.bits_per_weight, q.recipe != "uniform")):
        key = tuple((t.step.target, t.decision, t.spec) for t in qp.tensors)
        if key not in seen:
            seen.add(key)
            out.append(qp)
    return out


def _plan_label(qp: QuantPlan) -> str:
    if qp.recipe == "uniform":
        return f"uniform {qp.base.bits}-bit"
    return qp.recipe
