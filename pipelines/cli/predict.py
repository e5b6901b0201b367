"""`temper predict`: a registered, pulled or local model's answers to unlabelled records."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from ..params import TemperParams
from .common import PARAMS, ParamsOpt, SetOpt, fail, load


def local_base(p: TemperParams, folder: Path) -> Path | None:
    """`model.dir` when it holds the bundle's base model (saves materialising it again)."""
    from .. import bundle

    try:
        return bundle.matching_base(p.model.dir, bundle.read_manifest(folder))
    except bundle.BundleError:
        return None


def open_model(
    p: TemperParams, model: str, base: Path | None, tmp: Path, threads: int | None
) -> Any:
    """A Bundle for a pulled folder, a registry URI (pulled into `tmp`) or an adapter folder."""
    from .. import bundle

    path = Path(model)
    if not (path / bundle.MANIFEST).exists() and not (path / "adapter_config.json").exists():
        from ..tracking import pull
        from .release import registry_client

        registry_client(p)
        path = pull.pull(model, tmp / "bundle")
    ev = p.evaluate
    if (path / bundle.MANIFEST).exists():
        found = base or local_base(p, path)
        return bundle.load_bundle(path, found, threads=threads or ev.threads, device=ev.device)
    task = p.load_task()
    settings = bundle.generation_settings(task, ev)
    return bundle.load_adapter(
        path, base or p.base_dir, task, settings, threads or ev.threads, ev.device
    )


def predict_cmd(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="A pulled bundle folder, models:/<name>@<alias> (or /<version>), or an "
            "adapter folder (then the task, base model and settings come from the params).",
        ),
    ],
    input_path: Annotated[
        Path, typer.Option("--input", "-i", help="Records: .jsonl, .csv or .parquet.")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Predictions (JSONL, written atomically).")
    ] = Path("predictions.jsonl"),
    text_field: Annotated[str, typer.Option(help="The field holding each record's text.")] = "text",
    batch_size: Annotated[int, typer.Option(min=1, help="Generation batch size.")] = 16,
    on_error: Annotated[
        str, typer.Option(help="fail: stop at a bad record; skip: leave it out and count it.")
    ] = "fail",
    base: Annotated[
        Path | None,
        typer.Option(help="Base model folder (its hash must match; default: by identity)."),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads.")] = None,
    params: ParamsOpt = PARAMS,
    set_: SetOpt = None,
) -> None:
    """Answer unlabelled records: id, answer, raw output, schema validity, label confidences.

    A label's confidence is the product of the probabilities of the generated tokens that spell
    it (see temper.evaluation.confidence). Counts go to <out stem>.summary.json. Exit codes:
    0 done, 1 bad input or model, 2 bad options.
    """
    from ..evaluation import batch_predict

    if on_error not in ("fail", "skip"):
        fail(ValueError(f"--on-error {on_error!r}: use fail or skip"), 2)
    mode: Literal["fail", "skip"] = "skip" if on_error == "skip" else "fail"
    p = load(params, set_)
    # Check the input before loading a model: a bad line costs no model load.
    batch_predict.read_records(input_path, text_field, mode)
    with tempfile.TemporaryDirectory(prefix="temper-predict-") as tmp:
        loaded = open_model(p, model, base, Path(tmp), threads)
        summary = batch_predict.predict(loaded, input_path, out, text_field, batch_size, mode)
    typer.echo(
        f"predicted {summary['predicted']} records into {out} "
        f"({summary['schema_valid']} fit the schema; skipped {summary['skipped']}); "
        f"summary: {batch_predict.summary_path(out)}"
    )
