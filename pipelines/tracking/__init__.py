"""MLflow, for every part of Temper: where the store is, runs, the registry, the UI.

- `runs`: the store (embedded sqlite by default), the pipeline's parent run and the one
  helper, `child_run`, through which every stage logs.
- `registry`: versions and aliases read the same way on sqlite and on a server.
- `card`: the model card of a registered version.
- `server`: a lean `mlflow server` and the runs-table view Temper links to.
"""

from .registry import alias_version, quiet_downloads, redact_uri, version_str
from .runs import (
    PIPELINE_TAG,
    ChildRun,
    MlflowConfig,
    child_run,
    git_commit,
    log_adapter_model,
    log_dataset,
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
)

__all__ = [
    "CANDIDATES_VIEW", "PIPELINE_TAG", "ChildRun", "MlflowConfig", "alias_version",
    "child_run", "ensure_candidates_view", "log_adapter_model", "log_dataset", "git_commit", "lean_server_command", "pipeline_key",
    "pipeline_run", "quiet_downloads", "redact_uri", "runs_table_url", "setup", "start_server",
    "stop_server", "tracking_uri", "version_str",
]
