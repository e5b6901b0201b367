"""Batch mode: the vendors' batch APIs (about half price, answers within 24 h), resumable.

    done = await collect(provider, [(messages, json_schema, prompt_version), ...])
    done.verdict(messages, json_schema, prompt_version)  # None: answered (in the cache)
    # else BUDGET (never submitted under the cap) or the reason it failed for good

What it does: every request the cache lacks becomes one line of the vendor's batch JSONL with
`custom_id` = the request's cache key; lines go out in chunks within the vendor's limits
(requests and bytes per batch); the batch ids go into a state file; the batches are polled
with backoff; answers go into the same cache as the sync path's (same key, same `Completion`),
so everything after it (validation, repair, rejects, a later sync or replay run) is
unchanged. The repair turn of an invalid answer runs synchronously afterwards.

Why it is safe to stop at any moment (Ctrl-C, `kill -9`) and run again:
- A submission is written to the state file (with a fresh token) *before* it is sent, and its
  batch id right after. A crash in between leaves an entry without an id; the next run asks
  the vendor for it (OpenAI: the token in the batch's metadata; Anthropic: a batch of that
  size created since then) and adopts it, or drops the entry if the vendor never got it.
- A request is submitted only if the cache lacks it and no batch of the state file that is
  still to be collected holds it: nothing is submitted twice.
- A batch is marked collected only after all its answers are committed to the cache (sqlite,
  one commit per answer), so a crash while downloading re-downloads, never loses.
- The state file holds ids, custom_ids (hashes), counts and error texts: no prompt, no key.

Money: the estimate and every reservation use the row's batch prices (`Price.batch`); each
chunk's worst case is reserved against `max_usd`/`max_requests` before it is submitted, and
what does not fit is never sent (`BUDGET`). Failed batch requests are not billed by either
vendor; expired and 5xx/429 ones are resubmitted in a later batch up to `max_attempts`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..io import read_json, stable_hash, write_json
from .base import BudgetExceeded, Completion, Messages, Price, ProviderConfig, ProviderError
from .batch_wire import Result, wire_for
from .limits import estimate_tokens, reply_limit
from .privacy import is_local, redact
from .retries import is_retryable

log = logging.getLogger(__name__)

BUDGET = "budget cap"  # a verdict: not submitted because a cap would be crossed
STATE_VERSION = 1


class BatchError(ProviderError):
    """Batches could not be finished in this run; nothing lost. `pending`: they are still
    running or were cancelled (re-run to pick them up); else the vendor refused a call
    (a bad key, a 4xx: fix the config first)."""

    def __init__(self, message: str, pending: bool = True):
        super().__init__(message)
        self.pending = pending


def state_path(cfg: ProviderConfig, base_url: str) -> Path:
    """Beside the cache, one file per vendor, model and endpoint (batch ids are the
    endpoint's): a re-run with the same settings finds its batches."""
    if cfg.batch.state:
        return Path(cfg.batch.state)
    cache = Path(cfg.cache)
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in cfg.model)[:60]
    name = f"{cfg.kind}-{slug}-{stable_hash(base_url, length=8)}.json"
    return cache.with_name(cache.name + ".batches") / name


class State:
    """The state file: submitted batches, submissions per custom_id, final errors."""

    def __init__(self, path: Path, cfg: ProviderConfig, base_url: str):
        self.path = path
        data = read_json(path) if path.exists() else {}
        if data and data.get("version") != STATE_VERSION:
            raise BatchError(f"{path}: state file version {data.get('version')!r} unknown")
        self.data: dict[str, Any] = data or {
            "version": STATE_VERSION,
            "kind": cfg.kind,
            "model": cfg.model,
            "endpoint": base_url,
            "batches": [],
            "attempts": {},
            "errors": {},  # custom_id -> last error text
            "final": {},  # custom_id -> reason it will not be submitted again
        }

    @property
    def batches(self) -> list[dict[str, Any]]:
        return self.data["batches"]

    def save(self) -> None:
        write_json(self.path, self.data)  # atomic: temp file, fsync, rename

    def in_flight(self) -> set[str]:
        return {c for b in self.batches if not b["collected"] for c in b["custom_ids"]}


@dataclass
class Item:
    custom_id: str
    messages: Messages
    json_schema: dict[str, Any] | None
    max_tokens: int
    line: dict[str, Any]
    size: int
    reserve: float


@dataclass
class Collected:
    """What batch mode settled: `verdict` per request, and the report for the metrics."""

    keys: dict[tuple[str, str], str]
    final: dict[str, str] = field(default_factory=dict)
    budget: set[str] = field(default_factory=set)
    report: dict[str, Any] = field(default_factory=dict)

    def verdict(self, messages: Messages, json_schema: Any, version: str) -> str | None:
        cid = self.keys.get((stable_hash(messages), version))
        if cid is None:
            return None
        return BUDGET if cid in self.budget else self.final.get(cid)


def batch_price(provider: Any) -> Price:
    cfg = provider.cfg
    try:
        return cfg.prices[cfg.model].batch()
    except ValueError:
        raise ConfigError(
            f"mode batch: prices.{cfg.model} has no batch_input/batch_output (USD per 1M "
            "tokens through the batch API; configs/prices.yaml has them for the listed models)"
        ) from None


async def collect(
    provider: Any, requests: list[tuple[Messages, Any, str]], progress: bool = False
) -> Collected:
    """Get every uncached request answered through batches (see the module doc)."""
    cfg, bc = provider.cfg, provider.cfg.batch
    wire = wire_for(cfg.kind)
    price = batch_price(provider)
    max_n = min(bc.max_requests or wire.max_requests, wire.max_requests)
    max_bytes = int(min(bc.max_bytes or wire.max_bytes, wire.max_bytes) * 0.95)
    items: dict[str, Item] = {}
    done = Collected({})
    for messages, schema, version in requests:
        sent = [{**m, "content": redact(m["content"], cfg.redact)} for m in messages]
        cid = provider.cache_key(sent, json_schema=schema, prompt_version=version)
        done.keys[(stable_hash(messages), version)] = cid
        if cid in items or provider.cache.get(cid) is not None:
            continue
        line = wire.line(cid, provider.request_body(sent, schema, cfg.max_tokens))
        size = len(json.dumps(line, ensure_ascii=False).encode()) + 1
        reserve = price.worst_case(estimate_tokens(sent), cfg.max_tokens)
        items[cid] = Item(cid, sent, schema, cfg.max_tokens, line, size, reserve)
    state = State(state_path(cfg, provider.base_url), cfg, provider.base_url)
    run = Run(provider, wire, state, items, price, done, max_n)
    # A results file holds up to max_n replies: the byte cap scales with it.
    client = provider._client(reply_limit(cfg, cfg.max_tokens) * max_n + (1 << 20))
    try:
        await run.reconcile(client)
        await run.loop(client, max_bytes, progress)
    except (BatchError, ConfigError, BudgetExceeded):
        raise
    except Exception as err:  # an SDK error on submit/poll/download: stop, resumable
        text = str(err).replace(provider._api_key, "***")[:300]
        raise BatchError(
            f"batch mode stopped: {type(err).__name__}: {text}. Nothing is lost: re-run to "
            "pick up the submitted batches by id (nothing is submitted twice)",
            pending=is_retryable(err),
        ) from None
    finally:
        await client.close()
        done.report = run.report()
        provider.batch_report = done.report
    return done


class Run:
    """One run of batch mode over a state file (submit, poll, collect)."""

    def __init__(self, provider, wire, state, items, price, done, max_n):  # noqa: ANN001
        self.p, self.wire, self.state, self.items = provider, wire, state, items
        self.price, self.done, self.max_n = price, done, max_n
        self.reserved: dict[str, float] = {}  # batch id -> reserved in this run
        self.cancelled: set[str] = set()  # custom_ids of batches cancelled during this run
        self.counts = {"submitted_batches": 0, "submitted_requests": 0, "collected_batches": 0}
        self.counts |= {"answers": 0, "errors": 0, "resubmitted": 0, "resumed_batches": 0}
        self.local = not provider.cfg.allow_external or is_local(provider.base_url)
        self.t0 = time.time()

    async def reconcile(self, client: Any) -> None:
        """Entries written before a submission whose id never got recorded: adopt or drop."""
        known = {b["id"] for b in self.state.batches if b["id"]}
        for b in [b for b in self.state.batches if not b["id"]]:
            found = await self.wire.find(client, b["token"], b["n"], b["submitted_at"], known)
            if found:
                log.info("batch %s: adopted the submission the last run did not record", found)
                b["id"] = found
                known.add(found)
            else:  # never reached the vendor
                self.state.batches.remove(b)
                for cid in b["custom_ids"]:
                    self.state.data["attempts"][cid] -= 1
            self.state.save()
        self.counts["resumed_batches"] = sum(not b["collected"] for b in self.state.batches)

    def todo(self) -> list[Item]:
        st, flying = self.state.data, self.state.in_flight()
        out = []
        for cid, item in self.items.items():
            if cid in st["final"] or cid in flying or self.p.cache.get(cid) is not None:
                continue
            if cid in self.done.budget or cid in self.cancelled:
                continue
            if st["attempts"].get(cid, 0) >= self.p.cfg.batch.max_attempts:
                n = st["attempts"][cid]
                st["final"][cid] = f"gave up after {n} batch submissions: {st['errors'].get(cid)}"
                continue
            out.append(item)
        return out

    async def submit(self, client: Any, todo: list[Item], max_bytes: int) -> None:
        chunks: list[list[Item]] = [[]]
        size = 0
        for item in todo:
            if chunks[-1] and (len(chunks[-1]) >= self.max_n or size + item.size > max_bytes):
                chunks.append([])
                size = 0
            chunks[-1].append(item)
            size += item.size
        for chunk in (c for c in chunks if c):
            if self.done.budget:  # a cap was reached: nothing more goes out
                self.done.budget.update(i.custom_id for i in chunk)
                continue
            budget = self.p.budget
            reserved = []
            try:
                for item in chunk:
                    budget.reserve(item.reserve)
                    reserved.append(item.reserve)
            except BudgetExceeded:
                for r in reserved:
                    budget.settle(r, 0.0)
                budget.requests -= len(reserved)
                self.p.stats.budget_refusals += 1
                self.done.budget.update(i.custom_id for i in chunk)
                log.warning("batch: a cap would be crossed; %d requests not submitted", len(chunk))
                continue
            entry = {
                "id": None,
                "token": uuid.uuid4().hex,
                "submitted_at": time.time(),
                "n": len(chunk),
                "custom_ids": [i.custom_id for i in chunk],
                "status": "submitting",
                "counts": {},
                "collected": False,
            }
            attempts = self.state.data["attempts"]
            for i in chunk:
                self.counts["resubmitted"] += attempts.get(i.custom_id, 0) > 0
                attempts[i.custom_id] = attempts.get(i.custom_id, 0) + 1
            self.state.batches.append(entry)
            self.state.save()  # before sending: a crash now is found again by `reconcile`
            try:
                entry["id"] = await self.wire.submit(
                    client, [i.line for i in chunk], entry["token"]
                )
            except Exception:
                for r in reserved:
                    budget.settle(r, 0.0)
                raise
            entry["status"] = "submitted"
            self.state.save()
            self.reserved[entry["id"]] = sum(reserved)
            self.counts["submitted_batches"] += 1
            self.counts["submitted_requests"] += len(chunk)
            log.info("batch %s: %d requests submitted", entry["id"], len(chunk))

    async def loop(self, client: Any, max_bytes: int, progress: bool) -> None:
        bc = self.p.cfg.batch
        deadline = time.monotonic() + bc.max_wait_s
        wait = bc.poll_s
        while True:
            await self.submit(client, self.todo(), max_bytes)
            wanted = set(self.items)
            active = [
                b
                for b in self.state.batches
                if not b["collected"] and b["id"] and wanted & set(b["custom_ids"])
            ]
            if not active:
                break
            ended = 0
            for b in active:
                try:
                    pr = await self.wire.progress(client, b["id"])
                except Exception as err:  # a 429/5xx/timeout on a poll: poll again later
                    if not is_retryable(err):
                        raise
                    log.warning("batch %s: poll failed (%s), retrying", b["id"], type(err).__name__)
                    continue
                b["status"], b["counts"] = pr.status, pr.counts
                if pr.ended:
                    await self.collect(client, b)
                    ended += 1
            self.state.save()
            if progress:
                log.info("batches: %s", ", ".join(f"{b['id']} {b['status']}" for b in active))
            if ended:
                wait = bc.poll_s
                continue
            if time.monotonic() + wait > deadline:
                raise BatchError(
                    f"{len(active)} batch(es) still running after max_wait_s {bc.max_wait_s:g}"
                    f" ({', '.join(b['id'] for b in active)}); nothing is lost: re-run to "
                    "collect them (`temper distil --status` shows their progress)"
                )
            await asyncio.sleep(wait)
            wait = min(wait * 2, bc.poll_max_s)
        self.done.final = dict(self.state.data["final"])
        if self.cancelled:
            raise BatchError(
                f"{len(self.cancelled)} requests were in batches cancelled during this run; "
                "every answer they finished is cached: re-run to submit the rest"
            )

    async def collect(self, client: Any, b: dict[str, Any]) -> None:
        """Download a finished batch: answers into the cache, errors into the state."""
        results = await self.wire.results(client, b["id"], self.p.base_url, self.local)
        st = self.state.data
        turnaround_ms = max(time.time() - b["submitted_at"], 0.0) * 1000
        seen: set[str] = set()
        spent = 0.0
        for r in results:
            if r.custom_id == "*":  # the whole batch failed: every request gets its error
                results = [Result(c, error=r.error) for c in b["custom_ids"]]
                break
        for r in results:
            if r.custom_id not in b["custom_ids"] or r.custom_id in seen:
                continue
            seen.add(r.custom_id)
            if r.reply is not None:
                spent += self.store(r, turnaround_ms)
                continue
            self.counts["errors"] += 1
            st["errors"][r.custom_id] = r.error
            if r.cancelled:
                st["attempts"][r.custom_id] -= 1  # a cancel is not a try: a re-run resubmits
                if not b.get("cancel_requested"):  # cancelled elsewhere while we waited
                    self.cancelled.add(r.custom_id)
            elif not r.retryable:
                st["final"][r.custom_id] = r.error
        for cid in set(b["custom_ids"]) - seen:  # never lose one silently: resubmit it
            st["errors"][cid] = "missing from the batch results"
        reserved = self.reserved.pop(b["id"], 0.0)
        if reserved:
            self.p.budget.settle(reserved, spent)
        else:  # submitted by an earlier run: spent now all the same
            self.p.budget.spent_usd += spent
        b["collected"] = True
        self.counts["collected_batches"] += 1
        self.state.save()

    def store(self, r: Result, turnaround_ms: float) -> float:
        """One answer into the cache, priced at the batch rates; returns its USD."""
        cfg, stats = self.p.cfg, self.p.stats
        reply = r.reply
        item = self.items.get(r.custom_id)
        tin = reply.input_tokens if reply.input_tokens is not None else 0
        tout = reply.output_tokens
        if tout is None:
            tout = min(math.ceil(len(reply.text) / 3), cfg.max_tokens)
        if tout > cfg.max_tokens:  # past the limit we asked for: rejected, as in sync mode
            stats.over_limit += 1
            self.state.data["final"][r.custom_id] = (
                f"reply of {tout} output tokens, over the requested limit of {cfg.max_tokens}"
            )
            worst = item.reserve if item else 0.0
            stats.usd += worst
            stats.usd_charged_worst_case += worst
            return worst
        usd = self.price.cost(tin, tout, reply.cached_input_tokens, reply.cache_write_tokens)
        done = Completion(
            reply.text,
            tin,
            tout,
            usd,
            turnaround_ms,
            False,
            reply.finish_reason,
            cfg.model,
            reply.cached_input_tokens,
        )
        request = (
            {
                "messages": item.messages,
                "json_schema": item.json_schema,
                "max_tokens": item.max_tokens,
            }
            if item
            else {"batch": True}
        )
        self.p.cache.put(r.custom_id, self.p.cache_kind, request, done)
        stats.input_tokens += tin
        stats.output_tokens += tout
        stats.cached_input_tokens += reply.cached_input_tokens
        stats.cache_write_tokens += reply.cache_write_tokens
        stats.usd += usd
        self.counts["answers"] += 1
        return usd

    def report(self) -> dict[str, Any]:
        return {
            **self.counts,
            "state_file": str(self.state.path),
            "failed_for_good": len(self.state.data["final"]),
            "not_submitted_budget": len(self.done.budget),
            "wall_s": round(time.time() - self.t0, 2),
        }
