"""Every third-party package `pipelines/` imports is declared in pyproject.toml.

Found by reading every import statement (top level and inside functions: heavy libraries are
imported where used), mapping each module to the distribution that installs it
(`importlib.metadata.packages_distributions`), and checking that distribution is a runtime
dependency. A package that only arrives as a dependency of a dependency can disappear when
that one changes: declared, pip keeps it.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(folder: Path) -> dict[str, str]:
    """Top-level module -> the first file importing it (relative imports left out)."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {normalise(re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0]) for d in project["dependencies"]}


def undeclared(modules: dict[str, str], deps: set[str]) -> list[str]:
    """'module (file): distribution' for each third-party import no dependency covers."""
    owners = md.packages_distributions()
    out = []
    for module, where in sorted(modules.items()):
        if module in sys.stdlib_module_names or module == "temper":
            continue
        dists = {normalise(d) for d in owners.get(module, [module])}
        if not dists & deps:
            out.append(f"{module} ({where}): {', '.join(sorted(dists))}")
    return out


def test_every_third_party_import_of_the_package_is_declared():
    problems = undeclared(imported_modules(ROOT / "pipelines"), declared())
    assert not problems, "declare in pyproject.toml [project] dependencies:\n" + "\n".join(problems)


def test_the_check_finds_an_undeclared_import():
    modules = {"scipy": "pipelines/x.py", "json": "pipelines/y.py", "temper": "pipelines/z.py"}
    assert undeclared(modules, {"numpy"}) == ["scipy (pipelines/x.py): scipy"]
    assert undeclared(modules, {"scipy"}) == []
