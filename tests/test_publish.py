"""upload and release against a local fake of the Hub's HTTP API, driving the
real huggingface_hub client; the token is a sentinel that must never leak."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hybridconv.convert import convert
from hybridconv.publish.card import read_front_matter
from hybridconv.verify.reference import read_reference_file
from hybridconv.verify.run import verify_folder, write_report

from .fake_hub import FakeHub

HC = [sys.executable, "-m", "hybridconv"]
SENTINEL = "hf_SENTINELtokenDoNotLeak0123456789"


def _env(tmp_path: Path, hub: FakeHub | None) -> dict:
    env = dict(os.environ)
    env.update(HF_TOKEN=SENTINEL, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1")
    env.pop("HF_HUB_OFFLINE", None)
    if hub:
        env["HF_ENDPOINT"] = hub.url
    return env


def run(args, tmp_path, hub=None):
    r = subprocess.run([*HC, *map(str, args)], capture_output=True, text=True, env=_env(tmp_path, hub))
    assert SENTINEL not in r.stdout + r.stderr
    return r


@pytest.fixture
def verified(fixtures_dir, tmp_path) -> Path:
    case = "plamo2-tiny"
    out = tmp_path / "out"
    convert(str(fixtures_dir / case), out, dtype="float32")
    ref = read_reference_file(fixtures_dir / case / "expected.safetensors")
    write_report(verify_folder(out, ref).report, out / "verification.json")
    return out


def _no_sentinel_in_files(folder: Path):
    for f in folder.rglob("*"):
        if f.is_file():
            assert SENTINEL.encode() not in f.read_bytes(), f


def test_dry_run_lists_files_and_card(verified, tmp_path):
    r = run(["upload", verified, "--repo-id", "org/model", "--dry-run"], tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("model.safetensors", "config.json", "tokenizer.json", "verification.json", "README.md"):
        assert name in r.stdout
    assert "library_name: mlx" in r.stdout and "## Verification" in r.stdout
    assert not (verified / "README.md").exists()  # a dry run writes nothing


def test_unverified_and_tampered_are_refused(verified, tmp_path, fixtures_dir):
    bare = tmp_path / "bare"
    convert(str(fixtures_dir / "plamo2-tiny"), bare, dtype="float32")
    r = run(["upload", bare, "--repo-id", "org/model", "--dry-run"], tmp_path)
    assert r.returncode == 4 and "never verified" in r.stderr and "hybridconv verify" in r.stderr
    # a weight file changed after verify
    with open(verified / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x7f")
    r = run(["upload", verified, "--repo-id", "org/model", "--dry-run"], tmp_path)
    assert r.returncode == 4 and "changed after verification" in r.stderr
    # a failed verification
    report = json.loads((bare / "verification.json").read_text()) if (bare / "verification.json").exists() else None
    assert report is None
    with FakeHub() as hub:
        r = run(["upload", verified, "--repo-id", "org/model"], tmp_path, hub)
        assert r.returncode == 4
        assert hub.requests == []  # refused before any network


def test_upload_publishes_exactly_the_folder_and_card(verified, tmp_path):
    with FakeHub() as hub:
        r = run(["upload", verified, "--repo-id", "org/model", "--private", "--revision", "v1"], tmp_path, hub)
        assert r.returncode == 0, r.stdout + r.stderr
    repo = hub.repos["org/model"]
    assert repo["private"] and "v1" in repo["branches"]
    (commit,) = repo["commits"]
    assert commit["revision"] == "v1"
    local = {p.name for p in verified.iterdir() if p.is_file()}
    assert set(commit["files"]) == local  # README.md was written into OUT and uploaded
    assert commit["files"]["model.safetensors"] == (verified / "model.safetensors").read_bytes()
    card = commit["files"]["README.md"].decode()
    meta = read_front_matter(card)
    assert meta["library_name"] == "mlx" and {"mlx", "plamo2", "hybridconv"} <= set(meta["tags"])
    assert "| verdict | **pass** |" in card and "weights hash" in card
    # the token went only into the Authorization header
    auth = {rq["headers"].get("Authorization") or rq["headers"].get("authorization") for rq in hub.requests}
    assert auth == {f"Bearer {SENTINEL}"}
    for rq in hub.requests:
        assert SENTINEL.encode() not in rq["body"]
    _no_sentinel_in_files(verified)


def test_allow_unverified_is_loud_and_marked(fixtures_dir, tmp_path):
    bare = tmp_path / "bare"
    convert(str(fixtures_dir / "recurrent_gemma-tiny"), bare, dtype="float32")
    with FakeHub() as hub:
        r = run(["upload", bare, "--repo-id", "org/rg", "--allow-unverified"], tmp_path, hub)
        assert r.returncode == 0, r.stderr
    assert "UNVERIFIED" in r.stderr
    card = hub.repos["org/rg"]["commits"][0]["files"]["README.md"].decode()
    assert "unverified" in read_front_matter(card)["tags"] and "Not verified" in card


def test_hub_failure_exit_5_without_token(verified, tmp_path):
    with FakeHub() as hub:
        hub.fail_commits_for.add("org/broken")
        r = run(["upload", verified, "--repo-id", "org/broken"], tmp_path, hub)
    assert r.returncode == 5 and "Traceback" not in r.stderr
    assert "simulated failure" in " ".join(r.stderr.split())  # the Hub's own words reach the user


def test_hub_message_echoing_the_token_is_scrubbed(verified, tmp_path):
    """A Hub (or proxy) error that quotes the credentials: the user sees the Hub's
    message with the token replaced by ***, never the token (run() asserts that
    on stdout and stderr)."""
    with FakeHub() as hub:
        hub.echo_token_for.add("org/echo")
        r = run(["upload", verified, "--repo-id", "org/echo"], tmp_path, hub)
    err = " ".join(r.stderr.split())
    assert r.returncode == 5 and "Traceback" not in err
    assert "simulated refusal" in err and "may not write to org/echo" in err, err
    assert "Bearer ***" in err, err  # the token was there, and was replaced


def test_failed_verification_is_never_uploaded(verified, tmp_path):
    """A report whose verdict is fail, for exactly these weights (the hash
    matches): refused with the report's reasons, before any request."""
    from hybridconv.verify.run import REPORT_NAME

    report = json.loads((verified / REPORT_NAME).read_text())
    report.update(verdict="fail", failure_reasons=["max_kl_mean: 0.9 vs threshold 0.01"])
    write_report(report, verified / REPORT_NAME)
    with FakeHub() as hub:
        r = run(["upload", verified, "--repo-id", "org/model"], tmp_path, hub)
        assert r.returncode == 4, r.stderr
        assert hub.requests == [] and hub.repos == {}
    err = " ".join(r.stderr.split())
    assert "verification failed (max_kl_mean: 0.9 vs threshold 0.01)" in err, err
    dry = run(["upload", verified, "--repo-id", "org/model", "--dry-run"], tmp_path)
    assert dry.returncode == 4 and "verification failed" in dry.stderr


def test_card_template_and_source_card(fixtures_dir, tmp_path, verified):
    template = tmp_path / "card.md"
    template.write_text("# {title}\n\nCustom text. Verdict section:\n\n{verification_section}\n")
    r = run(["upload", verified, "--repo-id", "org/m", "--dry-run", "--card-template", template], tmp_path)
    assert r.returncode == 0 and "Custom text" in r.stdout
    template.write_text("# {nope}\n")
    r = run(["upload", verified, "--repo-id", "org/m", "--dry-run", "--card-template", template], tmp_path)
    assert r.returncode == 2 and "placeholder" in r.stderr
    # license and language come from the source's card
    src = tmp_path / "src"
    shutil.copytree(fixtures_dir / "recurrent_gemma-tiny", src)
    (src / "README.md").write_text("---\nlicense: gemma\nlanguage:\n- en\n---\n# original\n")
    out = tmp_path / "rg"
    convert(str(src), out, dtype="float32")
    from hybridconv.publish.card import render_card

    meta = read_front_matter(render_card(out, "org/rg"))
    assert meta["license"] == "gemma" and meta["language"] == ["en"]


PLAN = """
name = "tiny"
[source]
path = "{src}"
[verify]
random_tokens = 24
num_sequences = 2
[upload]
private = false
[[variants]]
name = "fp16"
dtype = "float16"
repo_id = "org/tiny-fp16"
[[variants]]
name = "q8"
bits = 8
group_size = 32
repo_id = "org/tiny-8bit"
[[variants]]
name = "q4"
bits = 4
group_size = 32
repo_id = "org/tiny-4bit"
gates = {{ min_top1 = 1.01 }}
"""


def test_release_three_variants(fixtures_dir, tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN.format(src=fixtures_dir / "plamo2-tiny"))
    work = tmp_path / "work"
    with FakeHub() as hub:
        r = run(["release", plan, "--workdir", work, "--json", tmp_path / "s.json"], tmp_path, hub)
        assert r.returncode == 1, r.stdout + r.stderr
        summary = json.loads((tmp_path / "s.json").read_text())
        assert summary["reference_runs"] == 1
        rows = {v["name"]: v for v in summary["variants"]}
        assert rows["fp16"]["verify"] == "pass" and rows["fp16"]["upload"] == "uploaded"
        assert rows["q8"]["verify"] == "pass" and rows["q8"]["upload"] == "uploaded"
        assert rows["q4"]["verify"] == "fail" and rows["q4"]["upload"].startswith("refused")
        assert set(hub.repos) == {"org/tiny-fp16", "org/tiny-8bit"}  # the failed one never reached the Hub
        card = hub.repos["org/tiny-8bit"]["commits"][0]["files"]["README.md"].decode()
        assert read_front_matter(card)["tags"][-1] == "8-bit"
        # rerun: everything finished is skipped, nothing uploaded twice, still non-zero
        n_commits = sum(len(r["commits"]) for r in hub.repos.values())
        r = run(["release", plan, "--workdir", work, "--json", tmp_path / "s2.json"], tmp_path, hub)
        assert r.returncode == 1
        again = {v["name"]: v for v in json.loads((tmp_path / "s2.json").read_text())["variants"]}
        assert json.loads((tmp_path / "s2.json").read_text())["reference_runs"] == 0
        assert all(again[n]["build"].startswith("skipped") for n in again)
        assert again["fp16"]["upload"].startswith("skipped") and again["q8"]["upload"].startswith("skipped")
        assert sum(len(r["commits"]) for r in hub.repos.values()) == n_commits
    _no_sentinel_in_files(work)


def test_release_dry_run_and_bad_plans(fixtures_dir, tmp_path):
    plan = tmp_path / "plan.yaml"
    data = {"source": {"path": str(fixtures_dir / "recurrent_gemma-tiny")},
            "variants": [{"name": "bf16", "dtype": "bfloat16", "repo_id": "org/a"},
                         {"name": "q4", "bits": 4, "group_size": 32, "repo_id": "org/b"}]}
    plan.write_text(yaml.safe_dump(data))
    r = run(["release", plan, "--dry-run"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "would upload to org/a" in r.stdout and "would upload to org/b" in r.stdout
    assert not (tmp_path / "release-plan").exists()
    for bad, needle in [({"variants": []}, "source"), ({**data, "extra": 1}, "unknown key(s) 'extra'"),
                        ({**data, "variants": [{"name": "x", "bitz": 4}]}, "bitz")]:
        plan.write_text(yaml.safe_dump(bad))
        r = run(["release", plan, "--dry-run"], tmp_path)
        assert r.returncode == 2 and needle in r.stderr, r.stderr
