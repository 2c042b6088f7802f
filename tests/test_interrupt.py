"""Interruption is deterministic (issue 15, item 7): the CLI's signal handlers only
record the signal and the library raises at its next safe point, so a signal can
never surface as an internal error from inside np.save or a finalizer. These run
in-process (the real handlers, installed by ``hybridconv.cli.main``); the
subprocess tests in test_hardening.py and test_cli.py send real signals."""

from __future__ import annotations

import json
import os
import signal

import pytest

from hybridconv import interrupt
from hybridconv.convert import convert

from .test_new_user import hc

PLAMO = "plamo2-tiny"


@pytest.fixture(autouse=True)
def _clean():
    interrupt.reset()
    yield
    interrupt.reset()


def test_a_recorded_signal_stops_convert_at_a_safe_point(fixtures_dir, tmp_path):
    interrupt.request(signal.SIGTERM)
    with pytest.raises(interrupt.Terminated):
        convert(str(fixtures_dir / PLAMO), tmp_path / "out", dtype="float32")
    assert list(tmp_path.iterdir()) == []  # no output, no partial folder
    interrupt.reset()
    interrupt.request(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        convert(str(fixtures_dir / PLAMO), tmp_path / "out", dtype="float32")
    assert list(tmp_path.iterdir()) == []


def test_critical_sections_finish_and_a_second_signal_escalates():
    with interrupt.critical():
        interrupt.request(signal.SIGTERM)
        interrupt.request(signal.SIGTERM)  # insisting does not break a critical section
        interrupt.check()
    with pytest.raises(interrupt.Terminated):
        interrupt.check()
    interrupt.reset()
    interrupt.request(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):  # outside one, the second signal raises at once
        interrupt.request(signal.SIGINT)


def test_ignored_signals_stay_ignored(fixtures_dir, tmp_path, monkeypatch, capsys):
    """A background job (SIGINT inherited as ignored) keeps ignoring it, as Python does."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rc, out = hc(monkeypatch, capsys, "convert", fixtures_dir / PLAMO, "-o", tmp_path / "out", "--dtype", "float32")
        assert rc == 0 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_without_the_cli_nothing_changes(fixtures_dir, tmp_path):
    # a library user installs no handler: check() is free and conversion runs
    interrupt.check()
    convert(str(fixtures_dir / PLAMO), tmp_path / "out", dtype="float32")
    assert (tmp_path / "out" / "config.json").is_file()


def _plan(tmp_path, fixtures_dir):
    plan = tmp_path / "plan.toml"
    plan.write_text(
        f'name = "tiny"\n[source]\npath = "{fixtures_dir / PLAMO}"\n'
        "[verify]\nrandom_tokens = 8\nnum_sequences = 1\n"
        '[[variants]]\nname = "f32"\ndtype = "float32"\n'
        '[[variants]]\nname = "q8"\nbits = 8\ngroup_size = 32\n'
    )
    return plan


@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signal_during_release(fixtures_dir, tmp_path, monkeypatch, capsys, signals_not_ignored, sig, code, word):
    """The signal arrives while the first variant is being verified (a real
    os.kill to this process, handled by the CLI's handler): the release stops
    before writing that variant's report, the second variant is never built, the
    state file stays valid JSON and nothing temporary is left."""
    import hybridconv.verify.run as vrun

    real = vrun.verify_folder

    def verify_then_signal(*a, **kw):
        outcome = real(*a, **kw)
        os.kill(os.getpid(), sig)
        return outcome

    monkeypatch.setattr(vrun, "verify_folder", verify_then_signal)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    work = tmp_path / "work"
    rc, out = hc(monkeypatch, capsys, "release", _plan(tmp_path, fixtures_dir), "--workdir", work, "--no-upload",
                 "--json", tmp_path / "s.json")
    assert rc == code and f"{word}: temporary output removed" in out, out
    assert "internal error" not in out and "Traceback" not in out
    f32 = work / "variants" / "f32"
    assert (f32 / "config.json").is_file() and (f32 / "model.safetensors").is_file()  # built completely
    assert not (f32 / "verification.json").exists()  # interrupted before its report
    assert not (work / "variants" / "q8").exists()  # never started
    state = json.loads((work / "release-state.json").read_text())
    assert "build" in state["variants"]["f32"] and "verify" not in state["variants"]["f32"]
    leftovers = [p.name for p in work.rglob("*") if "partial" in p.name or p.name.startswith(".")]
    assert leftovers == []
    assert not (tmp_path / "s.json").exists()
    # handlers are restored after the command
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    if sig == signal.SIGINT:
        return
    # the rerun resumes: the built variant is reused, everything else completes
    monkeypatch.setattr(vrun, "verify_folder", real)
    rc, out = hc(monkeypatch, capsys, "release", _plan(tmp_path, fixtures_dir), "--workdir", work, "--no-upload",
                 "--json", tmp_path / "s.json")
    assert rc == 0, out
    rows = {v["name"]: v for v in json.loads((tmp_path / "s.json").read_text())["variants"]}
    assert rows["f32"]["build"].startswith("skipped") and rows["f32"]["verify"] == "pass"
    assert rows["q8"]["build"] == "built" and rows["q8"]["verify"] == "pass"


def test_signal_after_the_last_safe_point_still_exits_with_its_code(fixtures_dir, tmp_path, monkeypatch, capsys):
    """A signal that lands after the work's last safe point: the output is complete
    (written atomically) and the exit code still says the run was terminated."""
    import hybridconv.convert as conv

    real = conv._swap_into_place

    def swap_then_signal(tmp, out):
        real(tmp, out)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(conv, "_swap_into_place", swap_then_signal)
    rc, out = hc(monkeypatch, capsys, "convert", fixtures_dir / PLAMO, "-o", tmp_path / "out", "--dtype", "float32")
    assert rc == 143 and "internal error" not in out
    assert (tmp_path / "out" / "conversion.json").is_file()  # the rename finished: a complete output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- calibrated quantization: its long passes stop at their own safe points -----------

CAL_SRC = __import__("pathlib").Path(__file__).parent / "data" / "trained" / "recurrent_gemma"


def _calibrate(tmp_path, methods, report=None):
    from hybridconv.quant.calibrate import CalibrationOptions, parse_methods
    from hybridconv.quant.run import quantize

    opts = CalibrationOptions(samples=2, length=32, learn_steps=5, methods=parse_methods(methods))
    return quantize(str(CAL_SRC), tmp_path / "out", bits=4, calibration=opts, report=report)


def _no_output(tmp_path):
    # neither the output nor a temporary folder (the calibration's float copy) is left
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_signal_during_the_widths_pass_stops_it_before_the_next_block(tmp_path):
    said = []

    def report(msg):
        said.append(msg)
        if msg.startswith("widths: block 1/"):
            interrupt.request(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        _calibrate(tmp_path, "widths", report)
    assert said[-1].startswith("widths: block 1/")  # block 2 never ran
    _no_output(tmp_path)


def test_a_signal_during_gptq_stops_before_the_next_matrix(tmp_path, monkeypatch):
    from hybridconv.quant import calibrate as C

    calls = []
    real = C._quantize_matrix

    def first_then_signal(*a, **k):
        calls.append(1)
        interrupt.request(signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(C, "_quantize_matrix", first_then_signal)
    with pytest.raises(interrupt.Terminated):
        _calibrate(tmp_path, "gptq")
    assert len(calls) == 1
    _no_output(tmp_path)


def test_a_signal_during_the_learned_step_stops_before_the_next_step(tmp_path, monkeypatch):
    import mlx.core as mx

    steps = []
    real = mx.value_and_grad

    def counting(fn):
        g = real(fn)

        def step(*a, **k):
            steps.append(1)
            interrupt.request(signal.SIGINT)
            return g(*a, **k)

        return step

    monkeypatch.setattr(mx, "value_and_grad", counting)
    with pytest.raises(KeyboardInterrupt):
        _calibrate(tmp_path, "learn")
    assert len(steps) == 1
    _no_output(tmp_path)
