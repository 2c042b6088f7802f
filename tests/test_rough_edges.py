"""Rough edges a new user met (issue 13, item 3): each is checked here."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest

from hybridconv.errors import LedgerError

REPO = Path(__file__).resolve().parents[1]


def license_warnings(pyproject: Path) -> list[str]:
    """The warnings setuptools gives when it reads ``pyproject`` (as on every
    ``pip install -e .``), those about the license only."""
    from setuptools.config import pyprojecttoml
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyprojecttoml.apply_configuration(Distribution(), str(pyproject))
    return [str(w.message) for w in caught if "license" in str(w.message).lower()]


def test_pyproject_license_is_an_spdx_string(tmp_path):
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    assert license_warnings(tmp_path / "pyproject.toml") == []
    # the check can fail: the table form it replaced is warned about
    text = (tmp_path / "pyproject.toml").read_text().replace('license = "Apache-2.0"', 'license = { text = "Apache-2.0" }')
    (tmp_path / "pyproject.toml").write_text(text)
    assert license_warnings(tmp_path / "pyproject.toml")


def test_a_config_that_lies_about_a_size_names_the_key(fixtures_dir, tmp_path):
    from hybridconv.convert import plan

    src = shutil.copytree(fixtures_dir / "plamo2-tiny", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["hidden_size"] = 96
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LedgerError) as err:
        plan(src)
    assert "implies [320, 96] (hidden_size = 96; the weights have 64)" in err.value.message


def test_verify_help_finishes_its_sentences():
    from typer.testing import CliRunner

    from hybridconv.cli import app, main  # noqa: F401  (main registers the commands)
    from hybridconv.cli import verify as _verify  # noqa: F401

    out = CliRunner().invoke(app, ["verify", "--help"], env={"COLUMNS": "300"}).output
    assert "How many random sequences to run [default: 2 when no --prompt or --text-file is given, else 1]." in out
    # no stray space before a full stop (where a [default: …] note was swallowed as markup)
    assert not re.search(r"\S \.(\s|$)", out), re.search(r".{40}\S \.(\s|$)", out)
    assert "<bool>" not in out  # flags take no value


def test_cli_starts_with_a_typer_that_has_no_rich_type_hook(monkeypatch):
    """Older typer releases have no TyperOption.display_type_rich (seen on another
    machine): hiding <bool> must then do nothing rather than break start-up."""
    from typer.core import TyperOption

    import hybridconv.cli as cli

    monkeypatch.delattr(TyperOption, "display_type_rich")
    cli._hide_flag_types()  # no AttributeError
