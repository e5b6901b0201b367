"""The MLflow UI shows the candidates: a real lean `mlflow server` and headless Chromium.

Chromium comes from the distribution (`apt-get install chromium`, done by `.ci/run`). Under
CI (`CI=true`) a missing browser is a failure; on a workstation the test is skipped with the
reason. The server runs in its own process group and is stopped in teardown.

The store is filled the way the pipeline fills it: train runs as the registry fixtures log them
(params `train.*`, dataset inputs, logged models) and eval runs by the evaluate stage's own
`evaluation.runs.log_runs` on an `EvalResult`. Set TEMPER_UI_SCREENSHOT=<file.png> to keep a screenshot of the
view.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from registry_fixtures import make_project, pattern, project_params, train_candidates, write_eval

from temper import tracking
from temper.io import md5_file
from temper.params import TemperParams
from temper.tracking.server import view_state

CHROMIUM = os.environ.get("TEMPER_CHROMIUM", "/usr/bin/chromium")
CANDIDATES = ["r8-lr1e-3", "r16-lr5e-4", "qlora-r16"]
PRIMARY = "clause_type.accuracy"
# Wide enough that the grid (which renders only the columns in sight) shows every column of
# the view beside the assistant panel the UI opens on a first visit.
WINDOW = "--window-size=3840,1000"


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
def store(tmp_path, monkeypatch):
    """One pipeline run with three candidates' train runs and the evaluate stage's eval runs
    (three candidates and the baseline) under it."""
    import mlflow

    from temper.evaluation.runs import log_runs
    from temper.tracking import Tracking

    project = tmp_path / "project"
    project.mkdir()
    base = tmp_path / "base"  # model_hash reads only the base model's temper_source.json
    base.mkdir()
    (base / "temper_source.json").write_text(json.dumps({"files": {"model.safetensors": "0"}}))
    make_project(project, base)
    monkeypatch.chdir(project)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    trained = train_candidates(project, CANDIDATES, adapter)
    correct = dict(
        zip(CANDIDATES, (pattern(40, 30), pattern(40, 24), pattern(40, 20)), strict=True)
    )
    result = write_eval(project, correct, winner="r8-lr1e-3")
    params = project_params(project)
    p = TemperParams.of(params)
    log_runs(
        Tracking(p.mlflow, params),
        result,
        p.evaluate.candidates_dir,
        [project / "metrics" / "eval.json"],
    )
    client = mlflow.MlflowClient()
    parent = client.get_run(trained["r8-lr1e-3"].mlflow_run_id).data.tags["mlflow.parentRunId"]
    experiment_id = client.get_run(parent).info.experiment_id
    tracking.ensure_candidates_view(client, experiment_id, PRIMARY)
    runs = {
        r.info.run_name: r.info.run_id for r in client.search_runs([experiment_id], max_results=100)
    }
    return {
        "folder": project,
        "uri": p.mlflow.tracking_uri,
        "experiment_id": experiment_id,
        "parent_name": client.get_run(parent).info.run_name,
        "runs": runs,
        "test_md5": md5_file(result.test_file),
    }


@pytest.fixture
def server(store):
    port = free_port()
    folder = store["folder"]
    proc = tracking.start_server(
        store["uri"], folder / "mlartifacts", port, log=folder / "server.log"
    )
    assert os.getpgid(proc.pid) == proc.pid  # its own process group, not pytest's
    yield {**store, "base": f"http://127.0.0.1:{port}"}
    tracking.stop_server(proc)
    with pytest.raises(ProcessLookupError):  # the whole group is gone
        os.killpg(proc.pid, 0)


def chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium; virtual time lets the table's fetches and renders finish."""
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
        *([] if any(a.startswith("--window-size") for a in args) else [WINDOW]),
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def dump_dom(browser: str, url: str, profile: Path) -> str:
    return chromium(browser, profile, "--dump-dom", url).stdout


class GridCells(HTMLParser):
    """The runs grid's cells as rendered: {(row-id, col-id): text}, headers {col-id: text}.

    The grid (ag-grid) gives each row a `row-id` that ends with the run's id and each cell a
    `col-id` that is the view's column key (`metrics.`name``...)."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str], str] = {}
        self.headers: dict[str, str] = {}
        self.row: str | None = None
        self.open: tuple[dict, str] | None = None  # (where the text goes, key)
        self.depth = 0
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("role") == "row":
            self.row = a.get("row-id")
        if self.open is not None:
            self.depth += tag == "div"
            return
        if a.get("role") == "gridcell" and a.get("col-id") and self.row:
            self.open, self.depth = (self.cells, (self.row, a["col-id"])), 1
        elif a.get("role") == "columnheader" and a.get("col-id"):
            self.open, self.depth = (self.headers, a["col-id"]), 1
        if self.open is not None:
            self.open[0][self.open[1]] = ""

    def handle_endtag(self, tag):
        if self.open is not None and tag == "div":
            self.depth -= 1
            if self.depth == 0:
                target, key = self.open
                target[key] = " ".join(target[key].split())
                self.open = None

    def handle_data(self, data):
        if self.open is not None:
            target, key = self.open
            target[key] += data + " "

    def cell(self, run_id: str, column: str) -> str | None:
        return next(
            (
                text
                for (row, col), text in self.cells.items()
                if row.endswith(run_id) and col == column
            ),
            None,
        )


@pytest.mark.slow
def test_runs_table_shows_candidates_with_metric_interval_params_and_datasets(
    browser, server, tmp_path
):
    url = tracking.runs_table_url(server["base"], server["experiment_id"])
    dom = dump_dom(browser, url, tmp_path / "profile-view")
    assert "Training runs" in dom  # the experiment's runs page rendered
    for name in CANDIDATES:
        assert f"train-{name}" in dom, f"run train-{name} not in the runs table"
        assert f"eval-{name}" in dom, f"run eval-{name} not in the runs table"
    assert "Group:" in dom  # grouped under their pipeline run

    grid = GridCells(dom)
    # Every column of the view is a rendered column, headed by its name.
    for column in tracking.view_columns(PRIMARY):
        assert column in grid.headers, f"column {column} not rendered (have {list(grid.headers)})"
        name = column.split("`")[1]
        assert name in grid.headers[column], (column, grid.headers[column])

    runs = server["runs"]
    metric = f"metrics.`{PRIMARY}`"
    # The winner's evaluation: value and interval (0.75 [0.7, 0.8]), its training params and
    # training metrics on the same row, the test set as its dataset.
    ev = runs["eval-r8-lr1e-3"]
    assert grid.cell(ev, metric) == "0.75"
    assert grid.cell(ev, f"metrics.`{PRIMARY}.ci_low`") == "0.7"
    assert grid.cell(ev, f"metrics.`{PRIMARY}.ci_high`") == "0.8"
    assert grid.cell(ev, "params.`train.rank`") == "8"
    assert grid.cell(ev, "params.`train.method`") == "lora"
    assert grid.cell(ev, "metrics.`train.val_loss`") == "1"
    assert f"test ({server['test_md5']})" in grid.cell(ev, "attributes.`Dataset`")
    assert grid.cell(runs["eval-r16-lr5e-4"], metric) == "0.6"
    assert grid.cell(runs["eval-r16-lr5e-4"], "params.`train.rank`") == "16"
    assert grid.cell(runs["eval-baseline"], metric) == "0.25"
    # A train run: its data as datasets (train, +1 for validation) and its logged model.
    tr = runs["train-qlora-r16"]
    assert grid.cell(tr, "attributes.`Dataset`").startswith("train (")
    assert "qlora-r16" in grid.cell(tr, "attributes.`Models`")
    assert grid.cell(tr, "params.`train.rank`") == "16"

    # On a laptop-sized window (the assistant panel open, as on a first visit) the dataset and
    # the primary metric with both interval bounds are in sight without scrolling: the view
    # orders them first (by default the UI puts selected columns last, sorted by name).
    narrow = GridCells(
        chromium(
            browser, tmp_path / "profile-narrow", "--window-size=1600,1000", "--dump-dom", url
        ).stdout
    )
    for column in tracking.view_columns(PRIMARY)[:4]:
        assert column in narrow.headers, f"{column} not in sight at 1600 px"

    shot = tmp_path / "view.png"
    chromium(browser, tmp_path / "profile-shot", f"--screenshot={shot}", url)
    assert shot.read_bytes()[:4] == b"\x89PNG"
    if os.environ.get("TEMPER_UI_SCREENSHOT"):
        shutil.copy(shot, os.environ["TEMPER_UI_SCREENSHOT"])

    # Control: the default view nests children under a collapsed parent row and shows no
    # metric or param columns, which is why `temper ui` links to the Temper view.
    plain = dump_dom(
        browser,
        tracking.runs_table_url(server["base"], server["experiment_id"], view=None),
        tmp_path / "profile-plain",
    )
    assert server["parent_name"] in plain
    assert "train-r8-lr1e-3" not in plain
    assert metric not in GridCells(plain).headers


def test_view_state_uses_the_ui_keys():
    """The shared view's keys and column keys are those of the MLflow 3.17 UI (its JS bundle
    lists the UI state keys; a column key is `<kind>.`<name>``)."""
    state = view_state("m")
    assert set(state) <= {"selectedColumns", "columnOrder", "columnWidths", "groupBy"}
    assert state["groupBy"] == "tag.average.mlflow.parentRunId"
    assert state["selectedColumns"][:4] == [
        "attributes.`Dataset`",
        "metrics.`m`",
        "metrics.`m.ci_low`",
        "metrics.`m.ci_high`",
    ]
    assert "params.`train.rank`" in state["selectedColumns"]
    assert state["columnOrder"][:2] == ["attributes.`Run Name`", "runDateAndNestInfo"]
    assert state["columnOrder"][2:-1] == state["selectedColumns"]
    assert set(state["columnWidths"]) <= set(state["selectedColumns"])


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
