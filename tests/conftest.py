"""Shared fixtures: the real base model and a small real prepared dataset, built once per run."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

# Nothing in the tests may reach a hub or phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist each worker gets its share of the cores for torch, in its own process and
# in those it starts (set before torch loads OpenMP). Two workers with two threads each on two
# cores thrash: OpenMP threads spin waiting for a sibling that is not running (measured in CI:
# pipeline tests 2-3x slower than alone).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))

ROOT = Path(__file__).resolve().parents[1]

# Fixtures that load or build the real base model (or run a stage on it): a test using one
# must be marked slow, so that `pytest -m "not slow"` stays fast.
REAL_MODEL_FIXTURES = {"base_model_dir", "prepared_dir"}


# Under `make test` (pytest-xdist, `--dist loadgroup`) a worker takes one group at a time: a
# module, or the vLLM modules together (one vLLM at a time on a 2-core machine, not two
# competing for it). Groups go out heaviest first (seconds in CI, docs/ci.md), so the workers
# finish together; the rest follow in file order. Order changes the wall time, never what runs.
# (xdist's own `xdist_group` marks do not group under pytest 9.2, whose node ids xdist 3.8 can
# no longer suffix: hence the scheduler below, which groups by file name.)
VLLM_GROUP = "vllm"
VLLM_MODULES = {"test_serve.py", "test_serve_route.py", "test_evaluate_vllm.py", "test_benches.py"}
HEAVIEST_FIRST = [
    VLLM_GROUP,  # ~900 s
    "test_team.py",
    "test_openai_sources.py",
    "test_field_kinds.py",
    "test_sweep.py",
    "test_train.py",
    "test_gpu_check.py",
    "test_bundle.py",
    "test_task_nli.py",
    "test_register.py",
    "test_evaluate.py",
    "test_distil_batch.py",
    "test_distil.py",
    "test_monitor_serve.py",
    "test_monitor_drift.py",
    "test_monitor_prometheus_live.py",
]


def group_of(nodeid: str) -> str:
    """The group a test runs in: its module's file, or the vLLM group."""
    module = nodeid.split("::", 1)[0]
    return VLLM_GROUP if Path(module).name in VLLM_MODULES else module


@pytest.hookimpl(optionalhook=True)  # pytest -p no:xdist runs without it
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None  # xdist's own scheduler for the mode asked for
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return ByGroup(config, log)


def pytest_collection_modifyitems(config, items):
    check_real_model_tests_are_slow(items)
    check_vllm_modules_are_grouped(items)

    def rank(item) -> int:
        group = Path(group_of(item.nodeid)).name
        return HEAVIEST_FIRST.index(group) if group in HEAVIEST_FIRST else len(HEAVIEST_FIRST)

    items.sort(key=rank)  # stable: a module's tests keep their order


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that talked to a `temper serve` process gets the tail of that server's
    logs (its own, its stderr, its vLLM's) in the report: CI shows why a request failed."""
    report = yield
    if report.failed and call.when == "call":
        for folder in server_log_folders(getattr(item, "funcargs", {}).values()):
            for path in sorted(folder.glob("*.log")) + sorted(folder.glob("*.stderr")):
                lines = path.read_text(errors="replace").splitlines()[-40:]
                report.sections.append((f"tail of {path.name}", "\n".join(lines)))
    return report


def server_log_folders(values) -> list[Path]:
    """The log folders of the running servers among a test's fixture values (or in tuples)."""
    found = []
    for value in values:
        for part in value if isinstance(value, tuple) else (value,):
            log = getattr(part, "log", None)
            if isinstance(log, Path) and hasattr(part, "proc") and log.parent not in found:
                found.append(log.parent)
    return found


def check_vllm_modules_are_grouped(items) -> None:
    found = {item.path.name for item in items if item.get_closest_marker("vllm")}
    if found - VLLM_MODULES:
        raise pytest.UsageError(f"add {sorted(found - VLLM_MODULES)} to VLLM_MODULES (conftest)")


def check_real_model_tests_are_slow(items) -> None:
    unmarked = [
        item.nodeid
        for item in items
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("slow") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "these use the real model but are not marked slow: " + ", ".join(unmarked)
        )


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a safetensors folder (`models/base`, built if absent)."""
    from temper.stages import base_model

    cfg = base_model.ModelConfig(dir=str(ROOT / "models" / "base"))
    (ROOT / "models").mkdir(exist_ok=True)
    with open(ROOT / "models" / ".base.lock", "w") as lock:  # one builder among the workers
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (Path(cfg.dir) / "temper_source.json").exists():
            base_model.run(cfg)
    return Path(cfg.dir)


@pytest.fixture(scope="session")
def task():
    from temper.task import load_task

    return load_task(ROOT / "configs" / "tasks" / "clause_review.yaml")


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, base_model_dir, task) -> Path:
    """A small prepared dataset from the real CUAD files (train 64, validation 32, test 32)."""
    from temper.config import load_params
    from temper.params import TemperParams
    from temper.stages.prepare import run

    out = tmp_path_factory.mktemp("prepared")
    params = load_params(ROOT / "params.yaml")
    cfg = TemperParams.of(params).prepare.model_copy(
        update={
            "sources": [str(ROOT / s) for s in params["prepare"]["sources"]],
            "out_dir": str(out),
            "metrics": str(out / "prepare.json"),
            "max_examples": {"train": 64, "validation": 32, "test": 32},
        }
    )
    run(cfg, task, base_model_dir)
    return out


@pytest.fixture(scope="session")
def shared_vllm(tmp_path_factory, base_model_dir):
    """One vLLM (its CPU build, float32) for the tests that attach to a running engine: the
    router over vLLM, the evaluation on vLLM and the engines bench. A start costs ~40 s of both
    cores here, so they share one. It is started as `evaluate.engine: vllm` starts one
    (`VllmGenerator`) and stopped by it at the end of the session; tests reach it by its URL
    and key. The tests of a vLLM that the gateway itself starts, supervises, restarts after
    kill -9 and stops on SIGTERM (tests/test_serve.py) start their own."""
    from test_serve import VLLM_PYTHON, engine_args

    from temper.engines import VllmConfig
    from temper.engines.vllm_generate import VllmGenerator

    engine_args("vllm")  # skips (or fails in CI) when vLLM's environment is missing
    cfg = VllmConfig(python=str(VLLM_PYTHON), dtype="float32", kv_cache_gib=2, max_lora_rank=16)
    log = tmp_path_factory.mktemp("shared-vllm") / "vllm.log"
    generator = VllmGenerator(cfg, base_model_dir, log, rows=16)
    generator.start()
    server = generator.server
    proc = server.proc
    yield server
    generator.close()
    assert generator.server is None and proc.poll() is not None, "vLLM outlived close()"
