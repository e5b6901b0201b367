"""`evaluate:` in params.yaml, beside the evaluation code that reads it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..config import Section
from ..errors import TemperError


class EvaluateConfig(Section):
    """`evaluate:` in params.yaml."""

    test: str = Field("data/prepared/test.jsonl", description="Prepared test split.")
    validation: str | None = Field(
        "data/prepared/validation.jsonl",
        description="Prepared validation split: every candidate is scored on it too and the "
        "winner is the best there on primary_metric (ties: first name), then gated and "
        "reported on test. null: pick on test (optimistic; the report warns).",
    )
    candidates_dir: str = Field("models/candidates", description="Folder of <name>/adapter/.")
    candidates: list[str] | None = Field(None, description="Candidates to score (null: all).")
    adapter: str | None = Field(
        None,
        description="Ad hoc (`temper evaluate --adapter`): one adapter folder or MLflow URI "
        "(models:/name@alias, runs:/id/adapter) scored instead of the candidates.",
    )
    baseline: Literal["auto", "api", "base_model", "none"] = Field(
        "auto",
        description="auto: the API teacher's answers when baseline_file exists, else "
        "the base model prompted like the teacher; api; base_model; none.",
    )
    baseline_file: str = Field(
        "data/distilled/baseline_test.jsonl",
        description="The API teacher's answers on the test split.",
    )
    baseline_few_shot: int = Field(
        3,
        ge=0,
        description="Few-shot turns of the base-model "
        "baseline (train examples, chosen as distil does).",
    )
    few_shot_from: str = Field("data/prepared/train.jsonl", description="Source of few-shots.")
    few_shot_seed: str = Field("temper-fewshot-v1", description="Salt of the few-shot choice.")
    max_examples: int | None = Field(
        None, gt=0, description="Score a stratified sample of this many test examples (null: all)."
    )
    engine: Literal["builtin", "vllm"] = Field(
        "builtin",
        description="What generates the model answers: builtin (model.generate, batched) or "
        "vllm (a vLLM server started from the `vllm:` section, the engine `temper serve "
        "--engine vllm` serves with; batch_size is then its concurrency).",
    )
    engine_url: str | None = Field(
        None,
        description="engine vllm: a running vLLM server of the same base model to use instead "
        "of starting one (as serve.engine_url; its key, if any, from VLLM_API_KEY).",
    )
    batch_size: int = Field(16, gt=0, description="Generation batch size on the CPU.")
    gpu_batch_size: int | None = Field(
        64,
        gt=0,
        description="Generation batch size when the model runs on a GPU (null: batch_size); "
        "one params.yaml then suits a 2-core CPU and a GPU box alike.",
    )
    threads: int | None = Field(None, gt=0, description="torch CPU threads (null: torch default).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: the GPU when torch sees one, else the CPU."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Inference dtype. auto: bfloat16 on a GPU that runs it natively, float16 "
        "on other GPUs, float32 on the CPU.",
    )
    stop_at_json: bool = Field(True, description="Stop a row once its JSON answer is complete.")
    constrained: bool = Field(
        True,
        description="Constrain the models' answers to the task's JSON schema while decoding "
        "(llguidance): every answer is then schema-valid, each label one of its labels. "
        "Off: the model writes freely (schema_valid_rate shows how often it strays).",
    )
    classical_train: str | None = Field(
        "data/distilled/train.jsonl",
        description="Training records of the classical yardstick (TF-IDF + logistic "
        "regression per label field): the distilled records the candidates were trained on. "
        "null: no yardstick.",
    )
    primary_metric: str = Field("clause_type.accuracy", description="Picks the winner.")
    n_resamples: int = Field(2000, gt=99, description="Bootstrap resamples.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Interval level.")
    seed: int = Field(0, description="Bootstrap seed.")
    hardware_usd_per_hour: float = Field(
        0.10, ge=0, description="Price of the serving machine per hour (cost per 1k examples)."
    )
    cache_dir: str | None = Field(
        ".cache/eval",
        description="Reuse the base-model baseline's and each candidate's answers across runs "
        "when model, adapter, prompts and generation settings are unchanged (a change of gates, "
        "judge or bootstrap regenerates nothing; null: always regenerate).",
    )
    metrics: str = Field("metrics/eval.json", description="The metrics file (DVC metrics).")
    reports_dir: str = Field("reports", description="Report, predictions and plots.")
    worst_examples: int = Field(10, ge=0, description="Wrong answers listed in the report.")
    log_mlflow: bool = Field(True, description="Log to MLflow child runs.")
    progress: bool = Field(True, description="Progress bars.")

    def batch_for(self, device: str) -> int:
        """The generation batch size on a resolved device ("cpu" or "cuda")."""
        if device == "cuda" and self.gpu_batch_size:
            return self.gpu_batch_size
        return self.batch_size


class EvalError(TemperError, ValueError):
    """Bad evaluation input; the message names the file, line and field."""
