"""How long `factory run` takes when every phase is unchanged, with a large base model folder.

A tiny example workspace (the fault suite's settings: 120 records, 4 steps, Q8_0) whose
model folder also holds an 8 GB file (sparse: no disk space, but 8 GB to read), run once
through every phase. Then, interleaved, a no-op `factory run` (every phase skipped):
- with the hash cache (.factory/hash-cache.json): large inputs are recognised by their
  (size, mtime, ctime, inode), not read;
- baseline: the same run with the hash cache removed first, which is what the engine did
  before the cache existed (every input hashed on every run).

The commands run with their bytecode cached (in the temporary folder, whatever
PYTHONDONTWRITEBYTECODE says), as an installed package runs. `--code` times another checkout
of the factory (e.g. a worktree of main: the baseline for a change to start-up time).

    python bench/noop_run.py [--size-gb 8] [--runs 5] [--max-wait S] [--tries N] [--code PATH]

Prints a Markdown row for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, quiet_run, timed_run  # noqa: E402

CONFIG = """\
data:
  inputs: [data/raw/localization.jsonl]
  split: {train: 0.9, val: 0.05, test: 0.05, seed: 3407}
model: {name: models/base, max_seq_length: 128, load_in_4bit: false}
lora: {r: 8, lora_alpha: 16, use_gradient_checkpointing: false}
training: {per_device_train_batch_size: 8, gradient_accumulation_steps: 1, warmup_steps: 0, max_steps: 4,
           learning_rate: 0.01, weight_decay: 0.0, optim: adamw_torch, logging_steps: 1}
save: {gguf_quantization: [Q8_0]}
evaluation: {metrics: [exact_match], primary: exact_match, max_new_tokens: 8, batch_size: 8, loss: false,
             bootstrap_samples: 200}
gates:
  data-valid: {format.records_out: 50}
  splits-ready: {split.counts.test: 3}
"""
# The learning gates do not apply to 4 steps of a random model: one criterion each.
GATES = {"training-completed": ("finetune", "training-stats.completed", "==", "true"),
         "model-performance": ("evaluate", "evaluation.num_examples", ">=", 1),
         "quantization-verified": ("quantize", "quantization.gguf_files", ">=", 1)}


def factory(*args: str) -> list[str]:
    return [sys.executable, "-m", "factory", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=8.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-wait", type=float, default=300.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--tries", type=int, default=3, help="measurements of a run while other processes use CPU")
    parser.add_argument("--code", type=Path, default=ROOT, help="the factory checkout to time (default: this one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="noop-bench-") as tmp:
        env = {**os.environ, "PYTHONPATH": str(args.code.resolve()), "HF_HUB_OFFLINE": "1",
               "PYTHONPYCACHEPREFIX": str(Path(tmp) / "bytecode")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)

        def run(*command: str, log: Path | None = None) -> dict:
            # in the temporary folder: in a checkout's own folder, `-m factory` would import that checkout
            return timed_run(factory(*command), env=env, cwd=Path(tmp), log=log)

        ws = Path(tmp) / "ws"
        run("init", "--example", str(ws), "--records", "120")
        (ws / "factory.yaml").write_text(CONFIG)
        for name, (after, metric, op, value) in GATES.items():
            (ws / "gates" / f"{name}.yaml").write_text(
                f"name: {name}\nafter: {after}\ncriteria:\n  - metric: {metric}\n    op: \"{op}\"\n    value: {value}\n")
        big = ws / "models" / "base" / "extra-weights.bin"  # transformers ignores it; the fingerprint reads it
        with open(big, "wb") as f:
            f.truncate(int(args.size_gb * 2**30))
        time.sleep(3)  # older than the hash cache's racy window
        started = time.monotonic()
        run("run", "-C", str(ws), log=Path(tmp) / "first.log")
        first = time.monotonic() - started
        run("run", "-C", str(ws), log=Path(tmp) / "second.log")  # settles the hash cache, writes the bytecode

        cached, uncached = [], []
        for _ in range(args.runs):
            cached.append(quiet_run(lambda: run("run", "-C", str(ws)), max_wait_s=args.max_wait, tries=args.tries))
            def without_cache():
                (ws / ".factory" / "hash-cache.json").unlink(missing_ok=True)
                return run("run", "-C", str(ws))
            uncached.append(quiet_run(without_cache, max_wait_s=args.max_wait, tries=args.tries))
        version = quiet_run(lambda: run("--version"), max_wait_s=args.max_wait, tries=args.tries)
        run("run", "-C", str(ws), log=Path(tmp) / "last.log")
        nothing_to_do = "Nothing to do" in (Path(tmp) / "last.log").read_text()

    med = lambda runs, key="wall_s": statistics.median(r[key] for r in runs)  # noqa: E731
    clean = all(r["clean"] for r in cached + uncached)
    print(f"code timed: {args.code.resolve()}")
    print(f"first full run: {first:.1f} s; the no-op runs skipped every phase: {nothing_to_do}")
    print(f"factory --version (start-up floor): {version['wall_s']:.2f} s wall, {version['cpu_s']:.2f} s CPU")
    print("| date | model folder | no-op run, hash cache (s) | no-op run, no cache: every input hashed (s) | "
          "cache/no cache | CPU s cache / no cache | quiet |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {date.today()} | {args.size_gb:g} GB (sparse) + tiny model | {med(cached):.2f} | {med(uncached):.2f} | "
          f"{med(cached) / med(uncached):.3f}x | {med(cached, 'cpu_s'):.2f} / {med(uncached, 'cpu_s'):.2f} | "
          f"{'yes' if clean else 'no: other processes used CPU'} |")
    print(f"runs (wall s): cache {[round(r['wall_s'], 2) for r in cached]}, no cache {[round(r['wall_s'], 2) for r in uncached]}")


if __name__ == "__main__":
    main()
