"""The house rules, checked on the code itself: what may import what, and honest DVC deps.

- A stage (`temper.stages.*`) never imports another stage: stages meet through files.
- The online wing never imports a stage; the shared floor and the ground floor never import
  a stage, the release wing, the online wing or the CLI.
- Every stage's DVC deps cover every module its entry module imports (directly, lazily inside
  a function, or through the modules it imports), so changing any of them re-runs the stage.
- Each train@<candidate> stage depends on the shared train fields and its own overrides only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from temper.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipelines"  # imported as `temper`
STAGES = (
    "base_model",
    "prepare",
    "distil",
    "train",
    "evaluate",
    "route",
    "cache_eval",
    "cost",
    "register",
)
SHARED = (
    "providers",
    "tracking",
    "evaluation",
    "training",
    "teacher",
    "labels",
    "engines",
    "bundle",
    "reports",
)
GROUND = (
    "config",
    "io",
    "task",
    "results",
    "records",
    "chat",
    "model_source",
    "models",
    "errors",
    "stats",
)


def module_name(path: Path) -> str:
    parts = ["temper", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# Every module of the package.
MODULES = {
    module_name(p): p
    for p in PACKAGE.rglob("*.py")
    if p.parent == PACKAGE or (p.parent / "__init__.py").exists()
}


def imports(name: str) -> set[str]:
    """The package's modules that `name` imports anywhere in its body (lazy imports too)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            # `import temper.a.b` also runs temper/__init__ and temper/a/__init__.
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(MODULES)
    return found - {name}


def closure(name: str) -> set[str]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += imports(current)
    return seen


def files_of(modules: set[str]) -> set[str]:
    """Module files, plus the metric scripts a metrics package loads by path."""
    files = {MODULES[m].relative_to(ROOT).as_posix() for m in modules}
    for m in modules:
        if MODULES[m].name == "__init__.py":
            for script in MODULES[m].parent.glob("*/*.py"):
                if not (script.parent / "__init__.py").exists():
                    files.add(script.relative_to(ROOT).as_posix())
    return files


def wing(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "temper"


def test_the_import_graph_sees_lazy_imports():
    # evaluate imports the judge inside a function, only when the judge is enabled.
    assert "temper.evaluation.judge" in imports("temper.stages.evaluate")
    assert "temper.providers.clients" in closure("temper.stages.evaluate")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_who_may_import_whom(name):
    wings = {wing(m) for m in imports(name)}
    here = wing(name)
    if here == "stages":
        others = {m for m in imports(name) if wing(m) == "stages" and m != "temper.stages"}
        assert not others, f"{name} imports another stage: {sorted(others)}"
    if here in SHARED + GROUND + ("online",):
        banned = {"stages", "release", "cli"} | ({"online"} if here != "online" else set())
        forbidden = wings & banned
        assert not forbidden, f"{name} ({here}) imports {sorted(forbidden)}"
    if here in GROUND:
        assert not wings & set(SHARED), f"ground module {name} imports the shared floor"


def test_no_module_past_the_size_where_it_holds_two_jobs():
    # The aim is ~400 lines a module (one job each); past 500 (ruff-formatted) it must split.
    long = {
        name: n
        for name, path in MODULES.items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > 500
    }
    assert not long, f"split these by job: {long}"


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def dep_paths(stage: dict) -> list[str]:
    body = stage.get("do", stage)
    return [next(iter(d)) if isinstance(d, dict) else str(d) for d in body.get("deps", [])]


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_deps_cover_every_module_the_stage_imports(stage):
    deps = dep_paths(dvc_stages()[stage])
    needed = files_of(closure(f"temper.stages.{stage}"))
    missing = sorted(
        f for f in needed if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)
    )
    assert not missing, f"dvc.yaml stage {stage}: add to deps {missing}"


def test_each_candidate_depends_on_the_shared_fields_and_its_own_overrides_only():
    params = dvc_stages()["train"]["do"]["params"]
    shared = {f"train.{f}" for f in TrainConfig.model_fields if f != "candidates"}
    # mlflow.sweep: a sweep's arm always trains under its sweep's run (docs/train.md).
    assert set(params) == shared | {"train.candidates.${key}", "model.dir", "mlflow.sweep"}
    assert "train" not in params and "train.candidates" not in params


def test_every_package_folder_is_installed():
    """pyproject.toml lists the packages by hand (the folder `pipelines/` installs as
    `temper`): a new subpackage missing there would be absent from a non-editable install."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    folders = {
        module_name(p / "__init__.py") for p in PACKAGE.rglob("*") if (p / "__init__.py").exists()
    } | {"temper"}
    assert listed == folders


MAX_FUNCTION_LINES = 80  # the aim is ~50: named steps that read at once
MAX_ENTRY_PARAMETERS = 3  # run(cfg, <what it reads beside its section>[, one more])


def functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def long_functions(paths: list[Path]) -> dict[str, int]:
    """`file:line name` -> length, for every function longer than the limit."""
    return {
        f"{path.name}:{node.lineno} {node.name}": node.end_lineno - node.lineno + 1
        for path in paths
        for node in functions(path)
        if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    }


def entry_width(path: Path) -> int | None:
    """How many parameters the module's top-level `run` takes (None: it has none)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    entry = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run"]
    if not entry:
        return None
    a = entry[0].args
    return len(a.posonlyargs + a.args + a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)


def test_no_function_is_longer_than_a_screen():
    long = long_functions(list(MODULES.values()))
    assert not long, f"split these into named steps (max {MAX_FUNCTION_LINES} lines): {long}"


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_has_one_narrow_entry_function_run(stage):
    width = entry_width(MODULES[f"temper.stages.{stage}"])
    assert width is not None, f"stages/{stage}.py: the entry function is `run`"
    assert width <= MAX_ENTRY_PARAMETERS, f"{stage}.run takes {width} parameters"


def test_the_limits_catch_what_they_are_for(tmp_path):
    """The checks above see a long function and a wide entry (a check that cannot fail
    proves nothing)."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    path = tmp_path / "stage.py"
    path.write_text(f"def run(cfg, task, base_dir, tracking=None):\n{body}\n", encoding="utf-8")
    assert long_functions([path]) == {"stage.py:1 run": MAX_FUNCTION_LINES + 1}
    assert entry_width(path) == 4
