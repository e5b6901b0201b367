"""What the request log costs a request: `RequestLog.submit` (all the request path does) against
the dict copy it makes, and how fast the writer thread empties the queue into sqlite.

    python scripts/bench_monitor.py [--rows 20000]
    python scripts/bench_monitor.py --smoke      # 500 rows: does it run (CI), not a timing

Equal work: the same `info` dicts, the same count. Embeddings are off (the embedder's cost is
the writer thread's, measured by the cache's benchmark). Ends with one line
`RESULT monitor_submit_overhead_ratio <submit time / dict-copy time>`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from temper.online.monitor import MonitorConfig, MonitorStore, RequestLog


def info(i: int) -> dict:
    return {
        "model": "champion",
        "version": "3",
        "tier": "self",
        "prompt_tokens": 180,
        "completion_tokens": 14,
        "_text": f"Clause {i}: this Agreement is governed by the laws of the State of New York.",
        "_answer": '{"clause_type": "Governing Law", "key_term": "New York"}',
        "_confidence": 0.93,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument(
        "--smoke", action="store_true", help="500 rows: does it run (CI), not a timing."
    )
    args = parser.parse_args()
    if args.smoke:
        args.rows = 500
    items = [info(i) for i in range(args.rows)]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = MonitorConfig(path=str(Path(tmp) / "m.sqlite"), embed=False, queue_size=args.rows)
        t0 = time.perf_counter()
        copies = [dict(x) for x in items]  # the baseline: the copy submit makes anyway
        baseline = time.perf_counter() - t0
        log = RequestLog(cfg)
        t0 = time.perf_counter()
        for i, x in enumerate(items):
            log.submit(f"r{i}", x, 200, 0.3)
        submit = time.perf_counter() - t0
        t0 = time.perf_counter()
        log.start().close(timeout=600)
        write = time.perf_counter() - t0
        with MonitorStore(cfg.path) as store:
            stored = store.count()
    del copies
    ratio = submit / baseline
    print(f"rows                     {args.rows}")
    print(f"dict copy (baseline)     {baseline / args.rows * 1e6:8.2f} us/request")
    print(f"RequestLog.submit        {submit / args.rows * 1e6:8.2f} us/request  ({ratio:.1f}x)")
    print(f"writer thread            {args.rows / write:8.0f} rows/s into sqlite ({stored} stored)")
    print(f"dropped                  {log.dropped}")
    print(f"RESULT monitor_submit_overhead_ratio {ratio:.2f}")
    if stored != args.rows or log.dropped:
        sys.exit(f"bench_monitor: {stored} of {args.rows} rows stored, {log.dropped} dropped")


if __name__ == "__main__":
    main()
