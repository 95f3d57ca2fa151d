"""Text keys shared by the data phases: normalization, word n-gram hashes, and MinHash
near-duplicate search.

normalize() folds what does not change meaning and nothing else: Unicode NFKC (full-width
letters, ligatures, non-breaking spaces), case (str.casefold), and whitespace (every run
becomes one space, ends stripped; in scripts written without spaces, such as Chinese,
Japanese and Thai, each character is a word). Symbols, punctuation and digits stay, so "x = a + b" and
"x = a - b" differ, and so do "-5" and "5".

Near-duplicates: MinHash signatures in datasketch's "affine32" scheme, the default of
datasketch 2.0 (each 32-bit shingle hash pre-mixed with the MurmurHash3 finalizer, then
`a * h + b mod 2^32` per permutation, with the permutations of `datasketch.MinHash(num_perm,
seed)`), computed for a whole block of texts in a few numpy operations instead of one
`MinHash.update_batch` call per text (35 us a text with datasketch's objects, under 5 us
here). Candidates come from LSH banding with the (bands, rows) that `datasketch.MinHashLSH`
picks for the threshold, weighted towards recall. The permutations and the (bands, rows) are
derived here as datasketch derives them, since importing it imports scipy (0.3 s);
tests/test_split.py checks that signatures, parameters and candidates are datasketch's.
Candidates whose MinHash estimate is near the threshold are then measured exactly on their
n-gram sets, and a pair is a near-duplicate when its Jaccard
similarity reaches the threshold (exact, so the grouping and the leakage check agree).
"""

from __future__ import annotations

import re
import unicodedata
from array import array
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from itertools import chain, repeat
from typing import Callable, Iterator

import numpy as np
import xxhash

NUM_PERM = 64
"""Permutations per signature: an estimated Jaccard of 0.8 has a standard error of 0.05."""

MINHASH_SEED = 1
LSH_WEIGHTS = (0.01, 0.99)
"""datasketch's (false positive, false negative) weights: candidates favour recall; the
Jaccard estimate of each candidate pair decides. At the default threshold 0.8 datasketch then
picks 12 bands of 5 rows: a pair at exactly 0.8 is a candidate with probability 0.991 (0.88
with the 9 bands of 7 rows of weights (0.1, 0.9)), at 0.85 0.999; a pair at 0.5 is one with
probability 0.32, and its signature estimate drops it before any exact measurement."""

THREADS = 2
"""Threads for the near-duplicate search's large numpy steps (sorts and filters let go of the
GIL): the pool's worker processes are idle then, so this uses the second core."""

SMALL_BUCKET = 32
"""LSH buckets up to this size are searched along the sorted band column, a distance at a time."""

RARE_NGRAM_ROWS = 32
"""Texts of LSH buckets above MAX_ALL_PAIRS_BUCKET that share an n-gram found in at most this
many of them are candidates too (near_duplicate_pairs)."""

MAX_ALL_PAIRS_BUCKET = 2048
"""An LSH bucket up to this size yields all its pairs (above SMALL_BUCKET, the buckets of one
size at a time): a question and its many small variants share buckets of hundreds, and only
all pairs link every variant that is a near-duplicate of some other. A larger bucket (a
template repeated thousands of times) yields each member with the bucket's first member and
with its neighbour."""

_U64 = np.uint64
_BASE = 0x100000001B3  # odd, so invertible modulo 2^64
_MIX = [_U64(c) for c in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5,
                          0x85EBCA77C2B2AE63, 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB,
                          0xBF58476D1CE4E5B9, 0xD6E8FEB86659FD93)]


_UNSPACED = re.compile("[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff"
                       "\uf900-\ufaff\U00020000-\U0002fa1f]+")
"""Runs of scripts written without spaces between words (Thai, Lao, Myanmar, Khmer, Japanese
kana, CJK ideographs). Each character of a run is made a word: word n-grams are then character
n-grams there, as near-duplicate and contamination searches need (a whole Chinese sentence
was one word, so two that differ in one character shared no n-gram)."""


def space_out(text: str) -> str:
    """`text` with a space around each character of a run of an unspaced script."""
    # a run at a time: 25 us for a 200-character Chinese text, against 160 with a substitution per character
    return _UNSPACED.sub(lambda run: f" {' '.join(run.group())} ", text)


def normalize(text: str) -> str:
    """NFKC, case folded, whitespace runs as one space, a character of an unspaced script as
    a word (see the module docstring)."""
    if text.isascii():
        return " ".join(text.lower().split())
    return " ".join(space_out(unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())).split())


_ASCII_FOLD = bytes(c + 32 if 65 <= c <= 90 else 32 if c in (9, 10, 11, 12, 13, 28, 29, 30, 31) else c
                    for c in range(256))
"""ASCII upper case to lower, and str.split()'s ASCII whitespace to a space."""

_OTHER_SPACES = re.compile("[\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")
"""Every character above ASCII that str.split() splits on (tests/test_split.py checks the set)."""


def normalize_batch(texts: list[str]) -> list[bytes]:
    """[normalize(t).encode() for t in texts], computed together: a text that is not ASCII
    is lower-cased when its other characters are plain (_plain_text), else gets NFKC, case
    folding and its other whitespace made a space; then all are joined and lower-cased, their
    whitespace runs collapsed and their ends stripped in a few passes over the joined bytes
    (no per-word Python objects; tests/test_split.py checks the equality)."""
    if not texts:
        return []
    # every text ends with a NUL, the last one too. A text above ASCII is folded and stands in
    # the join as its UTF-8 bytes read as Latin-1: every piece is then a one-byte-per-character
    # string, and the joined string's Latin-1 encoding is the UTF-8 of all (no copy per text)
    pieces = [*texts, ""]
    wide = [i for i, t in enumerate(texts) if not t.isascii()]  # O(1) per text in CPython: a flag of the string
    if wide:
        plain = _plain_text()
        lowered = [i for i in wide if plain(texts[i])]
        for i in set(wide).difference(lowered):
            pieces[i] = _fold_unicode(texts[i]).encode().decode("latin-1")
        # the plain ones lower-cased together: lower() is per character for them (no Σ)
        together = "\x00".join([texts[i] for i in lowered]).lower().encode().decode("latin-1").split("\x00")
        if len(together) != len(lowered):  # a text holds a NUL itself
            return [normalize(t).encode() for t in texts]
        for i, piece in zip(lowered, together):
            pieces[i] = piece
    joined = "\x00".join(pieces).encode("latin-1")
    data = np.frombuffer(joined.translate(_ASCII_FOLD), np.uint8)  # lower case, every whitespace a space
    end = data == 0
    if np.count_nonzero(end) != len(texts):  # a text holds a NUL itself
        return [normalize(t).encode() for t in texts]
    # a space goes when the byte before it is a space or a text's end (or it opens the data):
    # runs keep their first space and texts lose their leading ones; a trailing one is left,
    # and dropped after
    space = data == 32
    keep = np.empty(data.size, bool)
    keep[0] = not space[0]
    np.logical_not(space[1:] & (space[:-1] | end[:-1]), out=keep[1:])
    data = data[keep]
    trailing = np.flatnonzero((data[:-1] == 32) & (data[1:] == 0))  # a run's space kept at a text's end
    if trailing.size:
        data = np.delete(data, trailing)
    return data.tobytes().split(b"\x00")[:-1]


@lru_cache(maxsize=None)
def _plain_text() -> Callable[[str], bool]:
    """A test of whether a text's characters above ASCII are all plain: NFKC leaves each alone
    in any context (it is NFKC itself, of combining class 0, never the second of a canonical
    composition, no Hangul jamo), its case folding is its lower case and one plain character
    too, and it is neither whitespace nor of an unspaced script: é, ñ, ’, “, –, °, most Greek
    and Cyrillic, emoji. Such a text normalizes to text.lower() with its whitespace collapsed,
    with no NFKC and no regular expression per text (30 us for a 1,000-character text, about 5
    here). Σ is left out: lower() writes it as a final ς by context."""
    seconds = {int(parts[1], 16) for c in range(0x10000)  # every canonical composition's second is in the BMP
               if (parts := unicodedata.decomposition(chr(c)).split()) and len(parts) == 2 and not parts[0].startswith("<")}

    def plain(ch: str) -> bool:
        return (unicodedata.normalize("NFKC", ch) == ch and not unicodedata.combining(ch) and ord(ch) not in seconds
                and not 0x1100 <= ord(ch) <= 0x11FF and not ch.isspace() and not _UNSPACED.match(ch))

    chars = [ch for c in (*range(0x80, 0x3400), *range(0x1F000, 0x1FB00)) if (ch := chr(c)) != "\u03a3" and plain(ch)
             and len(folded := ch.casefold()) == 1 and folded == ch.lower() and plain(folded)]
    ranges, start = [], None
    for a, b in zip(chars, chars[1:] + [None]):
        start = start or a
        if b is None or ord(b) != ord(a) + 1:
            ranges.append(re.escape(start) + ("" if start == a else "-" + re.escape(a)))
            start = None
    not_plain = re.compile(f"[^\\x00-\\x7f{''.join(ranges)}]")
    return lambda text: not_plain.search(text) is None


def _fold_unicode(text: str) -> str:
    """NFKC, case folding and unspaced characters as words (as normalize()), other whitespace
    as ASCII spaces."""
    return _OTHER_SPACES.sub(" ", space_out(unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())))


def text_key(normalized: str | bytes, seed: int = 0) -> int:
    """A 64-bit key of an already normalized text (never 0, which means 'no key')."""
    return xxhash.xxh3_64_intdigest(normalized if type(normalized) is bytes else normalized.encode(), seed) or 1


def text_keys(texts: list[bytes], seed: int = 0) -> np.ndarray:
    """text_key of each text, together."""
    keys = np.fromiter(map(xxhash.xxh3_64_intdigest, texts, repeat(seed, len(texts))), np.uint64, len(texts))
    keys[keys == 0] = 1
    return keys


def words(normalized: str) -> int:
    return normalized.count(" ") + 1 if normalized else 0


def word_counts(texts: list[bytes]) -> np.ndarray:
    """words() of each normalized text (as bytes), counted together."""
    if not texts:
        return np.zeros(0, np.int64)
    data = np.frombuffer(b"\n".join(texts), np.uint8)
    spaces = np.concatenate(([0], np.cumsum(data == 32)))
    ends = np.append(np.flatnonzero(data == 10), data.size)
    starts = np.concatenate(([0], ends[:-1] + 1))
    return np.where(ends > starts, spaces[ends] - spaces[starts] + 1, 0)


# --- word n-grams ----------------------------------------------------------------------


class _Powers:
    """BASE^i and BASE^-i modulo 2^64 for i < n, grown on demand (per process)."""

    pow = np.ones(1, _U64)
    inv = np.ones(1, _U64)

    @classmethod
    def upto(cls, n: int) -> tuple[np.ndarray, np.ndarray]:
        if cls.pow.size < n:
            m = max(n, 2 * cls.pow.size, 1 << 16)
            with np.errstate(over="ignore"):
                cls.pow = np.concatenate(([_U64(1)], np.cumprod(np.full(m - 1, _BASE, _U64))))
                cls.inv = np.concatenate(([_U64(1)], np.cumprod(np.full(m - 1, pow(_BASE, -1, 1 << 64), _U64))))
        return cls.pow[:n], cls.inv[:n]


def fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> _U64(33))


NGRAM_CHUNK_BYTES = 1 << 20
"""ngram_hashes works on runs of texts of about this many bytes: its arrays (8 bytes per
byte of text, a few of them) stay small however many texts it is given."""


def ngram_hashes(texts: list[str] | list[bytes], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The 64-bit hashes of every run of n words in each normalized text, and the index of
    the text each comes from (texts with fewer than n words give none). Vectorized over all
    texts: words are hashed as polynomials over their UTF-8 bytes from one prefix sum, and n
    consecutive word hashes are mixed into one."""
    if not texts:
        return np.zeros(0, _U64), np.zeros(0, np.int64)
    size = sum(map(len, texts))
    if size > NGRAM_CHUNK_BYTES and len(texts) > 1:
        step = max(1, len(texts) * NGRAM_CHUNK_BYTES // size)
        parts = [(lo, _ngram_hashes(texts[lo:lo + step], n)) for lo in range(0, len(texts), step)]
        return (np.concatenate([hashes for _, (hashes, _) in parts]),
                np.concatenate([owner + lo for lo, (_, owner) in parts]))
    return _ngram_hashes(texts, n)


def _ngram_hashes(texts: list[str] | list[bytes], n: int) -> tuple[np.ndarray, np.ndarray]:
    joined = b"\n".join(texts) + b"\n" if type(texts[0]) is bytes else ("\n".join(texts) + "\n").encode()
    data = np.frombuffer(joined, np.uint8)
    pw, inv = _Powers.upto(data.size + 1)
    with np.errstate(over="ignore"):
        prefix = np.zeros(data.size + 1, _U64)
        np.cumsum((data.astype(_U64) + _U64(1)) * pw[:data.size], out=prefix[1:])
        ends = np.flatnonzero((data == 32) | (data == 10))
        starts = np.empty_like(ends)
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
        word = fmix64((prefix[ends] - prefix[starts]) * inv[starts])
        last_of_text = data[ends] == 10
        text_of_word = np.cumsum(last_of_text) - last_of_text
        count = word.size - n + 1
        if count <= 0:
            return np.zeros(0, _U64), np.zeros(0, np.int64)
        mixed = word[:count] * _MIX[0]
        for k in range(1, n):
            mixed += word[k:count + k] * _MIX[k % len(_MIX)]
    whole = text_of_word[:count] == text_of_word[n - 1:]  # the n words lie in one text
    return fmix64(mixed[whole]), text_of_word[:count][whole]


# --- MinHash ---------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch.MinHash(num_perm, seed, scheme="affine32").permutations, drawn as it draws
    them (MinHash._init_permutations): importing datasketch imports scipy, 0.3 s of every
    split. tests/test_split.py compares the signatures with datasketch's."""
    generator = np.random.RandomState(seed)
    a = generator.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)  # odd: a bijection
    b = generator.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def shingle_hash32(hashes: np.ndarray) -> np.ndarray:
    """The 32-bit values fed to MinHash (datasketch's hashfunc output) from n-gram hashes."""
    return (hashes >> _U64(32)).astype(np.uint32)


def signatures(texts: list[str] | list[bytes], n: int, num_perm: int = NUM_PERM, seed: int = MINHASH_SEED) -> np.ndarray:
    """MinHash signatures (len(texts), num_perm) uint32 of the texts' word n-gram sets.
    Every text must have at least n words. Row i equals the hashvalues of
    datasketch.MinHash(num_perm, seed, hashfunc=identity, scheme="affine32") after
    update_batch(shingle_hash32(n-gram hashes of text i))."""
    return minhash(*ngram_hashes(texts, n), len(texts), num_perm, seed)


def minhash(hashes: np.ndarray, owner: np.ndarray, count: int, num_perm: int = NUM_PERM,
            seed: int = MINHASH_SEED) -> np.ndarray:
    """signatures() of `count` texts from their n-gram hashes (as ngram_hashes gives them:
    every text has some), as the transpose of a (num_perm, count) array: band_keys reads a
    permutation's values for every text at once."""
    if not count:
        return np.zeros((0, num_perm), np.uint32)
    first = np.flatnonzero(np.concatenate(([True], owner[1:] != owner[:-1])))
    if first.size != count:
        raise ValueError("every text needs at least one n-gram (n words)")
    a, b = _permutations(num_perm, seed)
    mixed = _fmix32(shingle_hash32(hashes))
    out = np.empty((num_perm, count), np.uint32)
    # a permutation per row, the shingles of 1,024 texts along it: each minimum runs over
    # contiguous memory, and a slice's products stay in the cache
    with np.errstate(over="ignore"):
        for lo in range(0, count, 1024):
            hi = min(count, lo + 1024)
            s0 = first[lo]
            s1 = first[hi] if hi < count else mixed.size
            products = np.multiply(a[:, None], mixed[None, s0:s1])
            products += b[:, None]
            out[:, lo:hi] = np.minimum.reduceat(products, first[lo:hi] - s0, axis=1)
    return out.T


@lru_cache(maxsize=None)
def lsh_params(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows per band) that datasketch.MinHashLSH picks for this threshold with
    LSH_WEIGHTS: of every (b, r) with b * r <= num_perm, in its order, the first that minimises
    the weighted integrals of the false positive probability 1 - (1 - s^r)^b over [0,
    threshold] and of the false negative one over [threshold, 1] (lsh._optimal_param). It
    integrates with scipy's quad; these are polynomials of degree b * r, which Gauss-Legendre
    quadrature with num_perm // 2 + 1 nodes integrates exactly, without importing scipy.
    tests/test_split.py compares the choice with datasketch's over thresholds 0.01-0.99."""
    nodes, weights = np.polynomial.legendre.leggauss(num_perm // 2 + 1)
    below, above = (nodes + 1) * threshold / 2, threshold + (nodes + 1) * (1 - threshold) / 2
    weights_below, weights_above = weights * threshold / 2, weights * (1 - threshold) / 2
    best, params = float("inf"), (0, 0)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            false_positive = weights_below @ (1 - (1 - below ** r) ** b)
            false_negative = weights_above @ ((1 - above ** r) ** b)
            error = false_positive * LSH_WEIGHTS[0] + false_negative * LSH_WEIGHTS[1]
            if error < best:
                best, params = error, (b, r)
    return params


def prepare(threshold: float, num_perm: int = NUM_PERM, seed: int = MINHASH_SEED) -> None:
    """Compute and cache the permutations, the LSH parameters and the plain characters (the
    last reads Unicode's tables: 0.2 s): done once before worker processes are forked, they
    inherit the caches instead of each paying it."""
    _permutations(num_perm, seed)
    lsh_params(threshold, num_perm)
    _plain_text()


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(len(sig), bands) uint64: each band's rows mixed into one 64-bit key (band k's: the sum
    of its j-th row's values times _MIX[j], plus k). All bands at once, along the texts: three
    times as fast on minhash()'s layout as band by band."""
    mix = np.array([_MIX[j % len(_MIX)] for j in range(rows)], _U64)
    with np.errstate(over="ignore"):
        part = sig.T[:bands * rows].reshape(bands, rows, -1).astype(_U64)
        part *= mix[:, None]
        mixed = part.sum(axis=1, dtype=_U64)
        mixed += np.arange(bands, dtype=_U64)[:, None]
    return np.ascontiguousarray(fmix64(mixed).T)


def band_candidates(keys: np.ndarray, keep: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                    group: Callable[[], np.ndarray] | None = None, large: list[np.ndarray] | None = None
                    ) -> Iterator[tuple[np.ndarray, Callable[[], np.ndarray]]]:
    """For each LSH band in turn, the pairs (i, j), i < j, of rows that share its key, packed as
    i * len(keys) + j, sorted and distinct, in two parts: (first, rest). `first`: every pair of
    a bucket up to SMALL_BUCKET, and each member of a larger one with the bucket's first member
    and with its neighbour; `rest()`, computed when called: the other pairs of the buckets up to
    MAX_ALL_PAIRS_BUCKET. A bucket whose rows `group()` (a label per row) puts in one group
    gives none: only pairs across groups are wanted (labels may only merge from band to band).
    Only the pairs `keep(i, j)` accepts, filtered as they are found (a band can give tens of
    millions of candidates on templated data). Bands are searched THREADS at a time, and no
    further ahead: `keep` may change between bands. The rows of each bucket above
    MAX_ALL_PAIRS_BUCKET (of rows in two groups) are appended to `large`."""
    m = keys.shape[0]

    def kept(pairs: np.ndarray) -> np.ndarray:
        chunks = [pairs[:, lo:lo + (1 << 20)] for lo in range(0, pairs.shape[1], 1 << 20)]
        chunks = chunks if keep is None else [chunk[:, keep(chunk[0], chunk[1])] for chunk in chunks]
        return np.concatenate(chunks, axis=1) if chunks else np.zeros((2, 0), np.int64)

    def packed(found: list[np.ndarray]) -> np.ndarray:
        pairs = np.concatenate(found, axis=1).astype(np.int64) if found else np.zeros((2, 0), np.int64)
        low, high = np.minimum(pairs[0], pairs[1]), np.maximum(pairs[0], pairs[1])
        return distinct(low[low != high] * m + high[low != high])

    def band_pairs(k: int) -> tuple[np.ndarray, Callable[[], np.ndarray]]:
        # a bucket's rows come in row order (its first member is its smallest row). Keys that
        # differ only in their low bits share a bucket: a candidate more, measured as any other
        order, sorted_keys = _packed_sort(keys[:, k])
        repeated = sorted_keys[1:] == sorted_keys[:-1]
        shared = np.zeros(order.size, bool)
        shared[1:] = repeated
        shared[:-1] |= repeated
        order, sorted_keys = order[shared], sorted_keys[shared]

        def buckets() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            new = np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1]))
            start = np.flatnonzero(new)
            return np.cumsum(new) - 1, start, np.diff(np.append(start, order.size))

        if not order.size:
            return np.zeros(0, np.int64), lambda: np.zeros(0, np.int64)
        bucket, start, size = buckets()
        if group is not None:  # only the buckets whose rows are in two groups or more
            labels = group()[order]
            mixed = (np.minimum.reduceat(labels, start) != np.maximum.reduceat(labels, start))[bucket]
            order, sorted_keys = order[mixed], sorted_keys[mixed]
            if not order.size:
                return np.zeros(0, np.int64), lambda: np.zeros(0, np.int64)
            bucket, start, size = buckets()
        small = size[bucket] <= SMALL_BUCKET
        found = []
        for d in range(1, min(int(size.max()), SMALL_BUCKET)):
            same = (bucket[:-d] == bucket[d:]) & small[:-d]
            found.append(kept(np.stack((order[:-d][same], order[d:][same]))))
        in_large = np.flatnonzero(~small)
        if in_large.size:
            head = order[start[bucket[in_large]]]
            found.append(kept(np.stack((head, order[in_large]))))
            chain = in_large[:-1][bucket[in_large[:-1]] == bucket[in_large[1:]]]
            found.append(kept(np.stack((order[chain], order[chain + 1]))))
            huge = in_large[size[bucket[in_large]] > MAX_ALL_PAIRS_BUCKET]
            if large is not None and huge.size:
                large.append(order[huge])

        def rest() -> np.ndarray:
            medium = np.flatnonzero((size > SMALL_BUCKET) & (size <= MAX_ALL_PAIRS_BUCKET))
            more = []
            for s in np.unique(size[medium]).tolist():  # the buckets of one size together
                members = order[start[medium[size[medium] == s]][:, None] + np.arange(s)]
                if group is not None:  # again: the groups may have merged since
                    labels = group()[members]
                    members = members[(labels != labels[:, :1]).any(axis=1)]
                i, j = np.triu_indices(s, 1)
                for rows in np.array_split(members, max(1, members.shape[0] * i.size >> 20)):
                    more.append(kept(np.stack((rows[:, i].ravel(), rows[:, j].ravel()))))
            return packed(more)

        return packed(found), rest

    with ThreadPoolExecutor(THREADS) as pool:
        pending = deque(pool.submit(band_pairs, k) for k in range(min(THREADS, keys.shape[1])))
        for k in range(len(pending), keys.shape[1] + len(pending)):
            band = pending.popleft().result()
            if k < keys.shape[1]:
                pending.append(pool.submit(band_pairs, k))
            yield band


def maybe_shared(keys: np.ndarray) -> np.ndarray:
    """The rows (sorted) whose key may be another row's: every row that shares its key, and
    rarely another (keys alike in all but their low bits: see _packed_sort). 11 ms for
    750,000 rows, where a table of slots, placed by the keys' low bits, took 33 (its random
    writes miss the cache; numpy's sort of 64-bit integers is vectorized)."""
    rows, sorted_keys = _packed_sort(keys)
    repeated = sorted_keys[1:] == sorted_keys[:-1]
    shared = np.zeros(keys.size, bool)
    shared[1:] = repeated
    shared[:-1] |= repeated
    return np.sort(rows[shared])


def _packed_sort(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, keys) in key order (a key's rows in row order), from one sort of (key, row)
    packed in 64 bits, the row in the key's low bits, which the keys give up (the keys
    returned are shifted right by as many bits): keys that differ only there sort as equal
    (about 2^-44 per pair of rows at 1M rows)."""
    bits = np.uint64(max(1, (keys.size - 1).bit_length()))
    packed = np.sort(keys >> bits << bits | np.arange(keys.size, dtype=np.uint64))
    return (packed & ~(~np.uint64(0) << bits)).astype(np.int64), packed >> bits


def first_of_each(keys: np.ndarray) -> np.ndarray:
    """The positions (sorted) of each distinct key's first occurrence: np.unique's
    return_index, in file order, with only the rows maybe_shared keeps sorted."""
    maybe = maybe_shared(keys)
    first = first_occurrences(keys[maybe])
    later = np.ones(maybe.size, bool)
    later[first] = False
    kept = np.ones(keys.size, bool)
    kept[maybe[later]] = False
    return np.flatnonzero(kept)


def _rare_ngram_pairs(rows: np.ndarray, ngrams_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                      m: int, keep: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Pairs (i, j), i < j, of `rows` (sorted, distinct, of m) that share an n-gram found in 2 to
    RARE_NGRAM_ROWS of them and that `keep(i, j)` accepts (filtered as they are found, a million
    at a time), packed as i * m + j, sorted and distinct."""
    hashes, owner = ngrams_of(rows)
    order = np.lexsort((owner, hashes))
    hashes, owner = hashes[order], owner[order]
    new = np.concatenate(([True], (hashes[1:] != hashes[:-1]) | (owner[1:] != owner[:-1])))
    hashes, owner = hashes[new], owner[new]  # each n-gram once per row, rows grouped by n-gram
    start = np.flatnonzero(np.concatenate(([True], hashes[1:] != hashes[:-1])))
    size = np.diff(np.append(start, hashes.size))
    rare = (size >= 2) & (size <= RARE_NGRAM_ROWS)
    run = np.repeat(np.arange(start.size), size)
    members = np.flatnonzero(rare[run])
    run, row = run[members], rows[owner[members]]
    found = [np.zeros(0, np.int64)]
    for d in range(1, RARE_NGRAM_ROWS):
        same = run[:-d] == run[d:]
        if not same.any():
            break
        low, high = row[:-d][same], row[d:][same]
        low, high = np.minimum(low, high), np.maximum(low, high)
        for lo in range(0, low.size, 1 << 20):
            a, b = low[lo:lo + (1 << 20)], high[lo:lo + (1 << 20)]
            chosen = keep(a, b)
            found.append(a[chosen] * m + b[chosen])
    return distinct(np.concatenate(found))


def candidate_pairs(keys: np.ndarray, keep: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                    labels: np.ndarray | None = None, large: list[np.ndarray] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j), i < j, of rows that share an LSH band, sorted: the pairs
    datasketch.MinHashLSH's query returns for the same bands (band_candidates); with
    `labels`, only those of rows with different labels."""
    m = keys.shape[0]
    packed = np.zeros(0, np.int64)
    for first, rest in band_candidates(keys, keep, None if labels is None else lambda: labels, large):
        packed = distinct(np.concatenate((packed, first, rest())), runs=True)  # three sorted runs
    return packed // m, packed % m


def first_occurrences(keys: np.ndarray, inverse: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """np.unique(keys, return_index=True)[1]: the position of each distinct key's first
    occurrence, in the order of the keys; with `inverse`, also np.unique's return_inverse (each
    key's distinct number). np.unique sorts stably (timsort on 64-bit integers); the least
    position of each run of equal keys needs only numpy's default sort (SIMD on x86): 0.05 s
    against 0.15 s for 1.3M keys here."""
    order = np.argsort(keys)
    ordered = keys[order]
    new = np.empty(keys.size, bool)
    new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    first = np.minimum.reduceat(order, np.flatnonzero(new)) if keys.size else order
    if not inverse:
        return first
    number = np.empty(keys.size, np.int64)
    number[order] = np.cumsum(new) - 1
    return first, number


def distinct(values: np.ndarray, runs: bool = False) -> np.ndarray:
    """np.unique(values), by a sort: numpy 2.3's hash-based np.unique takes ten times as long
    on millions of integers (11.1 s against 0.9 s for 13M here). `runs`: `values` are a few
    sorted runs end to end, which a stable sort (timsort) merges in one pass."""
    values = np.sort(values, kind="stable" if runs else None)
    return values[np.concatenate(([True], values[1:] != values[:-1]))] if values.size else values


def estimated_jaccard(sig: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The share of equal signature values of each pair (datasketch's MinHash.jaccard)."""
    out = np.empty(low.size)
    for lo in range(0, low.size, 1 << 16):
        hi = lo + (1 << 16)
        out[lo:hi] = (sig[low[lo:hi]] == sig[high[lo:hi]]).sum(axis=1, dtype=np.uint16) / sig.shape[1]
    return out


NGRAMS_RUN = 1 << 16
"""near_duplicate_pairs asks for the candidates' n-gram hashes this many rows at a time."""

ESTIMATE_MARGIN = 0.2
"""Candidates whose estimate is this far below the threshold are still measured exactly (4
standard errors at 64 permutations): the estimate only filters, the exact Jaccard decides.
Two sets that can reach the threshold only when equal (lowest_reaching) are measured only
when their signatures are equal, and two that cannot reach it are not measured."""


def lowest_reaching(size_a: np.ndarray, size_b: np.ndarray, threshold: float) -> np.ndarray:
    """The lowest Jaccard similarity of at least `threshold` that two sets of these sizes can
    have, or 2 where none can. |A & B| = i gives i / (|A| + |B| - i), at least the threshold t
    from i = t (|A| + |B|) / (1 + t) on, and i is at most the smaller size: two sets of 7
    n-grams reach 0.8 only when equal (6 shared give 0.75), and 5 against 7 never do."""
    total = size_a + size_b
    shared = np.ceil(threshold * total / (1 + threshold) - 1e-9)
    return np.where(shared <= np.minimum(size_a, size_b), shared / np.maximum(total - shared, 1), 2.0)


def sketch(sig: np.ndarray) -> np.ndarray:
    """The low byte of each signature value: 64 bytes a text instead of 256. Equal values have
    equal low bytes, so the share of equal bytes is never below datasketch's estimate (and
    above it by at most (1 - J) / 256): as a filter it keeps every pair the estimate keeps."""
    return sig.astype(np.uint8)


LINKING_RUN = 1 << 16
"""near_duplicate_pairs(linking=True) measures candidates this many at a time."""


def near_duplicate_pairs(keys: np.ndarray, sketches: np.ndarray,
                         ngrams_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], threshold: float,
                         wanted: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                         labels: np.ndarray | None = None, linking: bool = False,
                         large: list[np.ndarray] | None = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j), i < j, of rows whose word n-gram sets have a Jaccard similarity of at
    least `threshold`, with that similarity, sorted: LSH candidates (from the band keys) of
    rows with different `labels` (if given) that `wanted(i, j)` keeps, filtered by their
    estimate from the signature sketches, measured exactly on the n-gram hashes
    (`ngrams_of(rows)`, for sorted rows: as ngram_hashes of their texts gives them).

    With `linking`, only pairs that link rows into groups, enough for the groups (connected
    components) to be those of all pairs: band by band, a candidate whose rows are already
    in one group is dropped as it is found, and the others are measured in runs (_link_run).
    A question with hundreds of variants, all near-duplicates of each other, costs hundreds of
    measurements, not tens of thousands.

    The texts of a bucket too large for all its pairs (a template's n-grams, thousands of times
    with a few words changed) share the band's values whatever else they share: there, two
    texts that share an n-gram found in at most RARE_NGRAM_ROWS of those texts (the same words
    changed) are candidates too, searched after the bands. The rows of those buckets are
    appended to `large`."""
    def keep(low: np.ndarray, high: np.ndarray) -> np.ndarray:
        chosen = np.ones(low.size, bool) if wanted is None else wanted(low, high)  # the cheap tests first
        if labels is not None:
            chosen &= labels[low] != labels[high]
        if linking:
            chosen &= group[low] != group[high]
        some = np.flatnonzero(chosen)
        chosen[some] = estimated_jaccard(sketches, low[some], high[some]) >= threshold - ESTIMATE_MARGIN
        return chosen

    m = keys.shape[0]
    grams = _NgramSets(ngrams_of, m, threshold)
    large = [] if large is None else large

    def rare_pairs() -> np.ndarray:
        if not large:
            return np.zeros(0, np.int64)
        return _rare_ngram_pairs(distinct(np.concatenate(large)), ngrams_of, m, keep)

    if not linking:
        low, high = candidate_pairs(keys, keep, labels, large)
        if large:
            packed = distinct(np.concatenate((low * m + high, rare_pairs())))
            low, high = packed // m, packed % m
        grams.add(distinct(np.concatenate((low, high))))
        some = ~grams.out_of_reach(low, high, sketches)
        low, high = low[some], high[some]
        similarity = grams.jaccard(low, high)
        keep_pair = similarity >= threshold - 1e-12
        return low[keep_pair], high[keep_pair], similarity[keep_pair]

    group = np.arange(m)  # each row's group: the smallest row it is linked to so far
    linked: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    apart = np.zeros(0, np.int64)  # pairs measured below the threshold (packed, sorted): not again in a later band

    def after_the_bands() -> Iterator[tuple[np.ndarray, Callable[[], np.ndarray]]]:  # once the bands' `large` is known
        yield rare_pairs(), lambda: np.zeros(0, np.int64)

    for first, rest in chain(band_candidates(keys, keep, lambda: group, large), after_the_bands()):
        for part in (first, None):
            band = rest() if part is None else part  # the rest once the first pairs are linked
            if apart.size:
                band = band[apart[np.minimum(np.searchsorted(apart, band), apart.size - 1)] != band]
            low, high = band // m, band % m
            estimate = estimated_jaccard(sketches, low, high)
            order = np.argsort(-estimate, kind="stable")
            low, high, estimate = low[order], high[order], estimate[order]
            failed = []
            for lo in range(0, low.size, LINKING_RUN):
                run = slice(lo, lo + LINKING_RUN)
                group = _link_run(low[run], high[run], estimate[run], group, grams, sketches, threshold, linked, failed)
            if failed:
                apart = distinct(np.concatenate((apart, distinct(np.concatenate(failed)))), runs=True)
    if not linked:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    a, b, similarity = (np.concatenate(parts) for parts in zip(*linked))
    order = np.lexsort((b, a))
    return a[order], b[order], similarity[order]


def _link_run(a: np.ndarray, b: np.ndarray, estimate: np.ndarray, group: np.ndarray, grams: "_NgramSets",
              sketches: np.ndarray, threshold: float, linked: list, failed: list) -> np.ndarray:
    """Measure the candidate pairs (a[k], b[k]) (by decreasing estimate) that join two groups,
    in two rounds: first one pair per edge of a spanning forest of the groups (the best
    estimate between two groups: the whole of a set of variants that are all near-duplicates
    of each other is linked with one pair per variant), then every candidate that still joins
    two groups. Appends (a, b, similarity) of the pairs that pass to `linked`, the packed pairs
    that fail to `failed`; returns the new groups."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import minimum_spanning_tree

    m = group.size
    pending = np.flatnonzero(group[a] != group[b])
    if not pending.size:
        return group
    ga, gb = group[a[pending]], group[b[pending]]
    low_g, high_g = np.minimum(ga, gb), np.maximum(ga, gb)
    first = first_occurrences(low_g * m + high_g)  # pending is by estimate: the best per pair of groups
    choice = pending[first]
    labels = distinct(np.concatenate((low_g[first], high_g[first])))
    ia, ib = np.searchsorted(labels, low_g[first]), np.searchsorted(labels, high_g[first])
    forest = minimum_spanning_tree(coo_matrix((2.0 - estimate[choice], (ia, ib)), shape=(labels.size, labels.size)))
    forest = forest.tocoo()
    edge = ia.astype(np.int64) * labels.size + ib  # ia < ib: labels are sorted and low_g < high_g
    by_edge = np.argsort(edge)
    tree_edge = np.minimum(forest.row, forest.col).astype(np.int64) * labels.size + np.maximum(forest.row, forest.col)
    forest_pairs = choice[by_edge[np.searchsorted(edge[by_edge], tree_edge)]]
    for measured in (forest_pairs, None):
        if measured is None:  # the second round: what still joins two groups
            rest = np.ones(a.size, bool)
            rest[forest_pairs] = False
            measured = np.flatnonzero(rest & (group[a] != group[b]))
        x, y = a[measured], b[measured]
        grams.add(distinct(np.concatenate((x, y))))
        vain = grams.out_of_reach(x, y, sketches)
        failed.append(x[vain] * m + y[vain])
        x, y = x[~vain], y[~vain]
        similarity = grams.jaccard(x, y)
        passed = similarity >= threshold - 1e-12
        failed.append(x[~passed] * m + y[~passed])
        if passed.any():
            linked.append((x[passed], y[passed], similarity[passed]))
            group = _merged(group, x[passed], y[passed])
    return group


def _merged(group: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`group` after linking rows a[k] and b[k] for every k: each merged group takes its
    smallest label."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ga, gb = group[a], group[b]
    labels = distinct(np.concatenate((ga, gb)))
    ia, ib = np.searchsorted(labels, ga), np.searchsorted(labels, gb)
    graph = coo_matrix((np.ones(ia.size, np.int8), (ia, ib)), shape=(labels.size, labels.size))
    component = connected_components(graph, directed=False)[1]
    smallest = np.full(component.max() + 1, group.size, np.int64)
    np.minimum.at(smallest, component, labels)
    relabel = np.arange(group.size)
    relabel[labels] = smallest[component]
    return relabel[group]


class _NgramSets:
    """The n-gram hashes of rows' texts, read (`ngrams_of`) once each, as they are first
    needed, and grown in place; and for a text of fewer n-grams than out_of_reach needs to
    know about, how many distinct ones it has."""

    def __init__(self, ngrams_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], rows: int, threshold: float):
        self.ngrams_of, self.threshold = ngrams_of, threshold
        # sets of equal size below this reach the threshold only when equal (lowest_reaching)
        self.small = (1 + threshold) / (1 - threshold) if threshold < 1 else np.inf
        self.slot = np.full(rows, -1, np.int64)  # a row's number among those hashed
        self.hashes, self.owner, self.size = array("Q"), array("q"), array("q")
        self.count = 0

    def add(self, rows: np.ndarray) -> None:
        """Read the n-gram hashes of these rows (sorted, distinct) that are not read yet."""
        rows = rows[self.slot[rows] < 0]
        for lo in range(0, rows.size, NGRAMS_RUN):
            run = rows[lo:lo + NGRAMS_RUN]
            found, which = self.ngrams_of(run)
            self.hashes.frombytes(found.tobytes())
            self.owner.frombytes((which + self.count + lo).tobytes())
            size = np.bincount(which, minlength=run.size)
            few = size < self.small
            size[~few] = -1  # not needed
            some = few[which]
            # (row, n-gram) packed in 64 bits and sorted: the n-gram hash gives up its low bits
            # to the row (two n-grams of one set alike in the rest: about 2^-48)
            bits = np.uint64(64 - max(1, (run.size - 1).bit_length()))
            key = np.sort(which[some].astype(np.uint64) << bits | found[some] >> (np.uint64(64) - bits))
            new = np.concatenate(([True], key[1:] != key[:-1]))[:key.size]
            size[few] = np.bincount((key[new] >> bits).astype(np.int64), minlength=run.size)[few]
            self.size.frombytes(size.astype(np.int64).tobytes())
        self.slot[rows] = self.count + np.arange(rows.size)
        self.count += rows.size

    def out_of_reach(self, low: np.ndarray, high: np.ndarray, sketches: np.ndarray) -> np.ndarray:
        """Pairs of rows (added) known below the threshold without measuring them: sets too
        unequal in size to reach it, or small sets that reach it only when equal (then their
        signatures are equal too) with signatures that differ."""
        size = np.frombuffer(self.size, np.int64)
        size_a, size_b = size[self.slot[low]], size[self.slot[high]]
        known = np.flatnonzero((size_a >= 0) & (size_b >= 0))
        lowest = lowest_reaching(size_a[known], size_b[known], self.threshold)
        out = np.zeros(low.size, bool)
        out[known] = (lowest > 1) | (lowest == 1) & (estimated_jaccard(sketches, low[known], high[known]) < 1)
        return out

    def jaccard(self, low: np.ndarray, high: np.ndarray) -> np.ndarray:
        """pair_jaccard of rows low[k] and high[k], all added."""
        if not low.size:
            return np.zeros(0)
        # views made here and dropped on return: an array cannot grow while numpy holds its buffer
        return pair_jaccard(np.frombuffer(self.hashes, np.uint64), np.frombuffer(self.owner, np.int64),
                            self.slot[low], self.slot[high])


PAIR_CHUNK = 1 << 20
"""pair_jaccard handles runs of pairs with about this many n-grams in all at once."""


def pair_jaccard(hashes: np.ndarray, owner: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each i, the Jaccard similarity of the sets of n-gram hashes of texts a[i] and b[i]
    (`hashes, owner` as ngram_hashes gives them), exactly (up to the n-gram hashes' top 44
    bits or more being alike), in numpy: for a run of pairs both sides' n-grams are laid out
    by pair and sorted; each distinct (pair, n-gram) is in the union, and in the intersection
    when both sides have it. No Python set per text (about 1 KB each for short texts) and no
    copy of all n-grams beyond the run's. Runs are measured THREADS at a time."""
    # each side's n-grams: where they start in `hashes` and how many (owner is sorted)
    start_a, start_b = np.searchsorted(owner, a), np.searchsorted(owner, b)
    size_a, size_b = np.searchsorted(owner, a, "right") - start_a, np.searchsorted(owner, b, "right") - start_b
    work = np.cumsum(size_a + size_b)
    cuts = [0, *np.searchsorted(work, np.arange(PAIR_CHUNK, int(work[-1]) if work.size else 0, PAIR_CHUNK)).tolist(), a.size]
    out = np.zeros(a.size)

    def measure(lo: int, hi: int) -> None:
        if hi <= lo:
            return
        left, right = size_a[lo:hi], size_b[lo:hi]
        pair = np.arange(hi - lo)
        pairs = np.concatenate((np.repeat(pair, left), np.repeat(pair, right)))
        values = np.concatenate((hashes[index_ranges(start_a[lo:hi], left)],
                                 hashes[index_ranges(start_b[lo:hi], right)]))
        on_right = np.arange(values.size) >= int(left.sum())
        # (pair, n-gram) packed in 64 bits and sorted: the n-gram hash gives up its low bits to
        # the pair (two n-grams of one pair alike in the rest: about 2^-44 at a million pairs)
        bits = np.uint64(64 - max(1, (hi - lo - 1).bit_length()))
        key = pairs.astype(np.uint64) << bits | values >> (np.uint64(64) - bits)
        del pairs, values
        order = np.argsort(key)
        key, on_right = key[order], on_right[order]
        first = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
        in_both = np.logical_or.reduceat(~on_right, first) & np.logical_or.reduceat(on_right, first)
        pair_of = (key[first] >> bits).astype(np.int64)
        union = np.bincount(pair_of, minlength=hi - lo)
        both = np.bincount(pair_of[in_both], minlength=hi - lo)
        np.divide(both, union, out=out[lo:hi], where=union > 0)

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(measure, cuts[:-1], cuts[1:]))
    return out


def index_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenated aranges [s, s + l) for each start s and length l."""
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(int(ends[-1]) if ends.size else 0)
