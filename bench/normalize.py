"""Benchmark: text normalization (factory.textsim.normalize_batch), this tree against a git revision.

    python bench/normalize.py                 # against HEAD
    python bench/normalize.py --baseline REV

Texts: instruction + output of ../shared/datasets/alpaca_en_demo.json (20 copies, 5% with one
non-ASCII word, as the data benchmark's mix) and of alpaca_zh_demo.json (20 copies). Each
function is timed on each set in one process, alternating baseline and this tree three times;
prints CPU microseconds a text (the median of the three) and the ratio this tree / baseline.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ROOT.parent / "shared" / "datasets"


def texts(name: str) -> list[str]:
    return [r["instruction"] + " " + r["output"] for r in json.loads((DATASETS / name).read_text(encoding="utf-8"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision of factory/textsim.py to compare with")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from factory import textsim

    source = subprocess.run(["git", "show", f"{args.baseline}:factory/textsim.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "textsim_baseline.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("textsim_baseline", path)
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)

    rng = random.Random(0)
    sets = {"en, 5% non-ASCII": [t if rng.random() > 0.05 else t.replace(" the ", " thé ", 1)
                                 for t in texts("alpaca_en_demo.json") * 20],
            "zh": texts("alpaca_zh_demo.json") * 20}
    for name, batch in sets.items():
        times: dict[str, list[float]] = {"baseline": [], "tree": []}
        for _ in range(3):
            for label, module in (("baseline", baseline), ("tree", textsim)):
                started = time.process_time()
                module.normalize_batch(batch)
                times[label].append((time.process_time() - started) / len(batch) * 1e6)
        base, tree = statistics.median(times["baseline"]), statistics.median(times["tree"])
        print(f"{name}: {len(batch)} texts, baseline {args.baseline} {base:.1f} us a text, this tree "
              f"{tree:.1f} us a text, ratio {tree / base:.2f}")


if __name__ == "__main__":
    main()
