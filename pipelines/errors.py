"""One base for the errors Temper raises on purpose, each with the exit code the CLI uses.

The command line catches `TemperError` in one place (`cli/__init__.py`): it prints
`error: <message>` (the message names the file, line and field) and exits with the error's
`exit_code`. Anything else is a bug and keeps its traceback. The subclasses keep the builtin
base they had (`ValueError`, `RuntimeError`, `FileNotFoundError`), so existing `except`
clauses of callers still hold.

Exit codes (the README's Development section repeats this table):

| code | meaning |
| --- | --- |
| 0 | done |
| 1 | a Temper error: bad input, a missing file, a failed stage (the message says which) |
| 2 | usage: an unreadable params file or `-S`, or the tracking server refused the credentials; any error of the commands whose 1 is a verdict (gate, promote, rollback, pull, serve, config, monitor) |
| 3 | distil: the budget cap was reached (finished work kept); `temper monitor probe` and `report`: an alarm fired |
| 4 | distil: the cost estimate is above the cap (nothing sent) |
| 5 | distil: the endpoint is not on this machine and `allow_external` is false (nothing sent) |
| 6 | distil: more than `max_reject_rate` of the records were rejected or failed |
| 7 | distil `mode: batch`: batches still running after `max_wait_s`, or cancelled |
"""

from __future__ import annotations


class TemperError(Exception):
    """Base of every error Temper raises on purpose; `exit_code` is what the CLI exits with."""

    exit_code: int = 1


class MissingInput(TemperError, FileNotFoundError):
    """A file a step needs is not there (the message says which, and what makes it)."""


class InvalidInput(TemperError, ValueError):
    """A file a step reads is malformed (the message names the file, line and field)."""
