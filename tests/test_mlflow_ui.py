"""The MLflow UI shows the candidates: a real lean `mlflow server` and headless Chromium.

Chromium comes from the distribution (`apt-get install chromium`, done by `.ci/run`). Under
CI (`CI=true`) a missing browser is a failure; on a workstation the test is skipped with the
reason. The server runs in its own process group and is stopped in teardown.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from registry_fixtures import template_db

from temper import tracking

CHROMIUM = os.environ.get("TEMPER_CHROMIUM", "/usr/bin/chromium")
CANDIDATES = ["r8-lr1e-3", "r16-lr5e-4", "qlora-r16"]


@pytest.fixture
def browser() -> str:
    """Checked before the server starts, so a missing browser fails (or skips) fast."""
    if Path(CHROMIUM).exists():
        return CHROMIUM
    if os.environ.get("CI") == "true":
        pytest.fail(f"{CHROMIUM} is missing: .ci/run installs the Debian package 'chromium'")
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); required under CI=true")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def store(tmp_path):
    """A store with one pipeline run, three candidate train runs and an eval run under it."""
    import mlflow

    shutil.copy(template_db(), tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tracking.MlflowConfig(tracking_uri=uri)
    params = {"train": {"candidates": CANDIDATES}}
    parent = tracking.pipeline_run(cfg, params, tmp_path)
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent).info.experiment_id
    for i, name in enumerate(CANDIDATES):
        run = client.create_run(
            experiment_id,
            run_name=f"train-{name}",
            tags=tracking.child_run_tags(parent, **{"temper.stage": "train"}),
        )
        client.log_metric(run.info.run_id, "val_loss", 1.0 - 0.1 * i)
        client.set_terminated(run.info.run_id)
    tracking.ensure_candidates_view(client, experiment_id)
    return tmp_path, uri, experiment_id, client.get_run(parent).info.run_name


@pytest.fixture
def server(store):
    folder, uri, experiment_id, parent_name = store
    port = free_port()
    proc = tracking.start_server(uri, folder / "mlartifacts", port, log=folder / "server.log")
    assert os.getpgid(proc.pid) == proc.pid  # its own process group, not pytest's
    yield f"http://127.0.0.1:{port}", experiment_id, parent_name, folder
    tracking.stop_server(proc)
    with pytest.raises(ProcessLookupError):  # the whole group is gone
        os.killpg(proc.pid, 0)


def dump_dom(browser: str, url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran (virtual time lets the table's fetches finish)."""
    profile.mkdir(exist_ok=True)
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=20000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_runs_table_shows_candidate_runs(browser, server, tmp_path):
    base, experiment_id, parent_name, _ = server
    url = tracking.runs_table_url(base, experiment_id)
    dom = dump_dom(browser, url, tmp_path / "profile-view")
    assert "Training runs" in dom  # the experiment's runs page rendered
    for name in CANDIDATES:
        assert f"train-{name}" in dom, f"run train-{name} not in the runs table"
    assert "Group:" in dom  # grouped under their pipeline run

    # Control: the default view nests children under a collapsed parent row, which is why
    # `temper ui` links to the grouped view. The parent is there, the children are not.
    plain = dump_dom(
        browser, tracking.runs_table_url(base, experiment_id, view=None), tmp_path / "profile-plain"
    )
    assert parent_name in plain
    assert "train-r8-lr1e-3" not in plain


def test_ui_on_a_server_store_prints_its_address_without_credentials(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from temper.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        "mlflow:\n  tracking_uri: https://bob:s3cret@mlflow.example.com:8443\n"
    )
    result = CliRunner().invoke(app, ["ui"])
    assert result.exit_code == 0, result.output
    assert "open https://***@mlflow.example.com:8443" in result.output
    assert "s3cret" not in result.output


def test_lean_server_command():
    cmd, env = tracking.lean_server_command("sqlite:////x/mlflow.db", "/x/art", port=5123)
    assert cmd[1:3] == ["server", "--backend-store-uri"]
    assert cmd[cmd.index("--workers") + 1] == "1"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
