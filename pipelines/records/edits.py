"""Hard negatives for the cache evaluation: real clauses with one fact edited by regex.

Each edit changes the fact the key term names, and the gold key term with it, while the rest
of the clause stays word for word: a governing-law clause with another state, a notice
clause with another number of days, a dated clause with another year. A cache that serves
the original's answer for the edited clause serves a wrong answer.
"""

from __future__ import annotations

import re
from typing import Any

from ..io import stable_hash

STATES = (
    "Alabama", "Alaska", "Arizona", "Arkansas", "California", "Colorado", "Connecticut",
    "Delaware", "Florida", "Georgia", "Hawaii", "Idaho", "Illinois", "Indiana", "Iowa",
    "Kansas", "Kentucky", "Louisiana", "Maine", "Maryland", "Massachusetts", "Michigan",
    "Minnesota", "Mississippi", "Missouri", "Montana", "Nebraska", "Nevada", "New Hampshire",
    "New Jersey", "New Mexico", "New York", "North Carolina", "North Dakota", "Ohio",
    "Oklahoma", "Oregon", "Pennsylvania", "Rhode Island", "South Carolina", "South Dakota",
    "Tennessee", "Texas", "Utah", "Vermont", "Virginia", "Washington", "West Virginia",
    "Wisconsin", "Wyoming",
)  # fmt: skip
NUMBER_WORDS = {
    5: "five", 7: "seven", 10: "ten", 14: "fourteen", 15: "fifteen", 20: "twenty",
    30: "thirty", 45: "forty-five", 60: "sixty", 90: "ninety", 120: "one hundred twenty",
    180: "one hundred eighty",
}  # fmt: skip
DAYS = (10, 15, 30, 45, 60, 90, 120, 180)
DATE_TYPES = ("Effective Date", "Expiration Date", "Agreement Date")
_DAYS_AFTER = r"(?=\s*\)?\s*(?:calendar\s+|business\s+)?days?\b)"


def _pick(options: list[Any], seed: str) -> Any:
    """A deterministic choice (the same clause always gets the same edit)."""
    return options[int(stable_hash(seed), 16) % len(options)]


def _word_case(new: str, old: str) -> str:
    return new.capitalize() if old[:1].isupper() else new


def swap_state(text: str, key_term: str, seed: str) -> tuple[str, str] | None:
    """The clause and key term with its state replaced by another (None: not one state)."""
    state = key_term.strip()
    if state not in STATES or not re.search(rf"\b{re.escape(state)}\b", text):
        return None
    # "Virginia" inside "West Virginia": replacing it would change the other state too.
    if any(state in s and s != state and s in text for s in STATES):
        return None
    others = [s for s in STATES if s not in text and state not in s and s not in state]
    new = _pick(others, seed)
    return re.sub(rf"\b{re.escape(state)}\b", new, text), new


def change_days(text: str, key_term: str, seed: str) -> tuple[str, str] | None:
    """The clause and key term with the number of days changed (digits and words)."""
    found = re.search(r"\b(\d+)\s*(?:calendar\s+|business\s+)?days?\b", key_term)
    if not found:
        return None
    old = int(found.group(1))
    new = _pick([d for d in DAYS if d != old and str(d) not in text], seed)
    edited = re.sub(rf"\b{old}\b{_DAYS_AFTER}", str(new), text)
    word = NUMBER_WORDS.get(old)
    if word:  # "ninety (90) days" -> "sixty (60) days", "ninety days" -> "sixty days"
        edited = re.sub(
            rf"\b{re.escape(word)}\b(?=\s*\(\s*{new}\s*\)|{_DAYS_AFTER})",
            lambda m: _word_case(NUMBER_WORDS.get(new, str(new)), m.group(0)),
            edited,
            flags=re.IGNORECASE,
        )
    if edited == text or re.search(rf"\b{old}\b{_DAYS_AFTER}", edited):
        return None
    return edited, re.sub(rf"\b{old}\b", str(new), key_term, count=1)


def change_year(text: str, key_term: str, seed: str) -> tuple[str, str] | None:
    """The clause and key term (m/d/yyyy) with the year moved by 1-5 years."""
    found = re.fullmatch(r"\s*(\d{1,2})/(\d{1,2})/(\d{4})\s*", key_term)
    if not found or not re.search(rf"\b{found.group(3)}\b", text):
        return None
    year = int(found.group(3))
    new = _pick([y for y in range(year + 1, year + 6) if str(y) not in text], seed)
    edited = re.sub(rf"\b{year}\b", str(new), text)
    return edited, f"{found.group(1)}/{found.group(2)}/{new}"


def hard_negatives(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One edited copy of every record an edit applies to: id `<id>~<kind>`, `source_id`,
    `kind` (state, days, year), the edited `text` and its `gold` (key term edited too)."""
    out = []
    for record in records:
        gold = record["gold"]
        kind_type, key_term = gold.get("clause_type"), gold.get("key_term")
        if not isinstance(key_term, str):
            continue
        if kind_type == "Governing Law":
            kind, edit = "state", swap_state
        elif kind_type == "Notice Period to Terminate Renewal":
            kind, edit = "days", change_days
        elif kind_type in DATE_TYPES:
            kind, edit = "year", change_year
        else:
            continue
        edited = edit(record["text"], key_term, record["id"])
        if edited is None:
            continue
        out.append(
            {
                "id": f"{record['id']}~{kind}",
                "source_id": record["id"],
                "kind": kind,
                "text": edited[0],
                "gold": {**gold, "key_term": edited[1]},
            }
        )
    return out
