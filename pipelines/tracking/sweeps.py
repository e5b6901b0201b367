"""A sweep in MLflow: one parent run per sweep, one nested pipeline run per arm.

`temper sweep` queues one DVC experiment per arm with `mlflow.sweep` (the sweep's name) and
`mlflow.sweep_params` (the dotted params it varies) set. Each arm's pipeline run then hangs
under the sweep's run (tag `temper.sweep_run`) and logs only the varied params' values, so
selecting the arms in the MLflow UI and choosing Compare plots parallel coordinates on what
was swept, not on two hundred constants; the evaluation logs the arm's headline on it
(`evaluation.runs.log_headline`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

SWEEP_RUN_TAG = "temper.sweep_run"


def sweep_run(client: Any, experiment_id: str, name: str, keys: list[str] | None = None) -> str:
    """The id of sweep `name`'s parent run in the experiment, made on first use (oldest wins).

    Callers hold `store_lock` on an embedded store; `temper sweep` makes it before any arm is
    queued, so arms on a server find it rather than race to make it."""
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{SWEEP_RUN_TAG}` = '{name}'", max_results=10
    )
    if found:
        return sorted(found, key=lambda r: (r.info.start_time or 0, r.info.run_id))[0].info.run_id
    tags = {SWEEP_RUN_TAG: name}
    if keys:
        tags["temper.sweep_params"] = json.dumps(keys)
    return client.create_run(experiment_id, run_name=f"sweep-{name}", tags=tags).info.run_id


def log_swept_params(client: Any, run_id: str, params: Mapping[str, Any], keys: list[str]) -> None:
    """The swept params' values in this arm as the run's params (`null` where unset)."""
    from mlflow.entities import Param

    from ..config import flatten

    flat = flatten(dict(params))
    values = [
        Param(key, value if isinstance(value := flat.get(key), str) else json.dumps(value))
        for key in keys
    ]
    client.log_batch(run_id, params=values)


def end_sweep(client: Any, experiment_id: str, name: str, states: Mapping[str, str]) -> None:
    """End the sweep's run and its arms' runs by how each arm ended in DVC's queue (an arm
    that stops at evaluate never reaches register, which ends a pipeline run otherwise)."""
    sweep_id = sweep_run(client, experiment_id, name)
    arms = client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{sweep_id}'"
    )
    for arm in arms:
        state = states.get(arm.info.run_name)
        if state is not None and arm.info.status == "RUNNING":
            client.set_terminated(arm.info.run_id, "FINISHED" if state == "Success" else "FAILED")
    failed = any(state != "Success" for state in states.values())
    client.set_terminated(sweep_id, "FAILED" if failed else "FINISHED")
