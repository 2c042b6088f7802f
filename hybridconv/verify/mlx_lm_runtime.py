"""verify's mlx-lm runtime: what people who run OUT with mlx-lm get.

The folder is loaded as mlx-lm loads it (``mlx_lm.utils.load_model``: what
``mlx_lm.load``, ``mlx_lm.generate``, ``mlx_lm.server`` call) in a separate
process that cannot import hybridconv's model code (:mod:`.mlx_lm_worker`),
with ``trust_remote_code`` when the folder carries hybridconv's model
(``config.json``'s ``model_file``, :mod:`hybridconv.mlx_lm_code`): then mlx-lm
runs that file, the way a user who passes ``--trust-remote-code`` does.
Otherwise mlx-lm's built-in model runs. The worker computes the logits of
verify's sequences (cached prefill, then single steps, as for hybridconv's
runtime) through mlx-lm's own caches; this process compares them with the
reference under the same metrics and gates (verify.run's comparison).

Before a carried file is executed its sha256 is checked against the one
``conversion.json`` recorded when hybridconv wrote it: a changed file is not
run (verdict ``not run``), as ``upload`` refuses it.

The result records ``trust_remote_code``, the model code that ran
(``model_code``: the carried file and its sha256, or mlx-lm's module) and the
process it ran in; the model card's Runtimes table and usage snippet come from it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .. import interrupt
from ..mlx_lm_code import carried_code

WORKER = Path(__file__).with_name("mlx_lm_worker.py")
PROCESS = ("a separate Python process in which hybridconv's model code cannot be imported "
           "(hybridconv.models, .converters, .loading blocked)")


class _Replay:
    """mlx-lm's logits, computed by the worker, behind the interface verify's
    comparison calls (``make_cache``, ``model(ids, cache=...)``): each call gets
    the rows of the sequence it feeds, in order."""

    def __init__(self, sequences: list[np.ndarray], logits: list[np.ndarray]):
        self.sequences, self.logits = sequences, logits
        self.used: set[int] = set()

    def make_cache(self):
        return {"seq": None, "pos": 0}

    def _find(self, ids: np.ndarray, full: bool) -> int:
        for s, seq in enumerate(self.sequences):
            if s in self.used:
                continue
            if (len(seq) == len(ids) if full else len(seq) >= len(ids)) and np.array_equal(seq[: len(ids)], ids):
                self.used.add(s)
                return s
        raise RuntimeError("the mlx-lm runtime was asked for a sequence it did not compute")

    def __call__(self, inputs, cache=None, hidden_states=None):
        import mlx.core as mx

        ids = np.array(inputs)
        if ids.shape[0] != 1:
            raise RuntimeError("the mlx-lm runtime computes one sequence at a time")
        ids = ids[0]
        if cache is None:
            return mx.array(self.logits[self._find(ids, True)][None])
        if cache["seq"] is None:
            cache["seq"] = self._find(ids, False)
        p = cache["pos"]
        cache["pos"] = p + len(ids)
        return mx.array(self.logits[cache["seq"]][p: p + len(ids)][None])


def run_mlx_lm(out, arch, config, reference, gates, decode_steps, progress, top_k, compute, activation_dtype,
               compare, arithmetic) -> dict:
    """mlx-lm's result on OUT (verify.run's runtime result dict). ``compare`` and
    ``arithmetic`` are verify.run's comparison and arithmetic choice."""
    import importlib.metadata as md

    from ..converters.registry import MlxLm

    out = Path(out)
    try:
        version = md.version("mlx-lm")
    except md.PackageNotFoundError:
        version = None
    code = carried_code(out)
    if code is not None:
        support = MlxLm("computes", f"the folder carries hybridconv's model ({code['file']}), which mlx-lm runs "
                                    "with trust_remote_code", None)
    else:
        support = arch.mlx_lm_support(config)
    head = {"runtime": "mlx-lm", "version": version, "loader": "mlx_lm.utils.load_model",
            "trust_remote_code": code is not None, "process": PROCESS,
            "expected": {"status": support.status, "reason": support.reason, "measured_with": support.measured_with}}
    if code is not None:
        head["model_code"] = {"source": "carried", **code}
    empty = {"metrics": None, "blocks": [], "decode": None, "checks": [], "first_divergent_block": None,
             "block_comparison": "not available: mlx-lm's models expose no per-block outputs"}
    if version is None:
        return {**head, **empty, "verdict": "not run", "message": "mlx-lm is not installed",
                "failure_reasons": ["mlx-lm is not installed"]}
    if code is not None and not code["matches"]:
        why = (f"{code['file']} is not the file hybridconv wrote (sha256 {code['sha256']}, conversion.json records "
               f"{code['recorded']}): not executed")
        return {**head, **empty, "verdict": "not run", "message": why, "failure_reasons": [why]}
    compute_name, upcast, head["compute"] = arithmetic(out, reference, compute, activation_dtype)
    work = Path(tempfile.mkdtemp(prefix="hybridconv-mlx-lm-"))
    try:
        result = _run_worker(out, work, reference, decode_steps, head["compute"]["path"], upcast, code is not None,
                             progress)
        if not result.get("ok"):
            verdict = "cannot load" if result.get("stage") == "load" else "cannot run"
            msg = result.get("message") or "the mlx-lm process failed"
            what = "cannot load" if verdict == "cannot load" else "loads but fails computing"
            return {**head, **empty, "verdict": verdict, "message": msg,
                    "failure_reasons": [f"mlx-lm {what} {out.name}: {msg}"]}
        head["model_code"] = head.get("model_code") or {"source": "mlx-lm", "class": result.get("model_class")}
        head["model_code"]["class"] = result.get("model_class")
        head["model_code"]["ran"] = "carried file" if result.get("carried_code_ran") else "mlx-lm's built-in model"
        head["hybridconv_modules_in_process"] = result.get("hybridconv_modules", [])
        logits = [np.load(work / f"logits-{s}.npy", mmap_mode="r") for s in range(len(reference.sequences))]
        res = compare(_Replay(list(reference.sequences), logits), None, reference, gates, decode_steps, None, top_k)
        del logits
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["block_comparison"] = empty["block_comparison"]
    if res["verdict"] == "pass" and support.status == "differs":
        # a lossy precision's gates can hide a different function: say so
        res["note"] = ("passes this precision's gates, but mlx-lm computes another function than the "
                       f"reference: {support.reason}")
    return {**head, **res}


def _run_worker(out: Path, work: Path, reference, decode_steps: int, compute: str, upcast: str, trust: bool,
                progress) -> dict:
    for s, ids in enumerate(reference.sequences):
        np.save(work / f"ids-{s}.npy", np.asarray(ids, dtype=np.int32))
    request = {"folder": str(out.resolve()), "trust_remote_code": trust, "compute": compute, "upcast": upcast,
               "decode_steps": decode_steps, "sequences": len(reference.sequences),
               "hybridconv_path": str(Path(__file__).resolve().parents[2])}
    (work / "request.json").write_text(json.dumps(request))
    with open(work / "stderr.txt", "w") as err:  # a file, not a pipe: mlx-lm's warnings cannot block it
        proc = subprocess.Popen([sys.executable, str(WORKER), str(work)], stdout=subprocess.PIPE, stderr=err,
                                text=True, env=dict(os.environ))
        try:
            for line in proc.stdout:
                if progress and line.strip():
                    progress(line.strip())
            proc.wait()
        finally:
            if proc.poll() is None:  # interrupted here: the worker goes too
                proc.kill()
                proc.wait()
    interrupt.check()
    try:
        return json.loads((work / "result.json").read_text())
    except (OSError, ValueError):
        tail = " ".join((work / "stderr.txt").read_text(errors="replace").split())[-500:]
        return {"ok": False, "stage": "run", "message": f"the mlx-lm process exited with code {proc.returncode}: {tail}"}
