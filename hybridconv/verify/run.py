"""``verify``: compare a converted MLX folder with its PyTorch original.

Order of work (memory): the reference outputs are computed first and kept
(logits in memory, block outputs on disk), the torch model is freed, and only
then is the MLX model loaded; block outputs are compared one block at a time.

The same inputs, metrics and gates run once per *runtime*: hybridconv's own
model and, when asked, mlx-lm's model of the same folder (``mlx_lm.utils.
load_model``: what people who download the output run). Each runtime's model
is loaded after the previous one is freed. mlx-lm's result is one of pass,
fail (with its metrics), ``cannot load`` or ``cannot run`` (with mlx-lm's own
message); its models expose no block outputs, so its blocks are not compared.

The report (``verification.json``; schema ``hybridconv.verification/2``,
documented in the README) holds the tool and library versions, the source and
its revision, a hash of OUT's weights, the inputs, the thresholds, and per
runtime the metrics (overall and per sequence), the per-block table, the
decode check, every gate with its value and the runtime's verdict; the top
level repeats hybridconv's result and the overall verdict (hybridconv's, and
every runtime required with ``require``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__, blas, interrupt
from ..converters import layer_of
from ..errors import OutputError, UsageError
from ..hashing import weights_hash
from ..loading import WeightMismatchError, compute_path, load_config
from .gates import Gates, gates_for, precision_of
from .metrics import DECISIVE_GAP, MIN_DECISIVE, relative_error, summarise, token_stats
from .onepass import decode_check, own_block_errors, run_sequences
from .reference import Reference
from .streamed import Measurement

SCHEMA = "hybridconv.verification/2"
REPORT_NAME = "verification.json"
# Who runs OUT: hybridconv's own model (hybridconv.load) and mlx-lm's model of
# the same folder (mlx_lm.utils.load_model, what `mlx_lm.load` users get).
RUNTIMES = ("hybridconv", "mlx-lm")


def available_runtimes() -> tuple[str, ...]:
    """The runtimes installed here (mlx-lm is optional)."""
    import importlib.util

    return tuple(r for r in RUNTIMES if r == "hybridconv" or importlib.util.find_spec("mlx_lm") is not None)


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
    compute: str = "auto",
    runtimes: tuple[str, ...] | list[str] = ("hybridconv",),
    require: tuple[str, ...] | list[str] = (),
    stream: bool | None = None,
    max_memory: str | None = None,
) -> Outcome:
    """Compare ``out`` against a computed or loaded :class:`Reference`, once per
    runtime in ``runtimes`` (:data:`RUNTIMES`; the reference is computed once).

    The report's top level holds hybridconv's result (the conversion's verdict);
    ``report["runtimes"]`` holds every runtime's. The verdict is ``pass`` when
    hybridconv's runtime passes and so does every runtime in ``require``; another
    runtime failing is reported, not a failure."""
    runtimes = tuple(dict.fromkeys(runtimes))
    require = tuple(dict.fromkeys(require))
    bad = [r for r in (*runtimes, *require) if r not in RUNTIMES]
    if bad or not runtimes:
        raise UsageError(f"unknown runtime {', '.join(map(repr, bad)) or '(none)'}; expected one of {', '.join(RUNTIMES)}")
    missing = [r for r in require if r not in runtimes]
    if missing:
        raise UsageError(f"runtime {', '.join(missing)} is required but not run", "add it to the runtimes run (--runtime all)")
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
            "weights_hash": None,  # hashed beside the runs (below)
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
    # the logits per token: vocab_size, or fewer where the head is padded and cut
    # (Inkling's unpadded_vocab_size)
    vocab = config.get("unpadded_vocab_size") or config["vocab_size"]
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
    # whole model or one block at a time (the same decision for every runtime)
    plan = plan_mlx(out, config, reference, compute, activation_dtype, stream, max_memory)
    # The weights' hash reads every weight file (14 GB: ~25 s on the 7B benchmark);
    # hashlib releases the GIL, so it runs in a thread while the models run.
    import threading
    from concurrent.futures import ThreadPoolExecutor

    stop = threading.Event()
    hasher = ThreadPoolExecutor(max_workers=1)
    hashed = hasher.submit(weights_hash, out, stop.is_set)
    try:
        _run_runtimes(report, out, arch, config, reference, gates, decode_steps, progress, activation_dtype, top_k,
                      compute, runtimes, require, plan)
    except BaseException:
        stop.set()  # an interrupt or error: the hash stops at its next read
        raise
    finally:
        hasher.shutdown(wait=True)
    report["model"]["weights_hash"] = hashed.result()
    return Outcome(report)


def _run_runtimes(report, out, arch, config, reference, gates, decode_steps, progress, activation_dtype, top_k,
                  compute, runtimes, require, plan) -> None:
    """Every runtime's result, the verdict and the execution into ``report``."""
    if reference.execution:
        report["reference"]["execution"] = reference.execution
    results: dict = {}
    for name in runtimes:
        interrupt.check()
        say = (lambda msg, _n=name: progress(f"{_n}: {msg}")) if progress else None
        if name == "hybridconv":
            results[name] = _run_hybridconv(out, reference, gates, decode_steps, say, activation_dtype, top_k, compute,
                                            plan)
        elif plan["path"] == "streamed":
            results[name] = _not_run_larger_than_memory(plan)
        else:
            results[name] = _run_mlx_lm(out, arch, config, reference, gates, decode_steps, say, top_k,
                                        compute, activation_dtype)
    primary = "hybridconv" if "hybridconv" in results else runtimes[0]
    report["runtime"] = primary
    main = results[primary]
    for key in PRIMARY_KEYS:
        if key in main:
            report[key] = main[key]
    report["verdict"] = main["verdict"]
    report["failure_reasons"] = list(main["failure_reasons"])
    report["required_runtimes"] = list(require)
    for name in require:
        if name != primary and results[name]["verdict"] != "pass":
            r = results[name]
            why = "; ".join(r["failure_reasons"]) or r["verdict"]
            report["verdict"] = "fail"
            report["failure_reasons"].append(f"required runtime {name}: {r['verdict']}: {why}")
    report["runtimes"] = results
    from ..resources import peak_rss

    # how the MLX side ran (hybridconv's runtime: its seconds per part), and the
    # process's peak memory over the whole verification
    report["execution"] = {**(results.get("hybridconv", {}).get("execution") or plan), "peak_rss_bytes": peak_rss()}


# The keys of one runtime's result that are also written at the top level of
# the report for the primary runtime (hybridconv's, as in schema /1).
PRIMARY_KEYS = ("compute", "metrics", "blocks", "block_comparison", "block_note", "first_divergent_block", "decode", "checks", "skipped_gates")


def _arithmetic(out, reference, compute: str, activation_dtype) -> tuple[str, str, dict]:
    """(compute, upcast, the report's ``compute`` entry) for one runtime: the
    arithmetic (loading.compute_path: float32 for low-precision weights on the CPU)
    and the BLAS behind it. Weights are held in float32 only where this process
    already held the float32 model (a live float32 reference run whole): the peak
    memory stays the reference's."""
    compute = "native" if activation_dtype is not None and compute == "auto" else compute
    whole_ref = (reference.execution or {}).get("path", "whole-model") == "whole-model"
    upcast = "model" if reference.file is None and reference.dtype == "float32" and whole_ref else "layer"
    return compute, upcast, {**compute_path(out, compute, activation_dtype, upcast), "blas": blas.status()}


def plan_mlx(out, config, reference, compute: str = "auto", activation_dtype=None, stream: bool | None = None,
             max_memory: str | None = None) -> dict:
    """Whole-model or streamed for the MLX side of verify (``resources.choose_path``
    on :func:`.streamed.estimate_mlx`); refuses (exit 2) when the path taken cannot fit."""
    from ..resources import choose_path
    from .streamed import MLX_HINT, estimate_mlx

    _, upcast, entry = _arithmetic(out, reference, compute, activation_dtype)
    float32 = entry["path"] == "float32"
    whole, streamed = estimate_mlx(Path(out), config, float32, float32 and upcast == "model", reference)
    # A live reference that had to run one block at a time sets the memory budget of
    # the whole verification: the MLX side streams too (the peak stays the reference's).
    follow = stream is None and (reference.execution or {}).get("path") == "streamed"
    plan = choose_path("the MLX model", whole, streamed, True if follow else stream, max_memory, MLX_HINT)
    if follow:
        plan["reason"] = ("the PyTorch reference ran one block at a time, so does the MLX side "
                          f"(reference: {reference.execution['reason']})")
    return plan


def _run_hybridconv(out, reference, gates, decode_steps, progress, activation_dtype, top_k, compute="auto",
                    plan: dict | None = None) -> dict:
    import time

    from ..loading import load
    from ..resources import peak_rss
    from .streamed import measure_streamed

    head = {"runtime": "hybridconv", "version": __version__, "loader": "hybridconv.load"}
    streamed = plan is not None and plan["path"] == "streamed"
    seconds: dict = {}
    t = time.perf_counter()
    try:
        compute, upcast, head["compute"] = _arithmetic(out, reference, compute, activation_dtype)
        if streamed:
            head["compute"] = {**compute_path(out, compute, activation_dtype, "layer"), "blas": blas.status()}
            head["compute"]["weights"] = head["compute"]["weights"].replace(
                "upcast to float32 one layer at a time", "upcast to float32 once per block, while it runs")
        # streamed: every weight mapped lazily, each block read when its turn comes
        model = load(out, lazy=streamed, activation_dtype=activation_dtype, compute=compute,
                     upcast="layer" if streamed else upcast)
    except WeightMismatchError as exc:
        # A conversion that produced weights the model cannot even take is a failed
        # verification, localised to the block of the offending tensor.
        return {**head, "metrics": None, "blocks": [], "decode": None, "checks": [],
                "first_divergent_block": layer_of(exc.parameter), "verdict": "fail",
                "message": exc.message, "failure_reasons": [exc.message]}
    seconds["load"] = time.perf_counter() - t
    try:
        kinds = model.block_kinds()
        if streamed:
            def reopen():
                return load(out, lazy=True, activation_dtype=activation_dtype, compute=compute, upcast="layer")

            m = measure_streamed(model, reference, decode_steps, head["compute"]["path"] == "float32", progress,
                                 gates.max_block_error, reopen)
            seconds.update({k: seconds["load"] + v if k == "load" else v for k, v in m.seconds.items()})
        else:
            t = time.perf_counter()
            m = _measure_whole(model, kinds, reference, decode_steps, progress)
            seconds["forward_and_metrics"] = time.perf_counter() - t
            if callable(m.own):
                own = m.own

                def timed_own():
                    t1 = time.perf_counter()
                    try:
                        return own()
                    finally:
                        seconds["second_stage"] = time.perf_counter() - t1

                m.own = timed_own
        result = {**head, **_compare(model, kinds, reference, gates, decode_steps, progress, top_k, measured=m)}
    finally:
        del model
        _free()
    if plan is not None:
        result["execution"] = {**plan, "seconds": {k: round(v, 3) for k, v in seconds.items()},
                               "peak_rss_bytes": peak_rss()}
        if streamed and m.seconds_note:
            result["execution"]["second_stage"] = m.seconds_note
    return result


def _not_run_larger_than_memory(plan: dict) -> dict:
    """mlx-lm's result when the MLX side streams: mlx-lm loads a whole model (its
    runtime is not run block by block here), so it is not run, and says so."""
    import importlib.metadata as md

    try:
        version = md.version("mlx-lm")
    except md.PackageNotFoundError:
        version = None
    why = (f"larger than memory: the MLX side runs one block at a time ({plan['reason']}), and mlx-lm "
           "loads the whole model")
    return {"runtime": "mlx-lm", "version": version, "loader": "mlx_lm.utils.load_model", "metrics": None,
            "blocks": [], "decode": None, "checks": [], "first_divergent_block": None,
            "block_comparison": "not available: mlx-lm was not run", "verdict": "not run", "message": why,
            "failure_reasons": [f"not run: {why}"], "execution": plan}


def _run_mlx_lm(out, arch, config, reference, gates, decode_steps, progress, top_k, compute="auto",
                activation_dtype=None) -> dict:
    """mlx-lm's result on OUT: what ``mlx_lm.load`` users get, measured in a separate
    process that loads the folder as mlx-lm does (with trust_remote_code when it
    carries hybridconv's model): :mod:`.mlx_lm_runtime`. Any error mlx-lm raises is
    its verdict (``cannot load`` / ``cannot run``), never a failure of this command;
    its model runs on the same arithmetic as hybridconv's (``compute``)."""
    from .mlx_lm_runtime import run_mlx_lm

    return run_mlx_lm(out, arch, config, reference, gates, decode_steps, progress, top_k, compute,
                      activation_dtype, compare=_compare, arithmetic=_arithmetic)


def _free() -> None:
    import gc

    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


def _compare(model, kinds, reference: Reference, gates: Gates, decode_steps: int, progress, top_k,
             measured=None) -> dict:
    """One runtime's metrics, block table, decode check and gates against the
    reference. ``kinds``: the block kinds when the model reports block outputs
    (``hidden_states``), else None. ``measured``: a :class:`.streamed.Measurement`
    computed already (the streamed path), else the whole model runs here."""
    m = measured if measured is not None else _measure_whole(model, kinds, reference, decode_steps, progress)
    return _judge(m, kinds, reference, gates, decode_steps, progress, top_k)


def _measure_whole(model, kinds, reference: Reference, decode_steps: int, progress) -> Measurement:
    """The whole model's pass over the sequences (one MLX pass per sequence, sequences
    of one length batched); the second stage as a function, run only when needed."""
    import mlx.core as mx

    n_blocks = len(kinds) if kinds is not None else 0
    have_hidden = reference.hidden_files is not None and kinds is not None
    m = Measurement(sq_diff=np.zeros(n_blocks), sq_ref=np.zeros(n_blocks))
    runs = run_sequences(model, reference.sequences, decode_steps, have_hidden, reference.vocab_size,
                         reference.hidden(0, 0).shape[-1] if have_hidden else 0, n_blocks, batch=kinds is not None)
    for s, ids in enumerate(reference.sequences):
        interrupt.check()  # a safe point: between sequences
        if progress:
            progress(f"sequence {s + 1}/{len(reference.sequences)}")
        got, hidden, k = next(runs)  # prefill, then the decode check's steps through the caches
        if have_hidden:
            m.dtypes = [h.dtype for h in hidden]
            for b, h in enumerate(hidden):
                r = np.asarray(reference.hidden(s, b), dtype=np.float64)
                g = np.array(h[0].astype(mx.float32), dtype=np.float64)
                m.sq_diff[b] += float(((g - r) ** 2).sum())
                m.sq_ref[b] += float((r**2).sum())
            del hidden
        m.stats.append(token_stats(reference.outputs[s], got, ids))
        if k > 0:
            m.decode_rows.append(decode_check(got, ids, k, reference.outputs[s]))
            m.steps_run.append(k)
    if have_hidden:
        m.own = lambda: own_block_errors(model, reference.sequences, decode_steps, reference.hidden, m.dtypes)
    return m


def _judge(m: Measurement, kinds, reference: Reference, gates: Gates, decode_steps: int, progress, top_k) -> dict:
    """The report of one runtime from what its pass measured: metrics, block table
    (the second stage's own errors when a chained error exceeds the gate), decode
    check, gates and verdict."""
    report: dict = {}
    n_blocks = len(kinds) if kinds is not None else 0
    have_hidden = reference.hidden_files is not None and kinds is not None
    sq_diff, sq_ref = m.sq_diff, m.sq_ref
    stats, decode_rows = m.stats, m.decode_rows
    per_seq = [{"sequence": s, **summarise([st])} for s, st in enumerate(stats)]
    overall = summarise(stats)
    report["metrics"] = {"overall": overall, "per_sequence": per_seq}

    blocks, first, block_gate = [], None, None
    if have_hidden:
        chained = [relative_error(sq_diff[b], sq_ref[b]) for b in range(n_blocks)]
        own = None
        if max(chained, default=0.0) > gates.max_block_error:
            # Over the gate in the chained pass: run each block on the reference's
            # input to it, to tell one wrong block from noise accumulated through
            # correct ones (see onepass.own_block_errors).
            if callable(m.own):
                if progress:
                    progress("blocks on the reference's inputs")
                m.own = m.own()
            own = [relative_error(m.own[b], sq_ref[b]) for b in range(n_blocks)]
        for b in range(n_blocks):
            row = {"block": b, "kind": kinds[b], "relative_error": chained[b]}
            if own is not None:
                row["own_error"] = own[b]
            decisive = own[b] if own is not None else chained[b]
            diverged = bool(decisive > gates.max_block_error)
            if diverged and first is None:
                first = b
            blocks.append({**row, "threshold": gates.max_block_error, "diverged": diverged})
        block_gate = max(own if own is not None else chained, default=0.0)
        if own is not None and first is None:
            report["block_note"] = (
                f"the chained block outputs exceed {gates.max_block_error:g} (worst {max(chained):.3g}), but every "
                f"block run on the reference's input to it stays within it (worst {block_gate:.3g}): the error is "
                "noise accumulated through correct blocks, not one wrong block; the KL gates bound its effect on "
                "the logits"
            )
    report["blocks"] = blocks
    report["first_divergent_block"] = first
    report["block_comparison"] = (
        ("hidden states after every block; over the gate, each block also run on the reference's input to it "
         "(own_error), which decides the gate and the first divergent block") if have_hidden
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
    for gate, key, count, which in (
        ("min_top1", "top1_agreement_decisive", "decisive_tokens", "best two logits"),
        ("min_top5", "top5_overlap_decisive", "decisive_tokens_top5", "5th and 6th best logits"),
    ):
        if any(sk["gate"] == gate for sk in skipped):
            continue
        n = overall[count]
        if n < MIN_DECISIVE:
            skipped.append({"gate": gate, "reason": (
                f"only {n} token(s) where the reference's {which} differ by {DECISIVE_GAP} nats or more "
                f"(fewer than {MIN_DECISIVE}: a nearly uniform next-token distribution); ranks are noise "
                "there, and KL measures those tokens")})
        else:
            checks.append(_check(gate, overall[key], getattr(gates, gate), "min"))
    if skipped:
        report["skipped_gates"] = skipped
    if have_hidden:
        checks.append(_check("max_block_error", block_gate, gates.max_block_error, "max"))
    if decode_rows:
        worst_kl = max(r["kl_max"] for r in decode_rows)
        report["decode"] = {
            # what ran: a sequence of T tokens has at most T - 1 steps after its prefill
            "steps_per_sequence": max(m.steps_run),
            **({"requested_steps": decode_steps} if max(m.steps_run) != decode_steps else {}),
            "method": "each sequence's last steps run one token at a time through the caches after a cached prefill "
                      "of the rest: the same MLX pass gives the metrics' logits (one pass per sequence; sequences "
                      "of one length run as a batch)",
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
    return report


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
        expected = arch.block_width(config) if "hidden_size" in config else width
        if width != expected:
            raise UsageError(f"the reference's block outputs are {width} wide, {out}'s blocks output {expected}", hint)


def _short(kinds: list[str]) -> str:
    return ", ".join(kinds[:6]) + (", …" if len(kinds) > 6 else "")


def write_report(report: dict, path: Path) -> None:
    """Write a verification report as JSON, atomically (temporary file, then rename)."""
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
