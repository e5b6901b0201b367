#!/usr/bin/env python
"""Benchmark `temper prepare` at scale: about 230,000 distinct clauses in a 200 MB JSONL.

The data set is built here, deterministically from `--seed`, out of the real CUAD clauses in
`data/raw/contracts/`: each record recombines phrases of clauses of one category (numbers
redrawn, party names swapped), so records are distinct and mostly not near-duplicates, with
the raw files' columns. Some near-duplicates are planted as they occur in real contract sets:
small clusters of lightly edited copies (one number or name changed) and one boilerplate
clause repeated 3,000 times with a different state, party and number.

`temper prepare` then runs as a subprocess (the real CLI, `-S` overrides for the sources and
outputs) on the shipped data (fixed costs: imports, tokenizer) and on the big file. Wall time
and peak RSS are measured per run (`os.wait4`). `--baseline-rev REV` also runs the prepare
stage of git revision REV on the same file, for comparison.

    .venv/bin/python scripts/bench_prepare.py                 # ~4 min on 2 cores
    .venv/bin/python scripts/bench_prepare.py --baseline-rev f30b12d --baseline-records 50000

The last line is `RESULT prepare_records_per_s <x>` (records read per second, big file).
Targets on the project's 2-core machines: under 180 s and under 3 GB peak RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "data" / "raw" / "contracts"
SPLITS = ("train", "validation", "test")
STATES = [
    "Delaware", "New York", "California", "Texas", "Florida", "Illinois", "Ohio", "Georgia",
    "Washington", "Massachusetts", "New Jersey", "Virginia", "Colorado", "Nevada", "Oregon",
    "Minnesota", "Arizona", "Michigan", "Pennsylvania", "North Carolina",
]  # fmt: skip
FIRST = [
    "Northwind", "Bluewater", "Redstone", "Silverline", "Evergreen", "Ironbridge", "Brightpath",
    "Summit", "Harbor", "Oakridge", "Pinecrest", "Crescent", "Granite", "Meridian", "Aurora",
    "Beacon", "Cobalt", "Falcon", "Horizon", "Keystone", "Lakeside", "Monarch", "Orion",
]  # fmt: skip
SECOND = [
    "Logistics", "Therapeutics", "Software", "Energy", "Holdings", "Media", "Foods", "Devices",
    "Networks", "Capital", "Pharma", "Systems", "Labs", "Retail", "Motors", "Analytics",
]  # fmt: skip
SUFFIX = ["Inc.", "LLC", "Ltd.", "Corp.", "Co.", "plc", "GmbH", "S.A."]
TYPES = ["License", "Distributor", "Supply", "Service", "Development", "Hosting", "Franchise"]
BOILERPLATE = (
    "This Agreement and any dispute, controversy or claim arising out of or relating to it "
    "shall be governed by and construed in accordance with the laws of the State of {state}, "
    "without giving effect to any choice of law rule that would cause the application of the "
    "laws of any other jurisdiction, and {party} irrevocably submits to the exclusive "
    "jurisdiction of the courts located in {state} for any action under Section {n}."
)
_PHRASE = re.compile(r"(?<=[,;:])\s+")
_NUMBER = re.compile(r"\d+")
_PARTY = re.compile(r"\b(?:Company|Licensee|Licensor|Distributor|Supplier|Customer|Vendor)\b")


def load_real() -> tuple[list[dict], dict[str, list[str]]]:
    rows = []
    for split in SPLITS:
        with open(RAW / f"{split}.jsonl", encoding="utf-8") as handle:
            rows += [json.loads(line) for line in handle]
    phrases: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        for phrase in _PHRASE.split(row["clause"]):
            if len(phrase.split()) >= 3:
                phrases[row["category"]].append(phrase.rstrip(",;:"))
    return rows, phrases


def party(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(SECOND)} {rng.choice(SUFFIX)}"


def vary(text: str, rng: random.Random) -> str:
    """Redraw every number and swap the generic party names: same shape, new words."""
    text = _NUMBER.sub(lambda m: str(rng.randrange(10 ** len(m.group()))), text)
    return _PARTY.sub(lambda m: party(rng) if rng.random() < 0.5 else m.group(), text)


def compose(category: str, target: int, phrases: dict[str, list[str]], rng: random.Random) -> str:
    """Phrases of clauses of one category, up to about `target` characters."""
    pool = phrases[category]
    parts, size = [], 0
    while size < target:
        phrase = vary(rng.choice(pool), rng)
        parts.append(phrase)
        size += len(phrase) + 2
    text = ", ".join(parts)
    return text[0].upper() + text[1:] + "."


def edit(text: str, rng: random.Random) -> str:
    """A light edit of a clause (one number or one word): a near-duplicate of it."""
    words = text.split()
    i = rng.randrange(len(words))
    words[i] = str(rng.randrange(1, 1000)) if rng.random() < 0.5 else rng.choice(FIRST)
    return " ".join(words)


def build(path: Path, n: int, seed: int) -> dict[str, int]:
    """Write the benchmark JSONL; returns what was planted."""
    rng = random.Random(seed)
    real, phrases = load_real()
    contracts = [
        (f"BENCH-{i:05d}-{rng.choice(TYPES).upper()} AGREEMENT", rng.random()) for i in range(9000)
    ]
    planted = {"records": 0, "near_dup_edits": 0, "boilerplate": 0}
    recent: list[tuple[str, dict]] = []
    n_boiler = min(3000, n // 20)
    boiler_at = set(rng.sample(range(n), n_boiler))
    with open(path, "w", encoding="utf-8") as out:
        for index in range(n):
            base = rng.choice(real)
            category = base["category"]
            if index in boiler_at:
                category = "Governing Law"
                text = BOILERPLATE.format(
                    state=rng.choice(STATES), party=party(rng), n=rng.randrange(1, 40)
                )
                planted["boilerplate"] += 1
            elif recent and rng.random() < 0.02:
                text, base = rng.choice(recent)
                category = base["category"]
                text = edit(text, rng)
                planted["near_dup_edits"] += 1
            else:
                text = compose(category, len(base["clause"]), phrases, rng)
                if len(recent) < 500:
                    recent.append((text, base))
                elif rng.random() < 0.05:
                    recent[rng.randrange(500)] = (text, base)
            contract, draw = rng.choice(contracts)
            split = "train" if draw < 0.76 else "validation" if draw < 0.88 else "test"
            row = {
                "id": "bench_" + hashlib.sha256(f"{seed}:{index}".encode()).hexdigest()[:16],
                "source": "temper bench (recombined CUAD v1 clauses)",
                "contract_id": contract,
                "contract_type": contract.split("-")[-1].title(),
                "split": split,
                "split_group": "g_" + hashlib.sha256(contract.encode()).hexdigest()[:10],
                "clause": text,
                "category": category,
                "labels": [category],
                "multi_label": False,
                "answer": base["answer"] if category == base["category"] else "Delaware",
                "answers": {category: base["answer"]},
                "n_words": len(text.split()),
                "has_omitted": False,
                "verified_in_contract_txt": False,
                "n_other_contracts_with_same_clause": 0,
                "near_dup_group": None,
            }
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            planted["records"] += 1
    return planted


def run_prepare(
    name: str, sources: list[Path], work: Path, code: Path | None = None, timeout: int = 1800
) -> dict:
    """`temper prepare` on `sources` as a child process; wall time and its peak RSS."""
    out, metrics = work / f"out-{name}", work / f"metrics-{name}.json"
    args = [
        "prepare",
        "-S", "prepare.sources=[" + ",".join(str(s) for s in sources) + "]",
        # prepare refuses sources outside its source_dir (DVC would not see them change)
        "-S", f"prepare.source_dir={os.path.commonpath([str(s.parent) for s in sources])}",
        "-S", f"prepare.out_dir={out}",
        "-S", f"prepare.metrics={metrics}",
    ]  # fmt: skip
    # The code under test: this checkout, or a git revision's package folder unpacked in
    # `code`, loaded under the name `temper` ahead of the installed one (its modules import
    # each other relatively, so this works for revisions from before the rename too).
    boot = "from temper.cli import app; app()"
    if code is not None:
        boot = (
            "import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('temper', {str(code / 'pipelines' / '__init__.py')!r}, "
            f"submodule_search_locations=[{str(code / 'pipelines')!r}]); "
            "module = importlib.util.module_from_spec(spec); sys.modules['temper'] = module; "
            "spec.loader.exec_module(module); " + boot
        )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TEMPER_LOG_LEVEL": "WARNING"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", boot, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = start + timeout
    while True:  # os.wait4: the rusage of this child alone
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.2)
    wall = time.perf_counter() - start
    output = proc.stdout.read() if proc.stdout else ""
    code_ = os.waitstatus_to_exitcode(status)
    stats = json.loads(metrics.read_text()) if code_ == 0 and metrics.exists() else {}
    shutil.rmtree(out, ignore_errors=True)
    return {
        "name": name,
        "rc": code_,
        "wall_s": wall,
        "rss_mb": usage.ru_maxrss / 1024,
        "read": stats.get("read", 0),
        "stats": stats,
        "output": output.strip().splitlines()[-3:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=230_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="Keep the data here.")
    parser.add_argument("--baseline-rev", default=None, help="Also run this git revision.")
    parser.add_argument("--baseline-records", type=int, default=None)
    parser.add_argument("--timeout", type=int, default=1800, help="Per run, seconds.")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="500 records, the big file only: does it run (CI), not a timing.",
    )
    args = parser.parse_args()
    if args.smoke:
        args.records = 500
        from bench_serve import smoke_base  # prepare reads the base model's tokenizer

        smoke_base()  # built into models/base when absent, as `dvc repro base_model` would

    work = args.work or Path(tempfile.mkdtemp(prefix="temper-bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"bench-{args.records}-{args.seed}.jsonl"
    start = time.perf_counter()
    if not data.exists():
        planted = build(data, args.records, args.seed)
        print(f"built {data} in {time.perf_counter() - start:.0f} s: {planted}")
    size_mb = data.stat().st_size / 1e6
    print(f"data: {size_mb:.0f} MB, {args.records} records")

    # The shipped data shows the fixed costs (imports, tokenizer) beside the big file; a smoke
    # run checks that the bench runs, so it prepares the small file alone.
    shipped = (
        [] if args.smoke else [run_prepare("shipped", [RAW / f"{s}.jsonl" for s in SPLITS], work)]
    )
    runs = [*shipped, run_prepare("bench", [data], work, timeout=args.timeout)]
    if args.baseline_rev:
        code = work / f"rev-{args.baseline_rev}"
        if not code.exists():
            code.mkdir()
            archive = subprocess.run(
                ["git", "archive", args.baseline_rev, "pipelines"], cwd=ROOT, check=True,
                capture_output=True,
            ).stdout  # fmt: skip
            subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
        source = data
        if args.baseline_records:
            source = work / f"bench-head-{args.baseline_records}.jsonl"
            with open(data, encoding="utf-8") as src, open(source, "w", encoding="utf-8") as dst:
                for _, line in zip(range(args.baseline_records), src, strict=False):
                    dst.write(line)
        runs.append(
            run_prepare(f"rev {args.baseline_rev}", [source], work, code, timeout=args.timeout)
        )

    print(
        f"\n{'run':<16} {'rc':>3} {'records':>9} {'wall s':>8} {'peak RSS MB':>12} {'records/s':>10}"
    )
    for r in runs:
        rate = r["read"] / r["wall_s"] if r["read"] else 0.0
        print(
            f"{r['name']:<16} {r['rc']:>3} {r['read']:>9} {r['wall_s']:>8.1f} "
            f"{r['rss_mb']:>12.0f} {rate:>10.0f}"
        )
    for r in runs:
        if r["rc"]:
            print(f"{r['name']}: failed (rc {r['rc']}):", *r["output"], sep="\n  ")
    bench = next(r for r in runs if r["name"] == "bench")
    if bench["stats"]:
        s = bench["stats"]
        near = s["near_duplicates"]
        print(
            f"\nbench output: splits { {k: v['records'] for k, v in s['splits'].items()} }, "
            f"available { {k: v['available'] for k, v in s['splits'].items()} }, "
            f"dropped {s['dropped']}, quarantined {s['quarantined']['total']}, near-dup pairs "
            f"{near['pairs']} (cross-split {near['cross_split_pairs']}), candidates checked "
            f"{near.get('candidates_checked')}, capped records {near.get('capped_records')}"
        )
    ok = bench["rc"] == 0 and bench["wall_s"] < 180 and bench["rss_mb"] < 3072
    print(f"target (< 180 s, < 3 GB): {'met' if ok else 'NOT met'}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    rate = bench["read"] / bench["wall_s"] if bench["rc"] == 0 else 0.0
    print(f"RESULT prepare_records_per_s {rate:.0f}")
    if any(r["rc"] for r in runs):
        sys.exit(1)  # a failed prepare is a failed benchmark, not a slow one


if __name__ == "__main__":
    main()
