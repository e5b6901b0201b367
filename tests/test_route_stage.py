"""The route stage: the threshold fit (Clopper-Pearson, by hand), the replay through the
serving policy, the prices, and the files it writes; on the fixtures' small eval.json."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from registry_fixtures import ROOT, make_project, pattern, write_eval
from typer.testing import CliRunner

from temper.cli import app
from temper.online.route import RouteConfig
from temper.params import TemperParams
from temper.stages.route import fit_threshold, lower_bound
from temper.stages.route import run as route
from temper.task import load_task

runner = CliRunner()
TASK = load_task(ROOT / "configs" / "tasks" / "clause_review.yaml")


def test_clopper_pearson_lower_bound_by_hand():
    # k = n: the one-sided bound solves p^n = 1 - confidence, so p = 0.05 ** (1 / n).
    assert lower_bound(20, 20, 0.95) == pytest.approx(0.05 ** (1 / 20))
    # k = 1, n = 1 the same way; k = 0: nothing to bound.
    assert lower_bound(1, 1, 0.95) == pytest.approx(0.05)
    assert lower_bound(0, 10, 0.95) == 0.0
    assert 0.5 < lower_bound(90, 100, 0.95) < 0.9  # below the point estimate


def test_fit_takes_the_lowest_threshold_that_is_provably_accurate():
    cfg = RouteConfig.model_validate({"calibrate": {"target_accuracy": 0.8}})
    # 30 sure answers (all right) and 30 unsure ones (every other one right).
    conf = np.array([0.99] * 30 + [0.4] * 30)
    right = np.array([1.0] * 30 + [1.0, 0.0] * 15)
    threshold, reached = fit_threshold(conf, right, cfg)
    # Keeping all 60 (45 right): bound < 0.8; keeping the 30 sure ones: 0.05**(1/30) = 0.905.
    assert (threshold, reached) == (0.99, True)
    cfg = RouteConfig.model_validate({"calibrate": {"target_accuracy": 0.99}})
    assert fit_threshold(conf, right, cfg) == (1.0, False)
    cfg = RouteConfig.model_validate(
        {"calibrate": {"target": "self_share", "target_self_share": 0.5}}
    )
    assert fit_threshold(conf, right, cfg)[0] == 0.99


def sure_when_right(project) -> list[dict]:
    """The fixtures' eval of 40 test answers (30 right) with confidences: right answers sure
    (0.95), wrong ones unsure (0.3). Returns the prediction rows."""
    write_eval(project, {"r16": pattern(40, 30)}, winner="r16")
    path = project / "reports" / "predictions" / "r16.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        row["confidence"] = {"clause_type": 0.95 if row["correct"] else 0.3}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.mark.slow  # make_project links the real base model
def test_stage_replays_test_through_the_policy_and_prices_it(tmp_path, base_model_dir):
    make_project(tmp_path, base_model_dir)
    with contextlib.chdir(tmp_path):
        (tmp_path / "configs" / "prices.yaml").write_text(
            (ROOT / "configs" / "prices.yaml").read_text()
        )
        rows = sure_when_right(tmp_path)
        pred = tmp_path / "reports" / "predictions"
        (pred / "validation").mkdir()
        (pred / "validation" / "r16.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = RouteConfig.model_validate(
            {
                "tiers": [
                    {
                        "name": "mid",
                        "provider": {"kind": "gold"},
                        "price_as": "gpt-4.1-mini",
                        "min_confidence": 0.5,
                    },
                    {"name": "frontier", "provider": {"kind": "gold"}, "price_as": "gpt-4.1"},
                ],
                "calibrate": {"target_accuracy": 0.85, "n_resamples": 200},
            }
        )
        result = route(cfg, TASK)
        assert result.threshold == 0.95 and result.fitted_on == "validation" and result.oracle
        assert result.shares == {"self": 0.75, "mid": 0.0, "frontier": 0.25}
        assert result.accuracy.value == 1.0  # the oracle fixes every deferred answer
        assert result.self_only_accuracy.value == 0.75 and result.kept_accuracy.value == 1.0
        # Cost by hand: 30 self answers at the measured $0.02 per 1k; the 10 deferred ones
        # (clauses 30-39) at gpt-4.1's $2 / $8 per 1M input / output tokens, chars/4 tokens,
        # the label-list prefix (under 1,024 tokens: too short for OpenAI to cache) in full.
        prefix = len(TASK.system_message(with_labels=True)) / 4
        answer = len(json.dumps({"clause_type": "Governing Law", "key_term": None})) / 4
        assert prefix < 1024 and TASK.format_answer(rows[0]["gold"]) == json.dumps(rows[0]["gold"])
        deferred = [
            (prefix + len(f"Clause:\nClause {i} is governed by the laws of New York.") / 4)
            * 2
            / 1e6
            + answer * 8 / 1e6
            for i in range(30, 40)
        ]
        assert result.usd_per_1k.value == pytest.approx(
            (30 * 0.02 / 1000 + sum(deferred)) / 40 * 1000
        )
        assert result.all_api_usd_per_1k["frontier"] > result.all_api_usd_per_1k["mid"] > 0.02
        saved = json.loads((tmp_path / "reports" / "route.json").read_text())
        assert saved["threshold"] == 0.95
        report = (tmp_path / "reports" / "route.md").read_text()
        assert "oracle" in report and "0.9500" in report
        assert (tmp_path / "reports" / "route_curve.png").stat().st_size > 1000
        out = runner.invoke(app, ["route", "-S", "route.calibrate.target=self_share"])
        assert out.exit_code == 0, out.output
        assert "route: threshold" in out.output


@pytest.mark.slow
@pytest.mark.parametrize("failing", [False, True])
def test_a_real_tier_is_asked_what_the_policy_sends_it(tmp_path, base_model_dir, failing):
    from fake_api import FakeAPI, Faults

    make_project(tmp_path, base_model_dir)
    answer = json.dumps({"clause_type": "Governing Law", "key_term": "New York"})
    faults = Faults(rate_500=1.0) if failing else Faults()
    with contextlib.chdir(tmp_path), FakeAPI(lambda m: answer, faults=faults) as api:
        sure_when_right(tmp_path)
        provider = {
            "kind": "openai",
            "model": "api-model",
            "base_url": api.openai_url,
            "prices": {"api-model": {"input": 1.0, "output": 2.0}},
            "max_retries": 0,
        }
        cfg = RouteConfig.model_validate(
            {
                "tiers": [{"name": "frontier", "provider": provider}],
                "calibrate": {"target_accuracy": 0.85, "n_resamples": 200,
                              "prices": str(ROOT / "configs" / "prices.yaml")},
            }
        )  # fmt: skip
        result = route(cfg, TASK)
    # Fitted on test (no validation file): the 10 unsure answers go to the API, one request
    # each (the fixture's gold clause type is Governing Law, as the fake API answers).
    assert result.fitted_on == "test" and not result.oracle
    assert result.shares == {"self": 0.75, "frontier": 0.25}
    if failing:
        assert result.api_failures == {"frontier": 10} and result.accuracy.value == 0.75
        assert result.usd_per_1k.value == pytest.approx(0.75 * 0.02)
    else:
        assert api.requests == 10 and result.api_failures == {"frontier": 0}
        assert result.accuracy.value == 1.0
        billed = (api.billed_input_tokens * 1.0 + api.billed_output_tokens * 2.0) / 1e6
        assert result.usd_per_1k.value == pytest.approx((30 * 0.02 / 1000 + billed) / 40 * 1000)


@pytest.mark.slow
def test_missing_inputs_are_named(tmp_path, base_model_dir):
    make_project(tmp_path, base_model_dir)
    with contextlib.chdir(tmp_path):
        out = runner.invoke(app, ["route"])
        assert out.exit_code != 0 and "metrics/eval.json" in out.output


def test_shipped_params_load():
    import yaml

    values = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = TemperParams.of(values).route
    assert [t.provider.kind for t in cfg.tiers] == ["gold", "gold"]  # offline: the oracle
