"""One micro-batch of chat completions through `model.generate`, each row with its own limits.

Why a separate loop from `evaluation.generation.generate` (which scores whole test sets): a
server's rows differ in budget, stop sequences and streaming, and a client may leave while its
row is still running. So here every decoding step passes through `_Rows`, a stopping criterion
that sees each row's new token, and for each row alone: records the token's log-probability
(raw logits, before the schema mask, as `evaluation.confidence` defines them), decodes its text,
streams the new characters, and ends the row at EOS, a stop sequence, a complete JSON answer,
its own `max_tokens`, or a cancel. The rest is the evaluation's: left padding, greedy decoding
(or sampling when a request asks for a temperature), and the schema's logits processor from
`evaluation.constrained`. A row that ends early is padded by `generate` until the batch ends
(no continuous batching: that is vLLM's job on a GPU, see docs/serve.md).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ...evaluation.generation import common_prefix_len
from ...task import parse_answer

MIN_PREFIX = 8  # shorter shared prefixes are not worth a cache copy
MAX_PREFIXES = 8  # prefix caches kept per served version


@dataclass
class Job:
    """One request's generation: its inputs, where its output goes, and how it ended."""

    prompt_ids: list[int]
    max_new_tokens: int
    key: tuple[Any, ...]  # requests with equal keys may share a batch
    stops: list[str] = field(default_factory=list)
    stop_at_json: bool = False
    strip: bool = False  # task mode: the answer without surrounding blanks, as evaluated
    want_logprobs: bool = False  # the client asked for `logprobs`
    top_logprobs: int = 0
    emit: Any = None  # callable(text_delta, token_entries) for streaming, or None
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    # filled in by the engine
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    # token index -> the raw model's log-probability, where the engine's logprobs are not
    # the raw model's (vLLM under a schema) and the label confidence needs them
    rescored: dict[int, float] = field(default_factory=dict)
    finish_reason: str | None = None
    started: float | None = None
    first_token: float | None = None
    finished: float | None = None
    error: BaseException | None = None


@dataclass
class Sampling:
    """How a batch picks tokens: greedy, or sampling with a temperature (and a seed)."""

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return not self.temperature

    def key(self) -> tuple[Any, ...]:
        return ("greedy",) if self.greedy else (self.temperature, self.top_p, self.seed)


def token_entry(tokenizer: Any, job: Job, i: int) -> dict[str, Any]:
    """The OpenAI `logprobs.content` entry of the job's i-th generated token."""

    def piece(token_id: int) -> tuple[str, list[int]]:
        text = tokenizer.decode([token_id])
        return text, list(text.encode("utf-8"))

    token, raw = piece(job.token_ids[i])
    top = []
    for token_id, logprob in job.top[i] if job.top_logprobs else []:
        text, raw_top = piece(token_id)
        top.append({"token": text, "logprob": logprob, "bytes": raw_top})
    return {"token": token, "logprob": job.logprobs[i], "bytes": raw, "top_logprobs": top}


class _Recorder:
    """Logits processor (first in the list): keeps this step's log-softmax of the raw logits,
    so the stopping criterion can read the chosen token's log-probability."""

    def __init__(self) -> None:
        self.last: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.last = scores.float().log_softmax(-1)
        return scores


class _Rows:
    """Stopping criterion doing each row's bookkeeping after every decoding step."""

    def __init__(self, jobs: list[Job], tokenizer: Any, recorder: _Recorder, eos: set[int]):
        self.jobs, self.tokenizer, self.recorder, self.eos = jobs, tokenizer, recorder, eos
        self.done = [False] * len(jobs)
        self.sent = [0] * len(jobs)  # characters already streamed per row
        self.hold = [max((len(s) for s in j.stops), default=1) - 1 for j in jobs]

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        now = time.perf_counter()
        last = input_ids[:, -1].tolist()
        logp = self.recorder.last
        for row, job in enumerate(self.jobs):
            if self.done[row]:
                continue
            if job.first_token is None:
                job.first_token = now
            token = last[row]
            if token in self.eos:
                self._finish(row, "stop", now)
                continue
            job.token_ids.append(token)
            entries: list[dict[str, Any]] = []
            if logp is not None:
                job.logprobs.append(float(logp[row, token]))
                if job.top_logprobs:
                    values, ids = logp[row].topk(job.top_logprobs)
                    job.top.append(list(zip(ids.tolist(), values.tolist(), strict=True)))
                if job.emit is not None and job.want_logprobs:
                    entries = [token_entry(self.tokenizer, job, len(job.token_ids) - 1)]
            text = self.tokenizer.decode(job.token_ids, skip_special_tokens=True)
            if job.strip:  # task mode: no leading blanks (the evaluation strips its answers)
                text = text.lstrip()
            job.text = text
            reason = self._why_stop(job, text, token)
            if reason == "stop_sequence":
                cut = min(text.find(s) for s in job.stops if s in text)
                job.text = text[:cut]
                reason = "stop"
            if job.cancelled.is_set():
                reason = "cancelled"
            self._stream(row, entries, final=reason is not None)
            if reason is not None:
                self._finish(row, reason, now)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def _why_stop(self, job: Job, text: str, token: int) -> str | None:
        if job.stops and any(s in text for s in job.stops):
            return "stop_sequence"
        closing = job.stop_at_json and "}" in self.tokenizer.decode([token])
        if closing and parse_answer(text) is not None:
            return "stop"
        if len(job.token_ids) >= job.max_new_tokens:
            return "length"
        return None

    def _stream(self, row: int, entries: list[dict[str, Any]], final: bool) -> None:
        job = self.jobs[row]
        if job.emit is None:
            return
        text = job.text
        upto = len(text) if final else max(self.sent[row], len(text) - self.hold[row])
        if not final and text[:upto].endswith("\ufffd"):
            upto -= 1  # half a multi-byte character: wait for the rest
        delta = text[self.sent[row] : upto]
        self.sent[row] = max(self.sent[row], upto)
        if delta or entries:
            job.emit(delta, entries)

    def _finish(self, row: int, reason: str, now: float) -> None:
        job = self.jobs[row]
        if job.emit is not None and self.sent[row] < len(job.text):
            self._stream(row, [], final=True)
        if job.strip and job.emit is None:
            job.text = job.text.strip()
        job.finish_reason, job.finished = reason, now
        self.done[row] = True


def run_batch(
    model: Any,
    tokenizer: Any,
    jobs: list[Job],
    sampling: Sampling,
    constraint: Any = None,
    record_logprobs: bool = True,
    prefixes: dict[tuple[int, ...], Any] | None = None,
) -> None:
    """Generate every job of one batch in place (their text, tokens, finish reason, times).

    `constraint`: an `evaluation.constrained.JsonConstraint` every row is held to, or None.
    `prefixes`: a store of prefix KV caches kept across batches (the served version's).

    The token prefix every row shares (in task mode: the chat template and the task's system
    prompt, about 60 tokens) is run once and its KV cache reused, per batch from `prefixes`;
    rows are laid out [shared prefix | left padding | own suffix], as `evaluation.generation`
    does (position ids follow the attention mask, so padding does not shift them).
    """
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    start = time.perf_counter()
    for job in jobs:
        job.started = start
    rows = [j.prompt_ids for j in jobs]
    n_prefix = common_prefix_len(rows) if len(rows) > 1 else 0
    n_prefix = n_prefix if n_prefix >= MIN_PREFIX else 0
    batch = tokenizer.pad(
        {"input_ids": [r[n_prefix:] for r in rows]}, return_tensors="pt", padding=True
    ).to(model.device)
    extra: dict[str, Any] = {}
    if n_prefix:
        prefix, cache = _prefix_cache(model, rows[0][:n_prefix], prefixes, len(rows))
        ones = torch.ones_like(batch["attention_mask"][:, :1]).expand(-1, n_prefix)
        batch["input_ids"] = torch.cat([prefix.expand(len(rows), -1), batch["input_ids"]], 1)
        batch["attention_mask"] = torch.cat([ones, batch["attention_mask"]], 1)
        extra["cache"] = cache
    budget = max(j.max_new_tokens for j in jobs)
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    recorder = _Recorder()
    processors: list[Any] = [recorder] if record_logprobs else []
    if constraint is not None:
        processors.append(constraint.processor(budget))
    tracker = _Rows(jobs, tokenizer, recorder, eos_ids)
    kwargs: dict[str, Any] = {"do_sample": False}
    if not sampling.greedy:
        kwargs = {"do_sample": True, "temperature": sampling.temperature, "top_k": 0}
        kwargs["top_p"] = sampling.top_p or 1.0
    # A seeded request samples from its own seed: generate() draws from torch's global RNG,
    # so it is forked for the call and the process's RNG is left as it was.
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        if not sampling.greedy and sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        model.generate(
            **batch,
            max_new_tokens=budget,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            logits_processor=LogitsProcessorList(processors),
            stopping_criteria=StoppingCriteriaList([tracker]),
            **kwargs,
            **extra,
        )
    end = time.perf_counter()
    for row in range(len(jobs)):  # rows still open when generate stopped: out of budget
        if not tracker.done[row]:
            tracker._finish(row, "length", end)


def _prefix_cache(model: Any, ids: list[int], store: dict | None, n_rows: int) -> tuple[Any, Any]:
    """The prefix as a [1, n] tensor and its KV cache repeated for `n_rows` rows."""
    import copy

    import torch

    prefix = torch.tensor([ids], device=model.device)
    key = tuple(ids)
    kv = store.get(key) if store is not None else None
    if kv is None:
        with torch.inference_mode():
            kv = model(input_ids=prefix, use_cache=True).cache
        if store is not None:
            if len(store) >= MAX_PREFIXES:
                store.pop(next(iter(store)))
            store[key] = kv
    cache = copy.deepcopy(kv)  # generate extends the cache in place: keep the stored one
    cache.batch_repeat_interleave(n_rows)
    return prefix, cache
