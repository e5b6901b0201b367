"""The team setup on one machine, for trying it: PostgreSQL as MLflow's backend store, an
artifact root that MLflow serves, `mlflow server` behind MLflow's basic-auth app, and a shared
folder as the DVC remote. docs/team.md walks through it; no `make` needed.

    python scripts/team_stack.py up --dir .team [--port 5000] [--user alice --user ci]
    python scripts/team_stack.py users --dir .team --user bob      # more users later
    python scripts/team_stack.py backup --dir .team --out backups/$(date +%F)
    python scripts/team_stack.py down --dir .team

`up` creates, on first use, under `--dir`:

    pg/            a PostgreSQL cluster (initdb), listening on 127.0.0.1 only, no Unix socket;
                   databases `mlflow` (tracking + registry) and `mlflow_auth` (users)
    artifacts/     the artifact root (`mlflow server --artifacts-destination`): clients
                   up- and download through the server (`mlflow-artifacts:/...`)
    dvc-remote/    the DVC remote (a shared folder: `dvc remote add -d team <dir>/dvc-remote`)
    secrets/       mode 0700: pgpass, the server's secret key, basic_auth.ini, the admin's
                   password and one `<user>.env` per user (MLFLOW_TRACKING_USERNAME/PASSWORD)
    logs/          postgres.log, mlflow.log
    stack.json     ports, process ids, the tracking URI (no secrets)

and starts PostgreSQL and the server (each in its own session: they outlive this command;
`down` stops both). Later `up`s reuse what is there. Passwords are generated
(`secrets.token_urlsafe`) and only ever written to files in `secrets/`; nothing here prints one.
The PostgreSQL binaries are Debian's (`apt-get install postgresql`); the cluster runs as the
current user, or as the `postgres` user when this runs as root (initdb refuses root).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DB_USER = "temper"  # the cluster's superuser, which MLflow connects as
DATABASES = ("mlflow", "mlflow_auth")
# Every team member may read and write every experiment and model; delete and permission
# changes (MANAGE) stay with each resource's creator and the admin (docs/team.md).
DEFAULT_PERMISSION = "EDIT"
AUTH_CACHE_TTL_S = 60  # a good credential check is reused this long (basic_auth.ini)


class StackError(RuntimeError):
    """The setup cannot be brought up as asked (the message says what to do)."""


def pg_bindir() -> Path | None:
    """The newest Debian PostgreSQL bin folder, else wherever `initdb` is on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _version(path: str) -> int:
    part = Path(path).parts[-3]
    return int(part) if part.isdigit() else 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    def __init__(self, folder: Path) -> None:
        self.dir = folder.resolve()
        self.pg = self.dir / "pg"
        self.artifacts = self.dir / "artifacts"
        self.remote = self.dir / "dvc-remote"
        self.secrets = self.dir / "secrets"
        self.logs = self.dir / "logs"
        self.state_file = self.dir / "stack.json"
        self.as_root = os.geteuid() == 0
        bindir = pg_bindir()
        if bindir is None:
            raise StackError(
                "PostgreSQL binaries not found (no /usr/lib/postgresql/*/bin/initdb, no initdb "
                "on PATH): apt-get install postgresql"
            )
        self.bin = bindir

    # --- state and secrets -------------------------------------------------------------
    def state(self) -> dict:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def save_state(self, state: dict) -> None:
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")

    def secret(self, name: str, make: bool = True) -> str:
        """A generated secret kept in secrets/<name> (mode 0600), created on first use."""
        path = self.secrets / name
        if not path.exists():
            if not make:
                raise StackError(f"{path}: missing")
            write_private(path, secrets.token_urlsafe(24))
        return path.read_text().strip()

    def pg_env(self, port: int) -> dict[str, str]:
        """libpq settings for clients (MLflow, createdb, pg_dump): the password from pgpass."""
        return {**os.environ, "PGPASSFILE": str(self.secrets / "pgpass"), "PGPORT": str(port)}

    # --- PostgreSQL ---------------------------------------------------------------------
    def pg_cmd(self, *args: str) -> list[str]:
        """A server-side PostgreSQL command, as the `postgres` user when we are root."""
        cmd = [str(self.bin / args[0]), *args[1:]]
        return ["runuser", "-u", "postgres", "--", *cmd] if self.as_root else cmd

    def own(self, path: Path) -> None:
        if self.as_root:
            shutil.chown(path, "postgres", "postgres")

    def init_postgres(self, port: int) -> None:
        password = self.secret("pg_password")
        write_private(self.secrets / "pgpass", f"127.0.0.1:*:*:{DB_USER}:{password}\n")
        self.pg.mkdir(mode=0o700)
        self.own(self.pg)
        pwfile = self.logs / ".initdb-pw"  # readable by the cluster's owner, removed at once
        write_private(pwfile, password + "\n")
        self.own(pwfile)
        try:
            run(
                self.pg_cmd(
                    "initdb",
                    "-D",
                    str(self.pg),
                    "-U",
                    DB_USER,
                    f"--pwfile={pwfile}",
                    "--auth-host=scram-sha-256",
                    "--auth-local=peer",
                    "-E",
                    "UTF8",
                    "--locale=C",
                )
            )
        finally:
            pwfile.unlink()
        conf = (
            "\n# temper scripts/team_stack.py\n"
            f"port = {port}\n"
            "listen_addresses = '127.0.0.1'\n"
            "unix_socket_directories = ''\n"
        )
        with (self.pg / "postgresql.conf").open("a") as handle:
            handle.write(conf)

    def pg_running(self) -> bool:
        done = subprocess.run(
            self.pg_cmd("pg_ctl", "-D", str(self.pg), "status"), capture_output=True, text=True
        )
        return done.returncode == 0

    def start_postgres(self, port: int) -> None:
        if not self.pg_running():
            run(
                self.pg_cmd(
                    "pg_ctl", "-D", str(self.pg), "-l", str(self.logs / "postgres.log"), "-w"
                )
                + ["-t", "120", "start"],
                start_new_session=True,
            )
        env = self.pg_env(port)
        for _ in range(120):
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                capture_output=True,
            )
            if ready.returncode == 0:
                break
            time.sleep(0.5)
        else:
            raise StackError(f"PostgreSQL not ready on port {port}: see {self.logs}/postgres.log")
        have = subprocess.run(
            [
                str(self.bin / "psql"),
                "-h",
                "127.0.0.1",
                "-U",
                DB_USER,
                "-d",
                "postgres",
                "-Atc",
                "SELECT datname FROM pg_database",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        for db in DATABASES:
            if db not in have:
                run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-U", DB_USER, db], env=env)

    def stop_postgres(self) -> None:
        if self.pg.exists() and self.pg_running():
            run(self.pg_cmd("pg_ctl", "-D", str(self.pg), "-m", "fast", "-w", "stop"))

    # --- MLflow -------------------------------------------------------------------------
    def db_uri(self, port: int, db: str) -> str:
        # No password in the URI: libpq reads it from PGPASSFILE (the server's environment).
        # The driver is named: SQLAlchemy 2.1 takes a bare postgresql:// to mean psycopg 3.
        return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{port}/{db}"

    def server_env(self, pg_port: int) -> dict[str, str]:
        ini = self.secrets / "basic_auth.ini"
        ini.write_text(
            "[mlflow]\n"
            f"default_permission = {DEFAULT_PERMISSION}\n"
            f"database_uri = {self.db_uri(pg_port, 'mlflow_auth')}\n"
            "admin_username = admin\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # MLflow checks the password (PBKDF2, 600,000 rounds) on every request unless
            # told to cache a good check: measured here, 0.35-0.43 s a request, so a
            # `temper promote` of 23 requests spent 10 of its 13 s waiting. Cached for a
            # minute: a changed or deleted password stops working everywhere within it.
            f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n"
        )
        return {
            "PGPASSFILE": str(self.secrets / "pgpass"),
            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            # Read only when the user store is empty (the first start): creates `admin`.
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.secret("admin_password"),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret("flask_secret_key"),
        }

    def start_mlflow(self, pg_port: int, port: int, host: str) -> int:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from temper.tracking.server import start_server

        proc = start_server(
            self.db_uri(pg_port, "mlflow"),
            self.artifacts,
            port,
            host=host,
            log=self.logs / "mlflow.log",
            timeout=300,
            app_name="basic-auth",
            extra_env=self.server_env(pg_port),
        )
        return proc.pid

    def add_users(self, uri: str, users: list[str]) -> list[str]:
        """Create each user (a generated password in secrets/<user>.env) unless it exists."""
        from mlflow.exceptions import MlflowException
        from mlflow.server.auth.client import AuthServiceClient

        os.environ["MLFLOW_TRACKING_USERNAME"] = "admin"
        os.environ["MLFLOW_TRACKING_PASSWORD"] = self.secret("admin_password", make=False)
        write_env(self.secrets / "admin.env", uri, "admin", os.environ["MLFLOW_TRACKING_PASSWORD"])
        client = AuthServiceClient(uri)
        made = []
        for user in users:
            env_file = self.secrets / f"{user}.env"
            try:
                client.get_user(user)
                exists = True
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                exists = False
            if exists and env_file.exists():
                continue
            password = secrets.token_urlsafe(18)
            if exists:  # a user without its file here: give it a new password
                client.update_user_password(user, password)
            else:
                client.create_user(user, password)
            write_env(env_file, uri, user, password)
            made.append(user)
        return made

    # --- commands -----------------------------------------------------------------------
    def up(self, port: int, host: str, users: list[str]) -> dict:
        state = self.state()
        if state.get("mlflow_pid") and alive(state["mlflow_pid"]):
            raise StackError(f"already up: {state['tracking_uri']} (pid {state['mlflow_pid']})")
        for folder in (self.dir, self.artifacts, self.remote, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        self.secrets.mkdir(mode=0o700, exist_ok=True)
        if self.as_root:
            # The cluster's owner must reach pg/ and write its log: x on the folder, no r.
            self.dir.chmod(self.dir.stat().st_mode | 0o011)
            self.own(self.logs)
        if not self.pg.exists():
            pg_port = free_port()
            self.init_postgres(pg_port)
            self.save_state({**state, "pg_port": pg_port})
        else:
            pg_port = state["pg_port"]
        self.start_postgres(pg_port)
        pid = self.start_mlflow(pg_port, port, host)
        uri = f"http://{host}:{port}"
        state = {
            "tracking_uri": uri,
            "port": port,
            "pg_port": pg_port,
            "mlflow_pid": pid,
            "backend_store_uri": self.db_uri(pg_port, "mlflow"),
            "artifacts_destination": str(self.artifacts),
            "dvc_remote": str(self.remote),
        }
        self.save_state(state)
        self.add_users(uri, users)
        return state

    def down(self) -> None:
        state = self.state()
        pid = state.get("mlflow_pid")
        if pid and alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            for _ in range(40):
                if not alive(pid):
                    break
                time.sleep(0.25)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        self.stop_postgres()
        if state:
            self.save_state({**state, "mlflow_pid": None})

    def backup(self, out: Path) -> list[Path]:
        """pg_dump of both databases (custom format) and a tar of the artifact root."""
        state = self.state()
        out.mkdir(parents=True, exist_ok=True)
        env = self.pg_env(state["pg_port"])
        written = []
        for db in DATABASES:
            dump = out / f"{db}.dump"
            run(
                [
                    str(self.bin / "pg_dump"),
                    "-h",
                    "127.0.0.1",
                    "-U",
                    DB_USER,
                    "-Fc",
                    "-f",
                    str(dump),
                    db,
                ],
                env=env,
            )
            written.append(dump)
        tar = out / "artifacts.tar.gz"
        run(["tar", "-czf", str(tar), "-C", str(self.dir), "artifacts"])
        written.append(tar)
        return written


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    path.chmod(0o600)


def write_env(path: Path, uri: str, user: str, password: str) -> None:
    write_private(
        path,
        f"export MLFLOW_TRACKING_URI={uri}\n"
        f"export MLFLOW_TRACKING_USERNAME={user}\n"
        f"export MLFLOW_TRACKING_PASSWORD={password}\n",
    )


def run(cmd: list[str], **kwargs) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise StackError(
            f"{' '.join(cmd[:6])}... failed ({done.returncode}): "
            + (done.stderr or done.stdout).strip()[-800:]
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "users", "down", "backup"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--dir", type=Path, default=Path(".team"), help="Where it all lives.")
        if name in ("up", "users"):
            cmd.add_argument(
                "--user", action="append", default=[], help="A user to create (repeatable)."
            )
        if name == "up":
            cmd.add_argument("--port", type=int, default=5000, help="The MLflow server's port.")
            cmd.add_argument(
                "--host", default="127.0.0.1", help="Interface (loopback unless you mean it)."
            )
        if name == "backup":
            cmd.add_argument("--out", type=Path, required=True, help="Backup folder.")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        stack = Stack(args.dir)
        if args.command == "up":
            state = stack.up(args.port, args.host, args.user)
            print(f"MLflow (basic auth, PostgreSQL): {state['tracking_uri']}")
            print(f"artifact root: {state['artifacts_destination']}")
            print(f"DVC remote: dvc remote add -d team {state['dvc_remote']}")
            for user in ["admin", *args.user]:
                print(f"as {user}: source {stack.secrets / (user + '.env')}")
        elif args.command == "users":
            made = stack.add_users(stack.state()["tracking_uri"], args.user)
            for user in made:
                print(f"created {user}: source {stack.secrets / (user + '.env')}")
        elif args.command == "down":
            stack.down()
            print("stopped")
        else:
            for path in stack.backup(args.out):
                print(f"wrote {path}")
    except (StackError, RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
