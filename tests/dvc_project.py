"""A git + DVC copy of the project for tests that run the real pipeline (`dvc exp run`).

Shared by the end-to-end tests of a profile or a task (ContractNLI, the OpenAI sources, every
field kind): the code, configs and data they name, the real base model (committed to DVC as
the `base_model` stage's output, so it is not rebuilt), the serve benchmark's measured figures
(a committed input of the cost stage), one git commit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]

# Tiny sizes for a pipeline run whose test checks that a task or profile goes through, not how
# well a few steps learn: a few training steps, one candidate judged on test alone (nothing to
# choose on validation), a one-shot base-model baseline, gates that let anything pass.
TINY = [
    "train.max_steps=2",
    "train.save_steps=2",
    "evaluate.n_resamples=100",
    "evaluate.batch_size=8",
    "evaluate.baseline_few_shot=1",  # the base-model baseline's prompt: 1 shot, not 3
    "evaluate.validation=null",
    "gates.min_primary=0.0",
    "gates.min_delta_low=null",
    "gates.min_json_valid_rate=null",
]


def sh(cwd: Path, *args: str, env: dict | None = None) -> str:
    """Run a command; fail the test with the tail of its output when it fails."""
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def env_of() -> dict[str, str]:
    """The pipeline's environment: the project's own MLflow store, quiet logs."""
    return {**os.environ, "MLFLOW_TRACKING_URI": "", "TEMPER_LOG_LEVEL": "WARNING"}


def make_repo(
    repo: Path,
    base_model_dir: Path,
    data: list[str],
    prepare: Callable[[Path], None] | None = None,
) -> Path:
    """`repo` as a committed git + DVC project holding the paths `data` (files or folders)
    beside the code; `prepare(repo)` adds what a test writes before the commit."""
    repo.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("pipelines", "configs", *data):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, repo / name)
    shutil.copytree(base_model_dir, repo / "models" / "base")
    (repo / "docs" / "results").mkdir(parents=True)
    shutil.copy(ROOT / "docs/results/bench_serve.json", repo / "docs/results/bench_serve.json")
    (repo / ".gitignore").write_text("/models/\n/mlflow.db\n/mlartifacts/\n/.cache/\n")
    if prepare is not None:
        prepare(repo)
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "t@example.com")
    sh(repo, "git", "config", "user.name", "t")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "commit", "-f", "-q", "base_model", env=env_of())  # the copied base model
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "project")
    return repo


def profile_args(repo: Path, profile: dict[str, Any]) -> list[str]:
    """The `-S` values that put `profile` (a configs/profiles mapping) over `repo`'s params.yaml,
    as `temper profile` prints them."""
    from temper.cli.profiles import profile_overrides
    from temper.config import read_yaml
    from temper.params import TemperParams

    return profile_overrides(profile, read_yaml(repo / "params.yaml"), TemperParams)


def exp_run(
    repo: Path, overrides: list[str], name: str | None = None, target: str | None = None
) -> str:
    """`dvc exp run [-n name] -S ... [target]` in `repo` (the stages up to `target`, else all);
    its output."""
    named = ["-n", name] if name else []
    sets = [a for o in overrides for a in ("-S", o)]
    return sh(repo, "dvc", "exp", "run", *named, *sets, *([target] if target else []), env=env_of())


def missing_outputs(repo: Path) -> list[str]:
    """The outs, metrics and plot files dvc.yaml declares that `repo` lacks (foreach stages
    left out)."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    paths = []
    for stage in stages.values():
        body = stage.get("do", stage)
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind, []):
                name = entry if isinstance(entry, str) else next(iter(entry))
                if "${" not in name:
                    paths.append(repo / name)
    return [str(p.relative_to(repo)) for p in paths if not p.exists()]
