"""`temper monitor review export | import`: human labels on logged answers, and what they say
about the judge.

Export picks a random share of the logged answers (hash-sampled, so a re-export picks the same
ones) plus every answer the model was unsure of and every answer the judge disputed, not yet
reviewed, into a CSV a reviewer fills in and a Label Studio import file (tasks JSON and its
labelling config). Import reads either back (the CSV, or Label Studio's JSON export), checks
every row before storing any (a bad row is an error naming the file, line and field), and
stores the verdicts. `agreement` compares judge and human on the rows both labelled (raw
agreement, Cohen's kappa) and calibrates the judge on the random share only: the unsure and
disputed rows are not a sample of the traffic, so they would bias its error rates.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import TemperError
from ...io import atomic_open, write_json
from .config import MonitorConfig
from .judge import wilson
from .store import MonitorStore, sampled

CSV_FIELDS = (
    "request_id",
    "reason",
    "time",
    "version",
    "tier",
    "confidence",
    "judge_verdict",
    "input_text",
    "answer",
    "verdict",  # the reviewer: correct | incorrect (blank: not reviewed yet)
    "corrected_answer",  # optional: the right answer as JSON
    "reviewer",
    "notes",
)
HUMAN_VERDICTS = ("correct", "incorrect")
LABEL_CONFIG = """<View>
  <Header value="Is the answer right for this clause?"/>
  <Text name="input" value="$input_text"/>
  <Header value="Answer"/>
  <Text name="answer" value="$answer"/>
  <Choices name="verdict" toName="input" choice="single" required="true">
    <Choice value="correct"/>
    <Choice value="incorrect"/>
  </Choices>
  <TextArea name="corrected_answer" toName="input" placeholder="The right answer (JSON)"/>
</View>
"""


class ReviewError(TemperError, ValueError):
    """A review file that cannot be read: names the file, line and field."""


@dataclass(frozen=True)
class Exported:
    csv: Path
    label_studio: Path
    label_config: Path
    rows: int
    by_reason: dict[str, int]


def export_reviews(cfg: MonitorConfig, store: MonitorStore, out_dir: str | Path) -> Exported:
    """Write the rows to review; rows without a kept input cannot be reviewed and are skipped."""
    rcfg = cfg.review
    verdicts, reviewed = store.verdicts(), store.reviews()
    rows, reasons = [], {}
    for r in store.requests():
        if r.id in reviewed or r.status != 200 or not r.answer or not r.input_text:
            continue
        judge = verdicts[r.id]["verdict"] if r.id in verdicts else None
        if sampled(r.id, rcfg.salt, rcfg.share):
            reason = "sample"
        elif r.confidence is not None and r.confidence < rcfg.low_confidence:
            reason = "low_confidence"
        elif judge in ("incorrect", "unsure"):
            reason = "judge_disputed"
        else:
            continue
        reasons[reason] = reasons.get(reason, 0) + 1
        rows.append(
            {
                "request_id": r.id,
                "reason": reason,
                "time": r.ts,
                "version": r.version or "",
                "tier": r.tier or "",
                "confidence": "" if r.confidence is None else round(r.confidence, 4),
                "judge_verdict": judge or "",
                "input_text": r.input_text,
                "answer": r.answer,
                "verdict": "",
                "corrected_answer": "",
                "reviewer": "",
                "notes": "",
            }
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / "review.csv", out / "label_studio_tasks.json", out / "label_config.xml")
    with atomic_open(paths[0]) as handle:
        writer = csv.DictWriter(handle, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    write_json(
        paths[1],
        [
            {
                "data": {k: row[k] for k in ("request_id", "input_text", "answer")},
                "meta": {k: row[k] for k in ("reason", "judge_verdict", "version", "tier")},
            }
            for row in rows
        ],
    )
    with atomic_open(paths[2]) as handle:
        handle.write(LABEL_CONFIG)
    return Exported(*paths, len(rows), reasons)


def _check_row(where: str, rid: Any, verdict: Any, corrected: Any, known: set[str]) -> None:
    if not rid:
        raise ReviewError(f"{where}: field 'request_id': missing")
    if rid not in known:
        raise ReviewError(f"{where}: field 'request_id': {rid!r} is not in the request log")
    if verdict not in HUMAN_VERDICTS:
        raise ReviewError(
            f"{where}: field 'verdict': {verdict!r}, expected one of {HUMAN_VERDICTS}"
        )
    if corrected:
        try:
            json.loads(corrected)
        except json.JSONDecodeError as err:
            raise ReviewError(f"{where}: field 'corrected_answer': not JSON ({err.msg})") from None


def read_reviews(
    path: str | Path, known: set[str]
) -> list[tuple[str, str, str | None, str | None]]:
    """(request id, verdict, corrected answer, reviewer) of every reviewed row of a CSV or a
    Label Studio JSON export; blank verdicts in a CSV are rows not reviewed yet (skipped)."""
    p = Path(path)
    out = []
    if p.suffix.lower() == ".csv":
        csv.field_size_limit(1 << 24)  # clauses can be long
        with p.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"request_id", "verdict"} - set(reader.fieldnames or ())
            if missing:
                raise ReviewError(f"{p}:1: missing column(s) {sorted(missing)}")
            for row in reader:
                where = f"{p}:{reader.line_num}"
                verdict = (row.get("verdict") or "").strip().lower()
                if not verdict:
                    continue
                rid = (row.get("request_id") or "").strip()
                corrected = (row.get("corrected_answer") or "").strip() or None
                _check_row(where, rid, verdict, corrected, known)
                out.append((rid, verdict, corrected, (row.get("reviewer") or "").strip() or None))
        return out
    try:
        tasks = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ReviewError(f"{p}:{err.lineno}: not JSON ({err.msg})") from None
    if not isinstance(tasks, list):
        raise ReviewError(f"{p}: expected Label Studio's JSON export (a list of tasks)")
    for i, task in enumerate(tasks):
        where = f"{p}: task {i}"
        rid = (task.get("data") or {}).get("request_id")
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not annotations:
            continue
        last = annotations[-1]
        verdict, corrected = None, None
        for result in last.get("result") or []:
            value = result.get("value") or {}
            if result.get("from_name") == "verdict" and value.get("choices"):
                verdict = str(value["choices"][0]).lower()
            if result.get("from_name") == "corrected_answer" and value.get("text"):
                corrected = str(value["text"][0]).strip() or None
        who = last.get("completed_by")
        _check_row(where, rid, verdict, corrected, known)
        out.append((rid, verdict, corrected, None if who is None else str(who)))
    return out


def import_reviews(store: MonitorStore, path: str | Path) -> int:
    """Store the reviewed rows of a file (all of them, or none on an error)."""
    known = {r[0] for r in store.db.execute("SELECT id FROM requests")}
    rows = read_reviews(path, known)
    return store.add_reviews([(rid, v, c, who, str(path)) for rid, v, c, who in rows])


def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's kappa of two raters (None: fewer than 2 rows, or chance agreement is total)."""
    if len(a) < 2:
        return None
    from sklearn.metrics import cohen_kappa_score

    if len(set(a) | set(b)) < 2:
        return None
    return float(cohen_kappa_score(a, b))


@dataclass(frozen=True)
class Agreement:
    """Judge vs human on rows both labelled, and the judge's error rates on the random share."""

    n: int
    agreement: float | None
    kappa: float | None
    n_sample: int
    true_pass: float | None  # P(judge says correct | human says correct), random share
    false_pass: float | None  # P(judge says correct | human says incorrect), random share

    def calibrated(self, judged_correct: int, judged: int) -> tuple[float, float, float] | None:
        """The accuracy a judged pass rate implies once the judge's errors are taken out
        (Rogan-Gladen), with the pass rate's Wilson bounds mapped the same way; None when
        the judge cannot tell right from wrong on the reviews (true_pass <= false_pass)."""
        if self.true_pass is None or self.false_pass is None or judged == 0:
            return None
        gap = self.true_pass - self.false_pass
        if gap <= 0:
            return None
        low, high = wilson(judged_correct, judged)

        def fix(q: float) -> float:
            return min(1.0, max(0.0, (q - self.false_pass) / gap))

        return fix(judged_correct / judged), fix(low), fix(high)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def agreement(cfg: MonitorConfig, store: MonitorStore) -> Agreement:
    verdicts, reviews = store.verdicts(), store.reviews()
    both = [
        (verdicts[rid]["verdict"], reviews[rid]["verdict"])
        for rid in sorted(set(verdicts) & set(reviews))
        if verdicts[rid]["verdict"] != "unsure"
    ]
    judge = [j for j, _ in both]
    human = [h for _, h in both]
    agree = sum(j == h for j, h in both) / len(both) if both else None
    sample = [
        (verdicts[rid]["verdict"], reviews[rid]["verdict"])
        for rid in sorted(set(verdicts) & set(reviews))
        if verdicts[rid]["verdict"] != "unsure" and sampled(rid, cfg.review.salt, cfg.review.share)
    ]
    right = [j for j, h in sample if h == "correct"]
    wrong = [j for j, h in sample if h == "incorrect"]
    return Agreement(
        n=len(both),
        agreement=agree,
        kappa=cohen_kappa(judge, human),
        n_sample=len(sample),
        true_pass=sum(j == "correct" for j in right) / len(right) if right else None,
        false_pass=sum(j == "correct" for j in wrong) / len(wrong) if wrong else None,
    )
