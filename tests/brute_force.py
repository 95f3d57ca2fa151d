"""An independent count of near-duplicate leakage: every pair of user turns across the split
files compared by brute force (Python sets), for the tests and bench/near_duplicate_recall.py."""

from pathlib import Path

import orjson

from factory.textsim import normalize
from phases.split import SPLITS


def near_pairs_across_splits(splits_dir: Path, threshold: float = 0.8, n: int = 3) -> int:
    """Pairs of different user turns (each once per split) in two split files whose word
    n-gram sets reach `threshold`, by comparing every pair."""
    texts = {(k, normalize(turn["content"])) for k, name in enumerate(SPLITS)
             for line in (Path(splits_dir) / f"{name}.jsonl").read_bytes().splitlines()
             for turn in orjson.loads(line)["conversations"] if turn["role"] == "user"}
    grams = [(k, t, {tuple(t.split()[i:i + n]) for i in range(len(t.split()) - n + 1)}) for k, t in sorted(texts)]
    grams = [g for g in grams if g[2]]
    return sum(1 for i, (k, t, a) in enumerate(grams) for (l, u, b) in grams[i + 1:]
               if k != l and t != u and len(a & b) >= threshold * len(a | b) - 1e-9)
