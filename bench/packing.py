"""Benchmark: training.packing on vs off, on SST-2 with a tiny Gemma-3 (the finetune phase).

    python bench/packing.py                          # 4,000 SST-2 rows, 200 steps, 1 thread and default
    python bench/packing.py --rows 4000 --steps 200 --reps 3 --threads 1
    python bench/packing.py --skip-timing            # only the padding count and the mask check

Builds two workspaces under bench/out/packing/ (`factory init`, the first --rows rows of
../shared/datasets/sst2/train.tsv as data/raw/sst2.tsv, mapped user=sentence,
assistant=label with label_map {"0": negative, "1": positive} and the user template
"Sentiment of: {text}"), one tiny Gemma-3 built with factory.example.build_tiny_gemma3 on
that text, and a factory.yaml that differs only in training.packing. Then:

  padding   in one process per workspace, the phase's own trainer
            (phases.finetune._build_trainer, same model, LoRA and config) and its train
            dataloader: over the first --steps batches, the positions in each collated batch,
            the real tokens (attention_mask ones; packing is padding-free, so every position
            is a token), the padding fraction, and the tokens that carry loss (labels != -100).
  mask      (packing only) the packed rows run through the model against each of their
            examples run alone: the largest logit difference (0 means no example attends to
            its neighbours in the packed row).
  layout    forward + backward of one batch, on 6 random groups of dataset rows: as the
            phase's collator lays them out (packing on: TRL's padding-free layout, the
            batch's packed rows flattened into one row; off: padded rows) and, with packing
            on, the same packed rows kept as separate rows of <= max_length.
  timing    `factory run --only finetune --force -C <ws>` for each, interleaved (on, off, on,
            off, ...), each after waiting for a quiet machine (and again when another process
            used CPU meanwhile): wall time, train_seconds, factory's tokens_per_second
            (num_input_tokens_seen, which counts padding) and the real tokens/s (real tokens
            from the padding count over train_seconds).

Prints medians and ratios; writes bench/out/packing/results.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (OUT, ROOT, factory_cli, median, quiet_run, run_cli, thread_env, timed_run, torch_threads,  # noqa: E402
                     wait_until_quiet)

SST2 = ROOT.parent / "shared" / "datasets" / "sst2" / "train.tsv"
LABELS = {"0": "negative", "1": "positive"}
USER_TEMPLATE = "Sentiment of: {text}"

CONFIG = """\
data:
  inputs:
    - path: data/raw/sst2.tsv
      mapping: {{user: sentence, assistant: label}}
      label_map: {{"0": negative, "1": positive}}
      user_template: "{template}"
  split: {{train: 0.8, val: 0.1, test: 0.1, seed: 3407, stratify: assistant}}

model:
  name: {model}
  max_seq_length: {max_len}
  load_in_4bit: false

lora:
  r: 16
  lora_alpha: 32
  use_gradient_checkpointing: false

training:
  per_device_train_batch_size: {batch}
  gradient_accumulation_steps: 1
  warmup_steps: 10
  max_steps: {steps}
  learning_rate: 0.01
  weight_decay: 0.0
  optim: adamw_torch
  logging_steps: 10
  packing: {packing}

evaluation:
  metrics: [exact_match]
  primary: exact_match
  max_new_tokens: 4
  batch_size: 64
"""

# Runs in a subprocess (so thread settings and imports match a factory run): the phase's own
# trainer and dataloader for one workspace; prints one JSON line.
COUNT_SCRIPT = r'''
import json, logging, sys
import torch
from factory import modeling, plan
from factory.config import load_config
from factory.workspace import Workspace
from phases import finetune
import orjson

ws = Workspace.at(sys.argv[1]); steps = int(sys.argv[2]); check_mask = sys.argv[3] == "1"
cfg = load_config(ws.config_file)
backend = modeling.select_backend(cfg.model.backend)
resolved = plan.resolve(cfg, plan.accelerator_memory_gib())
model, tokenizer = modeling.load_model(cfg, ws, backend, max_seq_length=resolved.max_seq_length)
model = modeling.add_lora(model, cfg, backend, rank=resolved.rank)
train_file = ws.split_file("train")
records = [orjson.loads(l) for l in train_file.read_bytes().splitlines() if l.strip()]
trainer = finetune._build_trainer(cfg, ws, backend, model, tokenizer, records, resolved, ws.path("bench-tmp"))
loader = trainer.get_train_dataloader()
positions = real = loss_tokens = examples = rows = 0
widths, per_batch_padding = [], []
done = 0
while done < steps:
    for batch in loader:
        ids = batch["input_ids"]
        n = ids.numel()
        r = int(batch["attention_mask"].sum()) if "attention_mask" in batch else n
        positions += n; real += r
        loss_tokens += int((batch["labels"] != -100).sum())
        examples += int((batch["position_ids"] == 0).sum()) if "position_ids" in batch else ids.shape[0]
        rows += ids.shape[0]; widths.append(ids.shape[1]); per_batch_padding.append(1 - r / n)
        done += 1
        if done == steps:
            break
result = {
    "packing": cfg.training.packing, "steps": steps, "dataset_rows": len(trainer.train_dataset),
    "train_records": len(records), "positions": positions, "real_tokens": real, "padding_tokens": positions - real,
    "padding_fraction": (positions - real) / positions, "loss_tokens": loss_tokens, "examples": examples,
    "rows_per_batch": rows / steps, "mean_batch_width": sum(widths) / steps,
    "max_batch_padding_fraction": max(per_batch_padding), "real_tokens_per_step": real / steps,
    "examples_per_step": examples / steps, "collator_keys": sorted(batch.keys()),
    "attn_implementation": model.config._attn_implementation,
}
if check_mask:
    # each packed row against its examples run alone: a leak across examples changes logits
    model.eval()
    worst, checked = 0.0, 0
    with torch.no_grad():
        multi = [i for i, n in enumerate(trainer.train_dataset["seq_lengths"]) if len(n) >= 3][:8]
        for i in multi:
            ex = trainer.train_dataset[i]
            batch = trainer.data_collator([ex])
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
            start = 0
            for length in ex["seq_lengths"]:
                ids = torch.tensor([ex["input_ids"][start:start + length]])
                alone = model(input_ids=ids).logits[0]
                worst = max(worst, float((packed[start:start + length] - alone).abs().max()))
                start += length; checked += 1
    result["mask_check"] = {"packed_rows": len(multi), "sequences": checked, "max_abs_logit_diff": worst}
# Forward + backward time of one batch, by layout, on random groups of `batch` dataset rows:
# "collated" is what the phase's collator makes (packing on: the rows flattened into one
# padding-free row; off: padded rows with an attention mask); with packing on, also
# "per_row": the same packed rows kept as rows of <= max_length (position_ids restart at
# each example, so transformers still masks between examples; no flattening).
import random, statistics, time
model.train()
rng = random.Random(0)
data = trainer.train_dataset
bs = cfg.training.per_device_train_batch_size if cfg.training.per_device_train_batch_size != "auto" else resolved.batch_size
groups = [[data[i] for i in rng.sample(range(len(data)), bs)] for _ in range(6)]

def fwd_bwd(**inputs):
    started = time.perf_counter()
    model(**inputs).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started

layouts = {"collated": []}
if cfg.training.packing:
    layouts["per_row"] = []
tokens = 0
fwd_bwd(**trainer.data_collator(groups[0]))  # warm-up
for group in groups:
    batch = trainer.data_collator(group)
    tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    layouts["collated"].append(fwd_bwd(**batch))
    if cfg.training.packing:
        width = max(len(ex["input_ids"]) for ex in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        pos = torch.zeros(len(group), width, dtype=torch.long)
        labels = torch.full((len(group), width), -100)
        for row, ex in enumerate(group):
            n = len(ex["input_ids"])
            ids[row, :n] = torch.tensor(ex["input_ids"])
            pos[row, :n] = torch.cat([torch.arange(k) for k in ex["seq_lengths"]])
            pos[row, n:] = torch.arange(1, width - n + 1) + pos[row, n - 1]  # padding: continues the last example
            labels[row, :n] = batch["labels"][0, sum(len(g["input_ids"]) for g in group[:row]):][:n]
        layouts["per_row"].append(fwd_bwd(input_ids=ids, position_ids=pos, labels=labels))
result["layout_timing"] = {
    "groups": len(groups), "real_tokens_per_batch": tokens / len(groups),
    **{f"{name}_s": statistics.median(t) for name, t in layouts.items()},
    **{f"{name}_real_tokens_per_s": tokens / sum(t) for name, t in layouts.items()},
}
print("COUNT " + json.dumps(result))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--rows", type=int, default=4000, help="first N rows of SST-2 train.tsv")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16, help="per_device_train_batch_size")
    parser.add_argument("--max-len", type=int, default=128, help="model.max_seq_length")
    parser.add_argument("--reps", type=int, default=3, help="runs of each side per thread setting")
    parser.add_argument("--threads", default="1,default",
                        help="comma-separated OMP_NUM_THREADS values; `default` leaves it unset")
    parser.add_argument("--skip-timing", action="store_true", help="only count padding and check the mask")
    parser.add_argument("--max-wait", type=float, default=600)
    parser.add_argument("--source", type=Path, default=SST2)
    parser.add_argument("--out", type=Path, default=OUT / "packing")
    args = parser.parse_args()

    workspaces = setup(args)
    results = {"date": datetime.now().date().isoformat(), "rows": args.rows, "steps": args.steps,
               "batch": args.batch, "max_len": args.max_len, "padding": {}, "settings": {}}
    print("\n== padding, from the phase's own collated batches", flush=True)
    for name, ws in workspaces.items():
        wait_until_quiet(args.max_wait)
        log = args.out / f"count-{name}.log"
        timed_run([sys.executable, "-c", COUNT_SCRIPT, str(ws), str(args.steps), "1" if name == "on" else "0"],
                  env=thread_env(1), cwd=ROOT, log=log)
        count = json.loads(next(l for l in log.read_text().splitlines() if l.startswith("COUNT "))[6:])
        shutil.rmtree(ws / "bench-tmp", ignore_errors=True)
        results["padding"][name] = count
        print(f"  packing {name:<3}: {count['rows_per_batch']:.0f} row(s) x {count['mean_batch_width']:.0f} positions a batch,"
              f" padding {100 * count['padding_fraction']:.1f}% (worst batch {100 * count['max_batch_padding_fraction']:.1f}%),"
              f" {count['real_tokens_per_step']:.0f} real tokens and {count['examples_per_step']:.1f} examples a step,"
              f" loss on {100 * count['loss_tokens'] / count['real_tokens']:.1f}% of tokens", flush=True)
        if "mask_check" in count:
            print(f"  mask check: {count['mask_check']}")
        lt = count["layout_timing"]
        print("  forward+backward of one batch (median of 6 random batches, 1 thread): "
              + ", ".join(f"{name} {lt[f'{name}_s']:.3f}s = {lt[f'{name}_real_tokens_per_s']:.0f} real tokens/s"
                          for name in ("collated", "per_row") if f"{name}_s" in lt), flush=True)
    if not args.skip_timing:
        for setting in args.threads.split(","):
            threads = None if setting == "default" else int(setting)
            env = thread_env(threads)
            n_threads = torch_threads(env)
            print(f"\n== OMP_NUM_THREADS={threads or 'unset'}: torch.get_num_threads() = {n_threads}", flush=True)
            runs = {name: [] for name in workspaces}
            for rep in range(args.reps):
                for name, ws in workspaces.items():
                    run = quiet_run(lambda: run_finetune(ws, env, args.out / f"run-{name}.log"), max_wait_s=args.max_wait)
                    run["real_tokens_per_second"] = results["padding"][name]["real_tokens"] / run["train_s"]
                    run["examples_per_second"] = results["padding"][name]["examples"] / run["train_s"]
                    runs[name].append(run)
                    print(f"  packing {name:<3} rep {rep + 1}: wall {run['wall_s']:.1f}s, train {run['train_s']:.1f}s,"
                          f" factory tokens/s {run['tokens_per_second']:.0f}, real tokens/s {run['real_tokens_per_second']:.0f}"
                          f" (others {100 * run['other_share']:.0f}% of a core{'' if run['clean'] else ', UNCLEAN'})", flush=True)
            summary = {name: {k: median([r[k] for r in rs]) for k in
                              ("wall_s", "train_s", "tokens_per_second", "real_tokens_per_second", "examples_per_second",
                               "final_loss")} for name, rs in runs.items()}
            summary["real_tokens_per_second_ratio_on_off"] = (summary["on"]["real_tokens_per_second"]
                                                              / summary["off"]["real_tokens_per_second"])
            summary["train_s_ratio_on_off"] = summary["on"]["train_s"] / summary["off"]["train_s"]
            results["settings"][setting] = {"torch_threads": n_threads, "runs": runs, "summary": summary}
            for name in workspaces:
                s = summary[name]
                print(f"  median packing {name:<3}: train {s['train_s']:.1f}s, factory tokens/s {s['tokens_per_second']:.0f},"
                      f" real tokens/s {s['real_tokens_per_second']:.0f}, examples/s {s['examples_per_second']:.1f},"
                      f" final loss {s['final_loss']:.3f}")
            print(f"  real tokens/s on/off: {summary['real_tokens_per_second_ratio_on_off']:.2f}x;"
                  f" train time on/off (same steps): {summary['train_s_ratio_on_off']:.2f}x")
    path = args.out / "results.json"
    if args.skip_timing and path.exists():  # keep the timings of an earlier run
        results["settings"] = json.loads(path.read_text()).get("settings", {})
    path.write_text(json.dumps(results, indent=2))
    print(f"\nresults: {path}")


def setup(args) -> dict[str, Path]:
    """The two workspaces (same data, model and splits; only training.packing differs)."""
    out = args.out
    wanted = {"rows": args.rows, "steps": args.steps, "batch": args.batch, "max_len": args.max_len}
    marker = out / ".bench-setup.json"
    workspaces = {"on": out / "packing-on", "off": out / "packing-off"}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return workspaces
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with open(args.source, newline="", encoding="utf-8") as f:
        rows = [r for _, r in zip(range(args.rows), csv.DictReader(f, delimiter="\t"))]
    model_dir = out / "tiny-gemma3"
    print(f"building a tiny Gemma-3 on {len(rows)} SST-2 rows in {model_dir} ...", flush=True)
    from factory.example import build_tiny_gemma3, record_texts

    alpaca = [{"input": USER_TEMPLATE.format(text=r["sentence"].strip()), "output": LABELS[r["label"]]} for r in rows]
    build_tiny_gemma3(model_dir, corpus=record_texts(alpaca))
    for name, ws in workspaces.items():
        run_cli("init", str(ws), log=out / "setup.log")
        raw = ws / "data/raw/sst2.tsv"
        with open(raw, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["sentence", "label"], delimiter="\t", lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        (ws / "factory.yaml").write_text(CONFIG.format(
            template=USER_TEMPLATE, model=model_dir.resolve(), max_len=args.max_len, batch=args.batch,
            steps=args.steps, packing=str(name == "on").lower()))
        run_cli("run", "split", "-C", str(ws), log=out / "setup.log")
    a, b = (workspaces[n] / "data/splits/train.jsonl" for n in ("on", "off"))
    assert a.read_bytes() == b.read_bytes(), "the two workspaces' train splits differ"
    marker.write_text(json.dumps(wanted))
    return workspaces


def run_finetune(ws: Path, env: dict, log: Path) -> dict:
    shutil.rmtree(ws / "outputs", ignore_errors=True)  # no progress checkpoints: no resume
    command = factory_cli("run", "--only", "finetune", "--force", "-C", str(ws))
    run = timed_run(command, env=env, cwd=ROOT, log=log, ok=(0, 1))  # 1: a failed gate; the timing counts
    stats = json.loads((ws / "metrics/training-stats.json").read_text())
    run.update(train_s=stats["train_seconds"], tokens=stats["tokens"], tokens_per_second=stats["tokens_per_second"],
               steps=stats["steps"], final_loss=stats["final_loss"])
    return run


if __name__ == "__main__":
    main()
