"""`temper profile NAME`: an unknown name is an error that lists the profiles that exist."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from temper.cli import app
from temper.cli.profiles import read_profile
from temper.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_profile_lists_the_profiles_that_exist(monkeypatch):
    monkeypatch.chdir(ROOT)
    shipped = sorted(p.stem for p in (ROOT / "configs/profiles").glob("*.yaml"))
    assert {"full", "nli"} <= set(shipped)
    result = CliRunner().invoke(app, ["profile", "bogus"])
    assert result.exit_code == 1
    assert "no profile 'bogus' (configs/profiles/bogus.yaml not found)" in result.output
    assert f"profiles: {', '.join(shipped)}" in result.output


def test_read_profile_reads_an_existing_one(tmp_path):
    (tmp_path / "small.yaml").write_text("train:\n  rank: 4\n")
    assert read_profile("small", tmp_path) == {"train": {"rank": 4}}


def test_read_profile_says_why_there_is_none(tmp_path):
    with pytest.raises(ConfigError, match=r"profiles: none, .* holds no \.yaml file"):
        read_profile("full", tmp_path)
    with pytest.raises(ConfigError, match=r"no folder .*nowhere here \(run temper in the"):
        read_profile("full", tmp_path / "nowhere")
