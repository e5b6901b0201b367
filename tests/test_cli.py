"""`temper --help` and every subcommand's help document the knobs."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from temper.cli import SECTIONS, app

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
    for dotted, field in knobs(SECTIONS[section_name], section_name):
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
    # A mapping replaces the default's whole (DVC would merge it), with no spaces outside
    # quotes, so an unquoted $(temper profile full) splits into whole arguments.
    assert (
        "-S '~prepare.max_examples' "
        "-S '+prepare.max_examples={train:null,validation:null,test:null}'"
    ) in result.output
    assert "-S train.layers=null" in result.output
