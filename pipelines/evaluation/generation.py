"""Batched greedy generation for evaluation: the one loop every model answer comes from.

Why by hand around `model.generate` rather than a `pipeline("text-generation")`: the pipeline
does not sort by length (so short clauses pay for the longest one's padding), does not stop a
row as soon as its JSON answer is complete, and hides the per-batch timing we report as
latency. What this does:

- prompts are rendered with the tokenizer's chat template and sorted by token length, so each
  batch holds similar lengths and pads little; results come back in the input order;
- left padding (decoder-only models continue from the right edge), KV cache, greedy decoding;
- the token prefix shared by every prompt (system prompt, label list, few-shot turns) is run
  through the model once and its KV cache reused by every batch: with the 38-label list in
  the prompt that prefix is most of the prompt, and recomputing it per example tripled the
  time of a base-model baseline here. Layout per batch: [shared prefix | left padding |
  own suffix]; position ids come from the attention mask's cumulative sum, so every suffix
  continues at the prefix's length whatever its padding (tested against no prefix cache);
- a row stops at EOS, or (`stop_at_json`) as soon as its reply holds a complete JSON object:
  a base model that keeps talking after the answer does not hold the whole batch up;
- each example gets its own latency: the time from its batch's start (prefill included) to
  the decoding step that finished it, as a caller would see it if its answer went back the
  moment it was done (a server returns it then); also the time to its first token, the
  batch's wall time divided by the batch size (the *amortised* cost per example, a
  throughput figure, not a latency) and the number of tokens it generated;
- with `token_scores=True`, each answer also gets its token ids and the log-probability the
  model gave each of them (log-softmax of the raw logits, before any logits processor), from
  which `evaluation.confidence` derives label confidences. Off by default: it keeps every
  step's logits of a batch until the batch ends.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..chat import render, supports_system
from ..errors import MissingInput
from ..task import parse_answer

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """One model answer and its timing."""

    text: str
    new_tokens: int
    latency_ms: float  # this answer's own time: batch start to the step that finished it
    first_token_ms: float  # batch start to its first new token (prefill + one step)
    amortised_ms: float  # the batch's wall time / its size: throughput, not a latency
    token_ids: list[int] | None = None  # with token_scores: the generated ids (EOS included)
    token_logprobs: list[float] | None = None  # with token_scores: log p of each of them


def resolve_adapter(ref: str | Path) -> Path:
    """A local adapter folder for a path or an MLflow URI (`models:/name@alias`, `runs:/id/p`)."""
    ref = str(ref)
    if ref.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        import mlflow

        return Path(mlflow.artifacts.download_artifacts(artifact_uri=ref))
    path = Path(ref)
    if not (path / "adapter_config.json").exists():
        raise MissingInput(f"{path}: not a PEFT adapter folder (no adapter_config.json)")
    return path


def load_model(
    base_dir: str | Path,
    adapter: str | Path | None = None,
    dtype: str = "auto",
    threads: int | None = None,
    device: str = "auto",
) -> tuple[Any, Any]:
    """Base model (+ adapter) and its tokenizer, in eval mode, on `device` in `dtype`
    (`auto`: see `evaluation.device`).

    A LoRA adapter is merged into the weights: that removes the LoRA matmuls from every forward
    pass, so generation runs at base-model speed, and the answers are the unmerged model's
    (merged and unmerged logits agree to ~1e-4 in float32, see STACK-FACTS; in 16 bits the
    merged weights are rounded once more). A QLoRA adapter is scored as it is served: the
    4-bit NF4 base plus the adapter, not merged (merging into 16-bit weights makes a different
    model; `temper merge` warns about it). bitsandbytes runs 4-bit on the CPU as well (0.48+).
    """
    import torch

    from ..model_source import (
        adapter_method,
        disable_bnb_cpu_repack,
        load_causal_lm,
        load_tokenizer,
        nf4_config,
    )
    from .device import resolve

    place = resolve(device, dtype)
    if threads and place.device == "cpu":
        torch.set_num_threads(threads)
    tokenizer = load_tokenizer(base_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch_dtype = getattr(torch, place.dtype)
    path = resolve_adapter(adapter) if adapter is not None else None
    method = adapter_method(path) if path is not None else "lora"
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise RuntimeError(
                f"{path}: a QLoRA adapter is scored on the 4-bit base it was trained on, "
                f"which needs bitsandbytes ({err}); install it, or `temper merge` it and "
                "evaluate the merged model (a different model from the one trained)"
            ) from None
        kwargs["quantization_config"] = nf4_config(torch_dtype)
        if place.device == "cuda":  # a quantized model is placed while loading, not moved
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = load_causal_lm(base_dir, **kwargs)
    if method == "qlora":
        disable_bnb_cpu_repack(model)  # on the CPU: the numbers training computed, not bf16's
    else:
        model = model.to(place.device)
    if path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(path))
        if method != "qlora":
            model = model.merge_and_unload()
    model.eval()
    log.info(
        "loaded %s%s on %s, %s%s",
        base_dir,
        f" + {method} adapter {path}" if path is not None else "",
        place.device,
        place.dtype,
        " (4-bit NF4 base, adapter unmerged: as served)" if method == "qlora" else "",
    )
    return model, tokenizer


class _StepClock:
    """Stopping "criterion" that never stops: it stamps the time of every decoding step, so
    each row's latency is the stamp of the step that produced its last token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _JsonDone:
    """Stopping criterion: a row is done once its new text holds a complete JSON object.

    Checks a row only when its latest token contains '}', so the cost per step is one
    tiny decode per row.
    """

    def __init__(self, tokenizer: Any, prompt_len: int):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if input_ids.shape[1] <= self.prompt_len:
            return done
        last = self.tokenizer.batch_decode(input_ids[:, -1:])
        for row, piece in enumerate(last):
            if "}" in piece:
                text = self.tokenizer.decode(
                    input_ids[row, self.prompt_len :], skip_special_tokens=True
                )
                done[row] = parse_answer(text) is not None
        return done


def _count_new(row: list[int], eos_ids: set[int]) -> int:
    """Generated tokens up to and including the first EOS (the rest is padding)."""
    for i, token in enumerate(row):
        if token in eos_ids:
            return i + 1
    return len(row)


def common_prefix_len(rows: list[list[int]]) -> int:
    """Length of the token prefix that every row shares (at least one token left per row)."""
    if not rows:
        return 0
    first, limit = rows[0], min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


@dataclass
class _Decoding:
    """How every batch of one `generate` call is decoded (one object, so the per-batch
    helpers take few arguments)."""

    max_new_tokens: int
    stop_at_json: bool
    token_scores: bool
    constraint: Any  # `constrained.json_logits_processor`'s result, or None (free answers)
    eos_ids: set[int]


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    max_new_tokens: int,
    batch_size: int = 16,
    stop_at_json: bool = True,
    prefix_cache: bool = True,
    progress: bool = True,
    desc: str = "generate",
    schema: dict[str, Any] | None = None,
    token_scores: bool = False,
) -> list[Generation]:
    """Greedy answers to chat prompts, batched by length; returned in the input order.

    `schema`: a JSON schema every answer is constrained to (`constrained.py`); None: free.
    """
    from tqdm.auto import tqdm

    encoded = _encode(tokenizer, prompts)
    prefix, prefix_kv, encoded = _shared_prefix(model, encoded, prefix_cache)
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    eos = tokenizer.eos_token_id
    constraint = None
    if schema is not None:
        from .constrained import json_logits_processor

        constraint = json_logits_processor(schema, tokenizer)
    decoding = _Decoding(
        max_new_tokens=max_new_tokens,
        stop_at_json=stop_at_json,
        token_scores=token_scores,
        constraint=constraint,
        eos_ids=set(eos if isinstance(eos, list) else [eos]),
    )
    results: list[Generation | None] = [None] * len(encoded)
    bar = tqdm(total=len(encoded), desc=desc, unit="ex", disable=not progress)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [encoded[i] for i in idx]
        answers = _generate_batch(model, tokenizer, rows, prefix, prefix_kv, decoding)
        for i, answer in zip(idx, answers, strict=True):
            results[i] = answer
        bar.update(len(idx))
    bar.close()
    return [r for r in results if r is not None]


def _encode(tokenizer: Any, prompts: list[list[dict[str, str]]]) -> list[list[int]]:
    """Token ids of each prompt rendered with the chat template (which holds the special
    tokens itself, so the tokenizer adds none)."""
    system_ok = supports_system(tokenizer)
    texts = [
        render(tokenizer, p, system_ok, tokenize=False, add_generation_prompt=True) for p in prompts
    ]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _shared_prefix(
    model: Any, encoded: list[list[int]], enabled: bool
) -> tuple[Any, Any, list[list[int]]]:
    """The token prefix every prompt shares, run through the model once so that no batch
    recomputes it: (its ids as a 1 x n tensor, its KV cache, the prompts without it); with no
    shared prefix (or `enabled` off, or a single prompt): (None, None, the prompts)."""
    import torch

    n_prefix = common_prefix_len(encoded) if enabled and len(encoded) > 1 else 0
    if not n_prefix:
        return None, None, encoded
    prefix = torch.tensor([encoded[0][:n_prefix]], device=model.device)
    with torch.inference_mode():
        prefix_kv = model(input_ids=prefix, use_cache=True).cache
    return prefix, prefix_kv, [row[n_prefix:] for row in encoded]


def _pad_batch(
    model: Any, tokenizer: Any, rows: list[list[int]], prefix: Any, prefix_kv: Any
) -> tuple[Any, dict[str, Any]]:
    """The batch's inputs laid out as [shared prefix | left padding | own suffix], and the
    extra `generate` arguments (a copy of the prefix's KV cache, one row per example)."""
    import torch

    batch = tokenizer.pad({"input_ids": rows}, return_tensors="pt", padding=True).to(model.device)
    extra: dict[str, Any] = {}
    if prefix_kv is not None:
        cache = copy.deepcopy(prefix_kv)
        cache.batch_repeat_interleave(len(rows))
        ones = torch.ones_like(batch["attention_mask"][:, :1]).expand(-1, prefix.shape[1])
        batch["input_ids"] = torch.cat([prefix.expand(len(rows), -1), batch["input_ids"]], 1)
        batch["attention_mask"] = torch.cat([ones, batch["attention_mask"]], 1)
        extra["cache"] = cache
    return batch, extra


def _generate_batch(
    model: Any,
    tokenizer: Any,
    rows: list[list[int]],
    prefix: Any,
    prefix_kv: Any,
    decoding: _Decoding,
) -> list[Generation]:
    """Answers to one batch of encoded prompts, in the batch's order, each timed from the
    batch's start (its padding included)."""
    t0 = time.perf_counter()
    batch, extra = _pad_batch(model, tokenizer, rows, prefix, prefix_kv)
    prompt_len = batch["input_ids"].shape[1]
    clock = _StepClock()
    sequences, logprobs = _decode(model, tokenizer, batch, extra, clock, decoding)
    elapsed_ms = (time.perf_counter() - t0) * 1000
    stamps = [(s - t0) * 1000 for s in clock.stamps] or [elapsed_ms]
    new = sequences[:, prompt_len:].tolist()
    answers = []
    for k, row in enumerate(new):
        n = _count_new(row, decoding.eos_ids)
        answer = Generation(
            text=tokenizer.decode(row[:n], skip_special_tokens=True).strip(),
            new_tokens=n,
            latency_ms=stamps[min(max(n, 1), len(stamps)) - 1],
            first_token_ms=stamps[0],
            amortised_ms=elapsed_ms / len(rows),
        )
        if logprobs is not None:
            answer.token_ids = row[:n]
            answer.token_logprobs = logprobs[k][:n]
        answers.append(answer)
    return answers


def _decode(
    model: Any,
    tokenizer: Any,
    batch: Any,
    extra: dict[str, Any],
    clock: _StepClock,
    decoding: _Decoding,
) -> tuple[Any, list[list[float]] | None]:
    """Greedy decoding of one padded batch: (prompt + new token ids, and with `token_scores`
    the log-probability of each new token, else None). `clock` stamps every step."""
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    prompt_len = batch["input_ids"].shape[1]
    stopping = StoppingCriteriaList(
        [clock] + ([_JsonDone(tokenizer, prompt_len)] if decoding.stop_at_json else [])
    )
    if decoding.constraint is not None:  # one matcher per row: a fresh processor per batch
        processor = decoding.constraint.processor(decoding.max_new_tokens)
        extra["logits_processor"] = LogitsProcessorList([processor])
    with_logits = {"output_logits": True, "return_dict_in_generate": True}
    with torch.inference_mode():
        out = model.generate(
            **batch,
            **extra,
            max_new_tokens=decoding.max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=stopping,
            **(with_logits if decoding.token_scores else {}),
        )
    if not decoding.token_scores:
        return out, None
    # step t's logits score the token at prompt_len + t: log p of the one chosen
    steps = torch.stack(out.logits, 1).float().log_softmax(-1)
    sequences = out.sequences
    return sequences, steps.gather(-1, sequences[:, prompt_len:, None])[..., 0].tolist()
