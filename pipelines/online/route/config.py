"""`route:` in params.yaml: the tiers behind the self-hosted model, and how sure it must be."""

from __future__ import annotations

from pydantic import Field, model_validator

from ...config import ConfigError, Section
from ...providers import ProviderConfig

SELF = "self"


class TierConfig(Section):
    """One API tier (mid-tier, frontier): a provider of the provider layer, with its band and
    its daily caps."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$", description="Tier name (not `self`).")
    provider: ProviderConfig = Field(
        default_factory=ProviderConfig,
        description="openai / anthropic (any compatible base_url), with its cache, retries and "
        "privacy guard; `gold` only in the offline route stage (the oracle).",
    )
    min_confidence: float = Field(
        0.0,
        ge=0,
        le=1,
        description="A deferred answer goes to the first API tier whose min_confidence the "
        "self tier's confidence reaches (the last tier: 0, it takes the rest).",
    )
    timeout_s: float = Field(
        20.0, gt=0, description="Longest wait for this tier, retries included; then the next."
    )
    daily_usd: float | None = Field(
        None, ge=0, description="Spend cap per UTC day (null: provider.max_usd per day)."
    )
    daily_requests: int | None = Field(
        None, ge=0, description="Request cap per UTC day (null: provider.max_requests)."
    )
    down_after: int = Field(
        3, gt=0, description="Consecutive failures after which the tier is skipped a while."
    )
    cooldown_s: float = Field(30.0, ge=0, description="How long a failing tier is skipped.")
    price_as: str | None = Field(
        None,
        description="The price-table model the route stage charges this tier's answers at "
        "(the gold oracle has no price of its own); null: provider.model.",
    )


class CalibrationConfig(Section):
    """How the route stage fits the self tier's threshold on the validation split."""

    target: str = Field(
        "accuracy",
        pattern=r"^(accuracy|self_share)$",
        description="accuracy: the lowest threshold whose kept answers' one-sided 95% "
        "Clopper-Pearson lower bound reaches target_accuracy; self_share: the threshold "
        "that keeps target_self_share of the traffic on the self tier.",
    )
    target_accuracy: float = Field(0.9, gt=0, lt=1, description="For target=accuracy.")
    target_self_share: float = Field(0.7, gt=0, le=1, description="For target=self_share.")
    confidence: float = Field(
        0.95, gt=0, lt=1, description="Of the one-sided lower bound and the intervals."
    )
    eval: str = Field("metrics/eval.json", description="The evaluation (its winner is routed).")
    predictions_dir: str = Field(
        "reports/predictions",
        description="<winner>.jsonl (test) and validation/<winner>.jsonl (fit) from evaluate.",
    )
    prices: str = Field("configs/prices.yaml", description="The dated price table.")
    reports_dir: str = Field("reports", description="route.json, route.md, route_curve.png.")
    n_resamples: int = Field(2000, gt=0, description="Bootstrap resamples of the intervals.")
    seed: int = 0


class RouteConfig(Section):
    """`route:` in params.yaml: read by `temper serve` (when enabled) and the route stage."""

    enabled: bool = Field(False, description="temper serve routes through these tiers.")
    tiers: list[TierConfig] = Field(
        default_factory=list, description="API tiers in escalation order (mid, then frontier)."
    )
    self_threshold: float = Field(
        0.9,
        ge=0,
        le=1,
        description="The self tier keeps answers at least this confident (the route stage "
        "fits it; serve uses the value in effect).",
    )
    registered_threshold: bool = Field(
        True,
        description="serve: a version registered with a route policy (serving/route.json, "
        "fitted by the route stage) is routed by its threshold instead of self_threshold.",
    )
    field: str | None = Field(
        None,
        description="The label field whose confidence decides (null: the least confident "
        "label field of the answer).",
    )
    allow_external: bool = Field(
        True, description="API tiers may answer at all (a request can only narrow this)."
    )
    self_usd_per_hour: float = Field(
        0.10, ge=0, description="The serving machine, for the self tier's cost per answer."
    )
    calibrate: CalibrationConfig = Field(default_factory=CalibrationConfig)

    @model_validator(mode="after")
    def _tiers(self) -> RouteConfig:
        names = [t.name for t in self.tiers]
        if SELF in names or len(set(names)) != len(names):
            raise ValueError(f"route.tiers: names must be unique and not {SELF!r}: {names}")
        bands = [t.min_confidence for t in self.tiers]
        if bands != sorted(bands, reverse=True):
            raise ValueError(
                "route.tiers: min_confidence must not increase along the escalation order "
                f"(got {bands}): a less confident answer goes further up"
            )
        return self

    def api_tiers(self) -> list[TierConfig]:
        """The tiers serve can call (refuses the offline-only gold oracle)."""
        for tier in self.tiers:
            if tier.provider.kind == "gold":
                raise ConfigError(
                    f"route.tiers.{tier.name}: provider kind gold answers from gold labels, "
                    "which exist only offline (the route stage); use openai or anthropic"
                )
        return self.tiers
