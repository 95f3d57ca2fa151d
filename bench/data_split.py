"""Benchmark: the data phases end to end against a plain `datasets` script.

    python bench/data_split.py                      # 1,000,000 records: format + split
    python bench/data_split.py --records 100000
    python bench/data_split.py --split-only         # split alone, on a generated all.jsonl
    python bench/data_split.py --no-baseline        # skip the datasets baseline

Builds N Alpaca records from ../shared/datasets/alpaca_en_demo.json in a fresh workspace
under bench/out/: the 999 records cycled, every 4th word of the instruction and input
replaced by a word drawn from the source's vocabulary (seeded by the record number) and the
instruction numbered, so that copies of one source record are not duplicates and mostly not
near-duplicates of each other (word 3-gram Jaccard well under 0.8), while the text keeps
its real length and characters. A short user turn can stay whole or nearly so in many
copies: the split then groups them (606,361 groups at 1,000,000 records). Then times, each in its own subprocess:

  factory    `python -m factory run split -C <ws> --force` (format, then split, with their
             gates), or `python -m factory run --only split` with --split-only. While the CLI
             cannot run, the phases' run() functions are called in a subprocess instead, and
             the output says so.
  datasets   load_dataset("json") -> map(convert_to_sharegpt) (seed 004) -> train_test_split
             twice (80/10/10) -> to_json for the three splits. No validation, de-duplication
             or grouping: the plain way, for scale.

For each: wall time, CPU time (user + sys of the subprocess and everything it waited for),
peak RSS of the process tree (polled every 20 ms, format and split workers included), and
the machine's 1-minute load average before and after. Prints records/s, the ratio, and a
markdown row for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import orjson
import psutil

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = ROOT.parent / "shared" / "datasets" / "alpaca_en_demo.json"
OUT = ROOT / "bench" / "out"

PHASES_IN_PROCESS = """
import logging, sys, time
from factory.config import load_config
from factory.io import write_json
from factory.phase import PhaseContext
from factory.workspace import Workspace
import phases.format, phases.split

class Quiet:
    def start(self, total, unit): pass
    def advance(self, n=1): pass

ws = Workspace.at(sys.argv[1])
cfg = load_config(ws.config_file)
for phase in ([phases.split] if sys.argv[2] == "split" else [phases.format, phases.split]):
    started = time.monotonic()
    metrics = phase.PHASE.run(PhaseContext(cfg, ws, Quiet(), logging.getLogger(phase.PHASE.name)))
    write_json(ws.metrics_file(phase.PHASE.metrics), metrics)
    print(f"{phase.PHASE.name}: {time.monotonic() - started:.2f}s")
"""

DATASETS_BASELINE = """
import sys, time
from datasets import disable_progress_bars, load_dataset

disable_progress_bars()
raw, out, cache = sys.argv[1], sys.argv[2], sys.argv[3]

def convert_to_sharegpt(example):  # seed 004, as printed
    conversations = []
    if example.get("instruction"):
        conversations.append({"role": "system", "content": example["instruction"]})
    if example.get("input"):
        conversations.append({"role": "user", "content": example["input"]})
    conversations.append({"role": "assistant", "content": example["output"]})
    return {"conversations": conversations}

ds = load_dataset("json", data_files=raw, split="train", cache_dir=cache)
ds = ds.map(convert_to_sharegpt, remove_columns=ds.column_names)
first = ds.train_test_split(test_size=0.2, seed=3407)
second = first["test"].train_test_split(test_size=0.5, seed=3407)
for name, part in (("train", first["train"]), ("val", second["train"]), ("test", second["test"])):
    part.to_json(f"{out}/{name}.jsonl", lines=True)
print(len(first["train"]), len(second["train"]), len(second["test"]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="an Alpaca JSON array")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--split-only", action="store_true", help="time the split phase alone")
    parser.add_argument("--no-baseline", action="store_true", help="skip the datasets baseline")
    args = parser.parse_args()

    n = args.records
    mode = "split" if args.split_only else "format+split"
    ws = args.out / f"{mode.replace('+', '-')}-{n}"
    if ws.exists():
        shutil.rmtree(ws)
    raw = ws / "data" / "raw" / "alpaca.jsonl"
    started = time.monotonic()
    size = write_alpaca(args.source, raw, n)
    print(f"generated {n:,} Alpaca records ({size / 1e6:.0f} MB) in {time.monotonic() - started:.1f}s: {raw}")
    if args.split_only:
        formatted = ws / "data" / "formatted" / "all.jsonl"
        size = write_canonical(raw, formatted)
        raw.unlink()
        print(f"wrote the canonical records ({size / 1e6:.0f} MB) to {formatted}")

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    probe = subprocess.run([sys.executable, "-m", "factory", "--help"], cwd=ROOT, env=env, capture_output=True)
    cli = probe.returncode == 0
    if cli:
        command = [sys.executable, "-m", "factory", "run", *(["--only", "split"] if args.split_only else ["split"]),
                   "-C", str(ws), "--force"]
        shown = f"factory run {'--only split' if args.split_only else 'split'} -C <ws> --force"
    else:
        command = [sys.executable, "-c", PHASES_IN_PROCESS, str(ws), "split" if args.split_only else "all"]
        shown = "phases' run() in a subprocess (the CLI does not run yet)"
        print("NOTE: `python -m factory --help` failed, so the phases are called in a subprocess instead of the CLI")

    print(f"\nfactory: {shown}")
    ours = measure(command, env)
    report("factory", n, ours)
    if ours["rc"] != 0:
        print(ours["output"][-3000:])
        sys.exit(f"factory exited with {ours['rc']}")
    steps = phase_seconds(ws)
    if steps:
        print(f"  phases: {steps}")

    theirs = None
    if not args.no_baseline and not args.split_only:
        print("\ndatasets: load_dataset -> map(convert_to_sharegpt) -> train_test_split x2 -> to_json x3")
        baseline_out = ws / "datasets-baseline"
        baseline_out.mkdir()
        theirs = measure([sys.executable, "-c", DATASETS_BASELINE, str(raw), str(baseline_out),
                          str(baseline_out / "cache")], env)
        if theirs["rc"] != 0:
            print(theirs["output"][-3000:])
            theirs = None
        else:
            report("datasets", n, theirs)
            print(f"\nfactory / datasets records/s: {theirs['wall'] / ours['wall']:.2f}x")

    print("\n| date | records | what | load | factory s | factory rec/s | factory CPU s | factory peak RSS | "
          "datasets s | datasets rec/s | datasets CPU s | datasets peak RSS | factory/datasets |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    loads = [ours["load"]] + ([theirs["load"]] if theirs else [])
    cells = [str(date.today()), f"{n:,}", mode + ("" if cli else " (phases in a subprocess)"),
             f"{min(x for pair in loads for x in pair):.1f}-{max(x for pair in loads for x in pair):.1f}",
             f"{ours['wall']:.1f}", f"{n / ours['wall']:,.0f}", f"{ours['cpu']:.1f}", f"{ours['rss'] / 2**20:,.0f} MB"]
    if theirs:
        cells += [f"{theirs['wall']:.1f}", f"{n / theirs['wall']:,.0f}", f"{theirs['cpu']:.1f}",
                  f"{theirs['rss'] / 2**20:,.0f} MB", f"{theirs['wall'] / ours['wall']:.2f}x"]
    else:
        cells += ["", "", "", "", ""]
    print("| " + " | ".join(cells) + " |")


def write_alpaca(source: Path, path: Path, n: int) -> int:
    """n distinct Alpaca records, JSONL, none a near-duplicate of another (see the docstring)."""
    base = orjson.loads(source.read_bytes())
    vocabulary = sorted({w for r in base for w in (r["instruction"] + " " + r["input"]).split()})
    path.parent.mkdir(parents=True, exist_ok=True)
    size = 0

    def perturb(text: str, i: int) -> str:
        words = text.split(" ")
        for k in range(i % 4, len(words), 4):
            words[k] = vocabulary[(i * 7919 + k * 104729) % len(vocabulary)]
        return " ".join(words)

    with open(path, "wb") as f:
        for start in range(0, n, 10_000):
            lines = []
            for i in range(start, min(n, start + 10_000)):
                r = base[i % len(base)]
                copy = i >= len(base)  # the first pass keeps the source records as they are
                lines.append(orjson.dumps({"instruction": f"{perturb(r['instruction'], i) if copy else r['instruction']} (#{i})",
                                           "input": perturb(r["input"], i) if copy and r["input"] else r["input"],
                                           "output": r["output"]}, option=orjson.OPT_APPEND_NEWLINE))
            chunk = b"".join(lines)
            f.write(chunk)
            size += len(chunk)
    return size


def write_canonical(raw: Path, path: Path) -> int:
    """The canonical records `format` writes for Alpaca (its mapping, orjson, one per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    with open(raw, "rb") as src, open(path, "wb") as f:
        for line in src:
            r = orjson.loads(line)
            if r["input"] and r["instruction"]:
                turns = [("system", r["instruction"]), ("user", r["input"])]
            else:
                turns = [("user", r["input"] or r["instruction"])]
            turns.append(("assistant", r["output"]))
            out = orjson.dumps({"conversations": [{"role": a, "content": b} for a, b in turns]},
                               option=orjson.OPT_APPEND_NEWLINE)
            f.write(out)
            size += len(out)
    return size


def measure(command: list[str], env: dict) -> dict:
    """Run a command; wall time, CPU time and peak RSS of its process tree. Writes still
    pending (the generated records, the run before) go to disk first: a run would otherwise
    pay for the writeback of files it did not write."""
    os.sync()
    load_before = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = psutil.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0
    chunks = []
    os.set_blocking(proc.stdout.fileno(), False)
    while proc.poll() is None:
        try:
            tree = [proc] + proc.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        data = proc.stdout.read()
        if data:
            chunks.append(data)
        time.sleep(0.02)
    wall = time.perf_counter() - started
    rest = proc.stdout.read()
    if rest:
        chunks.append(rest)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"rc": proc.returncode, "wall": wall, "cpu": cpu, "rss": peak, "load": (load_before, os.getloadavg()[0]),
            "output": b"".join(chunks).decode(errors="replace")}


def report(name: str, n: int, result: dict) -> None:
    print(f"  {name}: {result['wall']:.2f}s wall, {n / result['wall']:,.0f} records/s, "
          f"{result['cpu']:.2f}s CPU, peak RSS {result['rss'] / 2**20:,.0f} MB (process tree), "
          f"load average {result['load'][0]:.1f} at the start, {result['load'][1]:.1f} at the end")


def phase_seconds(ws: Path) -> dict:
    found = {}
    for name in ("format", "split"):
        path = ws / "metrics" / f"{name}.json"
        if path.exists():
            metrics = orjson.loads(path.read_bytes())
            found[name] = metrics.get("seconds")
            if "seconds_by_step" in metrics:
                found[f"{name} steps"] = metrics["seconds_by_step"]
    return found


if __name__ == "__main__":
    main()
