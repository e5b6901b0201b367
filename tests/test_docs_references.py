"""The docs name only commands and params that exist (README.md and docs/*.md).

Two kinds of reference are checked, both read from code (fenced blocks and inline spans):
`temper <command> [<subcommand>]` invocations, walked through the click tree of the typer
app, and params keys (`evaluate.constrained`, `-S serve.engine_url=...`) whose first part is a
params section, resolved through the typed config models (optional fields with defaults
count; a dict or list field such as `train.candidates` or `route.tiers` ends the walk: what
follows is data). The README's stage table and command list must cover every dvc.yaml stage
and every command.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from typer.testing import CliRunner

from temper.cli import app
from temper.config import Section, read_yaml
from temper.params import config_sections

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
SPAN = re.compile(r"`([^`]+)`")
# `temper` as a command (not `/srv/temper`, `temper-clause-review`, `temper.task`), then words.
INVOCATION = re.compile(r"(?<![\w/.@:-])temper((?:[ \t]+[a-z][a-z0-9_-]*)+)")
KEY = r"[a-z_][a-z0-9_]*(?:\.[A-Za-z0-9_<>\[\]*-]+)+"
SPAN_KEY = re.compile(rf"[+~]?({KEY})(?:\s*[:=].*)?", re.S)  # `key`, `key: v`, `key=v`
SET_KEY = re.compile(rf"(?:-S|--set)[ \t]+['\"]?[+~]*({KEY})")
FILE_SUFFIX = re.compile(r"\.(db|dump|json|jsonl|md|png|py|safetensors|yaml|yml)$")

# Dotted names in the docs that are not params, each with what it is. Each must stay a name
# that does not resolve (test_not_params_really_are_not_params), so none hides a real key.
NOT_PARAMS = {
    "train.lr": "README: the deliberate typo that `-S` answers with 'did you mean'",
    "distil.max_usd": "README: a key a level too high, answered 'did you mean' in full",
    "prepare.threshold": "docs/prepare.md: a key a level too high, answered 'did you mean'",
    "train.val_loss": "an MLflow metric name",
    "train.base_val_loss": "an MLflow metric name",
    "train.steps": "an MLflow metric name",
    "train.tokens_per_s": "an MLflow metric name",
    "mlflow.parentRunId": "an MLflow tag",
    "mlflow.modelVersions": "an MLflow tag",
    "mlflow.sharedViewState.temper-candidates": "an MLflow tag",
    "mlflow.register_model": "an MLflow function",
    "model.generate": "transformers' generate method",
    "train.generate": "a former module, named in a measurement's history",
    "evaluate.Metric": "the Hugging Face evaluate library's class",
    "route.tier": "a field of a request's `route` body, not of params",
}


def code_spans(markdown: str) -> list[str]:
    """The inline code spans of a markdown text, outside fenced blocks (a span may wrap onto
    the next line; its newline reads as a space)."""
    return [m.group(1).replace("\n", " ") for m in SPAN.finditer(FENCE.sub("", markdown))]


def code_texts(markdown: str) -> list[str]:
    """The code of a markdown text: each fenced block, then each inline span."""
    return [m.group(1) for m in FENCE.finditer(markdown)] + code_spans(markdown)


def invocations(markdown: str) -> list[list[str]]:
    """The word lists after `temper` in the code of `markdown` (arguments included)."""
    return [m.group(1).split() for code in code_texts(markdown) for m in INVOCATION.finditer(code)]


def command_error(words: list[str], root: Any) -> str | None:
    """Why `temper <words>` names no command (None when it does): the words are walked
    through the groups (a command with `commands`: typer's click is its own, so no isinstance
    on click.Group); at a command that is no group the rest are its arguments."""
    command, path = root, ["temper"]
    for word in words:
        if not isinstance(getattr(command, "commands", None), dict):
            return None
        sub = command.commands.get(word)
        if sub is None:
            have = ", ".join(sorted(command.commands))
            return f"`{' '.join(path)} {word}`: no such command (have: {have})"
        command, path = sub, [*path, word]
    return None


def param_keys(markdown: str) -> list[str]:
    """Dotted names in the code of `markdown` that start with a params section: an inline
    span that is a key (`evaluate.constrained`, `serve.engine: vllm`) and every `-S` key."""
    keys = [m.group(1) for code in code_texts(markdown) for m in SET_KEY.finditer(code)]
    for span in code_spans(markdown):
        key = SPAN_KEY.fullmatch(span.strip())
        if key and not FILE_SUFFIX.search(key.group(1)):
            keys.append(key.group(1))
    return [k for k in keys if k.split(".")[0] in config_sections()]


def _model_of(annotation: object) -> type[Section] | None:
    """The config section an annotation holds (`X` or `X | None`), or None."""
    options = [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(options) == 1 and isinstance(options[0], type) and issubclass(options[0], Section):
        return options[0]
    return None


def key_error(key: str) -> str | None:
    """Why `key` is no params key (None when it is one): each part after the section must be
    a field of the typed config it is in; a field that is no config section (a value, a dict
    or a list) ends the walk."""
    model: type[Section] | None = config_sections()[key.split(".")[0]]
    for part in key.split(".")[1:]:
        if model is None or part == "*":
            return None
        name = part.split("[")[0]
        field = model.model_fields.get(name)
        if field is None:
            return f"`{key}`: {model.__name__} has no field {name!r}"
        model = _model_of(field.annotation)
    return None


def doc_problems(markdown: str) -> list[str]:
    """Every command and params key the code of `markdown` names that does not exist."""
    root = typer.main.get_command(app)
    problems = [command_error(words, root) for words in invocations(markdown)]
    problems += [key_error(k) for k in param_keys(markdown) if k not in NOT_PARAMS]
    return [p for p in problems if p is not None]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_docs_name_only_commands_and_params_that_exist(path):
    assert doc_problems(path.read_text(encoding="utf-8")) == []


def test_the_checker_finds_a_bogus_command_and_a_bogus_key():
    bad = (
        "Run `temper bogus-command` or `temper monitor bogus`, set `evaluate.no_such_key`:\n\n"
        "```bash\ntemper train -S train.no_such_knob=1\n```\n"
    )
    problems = doc_problems(bad)
    assert len(problems) == 4, problems
    assert "`temper bogus-command`: no such command" in problems[0]
    assert "`temper monitor bogus`: no such command" in problems[1]
    assert "TrainConfig has no field 'no_such_knob'" in problems[2]
    assert "EvaluateConfig has no field 'no_such_key'" in problems[3]


def test_the_checker_accepts_what_exists():
    good = (
        "`temper monitor review import x.csv`, `temper profile nli`, `temper evaluate\n--help`,"
        " `evaluate.constrained: true`, `route.calibrate.target_accuracy`,"
        " `prepare.fields.fill: {column: x}`, `train.candidates.r16` (a dict: data after it),"
        " `route.tiers[0].min_confidence`, `serve.engine_url`, `cache_eval.seed`,"
        " `route.registered_threshold` (optional, not in params.yaml), `clause_type.accuracy`"
        " (no section), `mlflow.db` (a file), `temper-clause-review`, `import temper`\n"
        "```\ndvc exp run -S '+train.candidates.new={rank: 8}' -S ~prepare.max_examples\n```\n"
    )
    assert len(invocations(good)) == 3
    assert "route.calibrate.target_accuracy" in param_keys(good)
    assert "mlflow.db" not in param_keys(good)
    assert doc_problems(good) == []


def test_not_params_really_are_not_params():
    for key in NOT_PARAMS:
        assert key_error(key) is not None, f"{key} is a params key: take it out of NOT_PARAMS"


def readme_section(heading_or_start: str) -> str:
    """The README's text from a line starting with `heading_or_start` to the next blank line."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n" + heading_or_start) + 1
    end = text.find("\n\n", start)
    return text[start : end if end != -1 else len(text)]


def test_readme_stage_table_has_every_dvc_stage():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    table = readme_section("| stage | reads | writes |")
    named = set(re.findall(r"^\| `([a-z_]+)(?:@<\w+>)?` \|", table, re.M))
    assert named == set(stages)


def test_readme_command_list_has_every_command():
    commands = set(typer.main.get_command(app).commands)
    listed = set(re.findall(r"`([a-z-]+)`", readme_section("Commands: ")))
    assert listed == commands


def test_params_yaml_sections_are_typed():
    """The key check resolves through SECTIONS: a params.yaml section without a typed config
    would be unchecked (only `task`, a path, has none)."""
    assert set(read_yaml(ROOT / "params.yaml")) - set(config_sections()) == {"task"}


def test_evaluate_help_lists_the_metric_names_of_the_task_in_effect(monkeypatch):
    """docs/tasks.md: `temper evaluate --help` lists the names for the task in effect."""
    monkeypatch.chdir(ROOT)
    runner = CliRunner()
    text = " ".join(runner.invoke(app, ["evaluate", "--help"], terminal_width=200).output.split())
    assert "Metrics of task clause_review (configs/tasks/clause_review.yaml)" in text
    assert "clause_type.macro_f1, key_term.rouge1," in text
    assert "is not one of them" not in text
    nli = ["evaluate", "-S", "task=configs/tasks/contract_nli.yaml", "--help"]
    text = " ".join(runner.invoke(app, nli, terminal_width=200).output.split())
    assert "label.accuracy, label.accuracy_any, label.macro_f1." in text
    assert "clause_type.accuracy," not in text
    # The default primary metric is the clause task's: the help says evaluate would refuse it.
    assert "evaluate.primary_metric = 'clause_type.accuracy' is not one of them" in text
