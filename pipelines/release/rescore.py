"""Re-scoring the champion on the challenger's evaluation set, for `temper promote`.

When challenger and champion were evaluated on different sets (a new test split, another
sample), their recorded per-example scores cannot be paired. Instead of refusing forever, the
champion's adapter is downloaded through the registry (`temper pull`'s checks: adapter hash,
base model hash), its answers are generated on the challenger's evaluation set with the
evaluation's own generation and scoring code, and the paired comparison runs on those equal
examples. The challenger's set is its recorded `test_file`, which must be present and match
the recorded sha256 (after `dvc pull`, say): a changed file would compare other examples.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from ..evaluation.config import EvaluateConfig
from ..evaluation.field_scores import paired_metric
from ..io import read_jsonl, sha256_file
from ..results import EvalResult
from ..task import TaskConfig
from .promote import PromoteError

log = logging.getLogger(__name__)


def evaluation_records(evaluation: EvalResult, ids: list[str]) -> list[dict[str, Any]]:
    """The records of the challenger's evaluation set: its test file, checked by hash, limited
    to the ids its scores hold (the evaluation may have scored a sample)."""
    path = Path(evaluation.test_file)
    if not path.exists():
        raise PromoteError(
            f"{path}: the challenger's evaluation set is not here (run `dvc pull` or the "
            "pipeline first); cannot re-score the champion on it"
        )
    if sha256_file(path) != evaluation.test_sha256:
        raise PromoteError(
            f"{path}: differs from the challenger's evaluation set (sha256 "
            f"{evaluation.test_sha256[:12]} recorded); cannot re-score the champion on it"
        )
    by_id = {}
    for lineno, row in enumerate(read_jsonl(path), 1):
        for key in ("id", "prompt", "gold"):
            if key not in row:
                raise PromoteError(f"{path}:{lineno}: missing field '{key}'")
        by_id[str(row["id"])] = row
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise PromoteError(f"{path}: no record for scored id(s) {missing[:5]}")
    return [by_id[i] for i in ids]


def champion_scores(
    name: str,
    champion_version: str,
    evaluation: EvalResult,
    ids: list[str],
    task: TaskConfig,
    model_dir: str | Path,
    eval_cfg: EvaluateConfig,
) -> dict[str, float]:
    """The champion's per-example scores of the primary metric (`paired_metric`) on `ids` of the
    challenger's evaluation set, generated now (greedy, as the evaluate stage does)."""
    from ..evaluation.predict import model_predictions
    from ..evaluation.scoring import attach_scores, per_example, references_for
    from ..tracking.pull import PullError, pull_adapter

    records = evaluation_records(evaluation, ids)
    primary = paired_metric(evaluation.primary_metric)  # what the version's scores hold
    with tempfile.TemporaryDirectory(prefix="temper-rescore-") as tmp:
        try:
            adapter = pull_adapter(f"models:/{name}/{champion_version}", Path(tmp) / "champion")
        except PullError as err:
            raise PromoteError(f"re-scoring: {err}") from None
        log.info(
            "promote: re-scoring champion v%s on the challenger's %d examples",
            champion_version,
            len(records),
        )
        preds, _ = model_predictions(
            records,
            [r["prompt"] for r in records],
            model_dir,
            adapter,
            task,
            eval_cfg,
            f"champion v{champion_version}",
        )
    ex = per_example(task, records, preds, references_for(task, records, None))
    rows = attach_scores(preds, records, ex)
    scores = {str(r["id"]): r["scores"][primary] for r in rows if primary in r["scores"]}
    if sorted(scores) != sorted(ids):
        raise PromoteError(
            f"re-scoring: {primary} does not apply to the same examples as the challenger's"
        )
    return scores
