"""The semantic cache in front of the router: exact and similarity layers (docs/cache.md).

`SemanticCache.get(text, version) -> Hit | None` and `.put(text, version, answer)`, keyed by
`version_key(model version, task version, prompt hash)`; `CacheConfig` is `cache:` in
params.yaml. `reports/cache.md` (the `cache_eval` stage) measures its wrong hits.
"""

from .config import CacheConfig
from .embedder import Embedder, FixedEmbedder, SentenceEmbedder, normalise, text_key
from .store import Hit, SemanticCache, version_key

__all__ = [
    "CacheConfig",
    "Embedder",
    "FixedEmbedder",
    "Hit",
    "SemanticCache",
    "SentenceEmbedder",
    "normalise",
    "text_key",
    "version_key",
]
