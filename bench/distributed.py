"""Benchmark: the finetune phase in 2 processes (torchrun, DDP over gloo) against 1 process, with
the same effective batch, on this CPU machine.

    python bench/distributed.py                  # 100 steps of 8 x 2, 3 rounds
    python bench/distributed.py --steps 40 --reps 2 --records 1000 --tries 1   # a busy machine

Builds the example workspace (`factory init --example`, `factory run split`) under
bench/out/distributed/ and times, each as a fresh `factory run --only finetune --force
--restart`, interleaved (one-2t, one-1t, two, one-2t, ...):

  one-2t  nproc_per_node 1, torch's default threads (2 here, one per core): today's run
  one-1t  nproc_per_node 1, OMP_NUM_THREADS=1
  two     nproc_per_node 2 under torchrun (1 thread each, torchrun's default), accumulation
          2 -> 1 per process: the same effective batch of 16

tokens/s is the phase's own figure (tokens trained / seconds in trainer.train(), tokens
counted over all processes); wall is the whole command. The steps stay inside the first
epoch, where both see the same examples per optimizer step: the loss match is the largest
relative difference of the per-step training loss, and the adapter match the largest absolute
difference of its weights. Waits for a quiet machine before each run (up to --max-wait s) and
says when other processes used CPU meanwhile. Writes every run to bench/out/distributed/results.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, factory_cli, median, quiet_run, run_cli, thread_env, timed_run  # noqa: E402

VARIANTS = {"one-2t": (1, None), "one-1t": (1, 1), "two": (2, None)}


def workspace(base: Path, name: str, nproc: int) -> Path:
    root = base.parent / name
    if not root.exists():
        shutil.copytree(base, root)
    config = (base / "factory.yaml").read_text()
    (root / "factory.yaml").write_text(config.replace("  logging_steps: 1\n",
                                                      f"  logging_steps: 1\n  distributed: {{nproc_per_node: {nproc}}}\n"))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--records", type=int, default=2500)
    parser.add_argument("--max-wait", type=float, default=300.0)
    parser.add_argument("--tries", type=int, default=3, help="runs again while other processes used CPU")
    args = parser.parse_args()
    out = OUT / "distributed"
    base = out / "base"
    if not (base / "data" / "splits" / "train.jsonl").exists():
        shutil.rmtree(out, ignore_errors=True)
        run_cli("init", "--example", str(base), "--records", str(args.records), "--steps", str(args.steps))
        config = (base / "factory.yaml").read_text()
        config = config.replace("  per_device_train_batch_size: 16\n  gradient_accumulation_steps: 1\n",
                                "  per_device_train_batch_size: 8\n  gradient_accumulation_steps: 2\n")
        (base / "factory.yaml").write_text(config.replace("  logging_steps: 10\n", "  logging_steps: 1\n"))
        timed_run(factory_cli("run", "split", "-C", str(base)), env=thread_env(None), ok=(0, 1))
    train = sum(1 for _ in open(base / "data" / "splits" / "train.jsonl"))
    assert args.steps * 16 <= train, f"{args.steps} steps of 16 leave the first epoch of {train} records"
    roots = {name: workspace(base, name, nproc) for name, (nproc, _) in VARIANTS.items()}
    runs = []
    for rep in range(args.reps):
        for name, (nproc, threads) in VARIANTS.items():
            root = roots[name]
            command = factory_cli("run", "--only", "finetune", "--force", "--restart", "-C", str(root))
            result = quiet_run(lambda: timed_run(command, env=thread_env(threads), log=out / f"{name}.log"),
                               max_wait_s=args.max_wait, tries=args.tries)
            stats = json.loads((root / "metrics" / "training-stats.json").read_text())
            result.update(variant=name, rep=rep, tokens=stats["tokens"], train_s=stats["train_seconds"],
                          tokens_per_s=stats["tokens_per_second"], losses=[h["loss"] for h in stats["loss_history"]],
                          distributed=stats["distributed"])
            runs.append(result)
            print(f"{name} rep {rep}: wall {result['wall_s']:.1f}s, train {result['train_s']:.1f}s, "
                  f"{result['tokens_per_s']:.0f} tokens/s, others {100 * result['other_share']:.0f}% of a core", flush=True)

    from safetensors.torch import load_file

    adapters = {n: load_file(r / "models" / "checkpoints" / "last" / "adapter_model.safetensors") for n, r in roots.items()}
    by = {n: [r for r in runs if r["variant"] == n] for n in VARIANTS}
    reference = by["one-2t"][-1]["losses"]
    summary = {}
    for name, rows in by.items():
        losses = rows[-1]["losses"]
        summary[name] = {
            "wall_s": median([r["wall_s"] for r in rows]), "train_s": median([r["train_s"] for r in rows]),
            "tokens_per_s": median([r["tokens_per_s"] for r in rows]), "tokens": rows[-1]["tokens"],
            "clean_runs": sum(r["clean"] for r in rows), "runs": len(rows),
            "loss_max_rel_diff_vs_one_2t": max(abs(a - b) / abs(b) for a, b in zip(losses, reference)),
            "adapter_max_abs_diff_vs_one_2t": max(float((adapters[name][k] - adapters["one-2t"][k]).abs().max())
                                                  for k in adapters[name]),
            "final_loss": losses[-1]}
    for name, row in summary.items():
        row["tokens_per_s_ratio_vs_one_2t"] = row["tokens_per_s"] / summary["one-2t"]["tokens_per_s"]
        row["wall_ratio_vs_one_2t"] = row["wall_s"] / summary["one-2t"]["wall_s"]
    (out / "results.json").write_text(json.dumps({"date": datetime.now().isoformat(timespec="seconds"),
                                                  "steps": args.steps, "train_records": train, "runs": runs,
                                                  "summary": summary}, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
