"""The params as the commands see them: `temper config`, and help that shows values in effect.

A stage command resolves its params as `params.yaml` (or the `-p` file) with the `-S`
overrides applied in order, then validates them into the root model `TemperParams`, whose
sections are the stages' typed configs (`cli.common.load`). `temper config` prints exactly that; each command's
`--help` lists its sections' fields with the value in effect beside the code's default,
reading the `-p`/`-S` given on the same command line (help is built when it is asked for,
not at import, so it follows the working directory). A missing or broken params file never
breaks `--help`: the defaults are shown with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import click
import typer
import yaml
from typer.core import TyperCommand

from ..config import ConfigError, Params, describe, load_params, value_origin
from ..params import TemperParams, config_sections
from .common import PARAMS, ParamsOpt, SetOpt, load

# A command whose help lists one of these sections (evaluate, gate, promote) also lists the
# metric names of the task in effect: what `evaluate.primary_metric`, which the gates and
# promotion judge by, may name.
METRIC_SECTION_NAMES = frozenset({"gates"})


def params_args(args: list[str]) -> tuple[Path, list[str]]:
    """The `-p/--params` file and `-S/--set` overrides in a raw command line (before click
    parses it: `--help` is eager and stops parsing before the other options are read)."""
    path, overrides = PARAMS, []
    it = iter(args)
    for arg in it:
        for flags, kind in ((("-p", "--params"), "p"), (("-S", "--set"), "s")):
            value = None
            if arg in flags:
                value = next(it, None)
            elif arg.startswith(flags[1] + "="):
                value = arg.split("=", 1)[1]
            elif arg.startswith(flags[0]) and len(arg) > 2 and not arg.startswith("--"):
                value = arg[2:]
            if value is not None:
                if kind == "p":
                    path = Path(value)
                else:
                    overrides.append(value)
    return path, overrides


def resolved_help(names: tuple[str, ...], path: Path, overrides: list[str]) -> str:
    """The epilog of a command's help: every field of its sections, with values in effect."""
    try:
        params: Params | None = load_params(path, overrides)
        note = f"Values in effect: {path}" + (
            " with " + " ".join(f"-S {o}" for o in overrides) if overrides else ""
        )
        note += (
            ". A field set to something else than the code's default shows "
            "`value (where it was set; default: ...)`."
        )
    except ConfigError as err:
        params = None
        note = f"Showing the code's defaults: {err}"
    parts = [note]
    if METRIC_SECTION_NAMES.intersection(names):
        parts.append(metrics_help(params))
    for name in names:
        model = config_sections()[name]
        values = None
        if params is not None:
            try:
                one = Params({name: params.get(name) or {}}, params.source, params.overrides)
                values = TemperParams.of(one).model_dump(mode="json")[name]
            except ConfigError as err:
                parts.append(f"Showing the code's defaults for '{name}': {err}")
        parts.append(
            describe(model, name, values, lambda dotted, p=params: value_origin(p, dotted))
        )
    return "\n\n".join(parts)


def metrics_help(params: Params | None) -> str:
    """The metric names the task in effect gets, one paragraph of help (the default task's
    when the params could not be read)."""
    from ..evaluation.scoring import metric_names

    values = params or {}
    where = values.get("task") or "params set no task: the default"
    try:
        task = TemperParams.of({"task": values["task"]} if "task" in values else {}).load_task()
    except ConfigError as err:
        return f"Metrics: cannot read the task ({err})."
    names = metric_names(task)
    text = (
        f"Metrics of task {task.name} ({where}), the names evaluate.primary_metric may take: "
        + ", ".join(names)
        + "."
    )
    try:
        primary = TemperParams.of(
            {"evaluate": values.get("evaluate") or {}}
        ).evaluate.primary_metric
    except ConfigError:
        return text  # the section's own paragraph says what is wrong with it
    if primary not in names:
        text += f" evaluate.primary_metric = {primary!r} is not one of them: evaluate refuses it."
    return text


def help_command(names: tuple[str, ...]) -> type[TyperCommand]:
    """A command class whose help lists the sections `names` with the values in effect."""

    class ParamsHelpCommand(TyperCommand):
        def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
            ctx.meta["temper.argv"] = list(args)  # read by format_epilog if --help comes
            return super().parse_args(ctx, args)

        def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
            path, overrides = params_args(ctx.meta.get("temper.argv", []))
            formatter.write_paragraph()
            with formatter.indentation():
                formatter.write_text(resolved_help(names, path, overrides))

    return ParamsHelpCommand


def resolved(p: TemperParams, only: str | None = None) -> dict[str, Any]:
    """The params as the stage commands use them: validated, defaults filled in, dumped."""
    out = p.model_dump(mode="json")
    if only is None:
        return out
    if only not in out:
        raise ConfigError(
            f"no section {only!r} (have: {', '.join(sorted(config_sections()))}, task)"
        )
    return {only: out[only]}


def config_cmd(
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
    section_name: Annotated[
        str | None, typer.Option("--section", "-s", help="Print only this section.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of YAML.")] = False,
) -> None:
    """Print the resolved params (file + `-S` overrides, defaults filled in) as the stages
    see them: `temper config -S train.rank=8 --section train`. Exit 2 on a bad config."""
    out = resolved(load(params, set_), section_name)
    if section_name is not None:
        out = out[section_name]
    if as_json:
        typer.echo(json.dumps(out, indent=2))
    else:
        typer.echo(yaml.safe_dump(out, sort_keys=False, allow_unicode=True).rstrip())
