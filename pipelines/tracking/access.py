"""One clear line when a tracking server refuses the client: wrong, missing or too weak
credentials (docs/team.md).

MLflow's clients send the credentials of `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`
(or `MLFLOW_TRACKING_TOKEN`) with every request; Temper never reads, logs or stores them. A
server with authentication answers 401 (`UNAUTHENTICATED`) or 403 (`PERMISSION_DENIED`), which
MLflow raises as an `MlflowException` from wherever the request was made. `access_error` turns
such an exception into a `StoreAccessError` that names the server (without any user:password
in its URI) and what to set; the CLI prints it as one line and exits 2. No password is ever
part of the message: the server's own text is left out, and a password found in the URI or the
environment is masked in what is kept.
"""

from __future__ import annotations

import os
import sys

from ..errors import TemperError

DENIED = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


class StoreAccessError(TemperError, RuntimeError):
    """The tracking server refused this client (the message says why and what to set)."""

    exit_code = 2


def _is_mlflow_error(err: BaseException) -> bool:
    return any(c.__name__ == "MlflowException" for c in type(err).__mro__)


def current_uri() -> str:
    """The tracking URI in use, without credentials (MLflow's, when it is imported)."""
    from .registry import redact_uri

    mlflow = sys.modules.get("mlflow")
    uri = mlflow.get_tracking_uri() if mlflow is not None else os.environ.get("MLFLOW_TRACKING_URI")
    return redact_uri(uri or "(no tracking URI)")


def mask(text: str) -> str:
    """`text` with the password of the environment (and of the tracking URI) replaced."""
    from urllib.parse import urlsplit

    secrets = [os.environ.get("MLFLOW_TRACKING_PASSWORD"), os.environ.get("MLFLOW_TRACKING_TOKEN")]
    uri = os.environ.get("MLFLOW_TRACKING_URI") or ""
    secrets.append(urlsplit(uri).password if "://" in uri else None)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def access_error(err: BaseException) -> StoreAccessError | None:
    """`err` as a `StoreAccessError` when it is a server's 401/403, else None."""
    if isinstance(err, StoreAccessError):
        return err
    code = getattr(err, "error_code", None)
    if not _is_mlflow_error(err) or code not in DENIED:
        return None
    where = f"MLflow server {current_uri()}"
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    given = [v for v in CREDENTIAL_VARS if os.environ.get(v)]
    token = bool(os.environ.get("MLFLOW_TRACKING_TOKEN"))
    if code == "PERMISSION_DENIED":
        msg = (
            f"{where} denied user {user!r} this operation ({DENIED[code]} {code}): ask its "
            "admin for EDIT permission on the experiment or registered model (docs/team.md)"
        )
    elif not given and not token:
        msg = (
            f"{where} asks for credentials and none are set ({DENIED[code]} {code}): export "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (docs/team.md)"
        )
    else:
        missing = [v for v in CREDENTIAL_VARS if v not in given]
        msg = (
            f"{where} refused the credentials of user {user!r} ({DENIED[code]} {code}): "
            + (f"{' and '.join(missing)} not set; " if missing and not token else "")
            + "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (docs/team.md)"
        )
    return StoreAccessError(mask(msg))
