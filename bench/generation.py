"""Benchmark: batched against one-at-a-time generation, as the baseline and evaluate phases do it.

    python bench/generation.py                       # example workspace, adapter and base, 1 thread and default
    python bench/generation.py --models adapter --reps 3 --threads 1
    python bench/generation.py --workspace bench/out/finetune-overhead/ws   # reuse a trained workspace

Builds the example workspace under bench/out/generation/ (`factory init --example`,
`factory run split`, `factory run --only finetune`; not timed) unless --workspace names one
with a trained adapter. Then, in one process per thread setting, loads the model as evaluate
does (factory.modeling.load_for_inference: base + LoRA adapter, or the base alone) and
generates an answer for every test-split prompt with factory.modeling.generate, greedy,
evaluation.max_new_tokens from factory.yaml, at batch_size 64 (evaluate's setting in the
example) and batch_size 1, interleaved (64, 1, 64, 1, ...), each after waiting for a quiet
machine (and again when another process used CPU meanwhile). Reports examples/s, the ratio,
the exact-match score of each, and whether the two produce the same answers (left padding
can change greedy outputs).

Writes bench/out/generation/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, ROOT, run_cli, thread_env, timed_run, torch_threads  # noqa: E402

MEASURE_SCRIPT = r'''
import json, statistics, sys, time
sys.path.insert(0, sys.argv[5])
import torch
from _common import CpuWatch, wait_until_quiet
from factory import evaluation, modeling
from factory.config import load_config
from factory.workspace import Workspace

ws = Workspace.at(sys.argv[1]); which = sys.argv[2]; sizes = [int(s) for s in sys.argv[3].split(",")]
reps = int(sys.argv[4]); max_wait = float(sys.argv[6])
cfg = load_config(ws.config_file)
backend = modeling.select_backend(cfg.model.backend)
adapter = ws.path(cfg.save.lora_path) if which == "adapter" else None
model, chat = modeling.load_for_inference(cfg, ws, backend, adapter=adapter)
records = evaluation.read_split(ws.split_file("test"), ws)
references = [r["conversations"][-1]["content"] for r in records]
modeling.generate(model, chat, records[:2], batch_size=2, max_new_tokens=4)  # warm-up
times = {b: [] for b in sizes}; answers = {}; machine = []
for rep in range(reps):
    for b in sizes:
        for attempt in range(3):  # again when another process used CPU meanwhile
            seen = wait_until_quiet(max_wait, quiet=True)
            with CpuWatch() as watch:
                out = [g.text for g in modeling.generate(model, chat, records, batch_size=b,
                                                         max_new_tokens=cfg.evaluation.max_new_tokens)]
            if watch.other_share <= 0.1:
                break
        machine.append({**seen, "other_share": watch.other_share, "clean": watch.other_share <= 0.1})
        times[b].append(watch.wall_s)
        answers[b] = out
n = len(records)
result = {"model": which, "examples": n, "torch_threads": torch.get_num_threads(),
          "max_new_tokens": cfg.evaluation.max_new_tokens, "times": {str(b): t for b, t in times.items()},
          "examples_per_second": {str(b): n / statistics.median(t) for b, t in times.items()},
          "exact_match": {str(b): sum(a.strip() == r.strip() for a, r in zip(answers[b], references)) / n for b in sizes},
          "mean_answer_tokens": {str(b): sum(len(chat.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers[b]) / n
                                 for b in sizes},
          "unclean_runs": sum(1 for m in machine if not m["clean"]),
          "other_share": [round(m["other_share"], 3) for m in machine]}
first, *rest = sizes
for b in rest:
    same = sum(x == y for x, y in zip(answers[first], answers[b]))
    result[f"same_answers_{first}_vs_{b}"] = same / n
    result["differing_examples"] = [{"prompt": p[-1]["content"], str(first): x, str(b): y}
                                    for p, x, y in zip([r["conversations"][-2]["content"] for r in records], answers[first], answers[b]) if x != y][:5]
print("GEN " + json.dumps(result))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--workspace", type=Path, help="an example workspace with a trained adapter (default: build one)")
    parser.add_argument("--records", type=int, default=2500, help="example records when building the workspace")
    parser.add_argument("--steps", type=int, default=300, help="training steps when building the workspace")
    parser.add_argument("--models", default="adapter,base", help="comma-separated: adapter (base + LoRA), base")
    parser.add_argument("--batch-sizes", default="64,1", help="the first is compared with each of the others")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", default="1,default",
                        help="comma-separated OMP_NUM_THREADS values; `default` leaves it unset")
    parser.add_argument("--max-wait", type=float, default=600)
    parser.add_argument("--out", type=Path, default=OUT / "generation")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    ws = args.workspace or setup(args.out / "ws", args.records, args.steps)
    results = {"date": datetime.now().date().isoformat(), "workspace": str(ws), "runs": []}
    for setting in args.threads.split(","):
        threads = None if setting == "default" else int(setting)
        env = thread_env(threads)
        print(f"\n== OMP_NUM_THREADS={threads or 'unset'}: torch.get_num_threads() = {torch_threads(env)}", flush=True)
        for which in args.models.split(","):
            log = args.out / f"gen-{which}-{setting}.log"
            timed_run([sys.executable, "-c", MEASURE_SCRIPT, str(ws), which, args.batch_sizes, str(args.reps),
                       str(Path(__file__).resolve().parent), str(args.max_wait)], env=env, cwd=ROOT, log=log)
            r = json.loads(next(l for l in log.read_text().splitlines() if l.startswith("GEN "))[4:])
            r["threads_setting"] = setting
            results["runs"].append(r)
            eps = r["examples_per_second"]
            first, *rest = args.batch_sizes.split(",")
            for b in rest:
                print(f"  {which:<8} batch {first}: {eps[first]:.1f} examples/s, batch {b}: {eps[b]:.1f} examples/s"
                      f" -> {eps[first] / eps[b]:.2f}x; exact match {r['exact_match'][first]:.3f} vs {r['exact_match'][b]:.3f};"
                      f" same answers {100 * r[f'same_answers_{first}_vs_{b}']:.1f}%;"
                      f" {r['examples']} examples, {r['mean_answer_tokens'][first]:.1f} answer tokens on average"
                      f"{'; UNCLEAN runs: ' + str(r['unclean_runs']) if r['unclean_runs'] else ''}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nresults: {args.out / 'results.json'}")


def setup(ws: Path, records: int, steps: int) -> Path:
    marker = ws / ".bench-setup.json"
    wanted = {"records": records, "steps": steps}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return ws
    import shutil

    shutil.rmtree(ws, ignore_errors=True)
    ws.parent.mkdir(parents=True, exist_ok=True)
    print(f"building and training the example workspace in {ws} (not timed) ...", flush=True)
    log = ws.parent / "setup.log"
    run_cli("init", "--example", str(ws), "--records", str(records), "--steps", str(steps), log=log)
    run_cli("run", "split", "-C", str(ws), log=log)
    run_cli("run", "--only", "finetune", "-C", str(ws), env=thread_env(1), log=log)
    marker.write_text(json.dumps(wanted))
    return ws


if __name__ == "__main__":
    main()
