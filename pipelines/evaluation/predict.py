"""Where answers come from: the (adapted) model, the base-model baseline, the API teacher."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ..io import adapter_hash, model_hash, read_json, read_jsonl, stable_hash, write_json
from ..records.sampling import pick_few_shot
from ..task import TaskConfig
from .config import EvalError, EvaluateConfig
from .scoring import answer_fields

log = logging.getLogger(__name__)


def model_predictions(
    records: list[dict[str, Any]],
    prompts: list[list[dict[str, str]]],
    model_dir: str | Path,
    adapter: str | Path | None,
    task: TaskConfig,
    cfg: EvaluateConfig,
    desc: str,
    engine: Any = None,
) -> tuple[list[dict[str, Any]], float]:
    """Generate with the (adapted) model; returns per-example predictions and total seconds.
    `engine`: an `engines.VllmGenerator` (evaluate.engine vllm), a `BuiltinModels` (the
    built-in loop, the model kept loaded between calls), or None (the built-in loop on a
    model loaded for this call alone)."""
    from .confidence import label_confidences
    from .generation import generate

    schema = task.answer_schema() if cfg.constrained else None
    stop_at_json = cfg.stop_at_json and not task.is_text  # prose may hold braces
    t0 = time.perf_counter()
    engine = engine or BuiltinModels(cfg)
    if not isinstance(engine, BuiltinModels):
        gens, tokenizer = vllm_generations(engine, prompts, model_dir, adapter, task, cfg, desc)
    else:
        model, tokenizer, device = engine.load(model_dir, adapter)
        t0 = time.perf_counter()
        gens = generate(
            model,
            tokenizer,
            prompts,
            task.max_new_tokens,
            cfg.batch_for(device),
            stop_at_json=stop_at_json,
            progress=cfg.progress,
            desc=desc,
            schema=schema,
            token_scores=True,
        )
    seconds = time.perf_counter() - t0
    preds = []
    for r, g in zip(records, gens, strict=True):
        fields = answer_fields(task, g.text)
        conf = label_confidences(
            task, tokenizer, g.token_ids or [], g.token_logprobs or [], fields["answer"]
        )
        preds.append(
            {
                "id": r["id"],
                "output": g.text,
                "latency_ms": round(g.latency_ms, 2),
                "first_token_ms": round(g.first_token_ms, 2),
                "amortised_ms": round(g.amortised_ms, 2),
                "new_tokens": g.new_tokens,
                **fields,
                # the probability the model gave each label it answered (None: no label)
                "confidence": {k: None if v is None else round(v, 6) for k, v in conf.items()},
            }
        )
    return preds, seconds


class BuiltinModels:
    """The built-in loop's model for one evaluate run: the model that answered last stays
    loaded, so a candidate answering test and then validation is loaded once (with a large
    base on a GPU, loading is much of a small evaluation's time). One at a time: the last is
    let go before another loads, so the memory peak is one model, as before."""

    def __init__(self, cfg: EvaluateConfig) -> None:
        self.cfg = cfg
        self._key: tuple[str, str | None] | None = None
        self._loaded: tuple[Any, Any, str] | None = None

    def load(self, model_dir: str | Path, adapter: str | Path | None) -> tuple[Any, Any, str]:
        """(model, tokenizer, device) for the base at `model_dir` with `adapter` (or none)."""
        from .device import resolve
        from .generation import load_model

        key = (str(model_dir), None if adapter is None else str(adapter))
        if key != self._key:
            self.close()
            place = resolve(self.cfg.device, self.cfg.dtype)
            model, tokenizer = load_model(
                model_dir, adapter, place.dtype, self.cfg.threads, place.device
            )
            self._key, self._loaded = key, (model, tokenizer, place.device)
        assert self._loaded is not None
        return self._loaded

    def close(self) -> None:
        self._key = self._loaded = None


def open_engine(cfg: EvaluateConfig, vllm: Any, model_dir: str | Path) -> Any:
    """What generates for the run: a vLLM server (`evaluate.engine: vllm`, from the `vllm:`
    section, or the one at `evaluate.engine_url`), else the built-in loop's `BuiltinModels`."""
    if cfg.engine != "vllm":
        return BuiltinModels(cfg)
    from ..engines.vllm_generate import VllmGenerator

    log = Path(cfg.reports_dir) / "vllm.log"
    return VllmGenerator(vllm, model_dir, log, cfg.batch_size, url=cfg.engine_url)


def vllm_generations(
    engine: Any,
    prompts: list[list[dict[str, str]]],
    model_dir: str | Path,
    adapter: str | Path | None,
    task: TaskConfig,
    cfg: EvaluateConfig,
    desc: str,
) -> tuple[list[Any], Any]:
    """The answers through vLLM, and the tokenizer they were made with (the base's)."""
    from ..bundle import load_tokenizer
    from .confidence import label_tokens
    from .generation import resolve_adapter

    tokenizer = load_tokenizer(model_dir)

    def label_positions(ids: list[int], text: str) -> list[int]:
        spans = label_tokens(task, tokenizer, ids, task.parse(text))
        return sorted({j for hits in spans.values() for j in hits})

    gens = engine.generate(
        tokenizer,
        prompts,
        resolve_adapter(adapter) if adapter is not None else None,
        task.max_new_tokens,
        task.answer_schema() if cfg.constrained else None,
        label_positions,
        stop_at_json=cfg.stop_at_json and not task.is_text,
        progress=cfg.progress,
        desc=desc,
    )
    return gens, tokenizer


def cached_predictions(
    records: list[dict[str, Any]],
    prompts: list[list[dict[str, str]]],
    model_dir: str | Path,
    task: TaskConfig,
    cfg: EvaluateConfig,
    engine: Any = None,
    adapter: str | Path | None = None,
    desc: str = "baseline",
) -> tuple[list[dict[str, Any]], float, bool]:
    """`model_predictions`, reused from `cache_dir` when nothing that shapes the answers
    changed; returns (predictions, seconds, whether they came from the cache).

    DVC re-runs evaluate when any of its params changes, but most (gates, the judge, the
    bootstrap) change no answer: the base-model baseline and each candidate's answers are
    generated again only when a key part changed: the base model's file hashes, the adapter's
    (`adapter_hash`), every prompt and the generation settings. The cached run's own timing
    is reported (marked `cached` in eval.json). An adapter that is not a local folder (a
    `models:/` URI) is not cached.
    """
    from ..model_source import load_options
    from .device import resolve

    path = None
    local = adapter is None or Path(adapter).is_dir()
    if cfg.cache_dir and local and (Path(model_dir) / "temper_source.json").exists():
        place = resolve(cfg.device, cfg.dtype)
        key_fields = {
            "model": model_hash(model_dir),
            "prompts": prompts,
            "ids": [r["id"] for r in records],
            "max_new_tokens": task.max_new_tokens,
            "dtype": place.dtype,  # resolved: `auto` on the CPU hits the float32 entries
            "batch_size": cfg.batch_for(place.device),
            "stop_at_json": cfg.stop_at_json,
            "prompt_hash": task.prompt_hash,
            "format": 3,  # 2: per-request latency; 3: label confidences
        }
        # Added only when they differ from what every earlier entry was made with (CPU, the
        # default attention, the base model alone), so those entries stay valid.
        if place.device != "cpu":
            key_fields["device"] = place.device
        if cfg.constrained:  # only when on, so unconstrained keys stay what they were
            key_fields["constrained"] = True
        if engine is not None and not isinstance(engine, BuiltinModels):
            # likewise: the built-in engine's keys stay what they were
            key_fields["engine"] = {"vllm": engine.cfg.model_dump(include={"dtype"})}
        if adapter is not None:
            key_fields["adapter"] = adapter_hash(adapter)
        key_fields.update(load_options(model_dir))
        key = stable_hash(key_fields)
        kind = "baseline" if adapter is None else "answers"
        path = Path(cfg.cache_dir) / f"{kind}-{key}.json"
        if path.exists():
            hit = read_json(path)
            log.info("%s: reusing %s (same model, adapter, prompts and settings)", desc, path)
            return hit["preds"], hit["seconds"], True
    preds, seconds = model_predictions(
        records, prompts, model_dir, adapter, task, cfg, desc, engine
    )
    if path is not None:
        write_json(path, {"preds": preds, "seconds": seconds})
    return preds, seconds, False


def api_predictions(
    records: list[dict[str, Any]], path: Path, task: TaskConfig
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The API teacher's answers, aligned to the test records; a missing one is wrong."""
    rows = {}
    for lineno, row in enumerate(read_jsonl(path), 1):
        if "id" not in row:
            raise EvalError(f"{path}:{lineno}: missing field 'id'")
        rows[str(row["id"])] = row
    preds, missing = [], 0
    for r in records:
        row = rows.get(str(r["id"]))
        if row is None:
            missing += 1
            row = {"output": None, "error": "no teacher answer in baseline file"}
        # Each API answer is one request: its latency is its own; nothing is amortised.
        preds.append(
            {
                "id": r["id"],
                "output": row.get("output"),
                "latency_ms": row.get("latency_ms"),
                "amortised_ms": None,
                "new_tokens": row.get("output_tokens"),
                "usd": row.get("usd") or 0.0,
                "input_tokens": row.get("input_tokens") or 0,
                **answer_fields(task, row.get("output")),
            }
        )
    if missing:
        log.warning(
            "%s: %d of %d test ids have no teacher answer (scored as wrong)",
            path,
            missing,
            len(records),
        )
    return preds, {"missing": missing}


def baseline_prompts(
    records: list[dict[str, Any]], task: TaskConfig, cfg: EvaluateConfig
) -> tuple[list[list[dict[str, str]]], list[str]]:
    """The teacher's prompt (label list + few-shot turns) for the base-model baseline."""
    shots: list[dict[str, Any]] = []
    if cfg.baseline_few_shot:
        path = Path(cfg.few_shot_from)
        if not path.exists():
            raise EvalError(f"{path}: few-shot source not found (evaluate.few_shot_from)")
        shots = pick_few_shot(task, read_jsonl(path), cfg.baseline_few_shot, cfg.few_shot_seed)
    return [task.teacher_messages(shots, r["text"]) for r in records], [s["id"] for s in shots]
