"""Stage register: the evaluation's winner becomes a new version in the MLflow model registry.

Reads `metrics/eval.json` (written by evaluate), the winner's `models/candidates/<name>/`
(adapter + train_metrics.json), `dvc.lock` (dataset hashes) and the base model's
`temper_source.json`. Logs a `register-<name>` child run under the pipeline's parent run holding
the adapter with its model card (`adapter/README.md`), the params, the evaluation and the
per-example scores that `temper promote` compares; then creates the model version from that
run's `adapter` artifact and points the alias `challenger` at it. Everything needed to rebuild
the version (data hashes, params, git commit, base model hash) is on the version as tags.

The version is created with `MlflowClient.create_model_version(source=<run artifacts>/adapter)`:
`mlflow.register_model` needs a logged MLflow model and fails on a plain adapter folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from . import tracking
from .config import Section
from .io import read_json, read_jsonl, sha256_file, stable_hash, write_json, write_jsonl

log = logging.getLogger(__name__)

TAG_LIMIT = 5000  # MLflow tag values: 5000 chars is safe on sqlite and on a server


class RegisterError(ValueError):
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
    data_readme: str = Field(
        "data/raw/contracts/README.md", description="Source of the data attribution text."
    )
    out: str = Field("metrics/register.json", description="Summary written by the stage.")
    require_winner: bool = Field(
        False, description="Fail when no candidate passed the gates (else: register nothing)."
    )


# --- reading evaluate's output -------------------------------------------------------------------
# eval.json is written by another stage; these readers accept the shapes it may take (a metric as
# a number or as {value, ci_low, ci_high} / {value, ci: [lo, hi]}) and fail with the file's name.


def interval(obj: Any) -> tuple[float | None, float | None, float | None]:
    """(value, low, high) of a metric entry; low/high None when there is no interval."""
    if isinstance(obj, bool):
        return float(obj), None, None
    if isinstance(obj, int | float):
        return float(obj), None, None
    if not isinstance(obj, dict):
        return None, None, None
    value = next(
        (obj[k] for k in ("value", "mean", "point", "estimate", "delta") if k in obj), None
    )
    lo = next((obj[k] for k in ("ci_low", "low", "lo", "lower") if k in obj), None)
    hi = next((obj[k] for k in ("ci_high", "high", "hi", "upper") if k in obj), None)
    ci = obj.get("ci") or obj.get("ci95")
    if isinstance(ci, list | tuple) and len(ci) == 2:
        lo, hi = ci
    as_float = [None if v is None else float(v) for v in (value, lo, hi)]
    return as_float[0], as_float[1], as_float[2]


def tag_json(obj: Any, artifact: str = "temper/eval.json") -> str:
    """Compact JSON for a tag, or a pointer to the artifact when it would not fit (a cut JSON
    string would not parse)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return text if len(text) <= TAG_LIMIT else f"too long for a tag: see artifact {artifact}"


def fmt_num(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def fmt_interval(value: float | None, lo: float | None, hi: float | None) -> str:
    if value is None:
        return "n/a"
    ci = f" [{fmt_num(lo)}, {fmt_num(hi)}]" if lo is not None and hi is not None else ""
    return fmt_num(value) + ci


def gates_markdown(gates: Any) -> str:
    """evaluate's gate checks as a table; any other shape as JSON."""
    checks = gates.get("checks") if isinstance(gates, dict) else None
    if isinstance(checks, list) and all(isinstance(c, dict) and "gate" in c for c in checks):
        if not checks:
            return "(no gates configured)"
        rows = [
            [
                str(c["gate"]),
                "n/a" if c.get("value") is None else fmt_num(c["value"]),
                f"{c.get('op', '')} {c.get('threshold')}",
                "pass" if c.get("passed") else "FAIL",
            ]
            for c in checks
        ]
        return table(rows, ["gate", "value", "rule", "result"])
    if gates is None:
        return "(no gate details reported)"
    return "```json\n" + json.dumps(gates, indent=2, sort_keys=True, default=str) + "\n```"


def candidate_entry(evaluation: dict[str, Any], name: str, path: str) -> dict[str, Any]:
    for container in (evaluation.get("candidates"), evaluation):
        if isinstance(container, dict) and isinstance(container.get(name), dict):
            return container[name]
    raise RegisterError(f"{path}: no entry for candidate {name!r} (looked in 'candidates')")


def intervals(raw: dict[str, Any]) -> dict[str, tuple[float | None, float | None, float | None]]:
    """`{metric: value or interval}` -> `{metric: (value, low, high)}`, without empty values."""
    out = {}
    for key, value in raw.items():
        triple = interval(value)
        if triple[0] is not None:
            out[key] = triple
    return out


def gates_of(entry: dict[str, Any], is_winner: bool) -> tuple[bool, Any]:
    """(passed, detail). The winner passed by definition (evaluate picks it among passers)."""
    gates = entry.get("gates", entry.get("gate_results"))
    passed = None
    if isinstance(gates, dict):
        for key in ("passed", "pass", "ok", "all_passed"):
            if isinstance(gates.get(key), bool):
                passed = gates[key]
                break
        else:
            flags = [v.get("passed") if isinstance(v, dict) else v for v in gates.values()]
            if flags and all(isinstance(f, bool) for f in flags):
                passed = all(flags)
    elif isinstance(gates, list):
        flags = [g.get("passed") for g in gates if isinstance(g, dict)]
        if flags and all(isinstance(f, bool) for f in flags):
            passed = all(flags)
    for key in ("passed_gates", "gates_passed", "passed"):
        if passed is None and isinstance(entry.get(key), bool):
            passed = entry[key]
    if passed is None:
        passed = is_winner
    return passed, gates


def primary_metric(evaluation: dict[str, Any], metrics: dict[str, Any], path: str) -> str:
    name = evaluation.get("primary_metric")
    if isinstance(name, str) and name in metrics:
        return name
    for guess in ("clause_type.accuracy", "accuracy"):
        if guess in metrics:
            return guess
    raise RegisterError(
        f"{path}: no 'primary_metric' among the winner's metrics ({sorted(metrics)})"
    )


def example_scores(path: Path, metric: str) -> list[dict[str, Any]]:
    """Per-example scores of the primary metric, for the paired comparison in promote.

    evaluate writes `scores: {metric: value}` per record, leaving a metric out where it does
    not apply to the example (e.g. no gold key term); such examples are left out here too, so
    the comparison uses the metric's own examples. Older shapes (`<metric>` or `correct` at the
    top level) are accepted; a record with none of these is an error naming file and line.
    """
    if not path.exists():
        raise RegisterError(f"{path}: predictions not found (needed for promotion)")
    out = []
    for lineno, rec in enumerate(read_jsonl(path), 1):
        if "id" not in rec:
            raise RegisterError(f"{path}:{lineno}: missing field 'id'")
        if isinstance(rec.get("scores"), dict):
            if metric not in rec["scores"]:
                continue  # the metric does not apply to this example
            score = rec["scores"][metric]
        elif metric in rec:
            score = rec[metric]
        elif "correct" in rec:
            score = rec["correct"]
        else:
            score = None
        if not isinstance(score, bool | int | float):
            raise RegisterError(
                f"{path}:{lineno}: expected a per-example score "
                f"('scores.{metric}' or 'correct'), got {score!r}"
            )
        out.append({"id": str(rec["id"]), "score": float(score), "gold": rec.get("gold")})
    if not out:
        raise RegisterError(f"{path}: no example scored on {metric}")
    return out


def eval_set_hash(scores: list[dict[str, Any]]) -> str:
    """Identity of an evaluation set: its example ids and gold answers."""
    return stable_hash(sorted((s["id"], json.dumps(s.get("gold"), sort_keys=True)) for s in scores))


# --- other inputs --------------------------------------------------------------------------------


def data_hashes(lock_path: str | Path, outs: list[str]) -> dict[str, str]:
    """md5 of the data outputs as DVC recorded them in dvc.lock (`<path>: <md5>`)."""
    path = Path(lock_path)
    if not path.exists():
        raise RegisterError(f"{path}: not found (run the pipeline with `dvc repro`)")
    lock = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    found: dict[str, str] = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") in outs and out.get("md5"):
                found[out["path"]] = out["md5"]
    if not found:
        raise RegisterError(
            f"{path}: none of {outs} is a recorded output; cannot identify the "
            "data (run `dvc repro` so the lock records them)"
        )
    return dict(sorted(found.items()))


def teacher_and_cost(path: str | Path, evaluation: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = {}
    if Path(path).exists():
        distil = read_json(path)
        teacher = distil.get("teacher", distil.get("teacher_model"))
        if isinstance(teacher, dict):  # distil writes {"kind": "gold"|"openai"|..., "model"}
            teacher = (
                "gold labels of the dataset (no teacher)"
                if teacher.get("kind") == "gold"
                else f"{teacher.get('kind')}:{teacher.get('model')}"
            )
        if isinstance(teacher, str):
            info["teacher"] = teacher
        for key in ("usd", "cost_usd", "total_usd", "spent_usd"):
            if isinstance(distil.get(key), int | float):
                info["labelling_usd"] = distil[key]
                break
        if isinstance(distil.get("tokens_in"), int):
            info["labelling_tokens"] = distil["tokens_in"] + (distil.get("tokens_out") or 0)
    base = evaluation.get("baseline")
    if isinstance(base, dict):
        name = base.get("name") or "baseline"
        info["baseline"] = f"{name} ({base['kind']})" if base.get("kind") else name
        if isinstance(base.get("usd_total"), int | float):
            info["baseline_usd_on_test"] = base["usd_total"]
    info.setdefault("teacher", "gold labels (no teacher configured)")
    return info


def attribution(readme: str | Path) -> str:
    """The dataset README's 'License and required attribution' section, verbatim."""
    text = Path(readme).read_text(encoding="utf-8")
    start = text.find("## License and required attribution")
    if start < 0:
        raise RegisterError(f"{readme}: no '## License and required attribution' section")
    body = text[start:].split("\n", 1)[1]
    end = body.find("\n## ")
    return (body if end < 0 else body[:end]).strip()


def table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def adapter_hash(folder: str | Path) -> str:
    """SHA-256 over an adapter folder's files except its top-level README.md: the model card is
    replaced at registration, the weights and configs must come back byte for byte."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = file.relative_to(folder).as_posix()
        if rel == "README.md":
            continue
        digest.update(rel.encode() + b"\0" + sha256_file(file).encode() + b"\n")
    return digest.hexdigest()


def render_card(template: str | Path, values: dict[str, Any]) -> str:
    return string.Template(Path(template).read_text(encoding="utf-8")).substitute(values)


# --- the stage ------------------------------------------------------------------------------------


@dataclass
class Winner:
    """Everything register needs about the winner, read and checked before MLflow is touched."""

    name: str
    adapter_dir: Path
    metrics: dict[str, tuple[float | None, float | None, float | None]]
    deltas: dict[str, tuple[float | None, float | None, float | None]]
    primary: str
    gates: Any
    scores: list[dict[str, Any]]
    train_metrics: dict[str, Any]
    base_name: str
    base_hash: str
    data_hashes: dict[str, str]
    cost: dict[str, Any]
    commit: str
    params_hash: str
    adapter_sha: str
    attribution: str

    @property
    def dataset_hash(self) -> str:
        return stable_hash(self.data_hashes)

    @property
    def eval_set(self) -> str:
        return eval_set_hash(self.scores)

    @property
    def train_run_id(self) -> str | None:
        return self.train_metrics.get("mlflow_run_id")


def collect(
    cfg: RegisterConfig,
    evaluation: dict[str, Any],
    winner: str,
    params: dict[str, Any],
    base_dir: str | Path,
) -> Winner:
    from .base_model import model_hash

    entry = candidate_entry(evaluation, winner, cfg.eval)
    metrics = intervals(entry.get("metrics", {}))
    primary = primary_metric(evaluation, metrics, cfg.eval)
    gates_passed, gates = gates_of(entry, is_winner=True)
    if not gates_passed:
        raise RegisterError(f"{cfg.eval}: winner {winner!r} is marked as failing its gates")
    cand_dir = Path(cfg.candidates_dir) / winner
    adapter_dir = cand_dir / "adapter"
    if not (adapter_dir / "adapter_config.json").exists():
        raise RegisterError(f"{adapter_dir}: no adapter_config.json (train stage output missing)")
    train_metrics = (
        read_json(cand_dir / "train_metrics.json")
        if (cand_dir / "train_metrics.json").exists()
        else {}
    )
    base_dir = Path(base_dir)
    if not (base_dir / "temper_source.json").exists():
        raise RegisterError(f"{base_dir}/temper_source.json: not found (run temper base-model)")
    source = read_json(base_dir / "temper_source.json")
    return Winner(
        name=winner,
        adapter_dir=adapter_dir,
        metrics=metrics,
        deltas=intervals(entry.get("delta_vs_baseline", {})),
        primary=primary,
        gates=gates,
        scores=example_scores(Path(cfg.predictions_dir) / f"{winner}.jsonl", primary),
        train_metrics=train_metrics,
        base_name=source.get("name") or source.get("repo_id") or str(base_dir),
        base_hash=model_hash(base_dir),
        data_hashes=data_hashes(cfg.lock, cfg.data_outs),
        cost=teacher_and_cost(cfg.distil_metrics, evaluation),
        commit=tracking.git_commit(),
        params_hash=stable_hash(params),
        adapter_sha=adapter_hash(adapter_dir),
        attribution=attribution(cfg.data_readme),
    )


def model_card(cfg: RegisterConfig, w: Winner, pipeline_run_id: str) -> str:
    rows = [[k, fmt_interval(*v)] for k, v in w.metrics.items()]
    deltas = [[k, fmt_interval(*v)] for k, v in w.deltas.items()]
    return render_card(
        cfg.card_template,
        {
            "model_name": cfg.model_name,
            "candidate": w.name,
            "base_model": w.base_name,
            "base_model_hash": w.base_hash,
            "eval_examples": len(w.scores),
            "primary_metric": w.primary,
            "metrics_table": table(rows, ["metric", "value [95% CI]"]),
            "delta_table": table(deltas, ["metric", "candidate - baseline [95% CI]"])
            if deltas
            else "(none reported)",
            "baseline": w.cost.get("baseline", "baseline"),
            "gates_verdict": "passed",
            "gates_table": gates_markdown(w.gates),
            "teacher": w.cost["teacher"],
            "dataset_hash": w.dataset_hash,
            "attribution": w.attribution,
            "git_commit": w.commit,
            "params_hash": w.params_hash,
            "data_hashes": ", ".join(f"`{k}` {v}" for k, v in w.data_hashes.items()),
            "train_run_id": w.train_run_id or "n/a",
            "pipeline_run_id": pipeline_run_id,
            "adapter_sha256": w.adapter_sha,
        },
    )


def version_tags(w: Winner, params: dict[str, Any], pipeline_run_id: str) -> dict[str, str]:
    """The version's lineage and results as tags (strings), readable in the registry UI."""
    tags = {
        "temper.candidate": w.name,
        "temper.base_model": w.base_name,
        "temper.base_model_hash": w.base_hash,
        "temper.data_hashes": json.dumps(w.data_hashes, sort_keys=True),
        "temper.dataset_hash": w.dataset_hash,
        "temper.git_commit": w.commit,
        "temper.params_hash": w.params_hash,
        "temper.params": tag_json(params, "temper/params.json"),
        "temper.primary_metric": w.primary,
        "temper.metrics": tag_json({k: list(v) for k, v in w.metrics.items()}),
        "temper.delta_vs_baseline": tag_json({k: list(v) for k, v in w.deltas.items()}),
        "temper.gates": tag_json(w.gates),
        "temper.gates_passed": "true",
        "temper.eval_set": w.eval_set,
        "temper.eval_examples": str(len(w.scores)),
        "temper.teacher": str(w.cost["teacher"]),
        "temper.cost": tag_json(w.cost),
        "temper.adapter_sha256": w.adapter_sha,
        "temper.train_run_id": str(w.train_run_id),
        "temper.pipeline_run_id": pipeline_run_id,
    }
    tags.update({f"metric.{k}": fmt_interval(*v) for k, v in w.metrics.items()})
    return tags


def log_register_run(
    client: Any,
    experiment_id: str,
    parent_id: str,
    cfg: RegisterConfig,
    w: Winner,
    params: dict[str, Any],
    evaluation: dict[str, Any],
) -> Any:
    """The `register-<winner>` child run: adapter + card, params, lineage, eval, scores."""
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
        "train_run_id": w.train_run_id,
        "pipeline_run_id": parent_id,
    }
    run = client.create_run(
        experiment_id,
        run_name=f"register-{w.name}",
        tags=tracking.child_run_tags(
            parent_id,
            **{
                "temper.stage": "register",
                "temper.candidate": w.name,
                "temper.git_commit": w.commit,
            },
        ),
    )
    run_id = run.info.run_id
    try:
        with tempfile.TemporaryDirectory(prefix="temper-register-") as tmp:
            art = Path(tmp)
            shutil.copytree(w.adapter_dir, art / "adapter")
            (art / "adapter" / "README.md").write_text(
                model_card(cfg, w, parent_id), encoding="utf-8"
            )
            write_json(art / "temper" / "params.json", params)
            write_json(art / "temper" / "lineage.json", lineage_info)
            write_json(art / "temper" / "eval.json", evaluation)
            write_jsonl(
                art / "temper" / "scores.jsonl",
                ({"id": s["id"], "score": s["score"]} for s in w.scores),
            )
            if w.train_metrics:
                write_json(art / "temper" / "train_metrics.json", w.train_metrics)
            client.log_artifacts(run_id, str(art))
        client.log_param(run_id, "candidate", w.name)
        client.log_param(run_id, "registered_model", cfg.model_name)
        for key, (value, lo, hi) in w.metrics.items():
            client.log_metric(run_id, key, value)
            if lo is not None and hi is not None:
                client.log_metric(run_id, f"{key}_ci_low", lo)
                client.log_metric(run_id, f"{key}_ci_high", hi)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return run


def run(
    cfg: RegisterConfig,
    params: dict[str, Any],
    mlflow_cfg: tracking.MlflowConfig,
    base_dir: str | Path,
) -> dict[str, Any]:
    """Register the winner (if any) and return the summary written to `cfg.out`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not Path(cfg.eval).exists():
        raise RegisterError(f"{cfg.eval}: not found (run the evaluate stage first)")
    evaluation = read_json(cfg.eval)
    winner = evaluation.get("winner")
    # Every input is read and checked before anything is written to the store.
    w = collect(cfg, evaluation, winner, params, base_dir) if winner else None
    if w is None and cfg.require_winner:
        raise RegisterError(f"{cfg.eval}: no candidate passed the gates: nothing registered")

    parent_id = tracking.pipeline_run(mlflow_cfg, params)
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent_id).info.experiment_id
    tracking.ensure_candidates_view(client, experiment_id)
    if w is None:
        msg = "no candidate passed the gates: nothing registered"
        log.warning(msg)
        client.set_tag(parent_id, "temper.winner", "none")
        client.set_terminated(parent_id, "FINISHED")
        summary = {"registered": False, "reason": msg, "pipeline_run_id": parent_id}
        write_json(cfg.out, summary)
        return summary

    run_obj = log_register_run(client, experiment_id, parent_id, cfg, w, params, evaluation)
    try:
        client.create_registered_model(
            cfg.model_name,
            description="Temper: LoRA adapters for contract-clause review. "
            "Each version carries its model card in adapter/README.md.",
        )
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        cfg.model_name,
        source=f"{run_obj.info.artifact_uri}/adapter",
        run_id=run_obj.info.run_id,
        tags=version_tags(w, params, parent_id),
        description=f"{w.name}: {w.primary} {fmt_interval(*w.metrics[w.primary])} on "
        f"{len(w.scores)} test clauses",
    )
    number = tracking.version_str(version.version)
    client.set_registered_model_alias(cfg.model_name, cfg.alias, number)

    client.set_tag(parent_id, "temper.winner", w.name)
    client.set_tag(parent_id, "temper.registered_model", cfg.model_name)
    client.set_tag(parent_id, "temper.registered_version", number)
    client.log_metric(parent_id, f"winner.{w.primary}", w.metrics[w.primary][0])
    client.set_terminated(parent_id, "FINISHED")  # register is the last stage of a pipeline run

    summary = {
        "registered": True,
        "model_name": cfg.model_name,
        "version": number,
        "alias": cfg.alias,
        "candidate": w.name,
        "run_id": run_obj.info.run_id,
        "pipeline_run_id": parent_id,
        "source": version.source,
        "primary_metric": w.primary,
        w.primary: w.metrics[w.primary][0],
        "tracking_uri": tracking.redact_uri(mlflow.get_tracking_uri()),
    }
    write_json(cfg.out, summary)
    log.info(
        "registered %s version %s (@%s) from candidate %s",
        cfg.model_name,
        number,
        cfg.alias,
        w.name,
    )
    return summary


def lineage(name: str, version: str | int) -> dict[str, Any]:
    """What made a registered version: data hashes, params (verified against their hash),
    git commit, base model. Reads the version's tags and its run's `temper/params.json`."""
    import mlflow

    client = mlflow.MlflowClient()
    mv = client.get_model_version(name, tracking.version_str(version))
    tags = mv.tags
    with tracking.quiet_downloads():
        path = mlflow.artifacts.download_artifacts(
            run_id=mv.run_id, artifact_path="temper/params.json"
        )
    params = json.loads(Path(path).read_text(encoding="utf-8"))
    if stable_hash(params) != tags.get("temper.params_hash"):
        raise RegisterError(
            f"{name} v{mv.version}: temper/params.json does not match the "
            "version's temper.params_hash"
        )
    return {
        "version": tracking.version_str(mv.version),
        "run_id": mv.run_id,
        "data_hashes": json.loads(tags["temper.data_hashes"]),
        "dataset_hash": tags["temper.dataset_hash"],
        "params": params,
        "git_commit": tags["temper.git_commit"],
        "base_model": tags["temper.base_model"],
        "base_model_hash": tags["temper.base_model_hash"],
        "adapter_sha256": tags["temper.adapter_sha256"],
    }
