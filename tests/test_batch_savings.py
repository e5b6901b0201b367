"""scripts/batch_savings.py: the batch-mode cost table in docs/distil.md is what it prints."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def savings():
    spec = importlib.util.spec_from_file_location(
        "batch_savings", ROOT / "scripts/batch_savings.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_table_is_the_scripts_output(savings):
    """Recomputed from the per-request figure the docs quote and configs/prices.yaml."""
    from temper.providers.prices import load_prices
    from temper.task import load_task

    docs = (ROOT / "docs" / "distil.md").read_text()
    section = docs[docs.index("## Batch mode") :]
    tokens = int(re.search(r"\((\d+) input tokens per request", section).group(1))
    documented = "\n".join(
        line for line in section.split("**What happens.**")[0].splitlines() if line.startswith("|")
    )
    task = load_task(ROOT / "configs/tasks/clause_review.yaml")
    assert f"{task.max_new_tokens} output tokens" in section
    rows = savings.savings_rows(
        load_prices(ROOT / "configs/prices.yaml").models, tokens, task.max_new_tokens, 100_000
    )
    assert documented == savings.markdown(rows, 100_000)


def test_rows_halve_and_skip_models_without_batch_price(savings):
    from temper.providers.base import Price

    prices = {
        "a": Price(input=2.0, output=8.0, batch_input=1.0, batch_output=4.0),
        "local": Price(input=0, output=0),
    }
    (row,) = savings.savings_rows(prices, 1000, 50, 10_000)
    assert row["model"] == "a"
    assert row["sync"] == pytest.approx(10_000 * (1000 * 2.0 + 50 * 8.0) / 1e6)
    assert row["batch"] == pytest.approx(row["sync"] / 2)


def test_main_prints_result_line_and_refuses_without_prepared_data(savings, tmp_path, capsys):
    assert savings.main(["--prepared", str(tmp_path)]) == 1
    assert "dvc repro prepare" in capsys.readouterr().err
    assert savings.main(["--input-tokens", "919", "--clauses", "2000"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "RESULT batch_saved_share 0.500"
    assert any(line.startswith("| `gpt-4o-mini` |") for line in out)
