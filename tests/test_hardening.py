"""Bad input, faults and trust: every case exits with a documented code and a
message naming the file/tensor/key, without a traceback, leaving the source
untouched and no output that looks complete. (The README's table lists them.)"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

HC = [sys.executable, "-m", "hybridconv"]


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _copy(fixtures_dir: Path, case: str, dst: Path) -> Path:
    shutil.copytree(fixtures_dir / case, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    (dst / "expected.safetensors").unlink()
    (dst / "oracle.json").unlink()
    return dst


def _header(tensors: dict, data: bytes) -> bytes:
    raw = json.dumps(tensors).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _edit_config(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    for k, v in changes.items():
        if v is _DEL:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (src / "config.json").write_text(json.dumps(cfg))


_DEL = object()


def _edit_weights(src, fn):
    t = load_file(str(src / "model.safetensors"))
    fn(t)
    save_file(t, str(src / "model.safetensors"))


def _split_into_shards(src, index_fn=None):
    t = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    names = sorted(t)
    a, b = names[: len(names) // 2], names[len(names) // 2 :]
    save_file({k: t[k] for k in a}, str(src / "model-00001-of-00002.safetensors"))
    save_file({k: t[k] for k in b}, str(src / "model-00002-of-00002.safetensors"))
    wm = {k: "model-00001-of-00002.safetensors" for k in a} | {k: "model-00002-of-00002.safetensors" for k in b}
    index = {"metadata": {}, "weight_map": wm}
    if index_fn:
        index_fn(index, src)
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


def _duplicate_into_first(index, folder):
    """Put a tensor of the second shard into the first one as well."""
    first, second = (folder / f"model-0000{i}-of-00002.safetensors" for i in (1, 2))
    other = load_file(str(second))
    name = sorted(other)[0]
    save_file({**load_file(str(first)), name: other[name]}, str(first))


def _raw(src, data: bytes):
    (src / "model.safetensors").write_bytes(data)


PLAMO, RG = "plamo2-tiny", "recurrent_gemma-tiny"
F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

CASES = {
    # safetensors
    "st-truncated": (PLAMO, lambda s: _raw(s, b"abc"), 2, "truncated"),
    "st-header-past-end": (PLAMO, lambda s: _raw(s, struct.pack("<Q", 10**6) + b"{}"), 2, "runs past the end"),
    "st-header-not-json": (PLAMO, lambda s: _raw(s, struct.pack("<Q", 5) + b"{nope"), 2, "not valid JSON"),
    "st-offsets-out-of-range": (PLAMO, lambda s: _raw(s, _header({"a": {**F32, "data_offsets": [0, 8000]}}, b"\0" * 8)), 2, "outside the data section"),
    "st-offsets-overlap": (PLAMO, lambda s: _raw(s, _header({"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, b"\0" * 12)), 2, "overlap"),
    "st-unknown-dtype": (PLAMO, lambda s: _raw(s, _header({"a": {**F32, "dtype": "F7"}}, b"\0" * 8)), 2, "unknown dtype 'F7'"),
    "st-shape-mismatch": (PLAMO, lambda s: _raw(s, _header({"a": {**F32, "shape": [3]}}, b"\0" * 8)), 2, "needs 12 bytes"),
    "st-data-truncated": (PLAMO, lambda s: _raw(s, (s / "model.safetensors").read_bytes()[:-100]), 2, "outside the data section"),
    # index
    "idx-shard-missing": (RG, lambda s: _split_into_shards(s, lambda i, d: (d / "model-00002-of-00002.safetensors").unlink()), 2, "which is missing"),
    "idx-tensor-absent": (RG, lambda s: _split_into_shards(s, lambda i, d: i["weight_map"].__setitem__("model.ghost.weight", "model-00001-of-00002.safetensors")), 2, "'model.ghost.weight'"),
    "idx-tensor-in-two-shards": (RG, lambda s: _split_into_shards(s, _duplicate_into_first), 2, "is stored twice"),
    "idx-traversal-dotdot": (RG, lambda s: _split_into_shards(s, lambda i, d: i["weight_map"].__setitem__("model.final_norm.weight", "../x.safetensors")), 2, "not a plain file name"),
    "idx-traversal-absolute": (RG, lambda s: _split_into_shards(s, lambda i, d: i["weight_map"].__setitem__("model.final_norm.weight", "/etc/passwd")), 2, "not a plain file name"),
    "idx-traversal-separator": (RG, lambda s: _split_into_shards(s, lambda i, d: i["weight_map"].__setitem__("model.final_norm.weight", "sub/x.safetensors")), 2, "not a plain file name"),
    "idx-not-json": (RG, lambda s: (s / "model.safetensors.index.json").write_text("{oops"), 2, "not a valid index"),
    # config
    "cfg-missing": (PLAMO, lambda s: (s / "config.json").unlink(), 2, "config.json: not found"),
    "cfg-not-json": (PLAMO, lambda s: (s / "config.json").write_text("{'single': quotes}"), 2, "not valid JSON"),
    "cfg-unknown-arch": (PLAMO, lambda s: _edit_config(s, model_type="llama", architectures=["LlamaForCausalLM"]), 2, "plamo2 (Plamo2ForCausalLM)"),
    "cfg-missing-field": (PLAMO, lambda s: _edit_config(s, mamba_d_state=_DEL), 2, "'mamba_d_state' is missing"),
    "cfg-wrong-type": (RG, lambda s: _edit_config(s, hidden_size="64"), 2, "'hidden_size' must be an integer"),
    "cfg-shape-inconsistent": (RG, lambda s: _edit_config(s, lru_width=128, num_attention_heads=4), 2, "the config implies [128]"),
    "cfg-unknown-block-type": (RG, lambda s: _edit_config(s, block_types=["recurrent", "mamba"]), 2, "allowed: recurrent, attention"),
    "cfg-layer-count": (RG, lambda s: _edit_config(s, num_hidden_layers=2), 2, "num_hidden_layers = 2"),
    "cfg-conv-width": (PLAMO, lambda s: _edit_config(s, mamba_d_conv=3), 2, "neither the PyTorch conv1d layout"),
    # weights
    "w-nan": (PLAMO, lambda s: _edit_weights(s, lambda t: t["model.layers.layers.1.mlp.down_proj.weight"].__setitem__((0, 0), np.nan)), 2, "model.layers.layers.1.mlp.down_proj.weight"),
    "w-inf-in-ssm": (PLAMO, lambda s: _edit_weights(s, lambda t: t["model.layers.layers.0.mixer.A_log"].__setitem__(1, np.inf)), 2, "model.layers.layers.0.mixer.A_log"),
    "w-extra-tensor": (RG, lambda s: _edit_weights(s, lambda t: t.__setitem__("model.bonus.weight", np.zeros(4, np.float32))), 2, "model.bonus.weight"),
    "w-missing-tensor": (RG, lambda s: _edit_weights(s, lambda t: t.pop("model.layers.1.temporal_block.rg_lru.recurrent_param")), 2, "rg_lru.recurrent_param"),
    # untrusted code
    "pickle-only": (PLAMO, lambda s: _to_pickle(s), 2, "--allow-pickle"),
}


def _to_pickle(src: Path):
    import torch

    t = load_file(str(src / "model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in t.items()}, src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(fixtures_dir, tmp_path, name):
    case, mutate, code, needle = CASES[name]
    src = _copy(fixtures_dir, case, tmp_path / "src")
    mutate(src)
    before = _digest(src)
    out = tmp_path / "out"
    r = subprocess.run([*HC, "convert", src, "-o", out], capture_output=True, text=True)
    assert r.returncode == code, (r.stdout, r.stderr)
    assert needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert _digest(src) == before  # the source is never modified
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no partial
    if name.startswith("w-nan"):
        ok = subprocess.run([*HC, "convert", src, "-o", out, "--allow-nonfinite"], capture_output=True, text=True)
        assert ok.returncode == 0, ok.stderr


def test_allow_pickle_loads_tensors_only(fixtures_dir, tmp_path):
    src = _copy(fixtures_dir, PLAMO, tmp_path / "src")
    _to_pickle(src)
    r = subprocess.run([*HC, "convert", src, "-o", tmp_path / "out", "--allow-pickle", "--dtype", "float32"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import mlx.core as mx

    import hybridconv

    exp = mx.load(str(fixtures_dir / PLAMO / "expected.safetensors"))
    got = np.array(hybridconv.load(tmp_path / "out")(exp["input_ids"]))
    assert np.abs(got - np.array(exp["logits"])).max() < 1e-4


def test_malicious_pickle_never_runs(fixtures_dir, tmp_path):
    src = _copy(fixtures_dir, PLAMO, tmp_path / "src")
    (src / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    with open(src / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Evil()}, f)
    r = subprocess.run([*HC, "convert", src, "-o", tmp_path / "out", "--allow-pickle"], capture_output=True, text=True)
    assert r.returncode == 2 and "weights_only" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_output_parent_is_a_file_exit_3(fixtures_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    r = subprocess.run([*HC, "convert", fixtures_dir / PLAMO, "-o", tmp_path / "file" / "out"], capture_output=True, text=True)
    assert r.returncode == 3 and "Traceback" not in r.stderr


def test_disk_full_leaves_nothing(fixtures_dir, tmp_path, monkeypatch):
    import errno

    import hybridconv.convert as conv
    from hybridconv.errors import OutputError

    calls = {"n": 0}
    real = conv.write_all

    def flaky(f, data):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)

    monkeypatch.setattr(conv, "write_all", flaky)
    with pytest.raises(OutputError, match="No space left on device") as exc:
        conv.convert(str(fixtures_dir / PLAMO), tmp_path / "out", dtype="bfloat16")
    assert exc.value.exit_code == 3
    assert list(tmp_path.iterdir()) == []


def test_stale_partial_from_a_killed_run_is_removed(fixtures_dir, tmp_path):
    stale = tmp_path / ".out.partial-999999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    r = subprocess.run([*HC, "convert", fixtures_dir / PLAMO, "-o", tmp_path / "out"], capture_output=True, text=True)
    assert r.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_memory_guard(fixtures_dir, tmp_path):
    r = subprocess.run([*HC, "reference", fixtures_dir / PLAMO, "-o", tmp_path / "r.safetensors", "--max-memory", "100KB"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "needs about" in r.stderr and "--ref-dtype bfloat16" in r.stderr
    assert not (tmp_path / "r.safetensors").exists()
    r = subprocess.run([*HC, "reference", fixtures_dir / PLAMO, "-o", tmp_path / "r.safetensors", "--max-memory", "lots"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "expected a size" in r.stderr


def test_quantize_and_verify_refuse_bad_input_the_same_way(fixtures_dir, tmp_path):
    src = _copy(fixtures_dir, RG, tmp_path / "src")
    _edit_config(src, block_types=["recurrent", "mamba"])
    for args in (["quantize", src, "-o", tmp_path / "q"], ["inspect", src],
                 ["verify", src, "--reference", src]):
        r = subprocess.run([*HC, *map(str, args)], capture_output=True, text=True)
        assert r.returncode == 2 and "allowed: recurrent, attention" in r.stderr and "Traceback" not in r.stderr, args


@pytest.mark.parametrize("sig,code", [(15, 143), (2, 130)])
def test_signal_during_verify_leaves_no_temporary_files(fixtures_dir, tmp_path, sig, code):
    import time

    from hybridconv.convert import convert

    out = tmp_path / "out"
    convert(str(fixtures_dir / PLAMO), out, dtype="float32")
    before = _digest(out)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = dict(os.environ, TMPDIR=str(tmpdir))
    # Many short sequences: the reference loop runs for seconds, each step is quick.
    proc = subprocess.Popen([*HC, "verify", out, "--reference", fixtures_dir / PLAMO, "--random-tokens", "64",
                             "--num-sequences", "400"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_default_signals)
    deadline = time.time() + 60
    # Wait until the reference is inside its loop (its first output is written): the
    # handlers are installed by then. Wherever the signal lands, it is acted on at the
    # next safe point (hybridconv.interrupt), never inside np.save or a finalizer.
    while time.time() < deadline and not list(tmpdir.glob("hybridconv-ref-*/seq0-logits.npy")) and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "verify finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert list(tmpdir.iterdir()) == []  # reference outputs removed
    assert _digest(out) == before  # no report, no partial report


def _default_signals():
    """In the child: SIGINT and SIGTERM at their defaults, even when the test runner
    itself runs as a background job (which inherits SIGINT ignored)."""
    import signal as _signal

    for sig in (_signal.SIGINT, _signal.SIGTERM):
        _signal.signal(sig, _signal.SIG_DFL)
