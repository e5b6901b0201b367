"""The root of `params.yaml`: one typed model whose sections are the stages' configs.

litgpt's rule: the YAML mirrors the typed config of the code that reads it. Here the root
model lists every section (each the config class that lives beside its code) plus `task`,
so one validation checks the whole file with errors that name the field and where its
value came from (`train.rank (-S train.rank=x): ...`), and `temper config`, every
`--help`, the profiles and `tests/test_config.py` all read the same model.

This module imports every stage's config, so no stage imports it (a stage gets its own
section and the `Tracking` the CLI builds): it sits beside the CLI, above the stages.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, ValidationError

from .config import DEFAULT_PARAMS, Params, Section, invalid, load_params
from .engines.vllm_server import VllmConfig
from .evaluation.config import EvaluateConfig
from .evaluation.gates import GatesConfig
from .evaluation.judge import JudgeConfig
from .online.cache.config import CacheConfig
from .online.monitor.config import MonitorConfig
from .online.route.config import RouteConfig
from .online.serve.config import ServeConfig
from .release.promote import PromoteConfig
from .stages.base_model import ModelConfig
from .stages.cache_eval import CacheEvalConfig
from .stages.cost import CostConfig
from .stages.distil import DistilConfig
from .stages.prepare import PrepareConfig
from .stages.register import RegisterConfig
from .task import TaskConfig, load_task
from .tracking import MlflowConfig, Tracking
from .training.config import TrainConfig

DEFAULT_TASK = "configs/tasks/clause_review.yaml"


# pydantic warns that the field `register` shadows `BaseModel.register` (ABCMeta's class
# method): on an instance the field wins, and params.yaml's section is called `register`.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class TemperParams(Section):
    """All of `params.yaml`, defaults filled in; unknown keys are errors."""

    task: str = Field(DEFAULT_TASK, description="The task file: fields, prompt, labels.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    distil: DistilConfig = Field(default_factory=DistilConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    register: RegisterConfig = Field(default_factory=RegisterConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    cache_eval: CacheEvalConfig = Field(default_factory=CacheEvalConfig)
    route: RouteConfig = Field(default_factory=RouteConfig)
    cost: CostConfig = Field(default_factory=CostConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    vllm: VllmConfig = Field(default_factory=VllmConfig)

    # The values as resolved (file + `-S`), before defaults: what MLflow logs and what the
    # pipeline run's key hashes, and where each value came from (for messages and help).
    _raw: Params = PrivateAttr(default_factory=lambda: Params({}, str(DEFAULT_PARAMS), []))

    @classmethod
    def of(cls, values: Params | dict[str, Any]) -> TemperParams:
        """Validate resolved values; an error names every bad field and its origin."""
        if not isinstance(values, Params):
            values = Params(values, str(DEFAULT_PARAMS), [])
        try:
            out = cls.model_validate(values)
        except ValidationError as err:
            raise invalid(err, cls, values) from None
        out._raw = values
        return out

    @classmethod
    def load(
        cls, path: str | os.PathLike[str] = DEFAULT_PARAMS, overrides: list[str] | None = None
    ) -> TemperParams:
        """`params.yaml` (or `path`) with the `-S` overrides applied in order, validated."""
        return cls.of(load_params(path, overrides))

    @property
    def raw(self) -> Params:
        return self._raw

    def load_task(self) -> TaskConfig:
        return load_task(self.task)

    def tracking(self) -> Tracking:
        return Tracking(self.mlflow, self._raw)

    @property
    def base_dir(self) -> Path:
        """The base model's folder (`model.dir`)."""
        return Path(self.model.dir)


def config_sections() -> dict[str, type[Section]]:
    """Every section's name and config class (`task` is a plain value)."""
    return {
        name: field.annotation
        for name, field in TemperParams.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, Section)
    }
