"""The team setup for real (docs/team.md): `scripts/team_stack.py up` starts PostgreSQL (Debian's
binaries, a throw-away cluster on a free loopback port), `mlflow server --app-name basic-auth`
on it with a served artifact root, and a shared folder as the DVC remote. Against it, with the
credentials in MLflow's own variables only:

- the default pipeline's register stage under `dvc repro`, `temper promote` / `rollback` (by a
  CI user who did not create the model), `temper pull` and `temper serve` (by a third user),
  and `dvc push` / `pull` of the stage's output into a second clone; aliases read back as the
  strings a server returns;
- two users' `dvc exp run` at the same moment, each creating the experiment, the pipeline run
  and the registered model if missing: one of each, versions 1 and 2, no run lost;
- a wrong or missing credential: one `error:` line, exit 2, and no password anywhere.

PostgreSQL comes from the Debian package `postgresql` (.ci/run installs it). Without it the
test is skipped with that reason; under CI (`CI=true`) it fails instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from registry_fixtures import MODEL, git, make_project, pattern, tiny_adapter

from temper import tracking
from temper.io import adapter_hash

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPT = ROOT / "scripts" / "team_stack.py"
USERS = ("alice", "bob", "ci")
N = 60

_spec = importlib.util.spec_from_file_location("team_stack", SCRIPT)
team_stack = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(team_stack)

REGISTER_STAGE = {
    "stages": {
        "register": {
            "cmd": "temper register",
            "deps": ["metrics/eval.json", "reports/predictions", "models/candidates"],
            "params": ["register"],
            "outs": ["metrics/register.json"],
        }
    }
}


def free_port() -> int:
    return team_stack.free_port()


@pytest.fixture(scope="module")
def stack():
    """The whole setup, up for the module; `down` and removed afterwards."""
    if team_stack.pg_bindir() is None:
        reason = "PostgreSQL is not installed (Debian package `postgresql`; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    # Not under pytest's tmp folder (mode 0700): as root the cluster runs as `postgres`,
    # which must reach its data folder.
    folder = Path(tempfile.mkdtemp(prefix="temper-team-"))
    port = free_port()
    up = subprocess.run(
        [sys.executable, str(SCRIPT), "up", "--dir", str(folder), "--port", str(port)]
        + [a for u in USERS for a in ("--user", u)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((folder / "stack.json").read_text())
        envs = {u: read_env(folder / "secrets" / f"{u}.env") for u in ("admin", *USERS)}
        passwords = [e["MLFLOW_TRACKING_PASSWORD"] for e in envs.values()]
        passwords += [(folder / "secrets" / "pg_password").read_text().strip()]
        assert not any(p in up.stdout + up.stderr for p in passwords)
        yield {
            "dir": folder,
            "uri": state["tracking_uri"],
            "remote": state["dvc_remote"],
            "envs": envs,
            "passwords": passwords,
            "outputs": [up.stdout, up.stderr],
        }
    finally:
        subprocess.run(
            [sys.executable, str(SCRIPT), "down", "--dir", str(folder)],
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(folder, ignore_errors=True)


def read_env(path: Path) -> dict[str, str]:
    """secrets/<user>.env: `export KEY=value` lines."""
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        out[key] = value
    return out


def user_env(stack: dict, user: str | None, **extra: str) -> dict[str, str]:
    """The environment of a user's shell: the tracking URI and that user's credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", MLFLOW_TRACKING_URI=stack["uri"])
    if user is not None:
        env.update(stack["envs"][user])
    env.pop("DVC_EXP_NAME", None)
    return {**env, **extra}


def sh(stack: dict, cwd: Path, user: str | None, *cmd: str, **extra: str):
    done = subprocess.run(
        list(cmd), cwd=cwd, env=user_env(stack, user, **extra), capture_output=True, text=True
    )
    stack["outputs"] += [done.stdout, done.stderr]
    return done


def as_user(monkeypatch, stack: dict, user: str) -> None:
    """This process as `user` (the fixtures' in-process train runs)."""
    for key, value in user_env(stack, user).items():
        if key.startswith("MLFLOW_TRACKING_"):
            monkeypatch.setenv(key, value)


def client(stack: dict, monkeypatch):
    """A client as the admin (reads everything)."""
    import mlflow

    for key, value in stack["envs"]["admin"].items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(stack["uri"])
    mlflow.set_registry_uri(stack["uri"])
    return mlflow.MlflowClient()


def team_project(folder: Path, base_model_dir: Path, remote: str, **sections) -> Path:
    """A fixture project whose params name no store (so $MLFLOW_TRACKING_URI applies), with
    the register stage in dvc.yaml and the team's DVC remote as the default."""
    folder.mkdir()
    update = {"mlflow": {"tracking_uri": None}, "register": {"lock": "data/lock.yaml"}}
    for key, values in sections.items():
        update[key] = {**update.get(key, {}), **values}
    make_project(folder, base_model_dir, update)
    # The data hashes register reads: the fixture's lock, kept apart from the dvc.lock that
    # `dvc repro` of this one-stage dvc.yaml rewrites.
    shutil.copy(folder / "dvc.lock", folder / "data" / "lock.yaml")
    (folder / "dvc.lock").unlink()
    (folder / "dvc.yaml").write_text(yaml.safe_dump(REGISTER_STAGE, sort_keys=False))
    subprocess.run([BIN / "dvc", "init", "-q"], cwd=folder, check=True)
    subprocess.run([BIN / "dvc", "remote", "add", "-d", "team", remote], cwd=folder, check=True)
    git(folder, "add", "-A")
    git(folder, "commit", "-q", "-m", "team project")
    return folder


def round_(project: Path, adapter: Path, correct: list[int]) -> None:
    """What train and evaluate leave (the registry fixtures' train runs go to the server)."""
    from registry_fixtures import train_candidates, write_eval

    train_candidates(project, ["r16"], adapter)
    write_eval(project, {"r16": correct}, winner="r16")


def serve_models(stack: dict, project: Path, user: str, log: Path) -> list[dict]:
    """`temper serve` on models:/<MODEL>@champion as `user`: its /v1/models once ready."""
    import httpx

    port = free_port()
    cmd = [BIN / "temper", "serve", "--port", str(port), "--model", f"models:/{MODEL}@champion"]
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=project,
            env=user_env(stack, user),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                resp = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                if resp.status_code == 200:
                    return resp.json()["data"]
            time.sleep(1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        stack["outputs"].append(log.read_text())


def alias(c, name: str, which: str) -> str | None:
    mv = tracking.alias_version(c, name, which)
    return None if mv is None else tracking.version_str(mv.version)


def secrets_in(stack: dict, texts: list[str]) -> list[str]:
    return [p[:4] + "..." for p in stack["passwords"] if any(p in t for t in texts)]


def store_texts(c, experiment: str, model: str) -> list[str]:
    """Every param, tag and description the store holds for the experiment and the model."""
    exp = c.get_experiment_by_name(experiment)
    texts = [json.dumps(exp.tags)]
    for run in c.search_runs([exp.experiment_id], max_results=1000):
        texts += [json.dumps(run.data.params), json.dumps(run.data.tags)]
    for lm in c.search_logged_models([exp.experiment_id]):
        texts += [json.dumps(lm.params), json.dumps(lm.tags)]
    rm = c.get_registered_model(model)
    texts += [json.dumps(rm.tags), rm.description or ""]
    for mv in c.search_model_versions(f"name = '{model}'"):
        texts += [json.dumps(mv.tags), mv.description or "", mv.source or ""]
    return texts


@pytest.mark.slow
def test_register_promote_rollback_pull_and_dvc_remote_on_the_team_server(
    stack, tmp_path, base_model_dir, monkeypatch
):
    project = team_project(tmp_path / "alice", base_model_dir, stack["remote"])
    monkeypatch.chdir(project)
    as_user(monkeypatch, stack, "alice")
    adapter = tiny_adapter(str(base_model_dir))

    round_(project, adapter, pattern(N, 42))  # 0.70
    done = sh(stack, project, "alice", "dvc", "repro")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((project / "metrics" / "register.json").read_text())
    assert summary["version"] == "1" and summary["tracking_uri"] == stack["uri"]
    done = sh(stack, project, "ci", "temper", "promote")  # CI: not the model's creator
    assert done.returncode == 0, done.stdout + done.stderr

    round_(project, adapter, pattern(N, 43))  # 0.717: not worse
    done = sh(stack, project, "alice", "dvc", "repro")
    assert done.returncode == 0, done.stdout + done.stderr
    done = sh(stack, project, "ci", "temper", "promote")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "promoted:" in done.stdout

    c = client(stack, monkeypatch)
    # On a server the alias maps hold strings; Temper's reads agree with them.
    assert c.get_registered_model(MODEL).aliases == {"challenger": "2", "champion": "2"}
    assert alias(c, MODEL, "champion") == "2"

    done = sh(stack, project, "ci", "temper", "rollback")
    assert done.returncode == 0, done.stdout + done.stderr
    assert alias(c, MODEL, "champion") == "1" and alias(c, MODEL, "challenger") == "2"
    assert c.get_model_version(MODEL, "2").tags["temper.promotion"] == "rolled_back"
    done = sh(stack, project, "ci", "temper", "promote")  # the rolled-back one stays out
    assert done.returncode == 1 and "version 2 was rolled back" in done.stdout

    bundle = tmp_path / "bundle"
    done = sh(stack, project, "bob", "temper", "pull", f"models:/{MODEL}@champion", "-o", bundle)
    assert done.returncode == 0, done.stdout + done.stderr
    v1 = c.get_model_version(MODEL, "1")
    assert adapter_hash(bundle / "adapter") == v1.tags["temper.adapter_sha256"]
    assert json.loads((bundle / "serving.json").read_text())

    # A server on the champion, pulled from the team's registry by another user.
    served = serve_models(stack, project, "bob", tmp_path / "serve.log")
    assert [(m["registered_model"], str(m["version"])) for m in served] == [(MODEL, "1")]

    # The stage's output through the shared DVC remote, into bob's clone.
    git(project, "add", "dvc.lock")
    git(project, "commit", "-q", "-m", "registered v2")
    done = sh(stack, project, "alice", "dvc", "push")
    assert done.returncode == 0, done.stdout + done.stderr
    clone = tmp_path / "bob"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    done = sh(stack, clone, "bob", "dvc", "pull")
    assert done.returncode == 0, done.stdout + done.stderr
    pulled = json.loads((clone / "metrics" / "register.json").read_text())
    assert pulled == json.loads((project / "metrics" / "register.json").read_text())
    assert pulled["version"] == "2"

    files = [project / "metrics" / "register.json", project / "reports" / "promotion.md"]
    files += [p for p in bundle.rglob("*") if p.suffix in (".json", ".md", ".yaml")]
    files += [project / "dvc.lock", project / ".dvc" / "config"]
    files += list((stack["dir"] / "logs").glob("*.log"))
    texts = stack["outputs"] + [p.read_text(errors="replace") for p in files]
    texts += store_texts(c, "temper", MODEL)
    assert secrets_in(stack, texts) == []


WORKER = """
import os, pathlib, subprocess, sys, time
sys.path.insert(0, {tests!r})
project, adapter, user = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
os.chdir(project)
from registry_fixtures import pattern, train_candidates, write_eval
import mlflow  # imported before the start signal: the two start at one moment
(project / "ready").touch()
while not (project.parent / "go").exists():
    time.sleep(0.02)
train_candidates(project, ["r16"], adapter)  # creates the experiment and pipeline run if missing
write_eval(project, {{"r16": pattern(40, 30)}}, winner="r16")
done = subprocess.run(["dvc", "exp", "run", "-n", f"exp-{{user}}"], capture_output=True, text=True)
print(done.stdout + done.stderr)
sys.exit(done.returncode)
"""


@pytest.mark.slow
def test_two_users_dvc_exp_run_at_once_share_one_experiment_and_model(
    stack, tmp_path, base_model_dir, monkeypatch
):
    experiment, model = "team-race", "team-race-model"
    adapter = tiny_adapter(str(base_model_dir))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(tests=str(ROOT / "tests")))
    procs = {}
    for seed, user in enumerate(("alice", "bob")):  # two experiments: other params
        project = team_project(
            tmp_path / user,
            base_model_dir,
            stack["remote"],
            mlflow={"experiment": experiment},
            register={"model_name": model},
            train={"seed": seed},
        )
        procs[user] = subprocess.Popen(
            [sys.executable, str(worker), str(project), str(adapter), user],
            env=user_env(stack, user),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    deadline = time.monotonic() + 300
    while not all((tmp_path / u / "ready").exists() for u in procs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs.values())
        time.sleep(0.1)
    (tmp_path / "go").touch()
    outputs = {u: p.communicate(timeout=600)[0] for u, p in procs.items()}
    stack["outputs"] += list(outputs.values())
    for user, p in procs.items():
        assert p.returncode == 0, f"{user}:\n{outputs[user][-3000:]}"

    c = client(stack, monkeypatch)
    assert len(c.search_experiments(filter_string=f"name = '{experiment}'")) == 1
    assert [m.name for m in c.search_registered_models(f"name = '{model}'")] == [model]
    versions = c.search_model_versions(f"name = '{model}'")
    assert sorted(tracking.version_str(v.version) for v in versions) == ["1", "2"]
    assert sorted(v.tags["temper.experiment"] for v in versions) == ["exp-alice", "exp-bob"]
    assert len({v.run_id for v in versions}) == 2
    # Experiments do not move @challenger; a new model's version 1 gets it only while it is the
    # model's one version (if bob's version 2 came first, neither does): never version 2.
    assert c.get_registered_model(model).aliases in ({}, {"challenger": "1"})
    summaries = [
        json.loads((tmp_path / u / "metrics" / "register.json").read_text()) for u in procs
    ]
    assert sorted(s["version"] for s in summaries) == ["1", "2"]

    # No run lost: each user's pipeline run with its train and register child, all finished.
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if tracking.PIPELINE_TAG in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2 and len(children) == 4, [r.info.run_name for r in runs]
    assert sorted(r.data.tags["temper.stage"] for r in children) == ["register"] * 2 + ["train"] * 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {r.info.run_id for r in parents}
    assert all(r.info.status == "FINISHED" for r in runs)
    starts = sorted(r.info.start_time for r in parents)  # the two ran at one time
    assert starts[1] - starts[0] < 30_000, starts
    assert secrets_in(stack, stack["outputs"] + store_texts(c, experiment, model)) == []


@pytest.mark.slow
def test_wrong_or_missing_credentials_fail_in_one_line_without_the_secret(stack, tmp_path):
    project = tmp_path / "p"
    project.mkdir()
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    wrong = "not-the-password-" + os.urandom(6).hex()
    alice = stack["envs"]["alice"]
    cases = {
        "wrong password": dict(MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD=wrong),
        "unknown user": dict(
            MLFLOW_TRACKING_USERNAME="mallory",
            MLFLOW_TRACKING_PASSWORD=alice["MLFLOW_TRACKING_PASSWORD"],
        ),
        "no password": dict(MLFLOW_TRACKING_USERNAME="alice"),
        "nothing": {},
    }
    commands = [["promote"], ["rollback"], ["pull", f"models:/{MODEL}@champion"]]
    # Every case on one command, every command on one case (they share the access check):
    # six CLI starts rather than twelve.
    runs = [(case, commands[0]) for case in cases]
    runs += [("wrong password", command) for command in commands[1:]]
    texts = []
    for case, command in runs:
        done = sh(stack, project, None, str(BIN / "temper"), *command, **cases[case])
        texts += [done.stdout, done.stderr]
        where = f"{case}: temper {command[0]}"
        assert done.returncode == 2, f"{where}\n{done.stdout}\n{done.stderr}"
        assert "Traceback" not in done.stderr, where
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, f"{where}: {done.stderr}"
        assert lines[0].startswith(f"error: MLflow server {stack['uri']} "), lines[0]
        assert "(401 UNAUTHENTICATED)" in lines[0]
        hint = "none are set" if case == "nothing" else "refused the credentials"
        assert hint in lines[0], lines[0]
    assert "MLFLOW_TRACKING_PASSWORD not set" in "".join(texts)
    for text in texts + [p.read_text() for p in (stack["dir"] / "logs").glob("*.log")]:
        assert wrong not in text
    assert secrets_in(stack, texts) == []
    with contextlib.suppress(FileNotFoundError):
        assert wrong not in (project / "reports" / "promotion.md").read_text()


@pytest.mark.slow
def test_backup_dumps_both_databases_and_the_artifact_root_and_restores(stack, tmp_path):
    """`team_stack.py backup`, then the dump restored into a fresh database holds what the live
    one holds (docs/team.md, "Backup and restore")."""
    out = tmp_path / "backup"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "backup", "--dir", str(stack["dir"]), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "artifacts.tar.gz",
        "mlflow.dump",
        "mlflow_auth.dump",
    ]
    listed = subprocess.run(["tar", "-tzf", out / "artifacts.tar.gz"], capture_output=True)
    assert listed.returncode == 0 and listed.stdout.startswith(b"artifacts/")
    pg = team_stack.Stack(stack["dir"])
    env = pg.pg_env(json.loads((stack["dir"] / "stack.json").read_text())["pg_port"])
    base = ["-h127.0.0.1", f"-U{team_stack.DB_USER}"]

    def psql(db: str, sql: str) -> str:
        cmd = [pg.bin / "psql", *base, "-d", db, "-Atc", sql]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout

    subprocess.run([pg.bin / "createdb", *base, "restored"], env=env, check=True)
    subprocess.run(
        [pg.bin / "pg_restore", *base, "-d", "restored", out / "mlflow.dump"],
        env=env,
        check=True,
        capture_output=True,
    )
    for table in ("experiments", "runs", "registered_models", "model_versions"):
        sql = f"SELECT count(*) FROM {table}"
        assert psql("restored", sql) == psql("mlflow", sql), table
    assert int(psql("restored", "SELECT count(*) FROM model_versions")) >= 1


# --- without a server ----------------------------------------------------------------------


def test_access_error_names_the_server_and_never_the_password(monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import (
        PERMISSION_DENIED,
        RESOURCE_DOES_NOT_EXIST,
        UNAUTHENTICATED,
    )

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:hunter22@mlflow.example.com")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter22")
    import mlflow

    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: os.environ["MLFLOW_TRACKING_URI"])
    err = MlflowException("401 hunter22", error_code=UNAUTHENTICATED)
    msg = str(tracking.access_error(err))
    assert msg.startswith("MLflow server https://***@mlflow.example.com refused the credentials")
    assert "hunter22" not in msg
    denied = MlflowException("no", error_code=PERMISSION_DENIED)
    assert "denied user 'bob'" in str(tracking.access_error(denied))
    assert tracking.access_error(MlflowException("x", error_code=RESOURCE_DOES_NOT_EXIST)) is None
    assert tracking.access_error(ValueError("UNAUTHENTICATED")) is None


def test_a_lost_pipeline_run_the_user_may_not_delete_is_taken_out_of_the_search():
    """Under basic auth only the experiment's creator may delete its runs: a teammate whose
    pipeline run lost the race renames its key tag and ends it instead."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

    from temper.tracking.runs import discard_run

    class Client:
        def __init__(self):
            self.calls = []

        def delete_run(self, run_id):
            raise MlflowException("denied", error_code=PERMISSION_DENIED)

        def set_tag(self, run_id, key, value):
            self.calls.append(("tag", run_id, key, value))

        def set_terminated(self, run_id, status):
            self.calls.append(("end", run_id, status))

    c = Client()
    discard_run(c, "loser", "winner")
    assert ("tag", "loser", tracking.PIPELINE_TAG, "lost-to-winner") in c.calls
    assert ("end", "loser", "KILLED") in c.calls


def test_the_candidates_view_survives_a_writer_that_won_the_race():
    """Two users' register stages write the experiment's shared view at one moment; on
    PostgreSQL the MLflow server's insert-or-update is not atomic and the loser got
    `UniqueViolation ... experiment_tag_pk` (a CI run of the two-user test failed so). The
    loser writes once more (an update by then); any other error still surfaces."""
    from mlflow.exceptions import MlflowException

    from temper.tracking.server import ensure_candidates_view

    class Server:
        def __init__(self, fail_with: str | None):
            self.fail_with, self.writes = fail_with, []

        def set_experiment_tag(self, experiment_id, key, value):
            if self.fail_with is not None:
                message, self.fail_with = self.fail_with, None
                raise MlflowException(message)
            self.writes.append((experiment_id, key))

    lost = Server('duplicate key value violates unique constraint "experiment_tag_pk"')
    ensure_candidates_view(lost, "2")
    assert lost.writes == [("2", "mlflow.sharedViewState.temper-candidates")]
    other = Server("PERMISSION_DENIED: ci may not edit experiment 2")
    with pytest.raises(MlflowException, match="PERMISSION_DENIED"):
        ensure_candidates_view(other, "2")
    assert other.writes == []
