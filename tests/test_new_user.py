"""What a new user hit (issue 16): each case ran to a data loss, a silently
ignored option or an internal error (exit 70) before its fix.

The CLI runs in-process (``hybridconv.cli.main`` with ``sys.argv`` set), so
these cases cost no interpreter start-up; output is compared with whitespace
normalised because Rich wraps long lines.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest

from hybridconv.errors import EXIT_BAD_INPUT, EXIT_HUB

from .conftest import hc

PLAMO = "plamo2-tiny"
PLAMO_UNTIED = "plamo2-tiny-untied"
RG = "recurrent_gemma-tiny-hf5"


def digest(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def checkpoint(fixtures_dir: Path, case: str, dst: Path) -> Path:
    shutil.copytree(fixtures_dir / case, dst)
    for name in ("expected.safetensors", "oracle.json"):
        (dst / name).unlink()
    return dst


@pytest.fixture(scope="module")
def converted(fixtures_dir, tmp_path_factory):
    """float32 conversions of the two PLaMo-2 fixtures (4 and 3 layers)."""
    from hybridconv.convert import convert

    base = tmp_path_factory.mktemp("converted")
    convert(str(fixtures_dir / PLAMO), base / "p4", dtype="float32")
    convert(str(fixtures_dir / PLAMO_UNTIED), base / "p3", dtype="float32")
    return base


# --- 1. data loss with --force ------------------------------------------------------


@pytest.mark.parametrize("command", ["convert", "quantize"])
def test_force_never_deletes_the_source(fixtures_dir, tmp_path, monkeypatch, capsys, command):
    P = tmp_path / "P"
    P.mkdir()
    checkpoint(fixtures_dir, PLAMO, P / "src")
    (P / "notes.txt").write_text("mine")
    before = digest(P)
    code, out = hc(monkeypatch, capsys, command, P / "src", "-o", P, "--force")
    assert code == EXIT_BAD_INPUT and "contains the source checkpoint" in out
    code, out = hc(monkeypatch, capsys, command, P / "src", "-o", P / "src" / "out", "--force")
    assert code == EXIT_BAD_INPUT and "inside the source checkpoint" in out
    code, out = hc(monkeypatch, capsys, command, P / "src", "-o", P / "src", "--force")
    assert code == EXIT_BAD_INPUT and "is the source folder" in out
    assert digest(P) == before  # byte-identical, nothing added or removed


def test_force_replaces_only_a_hybridconv_output(fixtures_dir, tmp_path, monkeypatch, capsys):
    src = checkpoint(fixtures_dir, PLAMO, tmp_path / "src")
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8")
    code, out = hc(monkeypatch, capsys, "convert", src, "-o", other, "--force")
    assert code == EXIT_BAD_INPUT and "not a hybridconv output" in out and "cat.jpg" in out
    assert digest(other) == {"cat.jpg": hashlib.sha256(b"\xff\xd8").hexdigest()}
    # the current folder cannot be replaced ("Device or resource busy" before)
    first = tmp_path / "first"
    assert hc(monkeypatch, capsys, "convert", src, "-o", first)[0] == 0
    monkeypatch.chdir(first)
    code, out = hc(monkeypatch, capsys, "convert", src, "-o", ".", "--force")
    assert code == EXIT_BAD_INPUT and "current folder" in out


# --- 2. quantize --target-kl drops other options -----------------------------------


def test_target_kl_refuses_or_honours_every_option(fixtures_dir, tmp_path, monkeypatch, capsys):
    src = fixtures_dir / PLAMO
    out = tmp_path / "q"
    for extra, needle in [(["--bits", "3"], "--bits: --target-kl searches"),
                          (["--recipe", "mixed-4-6"], "--recipe: --target-kl searches"),
                          (["--mode", "mxfp4"], "--mode mxfp4: --target-kl searches affine")]:
        code, text = hc(monkeypatch, capsys, "quantize", src, "-o", out, "--target-kl", "0.05", *extra)
        assert code == EXIT_BAD_INPUT and needle in text, text
    # --dry-run: searches, shows the plan, writes nothing; --bits-for is applied to every candidate
    code, text = hc(monkeypatch, capsys, "quantize", src, "-o", out, "--target-kl", "0.05", "--dry-run",
                    "--bits-for", "*down_proj*=8", "--show-plan")
    assert code == 0, text
    assert "nothing written" in text and "wrote" not in text and not out.exists()
    assert "mlp.down_proj │ 8-bit affine g64 │ --bits-for *down_proj*" in text


# --- 3. a reference from another model ----------------------------------------------


def test_verify_refuses_a_reference_of_another_model(fixtures_dir, converted, tmp_path, monkeypatch, capsys):
    p4, p3 = converted / "p4", converted / "p3"
    # fewer layers (IndexError before), more layers (gate failures before)
    code, text = hc(monkeypatch, capsys, "verify", p4, "--reference", fixtures_dir / PLAMO_UNTIED, "--no-report")
    assert code == EXIT_BAD_INPUT and "layer schedule" in text and "another model" in text
    code, text = hc(monkeypatch, capsys, "verify", p3, "--reference", fixtures_dir / PLAMO, "--no-report")
    assert code == EXIT_BAD_INPUT and "layer schedule" in text
    # a reference-logits file with hidden states, from the other model
    ref = tmp_path / "r3.safetensors"
    assert hc(monkeypatch, capsys, "reference", fixtures_dir / PLAMO_UNTIED, "-o", ref, "--hidden-states")[0] == 0
    code, text = hc(monkeypatch, capsys, "verify", p4, "--reference-logits", ref, "--no-report")
    assert code == EXIT_BAD_INPUT and "another model" in text
    # a file without block kinds (older or foreign tool) but with 3 blocks of hidden states
    from safetensors.numpy import load_file, save_file

    t = load_file(str(ref))
    save_file(t, str(tmp_path / "bare.safetensors"))  # no metadata
    code, text = hc(monkeypatch, capsys, "verify", p4, "--reference-logits", tmp_path / "bare.safetensors", "--no-report")
    assert code == EXIT_BAD_INPUT and "outputs of 3 blocks" in text
    # a hybridconv output passed as --reference (internal error before)
    code, text = hc(monkeypatch, capsys, "verify", p4, "--reference", p3, "--no-report")
    assert code == EXIT_BAD_INPUT and "is a hybridconv output" in text


# --- 4. release plans ------------------------------------------------------------------


BAD_PLANS = {
    "source-typo": ({"source": {"path": "SRC", "revison": "main"}}, "'revison' (did you mean 'revision'?)"),
    "upload-typo": ({"upload": {"privat": True}}, "'privat' (did you mean 'private'?)"),
    "gate-typo": ({"variants": [{"name": "q", "bits": 4, "gates": {"max_kl_man": 0.1}}]}, "'max_kl_man'"),
    "gate-type": ({"variants": [{"name": "q", "bits": 4, "gates": {"max_kl_mean": "abc"}}]},
                  "variant 'q' gates: max_kl_mean must be a number, found 'abc'"),
    "bits-string": ({"variants": [{"name": "q", "bits": "4"}]}, "variant 'q': bits must be an integer, found '4'"),
    "bits-unsupported": ({"variants": [{"name": "q", "bits": 7}]}, "variant 'q': bits 7 is not supported"),
    "bad-repo": ({"variants": [{"name": "q", "bits": 4, "repo_id": "not a repo"}]}, "'not a repo' is not a Hub repo id"),
    "same-repo": ({"variants": [{"name": "a", "repo_id": "o/x"}, {"name": "b", "bits": 4, "repo_id": "o/x"}]},
                  "also the repo of variant 'a'"),
    "revision-with-path": ({"source": {"path": "SRC", "revision": "main"}}, "revision applies to a Hub repo_id"),
    "quant-key-without-bits": ({"variants": [{"name": "q", "group_size": 32}]}, "add bits = N"),
    "verify-type": ({"verify": {"random_tokens": "many"}}, "[verify]: random_tokens must be an integer"),
}


@pytest.mark.parametrize("name", sorted(BAD_PLANS))
def test_release_plan_validated_before_any_work(fixtures_dir, tmp_path, monkeypatch, capsys, name):
    import yaml

    change, needle = BAD_PLANS[name]
    data = {"source": {"path": str(fixtures_dir / PLAMO)}, "variants": [{"name": "f", "dtype": "float32"}]}
    for key, value in change.items():
        data[key] = value
    if data["source"].get("path") == "SRC":
        data["source"]["path"] = str(fixtures_dir / PLAMO)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(data))
    code, text = hc(monkeypatch, capsys, "release", plan)
    assert code == EXIT_BAD_INPUT and needle in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml"]  # nothing built


def test_release_without_token_fails_before_building(fixtures_dir, tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored login
    import hybridconv.publish.upload as up

    monkeypatch.setattr(up, "token", lambda: None)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"source": {"path": str(fixtures_dir / PLAMO)},
                                    "variants": [{"name": "f", "dtype": "float32", "repo_id": "org/x"}]}))
    code, text = hc(monkeypatch, capsys, "release", plan)
    assert code == EXIT_HUB and "HF_TOKEN" in text and "hf auth login" in text
    assert not (tmp_path / "release-plan").exists()


# --- 5, 6, 7, 11. usage errors, never internal errors; options never ignored ------------


def test_reference_output_path(fixtures_dir, tmp_path, monkeypatch, capsys):
    deep = tmp_path / "a" / "b" / "ref.safetensors"
    code, text = hc(monkeypatch, capsys, "reference", fixtures_dir / PLAMO, "-o", deep, "--random-tokens", "8")
    assert code == 0 and deep.is_file(), text
    folder = tmp_path / "dir"
    folder.mkdir()
    code, text = hc(monkeypatch, capsys, "reference", fixtures_dir / PLAMO, "-o", folder, "--force")
    assert code == EXIT_BAD_INPUT and "is a folder" in text


IGNORED = {
    "convert-bits-without-q": (["convert", "SRC", "-o", "OUT", "--bits", "3"], "--bits: quantization options need --quantize"),
    "convert-mode-without-q": (["convert", "SRC", "-o", "OUT", "--mode", "mxfp4"], "--mode: quantization options need"),
    "recipe-with-bits": (["quantize", "SRC", "-o", "OUT", "--recipe", "mixed-4-6", "--bits", "8"], "--recipe mixed-4-6 sets the widths"),
    "reference-logits-without-verify": (["quantize", "SRC", "-o", "OUT", "--reference-logits", "x.safetensors"], "neither was given"),
    "keep-and-bits-for": (["quantize", "SRC", "-o", "OUT", "--keep", "*down*", "--bits-for", "*down*=8"], "given to both --bits-for and --keep"),
    "bad-regex": (["quantize", "SRC", "-o", "OUT", "--bits-for", "re:[=8"], "not a valid regular expression"),
    "group-size-0": (["quantize", "SRC", "-o", "OUT", "--group-size", "0"], "--group-size 0 is not supported"),
    "recipe-width": (["quantize", "SRC", "-o", "OUT", "--recipe", "mixed-4-7"], "--recipe mixed-4-7: 7 bits"),
}


@pytest.mark.parametrize("name", sorted(IGNORED))
def test_options_are_never_ignored(fixtures_dir, tmp_path, monkeypatch, capsys, name):
    args, needle = IGNORED[name]
    args = [str(fixtures_dir / PLAMO) if a == "SRC" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    code, text = hc(monkeypatch, capsys, *args)
    assert code == EXIT_BAD_INPUT and needle in text, text
    assert "internal error" not in text and not (tmp_path / "out").exists()


def test_verify_reference_logits_refuses_live_options(converted, tmp_path, monkeypatch, capsys, fixtures_dir):
    ref = tmp_path / "r.safetensors"
    assert hc(monkeypatch, capsys, "reference", fixtures_dir / PLAMO, "-o", ref, "--random-tokens", "12")[0] == 0
    for extra in (["--seed", "3"], ["--ref-dtype", "bfloat16"]):
        code, text = hc(monkeypatch, capsys, "verify", converted / "p4", "--reference-logits", ref, "--no-report", *extra)
        assert code == EXIT_BAD_INPUT and extra[0] in text, text


def test_quantizing_nothing_is_refused(fixtures_dir, tmp_path, monkeypatch, capsys):
    code, text = hc(monkeypatch, capsys, "quantize", fixtures_dir / RG, "-o", tmp_path / "x", "--bits", "4", "--group-size", "128")
    assert code == EXIT_BAD_INPUT and "nothing would be quantized" in text and "nan" not in text
    assert not (tmp_path / "x").exists()


def test_default_bits_follow_the_mode(fixtures_dir, tmp_path, monkeypatch, capsys):
    code, text = hc(monkeypatch, capsys, "quantize", fixtures_dir / PLAMO, "-o", tmp_path / "x", "--mode", "mxfp8", "--dry-run")
    assert code == 0 and "mxfp8" in text and "--bits" not in text, text


# --- 8. pickle-only sources -----------------------------------------------------------------


def test_pickle_only_source_everywhere_with_allow_pickle(fixtures_dir, tmp_path, monkeypatch, capsys):
    import torch
    from safetensors.numpy import load_file

    src = checkpoint(fixtures_dir, PLAMO, tmp_path / "src")
    t = load_file(str(src / "model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in t.items()}, src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    code, text = hc(monkeypatch, capsys, "inspect", src)
    assert code == EXIT_BAD_INPUT and "--allow-pickle" in text
    code, text = hc(monkeypatch, capsys, "inspect", src, "--allow-pickle", "--json")
    assert code == 0 and '"model_type": "plamo2"' in text and str(src) in text
    out = tmp_path / "out"
    assert hc(monkeypatch, capsys, "convert", src, "-o", out, "--allow-pickle", "--dtype", "float32")[0] == 0
    code, text = hc(monkeypatch, capsys, "verify", out, "--reference", src, "--allow-pickle", "--random-tokens", "16")
    assert code == 0 and "PASS" in text, text
    ref = tmp_path / "ref.safetensors"
    assert hc(monkeypatch, capsys, "reference", src, "-o", ref, "--allow-pickle", "--random-tokens", "8")[0] == 0
    assert ref.is_file()


# --- 10. top-k reference files ----------------------------------------------------------------


def test_top1_file_skips_top5_and_says_kl_is_a_lower_bound(fixtures_dir, converted, tmp_path, monkeypatch, capsys):
    ref = tmp_path / "top1.safetensors"
    assert hc(monkeypatch, capsys, "reference", fixtures_dir / PLAMO, "-o", ref, "--top-k", "1")[0] == 0
    report = tmp_path / "report.json"
    code, text = hc(monkeypatch, capsys, "verify", converted / "p4", "--reference-logits", ref, "--no-report", "--json", report)
    assert code == 0, text
    r = json.loads(report.read_text())
    assert "min_top5" not in [c["gate"] for c in r["checks"]]
    assert r["skipped_gates"][0]["gate"] == "min_top5"
    assert r["metrics"]["overall"]["top5_overlap"] is None
    assert r["reference"]["top_k"] == 1 and "lower bound" in r["reference"]["note"]
    assert "lower bound" in text and "min_top5 skipped" in text


# --- 12. upload only hybridconv outputs --------------------------------------------------------


def test_upload_refuses_a_raw_checkpoint_whatever_the_flags(fixtures_dir, tmp_path, monkeypatch, capsys):
    raw = shutil.copytree(fixtures_dir / PLAMO, tmp_path / "raw")
    code, text = hc(monkeypatch, capsys, "upload", raw, "--repo-id", "org/x", "--allow-unverified", "--dry-run")
    assert code == EXIT_BAD_INPUT and "not a hybridconv output" in text
    assert not (raw / "README.md").exists()


# --- 13. a local path typo that looks like a repo id ------------------------------------------


@pytest.mark.parametrize("command", [["inspect"], ["convert", "-o", "OUT"]])
def test_missing_local_folder_fails_fast_and_says_so(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = [c if c != "OUT" else str(tmp_path / "o") for c in command]
    start = time.monotonic()
    code, text = hc(monkeypatch, capsys, args[0], "checkpoints/plamo2-tiny", *args[1:])
    assert code == EXIT_BAD_INPUT, text
    assert "no local folder named 'checkpoints/plamo2-tiny'" in text
    assert "Retrying" not in text and "thrown while requesting" not in text
    assert time.monotonic() - start < 10


def test_inspect_unreachable_hub_prints_no_retry_lines(tmp_path, monkeypatch, capsys):
    """With the network up but the Hub unreachable (this machine), huggingface_hub's
    retry lines used to precede the error; the first plain request now fails at once."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    start = time.monotonic()
    code, text = hc(monkeypatch, capsys, "inspect", "someorg/somemodel")
    assert code == EXIT_BAD_INPUT, text
    assert "reach" in text and "no local folder named 'someorg/somemodel'" in text, text
    assert "Retrying" not in text and "thrown while requesting" not in text
    assert time.monotonic() - start < 10
