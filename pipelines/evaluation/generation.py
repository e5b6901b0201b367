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

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..chat import render, supports_system
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
        raise FileNotFoundError(f"{path}: not a PEFT adapter folder (no adapter_config.json)")
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
    import copy

    import torch
    from tqdm.auto import tqdm
    from transformers import LogitsProcessorList, StoppingCriteriaList

    system_ok = supports_system(tokenizer)
    texts = [
        render(tokenizer, p, system_ok, tokenize=False, add_generation_prompt=True) for p in prompts
    ]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    n_prefix = common_prefix_len(encoded) if prefix_cache and len(encoded) > 1 else 0
    prefix_kv = None
    if n_prefix:
        prefix = torch.tensor([encoded[0][:n_prefix]], device=model.device)
        with torch.inference_mode():
            prefix_kv = model(input_ids=prefix, use_cache=True).cache
        encoded = [row[n_prefix:] for row in encoded]
    order = sorted(range(len(texts)), key=lambda i: (-len(encoded[i]), i))
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    results: list[Generation | None] = [None] * len(texts)
    constraint = None
    if schema is not None:
        from .constrained import json_logits_processor

        constraint = json_logits_processor(schema, tokenizer)
    bar = tqdm(total=len(texts), desc=desc, unit="ex", disable=not progress)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        t0 = time.perf_counter()
        batch = tokenizer.pad(
            {"input_ids": [encoded[i] for i in idx]}, return_tensors="pt", padding=True
        ).to(model.device)
        extra: dict[str, Any] = {}
        if prefix_kv is not None:
            cache = copy.deepcopy(prefix_kv)
            cache.batch_repeat_interleave(len(idx))
            ones = torch.ones_like(batch["attention_mask"][:, :1]).expand(-1, n_prefix)
            batch["input_ids"] = torch.cat([prefix.expand(len(idx), -1), batch["input_ids"]], 1)
            batch["attention_mask"] = torch.cat([ones, batch["attention_mask"]], 1)
            extra["cache"] = cache
        prompt_len = batch["input_ids"].shape[1]
        clock = _StepClock()
        stopping = StoppingCriteriaList(
            [clock] + ([_JsonDone(tokenizer, prompt_len)] if stop_at_json else [])
        )
        if constraint is not None:  # one matcher per row: a fresh processor per batch
            extra["logits_processor"] = LogitsProcessorList([constraint.processor(max_new_tokens)])
        with torch.inference_mode():
            out = model.generate(
                **batch,
                **extra,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                stopping_criteria=stopping,
                **(
                    {"output_logits": True, "return_dict_in_generate": True} if token_scores else {}
                ),
            )
        logprobs = None
        if token_scores:
            # step t's logits score the token at prompt_len + t: log p of the one chosen
            steps = torch.stack(out.logits, 1).float().log_softmax(-1)
            out = out.sequences
            logprobs = steps.gather(-1, out[:, prompt_len:, None])[..., 0].tolist()
        elapsed_ms = (time.perf_counter() - t0) * 1000
        stamps = [(s - t0) * 1000 for s in clock.stamps] or [elapsed_ms]
        new = out[:, prompt_len:].tolist()
        for k, (i, row) in enumerate(zip(idx, new, strict=True)):
            n = _count_new(row, eos_ids)
            results[i] = Generation(
                text=tokenizer.decode(row[:n], skip_special_tokens=True).strip(),
                new_tokens=n,
                latency_ms=stamps[min(max(n, 1), len(stamps)) - 1],
                first_token_ms=stamps[0],
                amortised_ms=elapsed_ms / len(idx),
            )
            if logprobs is not None:
                results[i].token_ids = row[:n]
                results[i].token_logprobs = logprobs[k][:n]
        bar.update(len(idx))
    bar.close()
    return [r for r in results if r is not None]
