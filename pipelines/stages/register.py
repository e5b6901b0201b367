"""Stage register: the evaluation's winner becomes a new version in the MLflow model registry.

Reads `metrics/eval.json` (`results.EvalResult`), the winner's `models/candidates/<name>/`
(adapter + `train_metrics.json`, a `results.TrainResult`), `dvc.lock` (dataset hashes),
`metrics/distil.json` (teacher and cost) and the base model's `temper_source.json`. Logs a
`register-<name>` child run under the pipeline's parent run holding the params, the evaluation
and the per-example scores that `temper promote` compares; writes the model card into the
candidate's logged model (the adapter that training logged) and creates the model version
from it, pointing the alias `challenger` at it. Everything needed to rebuild the version (data
hashes, params, git commit, base model hash) is on the version as tags. What serving needs
(the resolved task config, the tokenizer with its chat template, the base model's identity and
the generation settings) goes to `serving/` of the register run (`temper.bundle`), with
`temper.serving.*` tags; `temper pull` turns it into a portable bundle.

The version is created with `MlflowClient.create_model_version(source="models:/<model_id>",
run_id=<register run>, model_id=...)`, and the logged model gets the version in its
`mlflow.modelVersions` tag (what `mlflow.register_model` does). `register_model` itself is not
used: it would make the *train* run the version's run, and promote reads the evaluation and
scores from the version's run. Without a logged model (a candidate trained without MLflow) the
adapter is copied into the register run and registered from there.

Under `dvc exp run` (DVC sets `DVC_EXP_NAME`) the version is registered and tagged
`temper.experiment=<name>`, but the alias stays where it was unless
`register.move_alias_in_experiments` is true: an experiment is not a release candidate. A
model that has no such alias yet (its first version) gets it all the same.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from .. import bundle, tracking
from ..config import Section
from ..errors import TemperError
from ..evaluation.field_scores import paired_metric
from ..io import (
    adapter_hash,
    model_hash,
    read_json,
    read_jsonl,
    stable_hash,
    write_json,
    write_jsonl,
)
from ..models import describe, identity
from ..results import CandidateEval, DistilResult, EvalResult, ResultError, TrainResult
from ..task import TaskConfig
from ..tracking.card import (
    attribution,
    estimates_markdown,
    fmt_estimate,
    gates_markdown,
    render_card,
    task_values,
)
from ..tracking.provenance import data_hashes, eval_set_hash, tag_json

log = logging.getLogger(__name__)


class RegisterError(TemperError, ValueError):
    """An input of the register stage is missing or malformed (the message names the file)."""


class RegisterConfig(Section):
    """`register:` in params.yaml."""

    model_name: str = Field("temper-clause-review", description="Registered model name.")
    alias: str = Field("challenger", description="Alias set on the new version.")
    eval: str = Field("metrics/eval.json", description="Evaluation results (evaluate stage).")
    predictions_dir: str = Field(
        "reports/predictions", description="Per-example predictions, <candidate>.jsonl."
    )
    candidates_dir: str = Field("models/candidates", description="Trained candidates.")
    lock: str = Field("dvc.lock", description="DVC lock file: source of the dataset hashes.")
    data_outs: list[str] = Field(
        ["data/prepared", "data/distilled"],
        description="DVC outputs whose md5 identifies the data (those present in the lock).",
    )
    distil_metrics: str = Field(
        "metrics/distil.json", description="Teacher and labelling cost (optional file)."
    )
    card_template: str = Field("configs/model_card.md", description="Model card template.")
    data_readme: str | None = Field(
        "data/raw/contracts/README.md",
        description="Optional data README whose '## License and required attribution' section "
        "the card copies verbatim; null or a missing file: the card says 'no data README "
        "given' and a warning is logged.",
    )
    route: str | None = Field(
        "reports/route.json", description="The route stage's policy, registered with it."
    )
    out: str = Field("metrics/register.json", description="Summary written by the stage.")
    require_winner: bool = Field(
        False, description="Fail when no candidate passed the gates (else: register nothing)."
    )
    move_alias_in_experiments: bool = Field(
        False,
        description="Under `dvc exp run` (DVC_EXP_NAME set) move the alias to the new version "
        "too (false: register and tag it temper.experiment=<name>, leave the alias).",
    )


def example_scores(path: Path, metric: str) -> list[dict[str, Any]]:
    """Per-example scores of the primary metric (evaluate's `scores` per prediction row), for
    the paired comparison in promote. An example the metric does not apply to (no gold key
    term, say) has no entry and is left out, so the comparison uses the metric's own examples.
    """
    if not path.exists():
        raise RegisterError(f"{path}: predictions not found (needed for promotion)")
    out = []
    for lineno, rec in enumerate(read_jsonl(path), 1):
        if "id" not in rec or not isinstance(rec.get("scores"), dict):
            raise RegisterError(f"{path}:{lineno}: a prediction row needs 'id' and 'scores'")
        if metric in rec["scores"]:
            out.append(
                {
                    "id": str(rec["id"]),
                    "score": float(rec["scores"][metric]),
                    "gold": rec.get("gold"),
                }
            )
    if not out:
        raise RegisterError(f"{path}: no example scored on {metric}")
    return out


@dataclass
class Winner:
    """Everything register needs about the winner, read and checked before MLflow is touched."""

    name: str
    adapter_dir: Path
    entry: CandidateEval
    primary: str
    scores: list[dict[str, Any]]
    train: TrainResult
    base_name: str
    base_hash: str
    data_hashes: dict[str, str]
    cost: dict[str, Any]
    commit: str
    params_hash: str
    adapter_sha: str
    attribution: str
    task: TaskConfig
    generation: bundle.GenerationSettings
    base_dir: Path
    model_id: str | None = None  # the candidate's logged model, when this store holds it

    @property
    def dataset_hash(self) -> str:
        return stable_hash(self.data_hashes)

    @property
    def eval_set(self) -> str:
        return eval_set_hash(self.scores)


def collect(
    cfg: RegisterConfig, result: EvalResult, params: dict[str, Any], served: Served
) -> Winner:
    """Read and check every input of the winner (nothing is written yet)."""
    name = result.winner
    entry = result.candidate(name, cfg.eval)
    if entry.gates is None or not entry.gates.passed:
        raise RegisterError(f"{cfg.eval}: winner {name!r} is marked as failing its gates")
    cand_dir = Path(cfg.candidates_dir) / name
    adapter_dir = cand_dir / "adapter"
    if not (adapter_dir / "adapter_config.json").exists():
        raise RegisterError(f"{adapter_dir}: no adapter_config.json (train stage output missing)")
    base_dir = Path(served.base_dir)
    if not (base_dir / "temper_source.json").exists():
        raise RegisterError(f"{base_dir}/temper_source.json: not found (run temper base-model)")
    source = read_json(base_dir / "temper_source.json")
    cost: dict[str, Any] = {"teacher": "gold labels (no teacher configured)"}
    if Path(cfg.distil_metrics).exists():
        distil = DistilResult.load(cfg.distil_metrics)
        cost.update(
            teacher=distil.teacher_text,
            labelling_usd=distil.usd,
            labelling_tokens=distil.tokens_in + distil.tokens_out,
        )
    if result.baseline is not None:
        cost["baseline"] = f"{result.baseline.name} ({result.baseline.kind})"
        if result.baseline.usd_total is not None:
            cost["baseline_usd_on_test"] = result.baseline.usd_total
    try:
        text = attribution(cfg.data_readme)
    except (OSError, ValueError) as err:
        raise RegisterError(str(err)) from None
    return Winner(
        name=name,
        adapter_dir=adapter_dir,
        entry=entry,
        primary=result.primary_metric,
        scores=example_scores(
            Path(cfg.predictions_dir) / f"{name}.jsonl", paired_metric(result.primary_metric)
        ),
        train=TrainResult.load(cand_dir / "train_metrics.json"),
        base_name=source.get("name") or source.get("repo_id") or describe(identity(base_dir)),
        base_hash=model_hash(base_dir),
        data_hashes=data_hashes(cfg.lock, cfg.data_outs),
        cost=cost,
        commit=tracking.git_commit(),
        params_hash=stable_hash(params),
        adapter_sha=adapter_hash(adapter_dir),
        attribution=text,
        task=served.task,
        generation=served.generation,
        base_dir=base_dir,
    )


def model_card(cfg: RegisterConfig, w: Winner, pipeline_run_id: str) -> str:
    return render_card(
        cfg.card_template,
        {
            "model_name": cfg.model_name,
            **task_values(w.task),
            "candidate": w.name,
            "base_model": w.base_name,
            "base_model_hash": w.base_hash,
            "eval_examples": len(w.scores),
            "primary_metric": w.primary,
            "metrics_table": estimates_markdown(w.entry.metrics, "value [95% CI]"),
            "delta_table": estimates_markdown(
                w.entry.delta_vs_baseline or {}, "candidate - baseline [95% CI]"
            ),
            "baseline": w.cost.get("baseline", "baseline"),
            "gates_verdict": "passed",
            "gates_table": gates_markdown(w.entry.gates),
            "teacher": w.cost["teacher"],
            "dataset_hash": w.dataset_hash,
            "attribution": w.attribution,
            "git_commit": w.commit,
            "params_hash": w.params_hash,
            "data_hashes": ", ".join(f"`{k}` {v}" for k, v in w.data_hashes.items()),
            "train_run_id": w.train.mlflow_run_id or "n/a",
            "pipeline_run_id": pipeline_run_id,
            "adapter_sha256": w.adapter_sha,
        },
    )


def version_tags(w: Winner, params: dict[str, Any], pipeline_run_id: str) -> dict[str, str]:
    """The version's lineage and results as tags (strings), readable in the registry UI."""
    metrics = {k: list(m.triple()) for k, m in w.entry.metrics.items()}
    deltas = {k: list(m.triple()) for k, m in (w.entry.delta_vs_baseline or {}).items()}
    tags = {
        "temper.candidate": w.name,
        "temper.base_model": w.base_name,
        "temper.base_model_hash": w.base_hash,
        "temper.data_hashes": json.dumps(w.data_hashes, sort_keys=True),
        "temper.dataset_hash": w.dataset_hash,
        "temper.git_commit": w.commit,
        "temper.git_dirty": ", ".join(tracking.git_dirty() or [])[:4000],
        "temper.params_hash": w.params_hash,
        "temper.params": tag_json(params, "temper/params.json"),
        "temper.primary_metric": w.primary,
        "temper.paired_metric": paired_metric(w.primary),  # what temper/scores.jsonl holds
        "temper.metrics": tag_json(metrics),
        "temper.delta_vs_baseline": tag_json(deltas),
        "temper.gates": tag_json(w.entry.gates.model_dump()),
        "temper.gates_passed": "true",
        "temper.eval_set": w.eval_set,
        "temper.eval_examples": str(len(w.scores)),
        "temper.teacher": str(w.cost["teacher"]),
        "temper.cost": tag_json(w.cost),
        "temper.adapter_sha256": w.adapter_sha,
        "temper.train_run_id": str(w.train.mlflow_run_id),
        "temper.model_id": str(w.model_id),
        "temper.pipeline_run_id": pipeline_run_id,
        **bundle.serving_tags(w.task, identity(w.base_dir), w.generation),
    }
    tags.update({f"metric.{k}": fmt_estimate(m) for k, m in w.entry.metrics.items()})
    return tags


def log_register_run(
    run: tracking.ChildRun,
    cfg: RegisterConfig,
    w: Winner,
    params: dict[str, Any],
    result: EvalResult,
) -> str:
    """Fill the `register-<winner>` run (params, lineage, eval, scores, card) and put the model
    card into the candidate's logged model; returns the source of the version to create:
    `models:/<model_id>` (the logged model), or the run's copy of the adapter when the
    candidate was trained without MLflow."""
    lineage_info = {
        "candidate": w.name,
        "base_model": w.base_name,
        "base_model_hash": w.base_hash,
        "data_hashes": w.data_hashes,
        "dataset_hash": w.dataset_hash,
        "git_commit": w.commit,
        "params_hash": w.params_hash,
        "adapter_sha256": w.adapter_sha,
        "eval_set": w.eval_set,
        "primary_metric": w.primary,
        "train_run_id": w.train.mlflow_run_id,
        "pipeline_run_id": run.parent_id,
        "model_id": w.model_id,
    }
    card = model_card(cfg, w, run.parent_id)
    with tempfile.TemporaryDirectory(prefix="temper-register-") as tmp:
        art = Path(tmp)
        write_json(art / "temper" / "params.json", params)
        write_json(art / "temper" / "lineage.json", lineage_info)
        result.save(art / "temper" / "eval.json")
        write_jsonl(
            art / "temper" / "scores.jsonl",
            ({"id": s["id"], "score": s["score"]} for s in w.scores),
        )
        w.train.save(art / "temper" / "train_metrics.json")
        # This version's own card: the logged model holds the card of its latest registration
        # (one adapter registered twice, after a re-evaluation, is one logged model).
        (art / "temper" / "model_card.md").write_text(card, encoding="utf-8")
        bundle.write_serving(art / "serving", w.task, w.base_dir, w.generation, w.adapter_sha)
        bundle.add_route_policy(cfg.route, art)
        if w.model_id is None:
            # Trained without MLflow: the adapter (and its card) go to this run instead.
            shutil.copytree(w.adapter_dir, art / "adapter")
            (art / "adapter" / "README.md").write_text(card, encoding="utf-8")
            bundle.write_pyfunc(art / "adapter", art / "serving")
        run.client.log_artifacts(run.run_id, str(art))
        (art / "card").mkdir()
        (art / "card" / "README.md").write_text(card, encoding="utf-8")
        bundle.write_pyfunc(art / "card", art / "serving")  # also an MLflow pyfunc model
        if w.model_id is not None:
            run.client.log_model_artifacts(w.model_id, str(art / "card"))
    run.log_params({"candidate": w.name, "registered_model": cfg.model_name})
    # Not linked to the logged model: the evaluate stage's eval-<name> run already did, and
    # the same numbers twice on the model's page would look like two evaluations.
    run.log_metrics(
        {
            k: v
            for k, m in w.entry.metrics.items()
            for k, v in ((k, m.value), (f"{k}.ci_low", m.ci_low), (f"{k}.ci_high", m.ci_high))
            if v is not None
        }
    )
    if w.model_id is None:
        return f"{run.client.get_run(run.run_id).info.artifact_uri}/adapter"
    return tracking.model_source(w.model_id)


@dataclass(frozen=True)
class Served:
    """How the registered version will be served: its task, the base model's folder, and the
    generation settings it was evaluated with."""

    task: TaskConfig
    base_dir: str | Path
    generation: bundle.GenerationSettings


def run(cfg: RegisterConfig, pipeline: tracking.Tracking, served: Served) -> dict[str, Any]:
    """Register the winner (if any) under `pipeline`'s store and parent run; return the
    summary written to `cfg.out`."""
    import mlflow

    try:
        result = EvalResult.load(cfg.eval)
    except ResultError as err:
        raise RegisterError(str(err)) from None
    params = dict(pipeline.params)
    # Every input is read and checked before anything is written to the store.
    w = collect(cfg, result, params, served) if result.winner else None
    if w is None and cfg.require_winner:
        raise RegisterError(f"{cfg.eval}: no candidate passed the gates: nothing registered")

    parent_id = tracking.pipeline_run(pipeline.cfg, params)
    client = mlflow.MlflowClient()
    tracking.ensure_candidates_view(
        client, client.get_run(parent_id).info.experiment_id, result.primary_metric
    )
    if w is None:
        return nothing_registered(cfg, client, parent_id)
    w.model_id = tracking.known_model(client, w.train.mlflow_model_id)
    with pipeline.child("register", f"register-{w.name}", **{"temper.candidate": w.name}) as reg:
        source = log_register_run(reg, cfg, w, params, result)
    number = create_version(client, cfg, w, source, reg.run_id, version_tags(w, params, parent_id))
    experiment, moved = set_alias(client, cfg, number)
    primary = w.entry.metrics[w.primary]
    client.set_tag(parent_id, "temper.winner", w.name)
    client.set_tag(parent_id, "temper.registered_model", cfg.model_name)
    client.set_tag(parent_id, "temper.registered_version", number)
    client.log_metric(parent_id, f"winner.{w.primary}", primary.value)
    client.set_terminated(parent_id, "FINISHED")  # register is the last stage of a pipeline run
    summary = {
        "registered": True,
        "model_name": cfg.model_name,
        "version": number,
        "alias": cfg.alias if moved else None,
        "experiment": experiment,
        "candidate": w.name,
        "run_id": reg.run_id,
        "model_id": w.model_id,
        "pipeline_run_id": parent_id,
        "source": client.get_model_version(cfg.model_name, number).source,
        "primary_metric": w.primary,
        w.primary: primary.value,
        "tracking_uri": tracking.redact_uri(mlflow.get_tracking_uri()),
    }
    write_json(cfg.out, summary)
    where = f"@{cfg.alias}" if moved else "alias not moved"
    log.info("registered %s version %s (%s) from %s", cfg.model_name, number, where, w.name)
    return summary


def nothing_registered(cfg: RegisterConfig, client: Any, parent_id: str) -> dict[str, Any]:
    """No candidate passed the gates: say so on the pipeline run and in `cfg.out`."""
    msg = "no candidate passed the gates: nothing registered"
    log.warning(msg)
    client.set_tag(parent_id, "temper.winner", "none")
    client.set_terminated(parent_id, "FINISHED")
    summary = {"registered": False, "reason": msg, "pipeline_run_id": parent_id}
    write_json(cfg.out, summary)
    return summary


def create_version(
    client: Any, cfg: RegisterConfig, w: Winner, source: str, run_id: str, tags: dict[str, str]
) -> str:
    """A new version of `cfg.model_name` (the model created on first use); its number."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            cfg.model_name,
            description=f"Temper: LoRA adapters for task {w.task.name}: "
            f"{w.task.description.strip() or '(no description)'} "
            "Each version carries its model card in README.md.",
        )
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        cfg.model_name,
        source=source,
        run_id=run_id,
        model_id=w.model_id,
        tags=tags,
        description=f"{w.name}: {w.primary} {fmt_estimate(w.entry.metrics[w.primary])} on "
        f"{len(w.scores)} test examples ({w.task.name})",
    )
    number = tracking.version_str(version.version)
    if w.model_id is not None:
        tracking.link_version(client, w.model_id, cfg.model_name, number)
    return number


def set_alias(client: Any, cfg: RegisterConfig, number: str) -> tuple[str | None, bool]:
    """Move `cfg.alias` to the version, except from a DVC experiment (unless configured, or
    the model's first version: it displaces nothing). Returns (experiment, moved)."""
    experiment = os.environ.get("DVC_EXP_NAME") or None  # set by `dvc exp run`, not `repro`
    alone = tracking.first_version(client, cfg.model_name, cfg.alias)
    moved = experiment is None or cfg.move_alias_in_experiments or alone
    if experiment is not None:
        client.set_model_version_tag(cfg.model_name, number, "temper.experiment", experiment)
    if moved:
        client.set_registered_model_alias(cfg.model_name, cfg.alias, number)
    else:
        log.info("dvc experiment %s: alias @%s not moved", experiment, cfg.alias)
    return experiment, moved
