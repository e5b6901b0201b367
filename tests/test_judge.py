"""The pairwise judge against the loopback fake API (real HTTP, real OpenAI/Anthropic SDKs).

The fake server's verdicts are scripted: a judge biased to the first slot must be caught
(every verdict flips with the order, so all become ties, and it fails calibration); a judge
that follows gold must pass calibration and give the expected win rate.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from fake_api import FakeAPI

from temper.evaluation.gates import GatesConfig, check
from temper.evaluation.judge import JudgeConfig, combine, parse_verdict, run_judge, sample_indices
from temper.providers import ProviderConfig
from temper.results import CandidateEval

LABELS = ["Governing Law", "Audit Rights", "Insurance", "Non-Compete"]
N = 40


def scenario():
    """40 records; the candidate is right on 28, the baseline on 12 (8 of them shared)."""
    records, cand, base = [], [], []
    for i in range(N):
        gold = LABELS[i % 4]
        wrong = LABELS[(i + 1) % 4]
        records.append(
            {
                "id": f"r{i}",
                "text": f"Clause number {i} about {gold}.",
                "gold": {"clause_type": gold, "key_term": None},
            }
        )
        c_ok, b_ok = i < 28, (i < 8 or i >= 36)
        cand.append(
            {"output": json.dumps({"clause_type": gold if c_ok else wrong, "key_term": None})}
        )
        base.append(
            {
                "output": json.dumps(
                    {"clause_type": gold if b_ok else LABELS[(i + 2) % 4], "key_term": "x"}
                )
            }
        )
    c_correct = np.array([i < 28 for i in range(N)], float)
    b_correct = np.array([(i < 8 or i >= 36) for i in range(N)], float)
    return records, cand, base, c_correct, b_correct


def always_first(messages):
    return '{"winner": "A"}'


def gold_follower(messages):
    user = messages[-1]["content"]
    gold = re.search(r"Clause number \d+ about ([^.]+)\.", user).group(1)
    a = re.search(r"Answer A:\n(.*)\n\nAnswer B:", user, re.S).group(1)
    b = re.search(r"Answer B:\n(.*)$", user, re.S).group(1)
    a_ok = json.loads(a)["clause_type"] == gold
    b_ok = json.loads(b)["clause_type"] == gold
    return json.dumps({"winner": "A" if a_ok and not b_ok else "B" if b_ok and not a_ok else "tie"})


def judge_cfg(tmp_path, api, kind="openai", **kw):
    url = api.openai_url if kind == "openai" else api.anthropic_url
    provider = ProviderConfig(
        kind=kind,
        model="judge-x",
        base_url=url,
        max_tokens=16,
        cache=str(tmp_path / "judge-cache.sqlite"),
        backoff_s=0.01,
        timeout_s=5.0,
        prices={"judge-x": {"input": 1.0, "output": 2.0}},
    )
    return JudgeConfig(enabled=True, provider=provider, sample_frac=1.0, min_decided=5, **kw)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_first_position_judge_is_detected_and_turned_into_ties(tmp_path, task, kind):
    records, cand, base, cc, bc = scenario()
    with FakeAPI(responder=always_first) as api:
        cfg = judge_cfg(tmp_path, api, kind)
        result = run_judge(
            cfg, task, records, {"c": cand}, base, {"c": cc}, bc, n_resamples=500, progress=False
        )["c"]
        assert api.requests == 2 * N  # both orders for every example
    assert result["flip_rate"] == 1.0
    assert result["first_position_rate"] == 1.0
    assert result["tie"]["value"] == 1.0 and result["win"]["value"] == 0.0
    assert result["win_rate"]["value"] == 0.5
    assert result["agreement"] == 0.0 and result["n_decided"] == 24
    assert result["calibrated"] is False
    # An uncalibrated judge decides no gate, even with a strict win-rate threshold.
    entry = candidate({"clause_type.accuracy": {"value": 0.7}}, result)
    gates = check(
        GatesConfig(
            min_primary=None, min_delta_low=None, min_json_valid_rate=None, min_judge_win_rate=0.99
        ),
        "clause_type.accuracy",
        entry,
    )
    assert gates.passed and gates.checks[0].skipped


def candidate(metrics: dict, judge: dict) -> CandidateEval:
    """A candidate's evaluation with this judge result, as evaluate records it."""
    return CandidateEval.model_validate(
        {"adapter": "a", "seconds": 1.0, "metrics": metrics, "judge": judge}
    )


def test_gold_following_judge_is_calibrated_and_counts(tmp_path, task):
    records, cand, base, cc, bc = scenario()
    with FakeAPI(responder=gold_follower) as api:
        cfg = judge_cfg(tmp_path, api)
        result = run_judge(
            cfg, task, records, {"c": cand}, base, {"c": cc}, bc, n_resamples=500, progress=False
        )["c"]
        sent = api.requests
        # A re-run answers from the provider's cache: nothing sent, the same verdicts.
        again = run_judge(
            cfg, task, records, {"c": cand}, base, {"c": cc}, bc, n_resamples=500, progress=False
        )["c"]
        assert api.requests == sent
    assert again == {**result, "usd_new": 0.0}
    assert result["flip_rate"] == 0.0
    assert result["agreement"] == 1.0 and result["calibrated"] is True
    # 20 wins (cand right, base wrong), 4 losses, 16 ties (both right or both wrong).
    assert result["win"]["value"] == pytest.approx(20 / N)
    assert result["loss"]["value"] == pytest.approx(4 / N)
    assert result["win_rate"]["value"] == pytest.approx((20 + 0.5 * 16) / N)
    low, high = result["win_rate"]["ci_low"], result["win_rate"]["ci_high"]
    assert low < result["win_rate"]["value"] < high
    assert result["usd_new"] > 0
    strict = check(
        GatesConfig(
            min_primary=None, min_delta_low=None, min_json_valid_rate=None, min_judge_win_rate=0.9
        ),
        "x",
        candidate({}, result),
    )
    assert not strict.passed and strict.checks[0].value == result["win_rate"]["value"]


def test_judge_failures_are_counted_not_fatal(tmp_path, task):
    records, cand, base, cc, bc = scenario()
    with FakeAPI(responder=lambda m: "I cannot decide.") as api:
        result = run_judge(
            judge_cfg(tmp_path, api),
            task,
            records[:6],
            {"c": cand[:6]},
            base[:6],
            {"c": cc[:6]},
            bc[:6],
            n_resamples=200,
            progress=False,
        )["c"]
    assert result["errors"] == 12 and result["n_judged"] == 0
    assert result["calibrated"] is False


def test_verdict_parsing_combining_and_sampling():
    assert parse_verdict('```json\n{"winner": "B"}\n```') == "B"
    assert parse_verdict("tie") == "tie" and parse_verdict("a") == "A"
    assert parse_verdict('{"winner": "both"}') is None
    assert combine("A", "B") == 1  # candidate preferred in both orders
    assert combine("B", "A") == -1
    assert combine("A", "A") == 0  # follows the position: a tie
    assert combine("tie", "B") == 0
    cfg = JudgeConfig(sample_frac=0.25, max_examples=None, seed=3)
    picked = sample_indices(100, cfg)
    assert len(picked) == 25 and picked == sample_indices(100, cfg)
    assert len(sample_indices(1000, JudgeConfig(sample_frac=0.5, max_examples=40))) == 40


def test_judge_prompt_comes_from_the_task_config(task):
    from temper.evaluation.judge import judge_messages, system_prompt

    # The CUAD task keeps its contract-specific prompt through `judge_prompt`.
    assert system_prompt(task) == task.judge_prompt and "clause type" in task.judge_prompt
    generic = task.model_copy(update={"judge_prompt": None, "description": "Rate invoices."})
    prompt = system_prompt(generic)
    assert prompt.startswith("You are an impartial expert judge of answers to this task: Rate")
    assert "- key_term (text, may be null): The normalised key term" in prompt
    assert '{"winner": "A"}' in prompt
    assert judge_messages(generic, "x", "a", "b")[0]["content"] == prompt
