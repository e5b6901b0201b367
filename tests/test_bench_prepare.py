"""scripts/bench_prepare.py in its smoke mode: it runs and prints its RESULT line (a bench
nothing runs breaks unseen: it failed at once on main when prepare began to refuse sources
outside `prepare.source_dir`)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_prepare_smoke():
    done = subprocess.run(
        [sys.executable, "scripts/bench_prepare.py", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = re.findall(r"^RESULT prepare_records_per_s (\d+)$", done.stdout, re.M)
    assert result and int(result[-1]) > 0, done.stdout[-2000:]
