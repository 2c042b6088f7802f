"""The command line: exit codes, plain errors without tracebacks, JSON output,
and no torch at start-up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hybridconv.errors import EXIT_BAD_INPUT

REPO = Path(__file__).resolve().parents[1]
HC = [sys.executable, "-m", "hybridconv"]


def run(*args, env=None, **kw):
    e = dict(os.environ)
    e.pop("HYBRIDCONV_DEBUG", None)
    e.update(env or {})
    return subprocess.run([*HC, *map(str, args)], capture_output=True, text=True, env=e, **kw)


def test_cli_import_does_not_load_torch():
    code = "import sys, hybridconv.cli, hybridconv.convert, hybridconv.inspect; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False"


def test_help_documents_exit_codes():
    out = run("--help")
    assert out.returncode == 0
    assert "Exit codes" in out.stdout and "130" in out.stdout
    out = run("convert", "--help")
    assert "--dtype" in out.stdout and "--force" in out.stdout and "--revision" in out.stdout


def test_convert_then_inspect_json(fixtures_dir, tmp_path):
    out = tmp_path / "out"
    r = run("convert", fixtures_dir / "recurrent_gemma-tiny", "-o", out, "--dtype", "float16")
    assert r.returncode == 0, r.stderr
    assert "converted" in r.stdout and "conv1d-to-mlx" in r.stdout
    r = run("inspect", fixtures_dir / "recurrent_gemma-tiny", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert [l["kind"] for l in info["layers"]] == ["recurrent", "recurrent", "attention"]
    assert info["layers"][2]["window"] == 16
    conv = next(x for x in info["rules"] if x["rule"] == "conv1d-to-mlx")
    assert conv["matches"] == 2 and conv["changes"] == 2
    assert info["estimated_output_bytes"]["float32"] > info["estimated_output_bytes"]["bfloat16"]
    assert info["estimated_output_bytes"]["8-bit"] > info["estimated_output_bytes"]["4-bit"]
    assert info["parameters"] > 0


def test_inspect_plamo_schedule(fixtures_dir):
    info = json.loads(run("inspect", fixtures_dir / "plamo2-tiny-untied", "--json").stdout)
    assert [l["kind"] for l in info["layers"]] == ["mamba", "mamba", "attention"]
    keep = next(x for x in info["rules"] if x["rule"] == "keep-float32")
    assert keep["matches"] == 6  # A_log, D, dt_bias in two Mamba layers


@pytest.mark.parametrize(
    "args,needle",
    [
        (["convert", "no/such/path/x", "-o", "{tmp}/o"], "no such folder"),
        (["convert", "{fixture}/config.json", "-o", "{tmp}/o"], "is a file"),
        (["inspect", "{tmp}"], "config.json: not found"),
        (["convert", "{fixture}", "-o", "{tmp}/o", "--dtype", "int8"], "int8"),
    ],
)
def test_bad_usage_exit_2_without_traceback(fixtures_dir, tmp_path, args, needle):
    fixture = fixtures_dir / "plamo2-tiny"
    args = [a.format(tmp=tmp_path, fixture=fixture) for a in args]
    r = run(*args)
    assert r.returncode == EXIT_BAD_INPUT, (r.stdout, r.stderr)
    assert needle in r.stderr + r.stdout
    assert "Traceback" not in r.stderr


def test_unknown_architecture_and_debug_switch(tmp_path, fixtures_dir):
    src = tmp_path / "llama"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    r = run("inspect", src)
    assert r.returncode == EXIT_BAD_INPUT
    assert "supported:" in r.stderr and "plamo2 (Plamo2ForCausalLM)" in r.stderr and "Traceback" not in r.stderr
    r = run("--debug", "inspect", src)
    assert r.returncode == EXIT_BAD_INPUT and "Traceback" in r.stderr


def test_existing_output_exit_2(fixtures_dir, tmp_path):
    (tmp_path / "o").mkdir()
    r = run("convert", fixtures_dir / "plamo2-tiny", "-o", tmp_path / "o")
    assert r.returncode == EXIT_BAD_INPUT and "already exists" in r.stderr and "--force" in r.stderr


def test_console_script_entry_point():
    exe = Path(sys.executable).parent / "hybridconv"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("hybridconv ")


@pytest.mark.parametrize("command", ["convert", "quantize"])
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_convert_cleans_up(fixtures_dir, tmp_path, sig, code, command):
    """A large (200 MB) float32 embedding cast to bfloat16 keeps convert busy long
    enough to be interrupted; the temporary folder must vanish and OUT never appear."""
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "src"
    src.mkdir()
    fixture = fixtures_dir / "recurrent_gemma-tiny"
    cfg = json.loads((fixture / "config.json").read_text())
    cfg["vocab_size"] = 800_000
    (src / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(fixture / "model.safetensors"))
    tensors["model.embed_tokens.weight"] = np.ones((800_000, 64), dtype=np.float32)
    save_file(tensors, str(src / "model.safetensors"))
    out = tmp_path / "out"
    proc = subprocess.Popen([*HC, command, str(src), "-o", str(out), "--dtype", "bfloat16"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".out.partial-*")):
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "convert finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def _default_signals():
    """In the child: SIGINT and SIGTERM at their defaults, even when the test runner
    itself runs as a background job (which inherits SIGINT ignored)."""
    import signal as _signal

    for sig in (_signal.SIGINT, _signal.SIGTERM):
        _signal.signal(sig, _signal.SIG_DFL)
