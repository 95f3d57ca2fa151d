"""Benchmark: how many near-duplicate pairs at exactly the threshold the split misses.

    python bench/near_duplicate_recall.py                 # 300 questions, 10,000 records
    python bench/near_duplicate_recall.py --questions 100 --records 3000

Writes a workspace under bench/out/ whose records are QUESTIONS six-word questions (words
drawn from 5,000 made-up ones), each also copied with a number until there are RECORDS
records, shuffled. A copy's word 3-grams are its question's four and one more: Jaccard
exactly 0.8 to its question (the default dedup.near_threshold), 0.67 to another copy, the
hardest case for MinHash LSH. Then runs `python -m factory run split` on it and counts,
by brute force over the written split files (every pair of distinct normalized user turns
in two splits, Jaccard of their word 3-gram sets), the near-duplicate pairs across splits:
those the grouping and the leakage check both missed. Prints the LSH bands and rows, the
groups (QUESTIONS would link every copy), the pairs linked and the pairs missed.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
OUT = ROOT / "bench" / "out"

from brute_force import near_pairs_across_splits  # noqa: E402  (the tests' count)


def write_workspace(ws: Path, questions: int, records: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    asked = [" ".join(rng.sample(vocab, 6)) + "?" for _ in range(questions)]
    rows = [{"instruction": asked[i % questions] if i < questions else f"{asked[i % questions]} {i}",
             "input": "", "output": f"answer {i}"} for i in range(records)]
    rng.shuffle(rows)
    (ws / "data" / "raw").mkdir(parents=True)
    (ws / "data" / "raw" / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ws / "factory.yaml").write_text("data:\n  inputs: [data/raw/questions.jsonl]\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    ws = args.out / f"near-recall-{args.questions}-{args.records}"
    shutil.rmtree(ws, ignore_errors=True)
    write_workspace(ws, args.questions, args.records)
    proc = subprocess.run([sys.executable, "-m", "factory", "run", "split", "-C", str(ws)], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"factory run split failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    metrics = json.loads((ws / "metrics" / "split.json").read_text())
    near = metrics["near_duplicates"]
    bands, rows = near["lsh_bands_rows"]
    print(f"{args.records:,} records, {args.questions} questions: LSH {bands} bands x {rows} rows, "
          f"{metrics['groups']:,} groups, {near['pairs']:,} near pairs linked, "
          f"leakage check {metrics['leakage']['near_duplicates']}, brute-force pairs across splits {near_pairs_across_splits(ws / 'data' / 'splits'):,}")


if __name__ == "__main__":
    main()
