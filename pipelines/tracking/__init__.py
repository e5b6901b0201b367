"""MLflow, for every part of Temper: where the store is, runs, the registry, the UI.

- `runs`: the store (embedded sqlite by default), the pipeline's parent run and the one
  helper, `child_run`, through which every stage logs; datasets and logged models.
- `registry`: versions and aliases read the same way on sqlite and on a server; a version's
  logged model; lineage.
- `card`: the model card of a registered version.
- `server`: a lean `mlflow server` and the runs-table view Temper links to.
- `pull`: a registered version as a portable bundle folder (`temper pull`, `temper serve`).
- `access`: one clear error when a tracking server refuses the credentials (docs/team.md).
"""

from .access import StoreAccessError, access_error
from .registry import (
    alias_version,
    first_version,
    known_model,
    lineage,
    link_version,
    model_source,
    redact_uri,
    version_model_id,
    version_str,
)
from .runs import (
    PIPELINE_TAG,
    ChildRun,
    MlflowConfig,
    Tracking,
    child_run,
    git_commit,
    git_dirty,
    log_adapter_model,
    log_dataset,
    log_model_input,
    mark_failed,
    pipeline_key,
    pipeline_run,
    setup,
    tracking_uri,
)
from .server import (
    CANDIDATES_VIEW,
    ensure_candidates_view,
    lean_server_command,
    runs_table_url,
    start_server,
    stop_server,
    view_columns,
)

__all__ = [
    "CANDIDATES_VIEW",
    "PIPELINE_TAG",
    "ChildRun",
    "StoreAccessError",
    "access_error",
    "MlflowConfig",
    "Tracking",
    "alias_version",
    "first_version",
    "child_run",
    "ensure_candidates_view",
    "git_commit",
    "git_dirty",
    "mark_failed",
    "lean_server_command",
    "lineage",
    "link_version",
    "log_adapter_model",
    "log_dataset",
    "log_model_input",
    "model_source",
    "pipeline_key",
    "pipeline_run",
    "redact_uri",
    "runs_table_url",
    "setup",
    "start_server",
    "stop_server",
    "tracking_uri",
    "known_model",
    "version_model_id",
    "version_str",
    "view_columns",
]
