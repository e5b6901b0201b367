"""The routing decision, shared by `temper serve` and the route stage's replay: one function
from the self tier's label confidence to the tier that should answer, so the calibrated
figures are those of the policy that serves."""

from __future__ import annotations

from dataclasses import dataclass

from .config import SELF, RouteConfig


@dataclass(frozen=True)
class Policy:
    """Confidence bands: the self tier keeps answers at or above `self_threshold`; below it,
    the first API tier whose floor the confidence reaches answers (the last takes the rest)."""

    self_threshold: float
    bands: tuple[tuple[str, float], ...] = ()  # (tier, min_confidence), escalation order

    @classmethod
    def from_config(cls, cfg: RouteConfig, self_threshold: float | None = None) -> Policy:
        threshold = cfg.self_threshold if self_threshold is None else self_threshold
        return cls(threshold, tuple((t.name, t.min_confidence) for t in cfg.tiers))

    def pick(self, confidence: float | None) -> str:
        """The tier for an answer this confident (no confidence: as unsure as can be)."""
        c = 0.0 if confidence is None else confidence
        if c >= self.self_threshold or not self.bands:
            return SELF
        for name, floor in self.bands:
            if c >= floor:
                return name
        return self.bands[-1][0]

    def fallbacks(self, first: str) -> list[str]:
        """The API tiers to try, in order, starting at `first`: it, the tiers above it, then
        the ones below it (a cheaper tier beats no answer); the self tier comes last."""
        names = [name for name, _ in self.bands]
        if first not in names:
            return names
        i = names.index(first)
        return names[i:] + names[:i][::-1]


def decisive_confidence(confidences: dict[str, float | None], field: str | None) -> float | None:
    """The confidence the policy reads: `field`'s, or the least confident label field's
    (a label the model could not be located for counts as no confidence at all)."""
    if field is not None:
        return confidences.get(field)
    values = list(confidences.values())
    if not values or any(v is None for v in values):
        return None
    return min(v for v in values if v is not None)
