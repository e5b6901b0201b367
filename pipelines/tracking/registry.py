"""Registry helpers that read the same on sqlite and on a server: versions, aliases, URIs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..io import stable_hash

log = logging.getLogger(__name__)


def version_str(version: Any) -> str:
    """Model versions come back as int from sqlite and as str from a server: compare as str."""
    return str(int(version)) if str(version).isdigit() else str(version)


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The model version behind `name@alias`, or None when the alias (or model) does not exist.

    `get_model_version_by_alias` is the one call that reads aliases the same way on sqlite and
    on a server (`search_model_versions` does not fill them in everywhere).
    """
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def known_model(client: Any, model_id: str | None) -> str | None:
    """`model_id` if this store holds that logged model, else None (with a warning).

    A candidate's train_metrics.json names the logged model of the store it was trained
    against; a clone with its own store, a teammate's store or a deleted model lacks it, and
    linking metrics or a version to it would fail (a foreign key on sqlite).
    """
    from mlflow.exceptions import MlflowException

    if model_id is None:
        return None
    try:
        client.get_logged_model(model_id)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            raise
        log.warning(
            "logged model %s is not in this MLflow store (trained against another "
            "store?): nothing is linked to it",
            model_id,
        )
        return None
    return model_id


def model_source(model_id: str) -> str:
    """A version's source for a logged model: `models:/<model_id>`, MLflow's own form (what
    `mlflow.register_model` uses). The store resolves it to the model's artifact location for
    downloads; the id stays readable in the version's `source` on every store."""
    return f"models:/{model_id}"


def version_model_id(mv: Any) -> str | None:
    """The logged model behind a version: `mv.model_id` where the store fills it in (the
    sqlite and REST stores of MLflow 3.17 do not persist it), else its `models:/<id>` source."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    source = str(mv.source or "")
    rest = source.removeprefix("models:/")
    if source.startswith("models:/") and rest and not any(c in rest for c in "/@"):
        return rest  # models:/<name>/<version> and models:/<name>@<alias> name versions
    return None


def link_version(client: Any, model_id: str, name: str, version: str) -> None:
    """Record the version on its logged model (tag `mlflow.modelVersions`, as
    `mlflow.register_model` does): the model's page then lists its registered versions."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    model = client.get_logged_model(model_id)
    versions = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    entry = {"name": name, "version": version_str(version)}
    if entry not in versions:
        versions.append(entry)
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(versions)})


def redact_uri(uri: str) -> str:
    """A tracking URI without user:password, fit for logs and reports."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


def lineage(name: str, version: str | int) -> dict[str, Any]:
    """What made a registered version: data hashes, params (verified against their hash),
    git commit, base model. Reads the version's tags and its run's `temper/params.json`."""
    import mlflow

    client = mlflow.MlflowClient()
    mv = client.get_model_version(name, version_str(version))
    tags = mv.tags
    path = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="temper/params.json")
    params = json.loads(Path(path).read_text(encoding="utf-8"))
    if stable_hash(params) != tags.get("temper.params_hash"):
        raise ValueError(
            f"{name} v{mv.version}: temper/params.json does not match the "
            "version's temper.params_hash"
        )
    return {
        "version": version_str(mv.version),
        "run_id": mv.run_id,
        "data_hashes": json.loads(tags["temper.data_hashes"]),
        "dataset_hash": tags["temper.dataset_hash"],
        "params": params,
        "git_commit": tags["temper.git_commit"],
        "base_model": tags["temper.base_model"],
        "base_model_hash": tags["temper.base_model_hash"],
        "adapter_sha256": tags["temper.adapter_sha256"],
    }


def first_version(client: Any, name: str, alias: str) -> bool:
    """Model `name` has no `alias` and only one version (the one just made). Two experiments
    racing on a new model: only the first, while it is alone, gets the alias."""
    if alias in client.get_registered_model(name).aliases:
        return False
    return len(client.search_model_versions(f"name = '{name}'")) == 1
