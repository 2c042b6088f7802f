"""verify one block at a time (issue 21): the streamed PyTorch reference and the
streamed MLX side agree with the whole-model paths on every oracle case whose
architecture is registered (same verdict, logits and block errors within float32
noise, the same first divergent block on the deliberately broken conversions),
hold one block at a time, and keep verify's behaviour on interrupts and full disks.

The streamed paths are forced (``stream=True`` / ``--stream``) on the tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from hybridconv.checkpoint import resolve
from hybridconv.config import read_config
from hybridconv.convert import convert
from hybridconv.converters import lookup
from hybridconv.errors import HybridconvError, OutputError, UsageError
from hybridconv.verify.inputs import build_inputs
from hybridconv.verify.reference import compute_reference, read_reference_file, write_reference_file
from hybridconv.verify.run import verify_folder

from .conftest import FIXTURES, HYBRIDS, WAVE3

HC = [sys.executable, "-m", "hybridconv"]


def _registered(folder: Path) -> bool:
    try:
        lookup(read_config(folder))
        return True
    except HybridconvError:
        return False


def _cases() -> list[str]:
    """Every oracle case whose architecture the registry knows (new ones join as they are wired in)."""
    out = []
    for base, prefix in ((FIXTURES, ""), (HYBRIDS, "hybrids/"), (WAVE3, "wave3/")):
        if base.is_dir():
            out += [prefix + p.name for p in sorted(base.iterdir())
                    if (p / "expected.safetensors").is_file() and _registered(p)]
    return out


CASES = _cases()


def _vocab(folder: Path) -> int:
    raw = read_config(folder)  # a wrapper keeps it in its text config: the normalised one has it
    return lookup(raw).normalize_config(raw)["vocab_size"]


@lru_cache(maxsize=None)
def _inputs(case: str):
    src = resolve(str(FIXTURES / case))
    return src, build_inputs(src.path, _vocab(src.path), random_tokens=16, num_sequences=2, seed=1)


@pytest.fixture(scope="module")
def refs():
    """(whole-model, streamed) reference per case, computed when first asked."""
    cache: dict = {}

    def get(case):
        if case not in cache:
            src, inputs = _inputs(case)
            cache[case] = (compute_reference(src, inputs, stream=False), compute_reference(src, inputs, stream=True))
        return cache[case]

    return get


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cache: dict = {}

    def get(case, dtype="float32"):
        if (case, dtype) not in cache:
            out = tmp_path_factory.mktemp(case.replace("/", "-") + "-" + dtype) / "out"
            convert(str(FIXTURES / case), out, dtype=dtype)
            cache[case, dtype] = out
        return cache[case, dtype]

    return get


def test_cases_present():
    assert len(CASES) >= 20, CASES


def _close(a, b, rel=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max()) <= 1e-6 + rel * float(np.abs(a).max())


# Looped models call a block several times per forward: the streamed path refuses
# them, with that reason (also test_a_looped_model_is_refused); every other case agrees.
LOOPED_TYPES = {"inkling2_loop_text"}
PREFILL_DECODE_DIFFER = {"glm5_next"}


def _looped(case: str) -> bool:
    return lookup(read_config(FIXTURES / case)).model_type in LOOPED_TYPES


@pytest.mark.parametrize("case", CASES)
def test_streamed_reference_and_verify_agree_with_whole_model(refs, folders, case):
    if _looped(case):
        from hybridconv.verify.torch_stream import LoopedModelError

        src, inputs = _inputs(case)
        with pytest.raises(LoopedModelError, match="more than once"):
            compute_reference(src, inputs, stream=True)
        return
    whole, streamed = refs(case)
    assert whole.execution["path"] == "whole-model" and streamed.execution["path"] == "streamed"
    assert streamed.implementation == whole.implementation and streamed.block_kinds == whole.block_kinds
    for s in range(len(whole.sequences)):
        assert _close(whole.outputs[s]["logits"], streamed.outputs[s]["logits"]), (case, s)
        for b in range(whole.n_blocks):
            assert _close(whole.hidden(s, b), streamed.hidden(s, b)), (case, s, b)
    # the MLX side, each path on its own reference
    out = folders(case)
    # GLM-5-Next's tiny fixture: transformers' prefill and its own cached decode differ
    # at tied indexer scores, and so do hybridconv's (README, model notes): a float32
    # verify with decode steps fails on both paths alike; compared without them
    steps = 0 if lookup(read_config(FIXTURES / case)).model_type in PREFILL_DECODE_DIFFER else 4
    a = verify_folder(out, whole, stream=False, decode_steps=steps).report
    b = verify_folder(out, streamed, stream=True, decode_steps=steps).report
    assert a["execution"]["path"] == "whole-model" and b["execution"]["path"] == "streamed"
    assert a["verdict"] == b["verdict"] == "pass", (a["failure_reasons"], b["failure_reasons"])
    assert [x["kind"] for x in a["blocks"]] == [x["kind"] for x in b["blocks"]] == whole.block_kinds
    for x, y in zip(a["blocks"], b["blocks"]):
        assert abs(x["relative_error"] - y["relative_error"]) <= 1e-6, (case, x, y)
    oa, ob = a["metrics"]["overall"], b["metrics"]["overall"]
    assert oa["tokens"] == ob["tokens"] and ob["kl_mean"] < 1e-8 and ob["top1_agreement"] == oa["top1_agreement"]
    assert abs(oa["max_abs_logit_diff"] - ob["max_abs_logit_diff"]) <= 1e-4
    if steps:
        assert b["decode"]["steps_per_sequence"] == a["decode"]["steps_per_sequence"] == steps
        assert b["decode"]["kl_max"] < 1e-8
    else:
        assert a["decode"] is None and b["decode"] is None
    secs = b["execution"]["seconds"]
    assert set(secs) >= {"load", "blocks", "second_stage", "head_and_metrics"} and b["execution"]["peak_rss_bytes"] > 0
    assert b["reference"]["execution"]["path"] == "streamed"


@pytest.mark.parametrize("case,dtype", [("recurrent_gemma-tiny", "bfloat16"), ("hybrids/zamba2-tiny", "bfloat16"),
                                        ("hybrids/jamba-tiny", "bfloat16")])
def test_low_precision_folders_agree(refs, folders, case, dtype):
    """bf16 weights: the whole-model path holds them upcast to float32 after a live
    float32 reference; the streamed path upcasts one block at a time: same values."""
    whole, _ = refs(case)
    a = verify_folder(folders(case, dtype), whole, stream=False, decode_steps=4).report
    b = verify_folder(folders(case, dtype), whole, stream=True, decode_steps=4).report
    assert a["verdict"] == b["verdict"] == "pass"
    assert "once per block" in b["compute"]["weights"] and "held in float32" in a["compute"]["weights"]
    kla, klb = a["metrics"]["overall"]["kl_mean"], b["metrics"]["overall"]["kl_mean"]
    assert abs(kla - klb) <= 1e-3 * kla + 1e-12, (kla, klb)
    for x, y in zip(a["blocks"], b["blocks"]):
        assert abs(x["relative_error"] - y["relative_error"]) <= 1e-5


def test_second_stage_agrees(tmp_path):
    """A 4-bit model whose chained block errors exceed the gate (OLMo-Hybrid's tiny
    fixture: README): both paths report the same own errors, block note and verdict,
    the streamed one computing the second stage in the chained pass's batches."""
    from hybridconv.quant.run import quantize

    case = "hybrids/olmo_hybrid-tiny"
    src = resolve(str(FIXTURES / case))
    inputs = build_inputs(src.path, _vocab(src.path), random_tokens=48, num_sequences=2, seed=0)
    ref = compute_reference(src, inputs, stream=True)
    quantize(str(FIXTURES / case), tmp_path / "q4", bits=4)
    a = verify_folder(tmp_path / "q4", ref, stream=False).report
    b = verify_folder(tmp_path / "q4", ref, stream=True).report
    assert all("own_error" in x for x in a["blocks"]), a["blocks"]
    assert all("own_error" in x for x in b["blocks"])
    for x, y in zip(a["blocks"], b["blocks"]):
        assert abs(x["own_error"] - y["own_error"]) <= 1e-5 and abs(x["relative_error"] - y["relative_error"]) <= 1e-5
        assert x["diverged"] == y["diverged"]
    assert a["verdict"] == b["verdict"] and a["first_divergent_block"] == b["first_divergent_block"]
    assert ("block_note" in a) == ("block_note" in b)
    # the second stage ran in the chained pass's batches (one batch of both inputs)
    assert "in its batches" in b["execution"]["second_stage"], b["execution"]["second_stage"]
    assert abs(a["metrics"]["overall"]["kl_mean"] - b["metrics"]["overall"]["kl_mean"]) <= 1e-6


def test_streamed_verify_localises_broken_conversions(refs, folders, tmp_path):
    """The deliberately broken conversions of tests/test_verify.py: the streamed path
    fails each and names the same first divergent block."""
    from .test_verify import BROKEN, _break

    notes = []
    for name, (case, breaker, block) in sorted(BROKEN.items()):
        _, streamed = refs(case)
        broken = _break(folders(case), tmp_path / name, breaker)
        report = verify_folder(broken, streamed, stream=True, decode_steps=4).report
        assert report["verdict"] == "fail", name
        assert report["first_divergent_block"] == block, (name, report["blocks"])
        if report["blocks"]:  # (weights that do not fit the model fail before any block runs)
            assert all("own_error" in b for b in report["blocks"]), name
            notes.append(report["execution"]["second_stage"])
    # a wrong block after correct ones: its own error started the second stage, and the
    # blocks before it were read again for theirs
    assert any("read again" in n for n in notes), notes


def test_sequences_of_different_lengths(tmp_path):
    """Batches of one length and a sequence alone: the same as the whole model."""
    case = "hybrids/kimi_linear-tiny"
    src = resolve(str(FIXTURES / case))
    inputs = build_inputs(src.path, _vocab(src.path), random_tokens=20, num_sequences=2, seed=3)
    inputs.sequences.append(inputs.sequences[0][:13].copy())
    ref = compute_reference(src, inputs, stream=True)
    assert [len(s) for s in ref.sequences] == [20, 20, 13]
    convert(str(FIXTURES / case), tmp_path / "f32", dtype="float32")
    a = verify_folder(tmp_path / "f32", ref, stream=False).report
    b = verify_folder(tmp_path / "f32", ref, stream=True).report
    assert a["verdict"] == b["verdict"] == "pass"
    for x, y in zip(a["metrics"]["per_sequence"], b["metrics"]["per_sequence"]):
        assert x["tokens"] == y["tokens"] and abs(x["max_abs_logit_diff"] - y["max_abs_logit_diff"]) <= 1e-4


def test_reference_file_round_trip(refs, folders, tmp_path):
    """A streamed reference written as a file (tensor by tensor) and read back
    memory-mapped verifies as the live one does, on the streamed path too."""
    case = "plamo2-tiny"
    whole, streamed = refs(case)
    path = tmp_path / "ref.safetensors"
    write_reference_file(streamed, path, with_hidden=True)
    loaded = read_reference_file(path)
    assert isinstance(loaded.outputs[0]["logits"], np.memmap)
    assert np.array_equal(loaded.outputs[1]["logits"], np.asarray(streamed.outputs[1]["logits"]))
    assert np.array_equal(loaded.hidden(1, 3), streamed.hidden(1, 3))
    live = verify_folder(folders(case), whole, stream=False).report
    filed = verify_folder(folders(case), loaded, stream=True).report
    assert filed["verdict"] == "pass" and len(filed["blocks"]) == len(live["blocks"])
    assert abs(filed["metrics"]["overall"]["max_abs_logit_diff"] - live["metrics"]["overall"]["max_abs_logit_diff"]) <= 1e-4
    # the same file as safetensors' own reader sees it
    from safetensors.numpy import load_file

    t = load_file(str(path))
    assert t["logits"].shape == (2, 16, 320) and t["hidden.0"].shape == (2, 16, 64)
    assert np.array_equal(t["hidden.2"][0], whole.hidden(0, 2)) or _close(t["hidden.2"][0], whole.hidden(0, 2))


def test_one_block_resident_at_a_time():
    """The streamed reference holds one block's parameters at a time (and what is
    shared between blocks: Zamba2's shared transformer); the others stay on meta."""
    import torch

    from hybridconv.checkpoint import index_weights
    from hybridconv.verify.torch_stream import OutputStore, TransformersBlocks

    for case in ("hybrids/zamba2-tiny", "hybrids/qwen3_5_moe-tiny"):
        src, inputs = _inputs(case)
        cfg = lookup(read_config(src.path)).normalize_config(read_config(src.path))
        blocks = TransformersBlocks(src, index_weights(src.path), torch.float32, cfg["num_hidden_layers"])
        blocks.load_globals()
        shared = blocks.params[None]
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            store = OutputStore(Path(tmp))
            for b in range(blocks.n):
                blocks.load_block(b)
                for name, p in blocks.model.named_parameters(remove_duplicate=False):
                    g = blocks._group_of(name)
                    if name in shared or g is None:
                        continue
                    assert p.is_meta == (g != b), (case, b, name)
                blocks.run_block(b, 0, inputs.sequences[0], store)
                blocks.release_block(b)
            assert all(p.is_meta for n, p in blocks.model.named_parameters() if n not in shared)


def test_a_looped_model_is_refused():
    """A model that calls one block several times per forward (Inkling-2 loop) cannot
    run block by block: refused with that reason, not computed wrong."""
    import tempfile

    import torch

    from hybridconv.checkpoint import index_weights
    from hybridconv.verify.torch_stream import LoopedModelError, OutputStore, TransformersBlocks

    folder = WAVE3 / "inkling2_loop-tiny"
    if not folder.is_dir():
        pytest.fail(f"{folder} not found")
    cfg = json.loads((folder / "config.json").read_text())
    n = cfg.get("num_hidden_layers") or cfg["text_config"]["num_hidden_layers"]
    src = resolve(str(folder))
    blocks = TransformersBlocks(src, index_weights(src.path), torch.float32, n)
    blocks.load_globals()
    ids = np.arange(1, 9, dtype=np.int32)
    with tempfile.TemporaryDirectory() as tmp, pytest.raises(LoopedModelError, match="more than once"):
        store = OutputStore(Path(tmp))
        for b in range(n):
            blocks.load_block(b)
            blocks.run_block(b, 0, ids, store)
            blocks.release_block(b)
        blocks.logits(0, ids, store)


def test_path_choice_and_refusals(monkeypatch):
    """Whole-model when it fits in half the limit, streamed otherwise; refused only
    when the path taken cannot fit (--no-stream: the whole model)."""
    from hybridconv import resources

    src, inputs = _inputs("plamo2-tiny")
    from hybridconv.verify.reference import estimate_memory, estimate_streamed_memory, plan_reference

    whole, streamed = estimate_memory(src, inputs, "float32"), estimate_streamed_memory(src, inputs, "float32")
    assert plan_reference(src, inputs, max_memory=str(2 * whole + 10))["path"] == "whole-model"
    p = plan_reference(src, inputs, max_memory=str(max(whole, streamed) + 10))
    assert p["path"] == "streamed" and "one block at a time" in p["reason"]
    with pytest.raises(UsageError, match="one block at a time") as exc:
        plan_reference(src, inputs, max_memory=str(streamed // 2))
    assert "--ref-dtype bfloat16" in exc.value.hint
    with pytest.raises(UsageError, match="whole model") as exc:
        plan_reference(src, inputs, stream=False, max_memory=str(whole // 2))
    assert "drop --no-stream" in exc.value.hint
    assert plan_reference(src, inputs, stream=True)["reason"] == "asked for (--stream)"
    monkeypatch.setattr(resources, "available_memory", lambda: None)
    assert plan_reference(src, inputs)["path"] == "whole-model"


def test_cli_stream_and_mlx_lm_not_run(folders, tmp_path):
    case = "hybrids/mamba-tiny"
    out = folders(case)
    ref = tmp_path / "ref.safetensors"
    r = subprocess.run([*HC, "reference", FIXTURES / case, "-o", ref, "--stream", "--hidden-states",
                        "--random-tokens", "16"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "streamed" in r.stdout
    r = subprocess.run([*HC, "verify", out, "--reference-logits", ref, "--stream", "--runtime", "all",
                        "--json", tmp_path / "v.json", "--no-report"], capture_output=True, text=True,
                       env=dict(os.environ, COLUMNS="200"))
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((tmp_path / "v.json").read_text())
    assert rep["verdict"] == "pass" and rep["execution"]["path"] == "streamed"
    m = rep["runtimes"]["mlx-lm"]
    assert m["verdict"] == "not run" and m["failure_reasons"][0].startswith("not run: larger than memory")
    assert "mlx-lm not run" in r.stdout
    # required, mlx-lm not run is a failure, said so
    r = subprocess.run([*HC, "verify", out, "--reference-logits", ref, "--stream", "--runtime", "all",
                        "--require-runtime", "mlx-lm", "--no-report"], capture_output=True, text=True)
    assert r.returncode == 1 and "larger than memory" in r.stdout.replace("\n", " ")
    # --no-stream with too little memory: refused before work, exit 2, no traceback
    r = subprocess.run([*HC, "verify", out, "--reference", FIXTURES / case, "--no-stream", "--max-memory", "10KB",
                        "--no-report"], capture_output=True, text=True)
    assert r.returncode == 2 and "whole model" in r.stderr and "Traceback" not in r.stderr


def test_cli_chooses_streamed_for_a_model_larger_than_memory(folders, monkeypatch, capsys, tmp_path):
    """verify with no --stream / --no-stream, on a machine the whole models do not fit:
    both sides run one block at a time, and the report says why."""
    from hybridconv.verify import reference, streamed

    from .conftest import hc

    case = "hybrids/mamba-tiny"
    monkeypatch.setattr(reference, "estimate_memory", lambda *a: 10**15)
    real = streamed.estimate_mlx
    monkeypatch.setattr(streamed, "estimate_mlx", lambda *a: (10**15, real(*a)[1]))
    code, text = hc(monkeypatch, capsys, "verify", folders(case), "--reference", FIXTURES / case, "--random-tokens",
                    "16", "--runtime", "hybridconv", "--json", tmp_path / "a.json", "--no-report")
    assert code == 0, text
    rep = json.loads((tmp_path / "a.json").read_text())
    assert rep["reference"]["execution"]["path"] == "streamed" and rep["execution"]["path"] == "streamed"
    assert "the whole model needs about 1000000.0 GB" in rep["reference"]["execution"]["reason"]
    # the reference streamed: the MLX side keeps to its memory
    assert rep["execution"]["reason"].startswith("the PyTorch reference ran one block at a time")
    assert "reference run │ streamed (the whole model needs about" in text
    assert "MLX run │ streamed (the PyTorch reference ran one block at a time" in text
    # from a file, the MLX side decides on its own estimate
    ref = tmp_path / "ref.safetensors"
    code, text = hc(monkeypatch, capsys, "reference", FIXTURES / case, "-o", ref, "--random-tokens", "16",
                    "--hidden-states")
    assert code == 0, text
    code, text = hc(monkeypatch, capsys, "verify", folders(case), "--reference-logits", ref, "--runtime",
                    "hybridconv", "--json", tmp_path / "b.json", "--no-report")
    assert code == 0, text
    rep = json.loads((tmp_path / "b.json").read_text())
    assert rep["execution"]["path"] == "streamed" and "the whole model needs about" in rep["execution"]["reason"]


def test_full_temporary_disk_is_exit_3(monkeypatch, tmp_path):
    import errno

    from hybridconv.verify import torch_stream

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    calls = {"n": 0}
    real = torch_stream.OutputStore._save

    def full(self, t, stem):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, t, stem)

    monkeypatch.setattr(torch_stream.OutputStore, "_save", full)
    src, inputs = _inputs("hybrids/bamba-tiny")
    with pytest.raises(OutputError, match="(?i)no space left") as exc:
        compute_reference(src, inputs, stream=True)
    assert exc.value.exit_code == 3 and str(tmp_path) in exc.value.message and "needs about" in exc.value.message
    assert "TMPDIR" in exc.value.hint
    assert list(tmp_path.iterdir()) == []  # the temporary outputs are gone


@pytest.mark.parametrize("sig,code", [(15, 143), (2, 130)])
def test_signal_during_streamed_verify_leaves_no_temporary_files(folders, tmp_path, sig, code):
    import time

    from .test_hardening import _default_signals, _digest

    case = "plamo2-tiny"
    out = folders(case)
    before = _digest(out)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = dict(os.environ, TMPDIR=str(tmpdir))
    proc = subprocess.Popen([*HC, "verify", out, "--reference", FIXTURES / case, "--stream", "--random-tokens", "64",
                             "--num-sequences", "200"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=_default_signals)
    deadline = time.time() + 120
    # inside the block loop: the first block's outputs are written
    while time.time() < deadline and not list(tmpdir.glob("hybridconv-ref-*/seq1-block0.npy")) and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "verify finished before it could be interrupted"
    t = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert time.time() - t < 10, "the signal was acted on late"
    assert "Traceback" not in err
    assert list(tmpdir.iterdir()) == []
    assert _digest(out) == before


@pytest.mark.parametrize("case", ["hybrids/falcon_h1-tiny", "hybrids/qwen3_next-tiny"])
def test_untied_head_in_vocabulary_slices(refs, monkeypatch, case):
    """A large untied head is never held whole: read in vocabulary slices when the
    logits are computed (forced here with a tiny slice size), with the same logits
    (Falcon-H1 also scales its logits after the head)."""
    from hybridconv.verify import torch_stream

    monkeypatch.setattr(torch_stream, "HEAD_SLICE_BYTES", 1000)  # a few rows per slice
    reads = []
    real = torch_stream.read_source_tensor
    monkeypatch.setattr(torch_stream, "read_source_tensor",
                        lambda info, rows=None: reads.append((info.name, rows)) or real(info, rows))
    whole, _ = refs(case)
    src, inputs = _inputs(case)
    sliced = compute_reference(src, inputs, stream=True)
    head = [r for name, r in reads if name == "lm_head.weight"]
    assert len(head) > 2 and all(r is not None for r in head), head[:3]
    for s in range(2):
        assert _close(whole.outputs[s]["logits"], sliced.outputs[s]["logits"])


def test_sliced_head_equals_whole_head(monkeypatch, tmp_path):
    """On the float32 path a large head runs in vocabulary slices (each slice upcast or
    dequantized when used): the same logits as the model's own head, tied (bf16 and
    4-bit embedding) and untied; and the streamed verify with slices agrees with the
    whole-model verify."""
    import mlx.core as mx

    from hybridconv.loading import load
    from hybridconv.quant.run import quantize
    from hybridconv.verify import streamed

    monkeypatch.setattr(streamed, "HEAD_SLICE_BYTES", 4096)
    seen = 0
    for case, bits in [("recurrent_gemma-tiny", None), ("recurrent_gemma-tiny", 4), ("hybrids/nemotron_h-tiny", None)]:
        out = tmp_path / f"{case.replace('/', '-')}-{bits}"
        if bits:
            quantize(str(FIXTURES / case), out, bits=bits)
        else:
            convert(str(FIXTURES / case), out, dtype="bfloat16")
        model = load(out, lazy=True, compute="float32")
        proj = streamed._head_matrix(model)
        assert proj is not None and proj["weight"].shape[0] * model.args.hidden_size * 4 > 4096, case
        h = mx.random.normal((2, 5, model.args.hidden_size), key=mx.random.key(0))
        want = model.head(h, mx.float32)
        got = streamed._head(model, h, mx.float32, True)
        assert got.shape == want.shape and mx.allclose(got, want, rtol=1e-5, atol=1e-5).item(), case
        seen += model.tied
    assert seen >= 1  # (at least one tied head among the cases)
    src = resolve(str(FIXTURES / "recurrent_gemma-tiny"))
    inputs = build_inputs(src.path, _vocab(src.path), random_tokens=24, num_sequences=2, seed=0)
    ref = compute_reference(src, inputs, stream=True)
    q = tmp_path / "recurrent_gemma-tiny-4"
    a = verify_folder(q, ref, stream=False, decode_steps=4).report
    b = verify_folder(q, ref, stream=True, decode_steps=4).report
    assert a["verdict"] == b["verdict"]
    assert abs(a["metrics"]["overall"]["kl_mean"] - b["metrics"]["overall"]["kl_mean"]) <= 1e-6 + 1e-4 * a["metrics"]["overall"]["kl_mean"]
    assert abs(a["metrics"]["overall"]["max_abs_logit_diff"] - b["metrics"]["overall"]["max_abs_logit_diff"]) <= 1e-4
