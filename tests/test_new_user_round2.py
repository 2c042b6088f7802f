"""What a new user hit, round 2 (issue 26): a lost output, a search that missed,
labels that lied, exit 70s, misleading behaviour and friction. Each test failed
before its fix.

The race of two runs for one output is made deterministic: the first run is held
at the moment its complete output is renamed into place (a hook on
``convert._swap_into_place``, the rename) while the second runs to its end (as
another process: its own temporary names), or while a file appears in the folder
being replaced. The CLI runs
in-process (``hybridconv.cli.main``), as in tests/test_new_user.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hybridconv.errors import EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_HUB, EXIT_OUTPUT, HybridconvError

from .conftest import REPO, hc

PLAMO = "plamo2-tiny"
JAMBA = "hybrids/jamba-tiny"
MAMBA = "hybrids/mamba-tiny"
BAMBA = "hybrids/bamba-tiny"
SENTINEL = "hf_SENTINELtokenDoNotLeak0123456789"
CLOSED = "http://127.0.0.1:9"  # nothing listens on the discard port


def run(monkeypatch, capsys, *args, columns: int = 400) -> tuple[int, str, str]:
    """The CLI in-process: (exit code, stdout, stderr), each as printed."""
    from hybridconv.cli import main

    monkeypatch.setattr(sys, "argv", ["hybridconv", *map(str, args)])
    monkeypatch.delenv("HYBRIDCONV_DEBUG", raising=False)
    monkeypatch.setenv("COLUMNS", str(columns))
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def flat(text: str) -> str:
    return " ".join(text.split())


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoint(fixtures_dir: Path, case: str, dst: Path) -> Path:
    shutil.copytree(fixtures_dir / case, dst)
    for name in ("expected.safetensors", "oracle.json"):
        (dst / name).unlink()
    return dst


def edit_config(folder: Path, **changes) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def converted(fixtures_dir, tmp_path_factory):
    """float32 conversions of plamo2-tiny and bamba-tiny, shared (read only)."""
    from hybridconv.convert import convert

    base = tmp_path_factory.mktemp("round2")
    convert(str(fixtures_dir / PLAMO), base / "p", dtype="float32")
    convert(str(fixtures_dir / BAMBA), base / "b", dtype="float32")
    # without the carried model file: an output mlx-lm cannot open (Bamba is not in it)
    convert(str(fixtures_dir / BAMBA), base / "b-plain", dtype="float32", mlx_lm_code="never")
    return base


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


# --- 1. two runs into one output ----------------------------------------------------------


@pytest.mark.parametrize("command", ["convert", "quantize"])
def test_second_run_into_the_same_output_is_refused_at_the_swap(fixtures_dir, tmp_path, monkeypatch, capsys, command):
    """JAMBA's run is held at its rename while MAMBA's run writes the same OUT to the
    end: both used to exit 0, and the folder held only one of them."""
    import hybridconv.convert as conv
    from hybridconv.convert import convert
    from hybridconv.quant.run import quantize

    out = tmp_path / "same"
    real = conv._swap_into_place
    held = []

    def hold_then_swap(tmp, dst):
        if not held:  # the first (outer) run, held here: the other run goes to its end
            held.append(tmp)
            with monkeypatch.context() as other:  # as another process: its own temporary names
                other.setattr(os, "getpid", lambda pid=os.getpid(): pid + 1)
                if command == "convert":
                    convert(str(fixtures_dir / MAMBA), out, dtype="float32")
                else:
                    quantize(str(fixtures_dir / MAMBA), out, bits=4)
        return real(tmp, dst)

    monkeypatch.setattr(conv, "_swap_into_place", hold_then_swap)
    extra = ["--bits", "4"] if command == "quantize" else ["--dtype", "float32"]
    code, text = hc(monkeypatch, capsys, command, fixtures_dir / JAMBA, "-o", out, *extra)
    assert held, "the swap was never reached"
    assert code == EXIT_BAD_INPUT, text
    assert "already exists" in text and "created while this run worked" in text and "not touched" in text
    assert json.loads((out / "config.json").read_text())["model_type"] == "mamba"  # the other run's, intact
    assert _leftovers(tmp_path) == []  # this run's temporary output is gone, nothing else removed


def test_force_applies_the_rules_to_what_is_there_at_the_swap(fixtures_dir, tmp_path, monkeypatch, capsys):
    """With --force, a file that appears in the old output while the new one is written
    keeps that folder from being replaced (before: moved aside and deleted)."""
    import hybridconv.convert as conv

    out = tmp_path / "out"
    assert hc(monkeypatch, capsys, "convert", fixtures_dir / MAMBA, "-o", out)[0] == 0
    real = conv._swap_into_place
    before = {}

    def someone_writes_then_swap(tmp, dst):
        if not before:  # held at the swap: a file appears in the folder about to be replaced
            before.update(digest(dst))
            (dst / "notes.txt").write_text("mine, written while the conversion ran")
        return real(tmp, dst)

    monkeypatch.setattr(conv, "_swap_into_place", someone_writes_then_swap)
    code, text = hc(monkeypatch, capsys, "convert", fixtures_dir / JAMBA, "-o", out, "--force")
    assert code == EXIT_BAD_INPUT, text
    assert "notes.txt" in text and "replaces only a previous hybridconv output" in text
    assert (out / "notes.txt").read_text().startswith("mine")
    assert json.loads((out / "config.json").read_text())["model_type"] == "mamba"  # not replaced
    assert set(digest(out)) == set(before) | {"notes.txt"}
    assert _leftovers(tmp_path) == []


def test_a_second_release_in_the_same_workdir_is_refused(fixtures_dir, tmp_path):
    """Held at the first release's swap, a second release of the same work folder is
    refused (exit 2) instead of building into, verifying and replacing the same
    variant folders; the first then completes."""
    import hybridconv.convert as conv
    from hybridconv.publish.release import load_plan, run_release

    plan = tmp_path / "plan.toml"
    plan.write_text(f'[source]\npath = "{fixtures_dir / PLAMO}"\n[verify]\nrandom_tokens = 12\nnum_sequences = 1\n'
                    '[[variants]]\nname = "f32"\ndtype = "float32"\n')
    work = tmp_path / "work"
    real = conv._swap_into_place
    refused, held = [], []

    def hold(tmp, dst):
        if not held:
            held.append(tmp)
            with pytest.MonkeyPatch.context() as other:  # as another process
                other.setattr(os, "getpid", lambda pid=os.getpid(): pid + 1)
                with pytest.raises(HybridconvError) as exc:
                    run_release(load_plan(plan), work, upload=False, log=lambda m: None)
            refused.append(exc.value)
        return real(tmp, dst)

    mp = pytest.MonkeyPatch()
    mp.setattr(conv, "_swap_into_place", hold)
    try:
        summary = run_release(load_plan(plan), work, upload=False, log=lambda m: None)
    finally:
        mp.undo()
    assert refused and refused[0].exit_code == EXIT_BAD_INPUT
    assert "another release run is using this work folder" in refused[0].message
    assert summary["ok"] and summary["variants"][0]["verify"] == "pass"


# --- 2. --target-kl ------------------------------------------------------------------------


def test_target_kl_writes_the_smallest_candidate_meeting_the_target(fixtures_dir, tmp_path, monkeypatch):
    """KL is not monotone in bits: a larger candidate may miss a target a smaller one
    meets (the issue's mixed-3-6 vs uniform 4-bit). With KLs that say so, the search
    must still write the smallest candidate that meets the target, having measured
    every smaller one; a bisection over the order did not."""
    import hybridconv.verify.run as vr
    from hybridconv.quant.run import search_target_kl
    from hybridconv.verify.reference import read_reference_file

    src = fixtures_dir / PLAMO
    # a made-up KL per candidate: falls with bits, except mixed-3-6 (just above uniform 4)
    kl = {"uniform 2-bit": 0.5, "mixed-2-4": 0.2, "uniform 3-bit": 0.1, "mixed-3-4": 0.05, "mixed-2-6": 0.08,
          "uniform 4-bit": 0.009, "mixed-3-6": 0.02, "mixed-4-6": 0.004, "uniform 5-bit": 0.003,
          "mixed-4-8": 0.003, "uniform 6-bit": 0.001, "mixed-5-8": 0.001, "mixed-6-8": 0.0005, "uniform 8-bit": 1e-5}

    class Fake:
        def __init__(self, folder, *a, **k):
            cfg = json.loads((Path(folder) / "config.json").read_text())
            recipe, bits = cfg["hybridconv"]["recipe"], cfg["quantization"]["bits"]
            label = f"uniform {bits}-bit" if recipe == "uniform" else recipe
            self.report = {"metrics": {"overall": {"kl_mean": kl[label]}}}

    monkeypatch.setattr(vr, "verify_folder", Fake)
    ref = read_reference_file(src / "expected.safetensors")
    res = search_target_kl(str(src), tmp_path / "q", 0.01, ref)
    tried = [r["plan"] for r in res.search]
    assert tried == ["uniform 2-bit", "mixed-2-4", "uniform 3-bit", "mixed-3-4", "mixed-2-6", "uniform 4-bit"]
    assert res.plan.recipe == "uniform" and res.plan.base.bits == 4
    bpw = [r["bits_per_weight"] for r in res.search]
    assert bpw == sorted(bpw) and [c["bits_per_weight"] for c in res.candidates] == sorted(
        c["bits_per_weight"] for c in res.candidates)
    assert len(res.candidates) == 14
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["bits"] == 4


def test_target_kl_on_plamo2_tiny_finds_uniform_4bit_and_says_what_was_searched(fixtures_dir, tmp_path, monkeypatch, capsys):
    """The issue's case, measured: mixed-4-6 (6.01 bits/weight) was written as "the
    smallest plan meeting the target" while uniform 4-bit (5.30) meets it."""
    code, text = hc(monkeypatch, capsys, "quantize", fixtures_dir / PLAMO, "-o", tmp_path / "q", "--target-kl", "0.01")
    assert code == 0, text
    assert "wrote" in text and "uniform 4-bit (5.297 bits/weight" in text
    assert "searched 14 candidate plans" in text and "the 5 smaller one(s) were measured and missed it" in text
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["hybridconv"]["recipe"] == "uniform" and cfg["quantization"]["bits"] == 4


# --- 3. bits + recipe, labels and gates -------------------------------------------------------


def test_bits_with_a_mixed_recipe_is_refused_in_plans_as_on_the_command_line(fixtures_dir, tmp_path, monkeypatch, capsys):
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[source]\npath = "{fixtures_dir / PLAMO}"\n'
                    '[[variants]]\nname = "q"\nbits = 2\nrecipe = "mixed-4-6"\n')
    code, text = hc(monkeypatch, capsys, "release", plan, "--dry-run")
    assert code == EXIT_BAD_INPUT and "bits = 2 with recipe = 'mixed-4-6'" in text and "drop bits" in text, text
    code, text = hc(monkeypatch, capsys, "quantize", fixtures_dir / PLAMO, "-o", tmp_path / "x", "--bits", "2",
                    "--recipe", "mixed-4-6", "--dry-run")
    assert code == EXIT_BAD_INPUT and "--recipe mixed-4-6 sets the widths" in text


def test_a_mixed_variant_is_labelled_and_gated_by_the_weights_written(fixtures_dir, tmp_path, monkeypatch, capsys):
    """recipe = "mixed-4-6" alone is a quantized variant (before: "add bits = N"); the
    dry run, config, verification.json, the card and the gates say 4/6 bits, 4-bit gates."""
    from hybridconv.publish.card import read_front_matter, render_card

    plan = tmp_path / "plan.toml"
    plan.write_text(f'name = "m"\n[source]\npath = "{fixtures_dir / PLAMO}"\n[verify]\nrandom_tokens = 16\n'
                    'num_sequences = 1\n[[variants]]\nname = "mixed"\nrecipe = "mixed-4-6"\ngroup_size = 32\n'
                    'repo_id = "org/m"\n')
    code, text = hc(monkeypatch, capsys, "release", plan, "--dry-run")
    assert code == 0, text
    assert "quantize mixed-4-6 (4/6-bit affine g32)" in text
    work = tmp_path / "work"
    code, text = hc(monkeypatch, capsys, "release", plan, "--workdir", work, "--no-upload")
    assert code == 0, text
    out = work / "variants" / "mixed"
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["bits"] == 4 and q["model.embed_tokens"]["bits"] == 6
    report = json.loads((out / "verification.json").read_text())
    assert report["model"]["precision"] == "4bit"
    assert report["thresholds"]["max_kl_mean"] == 0.15  # the 4-bit gate, not 2-bit's 1.5 or 8-bit's 0.02
    card = render_card(out, "org/m")
    tags = read_front_matter(card)["tags"]
    assert tags[-2:] == ["mixed-4-6", "4-bit"]
    assert "affine, 4/6 bits, group size 32" in card and "2-bit" not in card


def test_cli_mixed_recipe_sets_the_base_width(fixtures_dir, tmp_path):
    """quantize --recipe mixed-3-6 (no --bits) used to write quantization.bits = 4 (the
    default --bits), labelling and gating 3/6-bit weights as 4-bit; and a 4-bit plan
    with a layer at 2 bits is gated as 2-bit."""
    from hybridconv.quant.run import quantize
    from hybridconv.verify.gates import precision_of

    quantize(str(fixtures_dir / PLAMO), tmp_path / "m", recipe="mixed-3-6")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["quantization"]["bits"] == 3
    assert precision_of(tmp_path / "m") == "3bit"
    quantize(str(fixtures_dir / PLAMO), tmp_path / "o", bits=4, bits_for=["mlp.down_proj=2"])
    assert precision_of(tmp_path / "o") == "2bit"


def test_the_readme_plan_and_the_example_plans_load(tmp_path):
    from hybridconv.publish.release import load_plan

    text = (REPO / "README.md").read_text()
    block = re.search(r"```toml\n(name = \"plamo-2-1b-mlx\".*?)```", text, re.S).group(1)
    (tmp_path / "readme.toml").write_text(block)
    variants = {v.name: v for v in load_plan(tmp_path / "readme.toml").variants}
    assert variants["mixed-4-6"].quantized and variants["mixed-4-6"].bits is None
    for path in (REPO / "examples" / "demo-release.toml", REPO / "examples" / "ci" / "release.toml"):
        plan = load_plan(path)
        assert all(not (v.bits is not None and v.recipe not in (None, "uniform")) for v in plan.variants)


# --- 4. network failures: exit 5 ---------------------------------------------------------------


@pytest.fixture
def hub_unreachable(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED)


def _verified_copy(converted: Path, fixtures_dir: Path, dst: Path) -> Path:
    from hybridconv.verify.reference import read_reference_file
    from hybridconv.verify.run import verify_folder, write_report

    shutil.copytree(converted / "p", dst)
    ref = read_reference_file(fixtures_dir / PLAMO / "expected.safetensors")
    write_report(verify_folder(dst, ref).report, dst / "verification.json")
    return dst


def test_upload_network_failure_is_exit_5_with_the_network_message(converted, fixtures_dir, tmp_path, monkeypatch,
                                                                    capsys, hub_unreachable):
    out = _verified_copy(converted, fixtures_dir, tmp_path / "p")
    code, text = hc(monkeypatch, capsys, "upload", out, "--repo-id", "org/x")
    assert code == EXIT_HUB, text
    assert "could not be reached" in text and "Connect" in text and "internal error" not in text
    assert SENTINEL not in text


def test_release_network_failure_is_exit_5_and_the_summary_says_what_was_done(fixtures_dir, tmp_path, monkeypatch,
                                                                              capsys, hub_unreachable):
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[source]\npath = "{fixtures_dir / PLAMO}"\n[verify]\nrandom_tokens = 12\nnum_sequences = 1\n'
                    '[[variants]]\nname = "kept"\ndtype = "float32"\n'
                    '[[variants]]\nname = "pub"\ndtype = "float32"\nrepo_id = "org/pub"\n')
    code, out, err = run(monkeypatch, capsys, "release", plan, "--workdir", tmp_path / "w", "--json", tmp_path / "s.json")
    text = flat(out + err)
    assert code == EXIT_HUB, text
    assert "internal error" not in text and SENTINEL not in text
    assert "done: kept; not done: pub" in text and "could not be reached" in text
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["done"] == ["kept"] and summary["not_done"] == ["pub"] and summary["exit_code"] == EXIT_HUB
    rows = {r["name"]: r for r in summary["variants"]}
    assert rows["pub"]["verify"] == "pass" and rows["pub"]["upload"] == "failed (Hub)"


# --- 5. a full disk while writing a reference ---------------------------------------------------


def _full_disk(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_reference_on_a_full_disk_is_exit_3_naming_path_and_space(fixtures_dir, tmp_path, monkeypatch, capsys):
    import hybridconv.safetensors_io

    # reference files are written tensor by tensor, one sequence's rows at a time
    monkeypatch.setattr(hybridconv.safetensors_io, "write_all", _full_disk)
    target = tmp_path / "ref.safetensors"
    code, text = hc(monkeypatch, capsys, "reference", fixtures_dir / PLAMO, "-o", target, "--random-tokens", "8")
    assert code == EXIT_OUTPUT, text
    assert str(target) in text and "No space left on device" in text and "needs about" in text and "free there" in text
    assert "internal error" not in text and not target.exists() and list(tmp_path.iterdir()) == []


def test_release_reference_on_a_full_disk_is_exit_3(fixtures_dir, tmp_path, monkeypatch, capsys):
    import hybridconv.safetensors_io

    # reference files are written tensor by tensor, one sequence's rows at a time
    monkeypatch.setattr(hybridconv.safetensors_io, "write_all", _full_disk)
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[source]\npath = "{fixtures_dir / PLAMO}"\n[verify]\nrandom_tokens = 8\nnum_sequences = 1\n'
                    '[[variants]]\nname = "f"\ndtype = "float32"\n')
    code, text = hc(monkeypatch, capsys, "release", plan, "--workdir", tmp_path / "w", "--no-upload")
    assert code == EXIT_OUTPUT, text
    assert str(tmp_path / "w" / "reference.safetensors") in text and "needs about" in text


# --- 6, 7. misleading hints; the source written into ------------------------------------------


def test_quantize_verify_of_a_converted_folder_is_refused_before_work(converted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"
    code, text = hc(monkeypatch, capsys, "quantize", converted / "p", "-o", out, "--verify")
    assert code == EXIT_BAD_INPUT, text
    assert "is a hybridconv output" in text and "--reference-logits" in text and "hybridconv reference" in text
    assert "as --reference" not in text and not out.exists()


def test_verify_refuses_a_folder_hybridconv_did_not_write(fixtures_dir, tmp_path, monkeypatch, capsys):
    src = checkpoint(fixtures_dir, PLAMO, tmp_path / "src")
    before = digest(src)
    code, text = hc(monkeypatch, capsys, "verify", src, "--reference", src, "--random-tokens", "8")
    assert code == EXIT_BAD_INPUT and "not a hybridconv output" in text, text
    assert digest(src) == before and not (src / "verification.json").exists()


# --- 8. config conflicts ---------------------------------------------------------------------------


@pytest.mark.parametrize("case,changes,needles", [
    (PLAMO, {"model_type": "plamo3"}, ["'model_type' and 'architectures' disagree", "plamo3", "Plamo2ForCausalLM"]),
    (MAMBA, {"model_type": "plamo2"}, ["'model_type' and 'architectures' disagree", "plamo2", "MambaForCausalLM"]),
    (PLAMO, {"torch_dtype": "int8"}, ["'torch_dtype' = 'int8'", "--dtype"]),
    (MAMBA, {"dtype": "float64"}, ["'dtype' = 'float64'", "--dtype"]),
    (MAMBA, {"state_size": None}, ["state_size = 16: null in config.json, so the default was used"]),
])
def test_config_conflicts_are_refused_naming_the_fields(fixtures_dir, tmp_path, monkeypatch, capsys, case, changes, needles):
    src = edit_config(checkpoint(fixtures_dir, case, tmp_path / "src"), **changes)
    code, text = hc(monkeypatch, capsys, "convert", src, "-o", tmp_path / "out")
    assert code == EXIT_BAD_INPUT, text
    for needle in needles:
        assert needle in text, (needle, text)
    assert not (tmp_path / "out").exists()


# --- 9. options ignored or unchecked ---------------------------------------------------------------


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_revision_with_a_local_folder_is_refused(fixtures_dir, tmp_path, monkeypatch, capsys, command):
    args = [command, fixtures_dir / PLAMO, "--revision", "v2"] + (["-o", tmp_path / "o"] if command == "convert" else [])
    code, text = hc(monkeypatch, capsys, *args)
    assert code == EXIT_BAD_INPUT and "--revision v2" in text and "local folder" in text, text
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra,needle", [
    (["--max-kl-mean", "-1"], "--max-kl-mean -1.0: must not be negative"),
    (["--min-top1", "2"], "--min-top1 2.0: an agreement, between 0 and 1"),
    (["--max-kl-p99", "nan"], "--max-kl-p99 nan: must be a finite number"),
    (["--decode-steps", "1000"], "--decode-steps 1000"),
])
def test_verify_options_out_of_range_are_refused(converted, fixtures_dir, monkeypatch, capsys, extra, needle):
    ref = fixtures_dir / PLAMO / "expected.safetensors"
    code, text = hc(monkeypatch, capsys, "verify", converted / "p", "--reference-logits", ref, "--no-report", *extra)
    assert code == EXIT_BAD_INPUT and needle in text, text


def test_target_kl_nan_is_refused(fixtures_dir, tmp_path, monkeypatch, capsys):
    code, text = hc(monkeypatch, capsys, "quantize", fixtures_dir / PLAMO, "-o", tmp_path / "q", "--target-kl", "nan")
    assert code == EXIT_BAD_INPUT and "--target-kl nan" in text and "positive number" in text, text


def test_the_decode_steps_recorded_are_the_steps_run(converted, tmp_path, monkeypatch, capsys, fixtures_dir):
    ref = tmp_path / "short.safetensors"
    assert hc(monkeypatch, capsys, "reference", fixtures_dir / PLAMO, "-o", ref, "--random-tokens", "5",
              "--num-sequences", "1")[0] == 0
    report = tmp_path / "r.json"
    code, text = hc(monkeypatch, capsys, "verify", converted / "p", "--reference-logits", ref, "--no-report",
                    "--json", report)
    assert code == 0, text
    decode = json.loads(report.read_text())["decode"]
    assert decode["steps_per_sequence"] == 4 and decode["requested_steps"] == 8


# --- 10. a signal after the last safe point -----------------------------------------------------------


def test_interrupt_after_the_last_safe_point_says_the_output_is_complete(fixtures_dir, tmp_path, monkeypatch, capsys,
                                                                          signals_not_ignored):
    import hybridconv.convert as conv

    real = conv._swap_into_place

    def swap_then_signal(tmp, out):
        real(tmp, out)
        os.kill(os.getpid(), signal.SIGINT)  # recorded by the CLI's handler, acted on after the work

    monkeypatch.setattr(conv, "_swap_into_place", swap_then_signal)
    code, out, err = run(monkeypatch, capsys, "convert", fixtures_dir / PLAMO, "-o", tmp_path / "out")
    assert code == 130
    assert "after the work had finished: its output is complete" in flat(err), err
    assert "temporary output removed" not in err
    assert (tmp_path / "out" / "conversion.json").is_file()


# --- 11. hints that were wrong -------------------------------------------------------------------------


def test_offline_hint_only_when_offline(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED)
    code, text = hc(monkeypatch, capsys, "convert", "someorg/somemodel", "-o", tmp_path / "o")
    assert code == EXIT_BAD_INPUT, text
    assert "HF_HUB_OFFLINE" not in text and "network" in text, text
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, text = hc(monkeypatch, capsys, "convert", "someorg/somemodel", "-o", tmp_path / "o")
    assert code == EXIT_BAD_INPUT and "HF_HUB_OFFLINE is set" in text and "unset HF_HUB_OFFLINE" in text, text


def test_doctor_names_a_blas_path_that_does_not_exist(monkeypatch):
    """HYBRIDCONV_BLAS naming a missing file: the fix is about that setting (before:
    "install the system OpenBLAS", which was installed). The process's BLAS state is
    set as preload leaves it for that setting (preload runs once, at import)."""
    from hybridconv import blas

    monkeypatch.setattr(blas, "_state", {"attempted": True, "warned": False, "setting": "/nonexistent/libblas.so",
                                         "action": "not found: /nonexistent/libblas.so: cannot open shared object file"})
    monkeypatch.setattr(blas, "_global_cblas_sgemm", lambda: None)
    monkeypatch.setattr(blas, "bundled_blas", lambda: Path("/venv/mlx_cpu.libs/libblas-0.so.3"))
    if not sys.platform.startswith("linux"):
        pytest.skip("the BLAS preload is Linux-only")
    fix = blas.status()["fix"]
    assert "HYBRIDCONV_BLAS=/nonexistent/libblas.so: no such file" in fix
    assert "unset HYBRIDCONV_BLAS" in fix and not fix.startswith("install the system OpenBLAS")


def test_inspect_shows_a_verification_the_weights_no_longer_match(converted, fixtures_dir, tmp_path, monkeypatch, capsys):
    from hybridconv.quant.run import quantize
    from hybridconv.verify.reference import read_reference_file
    from hybridconv.verify.run import verify_folder, write_report

    out = tmp_path / "q"
    quantize(str(fixtures_dir / PLAMO), out, bits=8)
    ref = read_reference_file(fixtures_dir / PLAMO / "expected.safetensors")
    write_report(verify_folder(out, ref).report, out / "verification.json")
    code, text = hc(monkeypatch, capsys, "inspect", out)
    assert code == 0 and "pass (8bit" in text and "stale" not in text, text
    with open(out / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x01\x02\x03\x04")
    code, text = hc(monkeypatch, capsys, "inspect", out)
    assert code == 0 and "stale" in text and "changed after verification" in text and "upload refuses" in text, text
    code, text = hc(monkeypatch, capsys, "inspect", out, "--json")
    assert '"current": false' in text
    code, text = hc(monkeypatch, capsys, "upload", out, "--repo-id", "org/x", "--dry-run")
    assert code == 4 and "changed after verification" in text


# --- 12. --json - ---------------------------------------------------------------------------------------


def test_json_dash_means_stdout(converted, fixtures_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ref = fixtures_dir / PLAMO / "expected.safetensors"
    code, out, err = run(monkeypatch, capsys, "verify", converted / "p", "--reference-logits", ref, "--no-report",
                         "--json", "-")
    assert code == 0, err
    assert json.loads(out)["verdict"] == "pass" and "PASS" in err
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[source]\npath = "{fixtures_dir / PLAMO}"\n[[variants]]\nname = "f"\ndtype = "float32"\n')
    code, out, err = run(monkeypatch, capsys, "release", plan, "--dry-run", "--json", "-")
    assert code == 0, err
    assert json.loads(out)["variants"][0]["name"] == "f"
    assert not (tmp_path / "-").exists()


# --- 13. readable rule texts --------------------------------------------------------------------------------


def test_inspect_names_targets_in_words(fixtures_dir, monkeypatch, capsys):
    code, text = hc(monkeypatch, capsys, "inspect", fixtures_dir / JAMBA)
    assert code == 0, text
    assert "\\g<" not in text and "(?P<" not in text
    assert "rename *.feed_forward.experts.down_proj -> ….switch_mlp.down_proj.weight" in text
    code, text = hc(monkeypatch, capsys, "inspect", fixtures_dir / JAMBA, "--json")
    assert "\\\\g<" not in text and "\\g<" not in text and "….switch_mlp.gate_proj.weight" in text


# --- 14, 15. parents created silently; files removed silently ----------------------------------------------


def test_missing_parents_are_named_and_removed_when_the_run_fails(fixtures_dir, tmp_path, monkeypatch, capsys):
    deep = tmp_path / "new" / "deeper" / "out"
    code, out, err = run(monkeypatch, capsys, "convert", fixtures_dir / PLAMO, "-o", deep)
    assert code == 0, err
    assert f"created the missing folder(s) {tmp_path / 'new'}, {tmp_path / 'new' / 'deeper'}" in flat(err)
    # a run that fails while writing leaves no folder it created behind
    from safetensors.numpy import load_file, save_file

    src = checkpoint(fixtures_dir, PLAMO, tmp_path / "nan-src")
    t = load_file(str(src / "model.safetensors"))
    name = sorted(t)[0]
    t[name] = t[name].copy()
    t[name].flat[0] = float("nan")
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    code, out, err = run(monkeypatch, capsys, "convert", src, "-o", tmp_path / "other" / "x" / "out")
    assert code == EXIT_BAD_INPUT and "NaN" in err
    assert not (tmp_path / "other").exists()


def test_force_names_the_model_card_and_report_it_removes(converted, tmp_path, fixtures_dir, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(converted / "p", out)
    (out / "README.md").write_text("# my card, edited by hand\n")
    (out / "verification.json").write_text("{}")
    code, stdout, err = run(monkeypatch, capsys, "convert", fixtures_dir / PLAMO, "-o", out, "--force", "--dtype", "float32")
    assert code == 0, err
    text = flat(err)
    assert "--force: replaced the previous" in text
    assert "README.md (its model card, perhaps edited by hand)" in text and "verification.json" in text
    assert not (out / "README.md").exists()


# --- 16. overlapping --bits-for; a reversed recipe -----------------------------------------------------------


def test_overlapping_bits_for_says_which_won_and_reversed_recipes_are_refused(fixtures_dir, tmp_path, monkeypatch, capsys):
    code, text = hc(monkeypatch, capsys, "quantize", fixtures_dir / PLAMO, "-o", tmp_path / "q", "--dry-run",
                    "--show-plan", "--bits-for", "mlp.down_proj=6", "--bits-for", "*down_proj*=8")
    assert code == 0, text
    assert "--bits-for *down_proj* (last of mlp.down_proj=6, *down_proj*=8)" in text
    assert "the last given wins, '*down_proj*=8'" in text
    for recipe in ("mixed-6-4", "mixed-4-4"):
        code, text = hc(monkeypatch, capsys, "quantize", fixtures_dir / PLAMO, "-o", tmp_path / "q", "--recipe", recipe)
        assert code == EXIT_BAD_INPUT and f"--recipe {recipe}" in text, text
    assert "did you mean --recipe mixed-4-6?" in hc(monkeypatch, capsys, "quantize", fixtures_dir / PLAMO, "-o",
                                                    tmp_path / "q", "--recipe", "mixed-6-4")[1]
    assert not (tmp_path / "q").exists()


# --- 17, 18. help at 80 columns, --show-plan names, bare hybridconv ----------------------------------------------


def _premature_breaks(text: str, width: int) -> list[str]:
    """Lines of the help's description (before the first panel) that end where the
    next line's first word would still have fitted: a line break kept from the source."""
    desc = text.split("╭")[0].splitlines()
    bad = []
    for line, nxt in zip(desc, desc[1:]):
        a, b = line.strip(), nxt.strip()
        if a and b and not a.startswith("Usage:") and len(line.rstrip()) + 1 + len(b.split()[0]) < width - 2:
            bad.append(f"{a!r} / {b!r}")
    return bad


@pytest.mark.parametrize("command", ["convert", "quantize", "verify", "reference", "upload", "release", "inspect", "doctor"])
def test_help_is_not_broken_mid_sentence_at_80_columns(monkeypatch, capsys, command):
    code, out, err = run(monkeypatch, capsys, command, "--help", columns=80)
    assert code == 0
    assert _premature_breaks(out, 80) == []


def test_show_plan_never_splits_tensor_names(fixtures_dir, tmp_path, monkeypatch, capsys):
    from hybridconv.quant.run import quantize

    names = [t.step.target for t in quantize(str(fixtures_dir / PLAMO), tmp_path / "q", dry_run=True).plan.tensors]
    code, out, err = run(monkeypatch, capsys, "quantize", fixtures_dir / PLAMO, "-o", tmp_path / "q", "--dry-run",
                         "--show-plan", columns=80)
    assert code == 0
    lines = out.splitlines()
    for name in names:
        assert any(name in line for line in lines), name


def test_bare_hybridconv_prints_help_and_no_empty_error(monkeypatch, capsys):
    code, out, err = run(monkeypatch, capsys)
    assert "Usage:" in out and "Commands" in out
    assert "error" not in err and err.strip() == ""
    assert code == EXIT_BAD_INPUT


# --- README bullets ---------------------------------------------------------------------------------------------------


def test_readme_api_example_imports_hybridconv_before_mlx():
    text = (REPO / "README.md").read_text()
    block = text.split("### Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("import ")]
    assert lines.index("import hybridconv          # first: loads the optimised BLAS before MLX (see \"Speed on Linux\")") \
        < lines.index("import mlx.core as mx")


def test_load_warns_once_when_mlx_is_on_the_reference_blas(converted):
    """The README's old order (mlx first): hybridconv.load warns once, with the fix;
    hybridconv first: no warning. A child process each (the BLAS is per process)."""
    folder = converted / "p"
    code = ("import warnings, sys; warnings.simplefilter('default'); {first}; {second}; "
            f"m = hybridconv.load({str(folder)!r}); m = hybridconv.load({str(folder)!r}); print('loaded')")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("HYBRIDCONV_BLAS", None)
    late = subprocess.run([sys.executable, "-c", code.format(first="import mlx.core", second="import hybridconv")],
                          capture_output=True, text=True, env=env)
    assert late.returncode == 0 and "loaded" in late.stdout, late.stderr
    assert late.stderr.count("SlowBlasWarning") == 1
    assert "import hybridconv before mlx" in late.stderr
    from hybridconv import blas

    if blas.status().get("kind") != "optimised":
        pytest.skip("no optimised BLAS on this machine: both orders run on the reference BLAS")
    early = subprocess.run([sys.executable, "-c", code.format(first="import hybridconv", second="import mlx.core")],
                           capture_output=True, text=True, env=env)
    assert early.returncode == 0 and "SlowBlasWarning" not in early.stderr, early.stderr


def test_verify_warns_about_the_reference_blas_in_its_own_voice(converted, fixtures_dir, monkeypatch, capsys):
    from hybridconv import blas

    monkeypatch.setitem(blas._state, "warned", False)
    monkeypatch.setattr(blas, "status", lambda: {"kind": "reference", "blas": "libblas.so.3", "action": "too late",
                                                 "fix": "import hybridconv before mlx"})
    ref = fixtures_dir / PLAMO / "expected.safetensors"
    code, out, err = run(monkeypatch, capsys, "verify", converted / "p", "--reference-logits", ref, "--no-report",
                         "--runtime", "hybridconv")
    assert code == 0
    assert "warning: MLX runs its float32 products on the slow bundled reference BLAS" in flat(err)
    assert "Fix: import hybridconv before mlx" in flat(err) and "SlowBlasWarning" not in err


def test_torch_pin_and_cpu_index_in_the_setup():
    """The Makefile installs the pinned torch from the PyTorch CPU index on Linux
    without an NVIDIA driver, before the extras (which pin the same version)."""
    make = (REPO / "Makefile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    pin = re.search(r"^TORCH := (torch==[\d.]+)$", make, re.M).group(1)
    assert pyproject.count(f'"{pin}"') == 2  # reference and test extras
    assert "TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu" in make
    assert "command -v nvidia-smi" in make
    assert re.search(r"^install-reference: .*\btorch\b", make, re.M) and re.search(r"^install-test: .*\btorch\b", make, re.M)
    assert '--index-url $(TORCH_INDEX)' in make
    # the shell test the Makefile runs, here: this machine has no NVIDIA driver
    probe = subprocess.run(["sh", "-c", 'if [ "$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1; '
                            'then echo cpu; fi'], capture_output=True, text=True)
    if sys.platform.startswith("linux") and shutil.which("nvidia-smi") is None:
        assert probe.stdout.strip() == "cpu"


def test_help_texts_list_every_exit_code(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "--help", columns=200)
    assert "70 internal error" in flat(out)
    code, out, _ = run(monkeypatch, capsys, "release", "--help", columns=200)
    assert "5 the Hub" in flat(out) and "3 an output could not be written" in flat(out)
    code, out, _ = run(monkeypatch, capsys, "verify", "--help", columns=200)
    assert "with --runtime mlx-lm alone, mlx-lm is the only runtime run and its result is the verdict" in flat(out)


def test_runtime_mlx_lm_alone_follows_mlx_lm(converted, fixtures_dir, monkeypatch, capsys):
    """The rule the README states: mlx-lm failing changes the exit code only where it
    was asked for (--runtime mlx-lm alone, or --require-runtime mlx-lm)."""
    pytest.importorskip("mlx_lm")
    ref = fixtures_dir / BAMBA / "expected.safetensors"
    code, text = hc(monkeypatch, capsys, "verify", converted / "b-plain", "--reference-logits", ref, "--no-report")
    assert code == 0 and "cannot load" in text, text
    code, text = hc(monkeypatch, capsys, "verify", converted / "b-plain", "--reference-logits", ref, "--no-report",
                    "--runtime", "mlx-lm")
    assert code == EXIT_GATE_FAILED and "cannot load" in text, text


def test_demo_banner_says_what_quantize_keeps(fixtures_dir, tmp_path):
    """conv kernels and norms keep the output dtype (README); the dynamics stay float32."""
    from hybridconv.quant.run import quantize

    make = (REPO / "Makefile").read_text()
    assert "conv kernels and norms keep the output dtype" in make and "conv kernels and norms stay float32" not in make
    rows = {r["tensor"]: r for r in quantize(str(fixtures_dir / PLAMO), tmp_path / "q", dtype="bfloat16",
                                             dry_run=True).plan.rows()}
    conv = next(r for n, r in rows.items() if n.endswith("conv1d.weight"))
    norm = next(r for n, r in rows.items() if n.endswith("post_mlp_norm.weight"))
    a_log = next(r for n, r in rows.items() if n.endswith("A_log"))
    assert conv["dtype"] == "bfloat16" and norm["dtype"] == "bfloat16" and a_log["dtype"] == "float32"
