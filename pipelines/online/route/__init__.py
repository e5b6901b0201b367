"""Routing: the self-hosted model answers first; what it is unsure of goes to API tiers.

config (the `route:` section: tiers, the self threshold, calibration targets) -> policy (one
function from the self tier's label confidence to a tier, shared with the route stage's
replay) -> tiers (one API tier: the teacher's question, daily caps, deadline, breaker) ->
router (the walk: self, the chosen tier, the next ones, the self answer as last resort).
`temper serve` uses it when `route.enabled` is true (docs/route.md).
"""

from .config import SELF, CalibrationConfig, RouteConfig, TierConfig
from .policy import Policy, decisive_confidence
from .router import NoTierAnswered, Routed, Router, RouteRefused, SelfAnswer
from .tiers import ApiTier, TierAnswer, TierFailure

__all__ = [
    "SELF",
    "ApiTier",
    "CalibrationConfig",
    "NoTierAnswered",
    "Policy",
    "RouteConfig",
    "RouteRefused",
    "Routed",
    "Router",
    "SelfAnswer",
    "TierAnswer",
    "TierConfig",
    "TierFailure",
    "decisive_confidence",
]
