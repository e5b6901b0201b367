"""`temper --help` and every subcommand's help document the knobs."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from temper.cli import app
from temper.params import config_sections

ROOT = Path(__file__).resolve().parents[1]

runner = CliRunner()


def commands() -> list[str]:
    import typer.main

    return sorted(typer.main.get_command(app).commands)


def test_top_level_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in commands():
        assert name in result.output
    assert {"base-model", "prepare", "profile"} <= set(commands())


@pytest.mark.parametrize("name", commands())
def test_every_command_has_help(name):
    result = runner.invoke(app, [name, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


STAGE_SECTIONS = [
    ("base-model", "model"),
    ("prepare", "prepare"),
    ("distil", "distil"),
    ("train", "train"),
    ("evaluate", "evaluate"),
    ("gate", "gates"),
    ("register", "register"),
    ("promote", "promote"),
    ("cost", "cost"),
]


def knobs(model, prefix: str):
    """(dotted name, field) of every leaf field, nested sections (distil.provider) included."""
    from temper.config import Section

    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, Section):
            yield from knobs(field.annotation, f"{prefix}.{name}")
        else:
            yield f"{prefix}.{name}", field


@pytest.mark.parametrize(("command", "section_name"), STAGE_SECTIONS)
def test_every_knob_is_documented_in_its_commands_help(command, section_name):
    """A field added without a description fails here: the help is where users read them."""
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    help_text = " ".join(result.output.split())  # help wraps long lines
    for dotted, field in knobs(config_sections()[section_name], section_name):
        assert (field.description or "").strip(), f"{dotted} has no description"
        assert f"{dotted} = " in help_text, dotted
        assert " ".join(field.description.split())[:40] in help_text, dotted


def test_bad_override_is_a_usage_error():
    result = runner.invoke(app, ["prepare", "-S", "prepare.max_tokens=lots"])
    assert result.exit_code != 0
    assert "prepare.max_tokens" in result.output


def test_profile_prints_dvc_overrides():
    result = runner.invoke(app, ["profile", "full"])
    assert result.exit_code == 0
    # A mapping replaces the default's whole (DVC would merge it), leaf by leaf and unquoted,
    # so an unquoted $(temper profile full) splits into whole arguments.
    assert (
        "-S ~prepare.max_examples -S +prepare.max_examples.train=null "
        "-S +prepare.max_examples.validation=null -S +prepare.max_examples.test=null"
    ) in result.output
    assert "'" not in result.output and "{" not in result.output
    assert "-S train.layers=null" in result.output


def test_help_shows_the_value_in_effect_beside_the_default(tmp_path, monkeypatch):
    """params.yaml of the working directory, then -p and -S given before --help."""
    import yaml

    from temper.config import read_yaml

    monkeypatch.chdir(tmp_path)
    params = read_yaml(ROOT / "params.yaml")
    params["train"]["layers"] = 8
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    text = " ".join(runner.invoke(app, ["train", "--help"], terminal_width=200).output.split())
    assert "train.layers = 8 (params.yaml; default: None)" in text
    assert "train.rank = 16 (int)" in text  # same as the default: shown once
    res = runner.invoke(app, ["train", "-S", "train.layers=4", "--help"], terminal_width=200)
    assert "train.layers = 4 (-S train.layers=4; default: None)" in " ".join(res.output.split())
    other = tmp_path / "exp.yaml"
    other.write_text(yaml.safe_dump({**params, "train": {**params["train"], "layers": 2}}))
    res = runner.invoke(app, ["train", "--help", "-p", str(other)], terminal_width=200)
    assert f"train.layers = 2 ({other}; default: None)" in " ".join(res.output.split())


@pytest.mark.parametrize("content", [None, "train: [1\n", "train:\n  rank: lots\n"])
def test_help_never_fails_on_a_missing_or_broken_params_file(tmp_path, monkeypatch, content):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / "params.yaml").write_text(content)
    res = runner.invoke(app, ["train", "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "Showing the code's defaults" in text
    assert {None: "file not found", "train: [1\n": "invalid YAML", "train:\n  rank: lots\n": "train.rank"}[content] in text  # fmt: skip
    assert "train.layers = None (int | None)" in text


def test_config_prints_the_resolved_params(tmp_path):
    import json

    import yaml

    params = str(ROOT / "params.yaml")
    res = runner.invoke(app, ["config", "-p", params])
    assert res.exit_code == 0, res.output
    out = yaml.safe_load(res.output)
    assert set(config_sections()) <= set(out) and out["task"] == "configs/tasks/clause_review.yaml"
    assert out["train"]["layers"] == 8
    assert out["distil"]["provider"]["kind"] == "gold"
    assert out["evaluate"]["threads"] is None and "dtype" in out["evaluate"]  # defaults filled
    res = runner.invoke(
        app,
        ["config", "-p", params, "-S", "train.learning_rate=5e-4", "--section", "train", "--json"],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["learning_rate"] == 0.0005
    res = runner.invoke(app, ["config", "-p", params, "-S", "train.lr=1"])
    assert res.exit_code == 2 and "did you mean 'learning_rate'" in res.output
    res = runner.invoke(app, ["config", "-p", params, "--section", "nope"])
    assert res.exit_code == 2 and "no section 'nope'" in res.output


def test_key_put_a_level_too_high_names_the_nested_key(tmp_path):
    """`distil.max_usd` is `distil.provider.max_usd`: the hint gives the key to type, whether
    the stray key came from `-S` (temper's or `dvc exp run`'s) or from the params file."""
    params = tmp_path / "params.yaml"
    params.write_text("{}\n", encoding="utf-8")
    hint = "distil.max_usd: Extra inputs are not permitted (did you mean distil.provider.max_usd?)"
    res = runner.invoke(app, ["config", "-p", str(params), "-S", "distil.max_usd=0.05"])
    assert res.exit_code == 2 and hint in res.output, res.output
    assert "-S distil.max_usd=0.05" in res.output
    # A stage: an invalid (not unreadable) params file is a Temper error, exit 1.
    res = runner.invoke(app, ["prepare", "-p", str(params), "-S", "distil.max_usd=0.05"])
    assert res.exit_code == 1 and hint in res.output, res.output
    params.write_text("distil:\n  max_usd: 0.05\n", encoding="utf-8")
    res = runner.invoke(app, ["config", "-p", str(params)])
    assert res.exit_code == 2 and hint in res.output and f"{params}: invalid" in res.output
    # One level too low, and a misspelt leaf, are found the same way.
    fixed = ["config", "-p", str(params), "-S", "~distil.max_usd"]
    res = runner.invoke(app, [*fixed, "-S", "distil.provider.out_dir=x"])
    assert res.exit_code == 2 and "(did you mean distil.out_dir?)" in res.output, res.output
    res = runner.invoke(app, [*fixed, "-S", "distil.max_uds=1"])
    assert "(did you mean distil.provider.max_usd?)" in res.output, res.output
