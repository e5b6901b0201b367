"""Near-duplicate search: MinHash over word 3-grams, LSH banding, verified by exact Jaccard.

The MinHash is datasketch's (SHA-1 of each shingle, its "affine32" permutations seeded 1, the
band layout of its `MinHashLSH`), computed for many records at once with numpy instead of one
`MinHash` object per record, so the candidates, and therefore the pairs found, are the ones
datasketch finds (tests compare the signatures bit for bit).

Two things keep it bounded on large inputs:
- each record keeps only its shingles' 64-bit hashes (an array), not a set of strings;
  exact Jaccard is computed on those (equal to the string-set Jaccard unless two distinct
  shingles share a 64-bit hash);
- boilerplate that many records share (one clause with a different name or number each time)
  puts thousands of records in one LSH bucket. At most `max_candidates` earlier records are
  verified per record, those sharing the most bands first; records whose search was cut are
  counted (`capped`), never hidden.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_TOKEN = re.compile(r"[^\W_]+")
_MAX32 = np.uint32(0xFFFFFFFF)
# MurmurHash3's 32-bit finalizer, as datasketch pre-mixes every input hash.
_FMIX32 = (
    np.uint32(16),
    np.uint32(0x85EBCA6B),
    np.uint32(13),
    np.uint32(0xC2B2AE35),
    np.uint32(16),
)


def dedup_key(text: str) -> str:
    """Exact-duplicate key: lower-cased alphanumeric tokens (case, punctuation don't count)."""
    return " ".join(_TOKEN.findall(text.casefold()))


def shingles(text: str, n: int = 3) -> set[str]:
    """Word n-grams of the de-duplication key (the whole key when it has fewer words)."""
    words = dedup_key(text).split()
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def shingle_hashes(text: str) -> np.ndarray:
    """64-bit hashes of a text's distinct shingles (`shingles`, unordered): the first 8 bytes
    of each one's SHA-1, little-endian, so the low 32 bits are datasketch's `sha1_hash32`."""
    # The same shingles as `shingles`, built as UTF-8 bytes directly (twice as fast).
    words = dedup_key(text).encode().split(b" ")
    if len(words) < 3:
        grams = {b" ".join(words)} if words[0] else set()
    else:
        grams = set(map(b" ".join, zip(words, words[1:], words[2:], strict=False)))
    sha1 = hashlib.sha1
    return np.frombuffer(b"".join([sha1(g).digest()[:8] for g in grams]), dtype="<u8")


def _permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 permutations h -> a*h + b mod 2^32 for seed 1 (`a` odd)."""
    gen = np.random.RandomState(1)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def signatures(hashes: Sequence[np.ndarray], num_perm: int, chunk: int = 200_000) -> np.ndarray:
    """MinHash signatures, one row per record (uint32; an empty set gets all 0xFFFFFFFF)."""
    a, b = _permutations(num_perm)
    s1, m1, s2, m2, s3 = _FMIX32
    out = np.full((len(hashes), num_perm), _MAX32, dtype=np.uint32)
    start = 0
    with np.errstate(over="ignore"):  # uint32 wraparound is the modulo 2^32 the scheme wants
        while start < len(hashes):
            # Records in batches of about `chunk` shingles: one (shingles x num_perm) matrix.
            stop, total = start, 0
            while stop < len(hashes) and (total == 0 or total + len(hashes[stop]) <= chunk):
                total += len(hashes[stop])
                stop += 1
            block = hashes[start:stop]
            sizes = np.fromiter((len(h) for h in block), dtype=np.int64, count=len(block))
            if total:
                hv = (np.concatenate(block) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
                hv ^= hv >> s1
                hv *= m1
                hv ^= hv >> s2
                hv *= m2
                hv ^= hv >> s3
                permuted = hv[:, None] * a
                permuted += b
                nonempty = np.flatnonzero(sizes)
                offsets = np.concatenate(([0], np.cumsum(sizes)[:-1]))[nonempty]
                out[start + nonempty] = np.minimum.reduceat(permuted, offsets, axis=0)
            start = stop
    return out


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH picks for this threshold."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


@dataclass
class NearDuplicates:
    """Pairs (earlier index, later index, Jaccard) and what the search checked."""

    pairs: list[tuple[int, int, float]]
    checked: int  # candidate pairs whose Jaccard was computed
    capped: int  # records that had more than max_candidates candidates


def find_near_duplicates(
    texts: Sequence[str], threshold: float = 0.8, num_perm: int = 64, max_candidates: int = 100
) -> NearDuplicates:
    """Index pairs whose word-3-gram Jaccard is >= threshold."""
    hashes = [shingle_hashes(t) for t in texts]
    sig = signatures(hashes, num_perm)
    # LSH is probabilistic: bucket at a lower threshold for recall, then keep only the pairs
    # whose exact Jaccard reaches `threshold` (precision).
    bands, rows = lsh_bands(max(0.05, threshold - 0.2), num_perm)
    n = len(texts)
    empty = np.fromiter((len(h) == 0 for h in hashes), dtype=bool, count=n)
    # For every band: records sorted by (bucket, index), and each one's bucket start in that
    # order, so the earlier records of its bucket are a slice just before it.
    order, rank, start = [], [], []
    shared = np.zeros(n, dtype=bool)
    for band in range(bands):
        key = np.ascontiguousarray(sig[:, band * rows : (band + 1) * rows]).view(
            np.dtype((np.void, 4 * rows))
        )[:, 0]
        _, bucket = np.unique(key, return_inverse=True)
        bucket = np.where(empty, -1 - np.arange(n), bucket)  # empty sets never pair
        o = np.argsort(bucket, kind="stable")
        sorted_bucket = bucket[o]
        first = np.flatnonzero(np.r_[True, sorted_bucket[1:] != sorted_bucket[:-1]])
        starts = np.repeat(first, np.diff(np.r_[first, n]))
        r = np.empty(n, dtype=np.int64)
        r[o] = np.arange(n)
        s = np.empty(n, dtype=np.int64)
        s[o] = starts
        order.append(o)
        rank.append(r)
        start.append(s)
        shared |= r > s  # has an earlier record in this band's bucket
    pairs: list[tuple[int, int, float]] = []
    checked = capped = 0
    for i in np.flatnonzero(shared).tolist():
        windows = []
        over = False
        for o, r, s in zip(order, rank, start, strict=True):
            lo, hi = s[i], r[i]
            if hi - lo > max_candidates:
                lo, over = hi - max_candidates, True  # the most recent ones of a huge bucket
            if hi > lo:
                windows.append(o[lo:hi])
        cands, hits = np.unique(np.concatenate(windows), return_counts=True)
        if over or len(cands) > max_candidates:
            capped += 1
            # Most shared bands first (most likely similar), then the most recent.
            keep = np.lexsort((-cands, -hits))[:max_candidates]
            cands = cands[keep]
        mine = hashes[i]
        others = [hashes[j] for j in cands.tolist()]
        sizes = np.array([len(h) for h in others])
        inside = np.isin(np.concatenate(others), mine)
        owner = np.repeat(np.arange(len(others)), sizes)
        inter = np.bincount(owner, weights=inside, minlength=len(others))
        jaccard = inter / (sizes + len(mine) - inter)
        checked += len(others)
        for j, jac in zip(cands.tolist(), jaccard.tolist(), strict=True):
            if jac >= threshold:
                pairs.append((j, i, round(jac, 4)))
    return NearDuplicates(sorted(pairs), checked, capped)


def near_duplicate_pairs(
    texts: Sequence[str], threshold: float = 0.8, num_perm: int = 64
) -> list[tuple[int, int, float]]:
    """Index pairs whose word-3-gram Jaccard is >= threshold (MinHash LSH, then verified)."""
    return find_near_duplicates(texts, threshold, num_perm).pairs
