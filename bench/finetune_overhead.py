"""Benchmark: the finetune phase (the whole CLI process) against a bare TRL SFTTrainer script.

    python bench/finetune_overhead.py                       # 300 steps, 3 pairs, 1 thread and torch's default
    python bench/finetune_overhead.py --steps 300 --reps 3 --threads 1
    python bench/finetune_overhead.py --no-nosave           # skip the bare run without checkpoints
    python bench/finetune_overhead.py --profile             # also: one factory run under cProfile
    python bench/finetune_overhead.py --trl-default-precision   # also: the bare run with TRL's bf16 default

Builds the example workspace (`factory init --example`, then `factory run split`) under
bench/out/finetune-overhead/, writes the bare script next to it (bare_sft.py), and times,
each as a fresh subprocess, interleaved (factory, bare, bare-nosave, factory, bare, ...):

  factory       `python -m factory run --only finetune --force -C <ws>`: CLI start-up, config
                validation, the runner's fingerprints, status files, the phase (model load,
                LoRA, trainer, training with 25/50/75/100% progress checkpoints and
                training_state.json, live status), the adapter save, metrics and the
                training-completed gate.
  bare          `python bare_sft.py <ws> <steps> save`: AutoModelForCausalLM + get_peft_model
                with the same LoRA config, SFTTrainer with the SFTConfig values the phase
                passes (save_steps=0.25 included), on data/splits/train.jsonl as `messages`
                with assistant_only_loss, then save_pretrained of the adapter and tokenizer.
                It needs the phase's CPU loss override to run at all on CPU: TRL 1.15's
                SFTTrainer.compute_loss calls a Triton kernel that CPU torch lacks.
  bare-nosave   the same with save_strategy="no": what the four progress checkpoints cost.
  bare-trl-default (with --trl-default-precision) the bare run without the phase's
                bf16=False: TRL's SFTConfig defaults to bf16=True, bfloat16 autocast even on CPU.

Progress checkpoints are deleted before each run (outside the timing), so no run resumes.
Before each run the script waits (up to 10 min) until no other process (a `spike/` job,
`pytest`, another `factory run`, anything else) uses CPU, and runs again (up to 3 times) when
another process used more than 10% of a core meanwhile. Prints medians and ratios; writes
every run to bench/out/finetune-overhead/results.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (OUT, ROOT, factory_cli, median, quiet_run, run_cli, thread_env, timed_run, torch_threads,  # noqa: E402
                     wait_until_quiet)

BARE_SCRIPT = r'''
"""A bare TRL script: the example workspace's finetune settings, nothing else.
usage: python bare_sft.py WORKSPACE STEPS save|nosave OUTPUT_DIR [trl-default-precision]"""
import json, sys, time
t0 = time.monotonic()
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer
from trl import SFTConfig, SFTTrainer
t_import = time.monotonic()

ws, steps, save, out = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "save", sys.argv[4]
# The phase passes bf16=False and fp16=False on CPU; TRL's SFTConfig defaults to bf16=True
# (bfloat16 autocast, on CPU too). `trl-default-precision` leaves TRL's default.
precision = {} if sys.argv[5:] == ["trl-default-precision"] else {"bf16": False, "fp16": False}
base = f"{ws}/models/base"
tokenizer = AutoTokenizer.from_pretrained(base)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(
    r=16, lora_alpha=32, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
rows = [json.loads(line) for line in open(f"{ws}/data/splits/train.jsonl") if line.strip()]
train = Dataset.from_list([{"messages": r["conversations"]} for r in rows])
t_load = time.monotonic()


class CPUSafeSFTTrainer(SFTTrainer):
    # Needed on CPU: TRL 1.15's compute_loss calls a Triton kernel CPU torch lacks.
    # The same override as phases/finetune.py (transformers' loss, plus the token accuracy).
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs["use_cache"] = False
        loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        with torch.no_grad():
            labels = inputs["labels"][:, 1:]
            mask = labels != -100
            correct = (outputs.logits[:, :-1].argmax(-1) == labels) & mask
            self._metrics["train"]["mean_token_accuracy"].append((correct.sum() / mask.sum().clamp(min=1)).item())
        return (loss, outputs) if return_outputs else loss


args = SFTConfig(
    output_dir=out, per_device_train_batch_size=16, gradient_accumulation_steps=1, warmup_steps=10,
    max_steps=steps, learning_rate=0.01, lr_scheduler_type="linear", optim="adamw_torch", weight_decay=0.0,
    logging_steps=10, seed=3407, data_seed=3407, save_strategy="steps" if save else "no", save_steps=0.25,
    report_to="none", disable_tqdm=True, use_cpu=True, gradient_checkpointing=False, max_length=128,
    packing=False, include_num_input_tokens_seen=True, dataloader_num_workers=0, assistant_only_loss=True,
    **precision,
)
trainer = CPUSafeSFTTrainer(model=model, processing_class=tokenizer, train_dataset=train, args=args)
t_build = time.monotonic()
result = trainer.train()
t_train = time.monotonic()
model.save_pretrained(f"{out}/adapter")
tokenizer.save_pretrained(f"{out}/adapter")
t_save = time.monotonic()
losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
print("BARE " + json.dumps({
    "torch_threads": torch.get_num_threads(), "bf16": trainer.args.bf16, "import_s": t_import - t0, "load_s": t_load - t_import,
    "build_s": t_build - t_load, "train_s": t_train - t_build, "train_runtime": result.metrics["train_runtime"],
    "save_s": t_save - t_train, "steps": trainer.state.global_step, "tokens": trainer.state.num_input_tokens_seen,
    "first_loss": losses[0], "final_loss": losses[-1]}))
'''

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--records", type=int, default=2500, help="example records (factory init --example)")
    parser.add_argument("--reps", type=int, default=3, help="runs of each side per thread setting")
    parser.add_argument("--threads", default="1,default",
                        help="comma-separated OMP_NUM_THREADS values; `default` leaves it unset (torch: one per core)")
    parser.add_argument("--no-nosave", action="store_true", help="skip the bare run without checkpoints")
    parser.add_argument("--trl-default-precision", action="store_true",
                        help="add a bare run with TRL's default precision (bf16=True: bfloat16 autocast on CPU)")
    parser.add_argument("--profile", action="store_true", help="also run factory once under cProfile (1 thread)")
    parser.add_argument("--max-wait", type=float, default=600, help="seconds to wait for a quiet machine per run")
    parser.add_argument("--out", type=Path, default=OUT / "finetune-overhead")
    args = parser.parse_args()

    out = args.out
    ws = out / "ws"
    setup(ws, args.records, args.steps)
    bare = out / "bare_sft.py"
    bare.write_text(BARE_SCRIPT)
    arms = (["factory", "bare"] + ([] if args.no_nosave else ["bare-nosave"])
            + (["bare-trl-default"] if args.trl_default_precision else []))

    results = {"date": datetime.now().date().isoformat(), "steps": args.steps, "records": args.records,
               "train_records": sum(1 for _ in open(ws / "data/splits/train.jsonl")), "settings": {}}
    startup = measure_startup(out)
    results["startup"] = startup
    for setting in args.threads.split(","):
        threads = None if setting == "default" else int(setting)
        env = thread_env(threads)
        n_threads = torch_threads(env)
        print(f"\n== OMP_NUM_THREADS={threads or 'unset'}: torch.get_num_threads() = {n_threads}", flush=True)
        runs: dict[str, list[dict]] = {arm: [] for arm in arms}
        for rep in range(args.reps):
            for arm in arms:
                if arm == "factory":
                    measure = lambda: run_factory(ws, env, out)  # noqa: E731
                else:
                    measure = lambda: run_bare(ws, bare, env, out, arm, args.steps)  # noqa: E731
                run = quiet_run(measure, max_wait_s=args.max_wait)
                runs[arm].append(run)
                print(f"  {arm:<12} rep {rep + 1}: wall {run['wall_s']:.2f}s, train {run['train_s']:.2f}s"
                      f" (others {100 * run['other_share']:.0f}% of a core{'' if run['clean'] else ', UNCLEAN'})", flush=True)
        results["settings"][setting] = {"omp_num_threads": threads, "torch_threads": n_threads, "runs": runs,
                                        "summary": summarize(runs)}
        print_summary(setting, n_threads, results["settings"][setting]["summary"])
    if args.profile:
        results["profile"] = profile_factory(ws, out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nresults: {out / 'results.json'}")


def setup(ws: Path, records: int, steps: int) -> None:
    marker = ws / ".bench-setup.json"
    wanted = {"records": records, "steps": steps}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return
    if ws.exists():
        shutil.rmtree(ws)
    ws.parent.mkdir(parents=True, exist_ok=True)
    print(f"building the example workspace in {ws} ...", flush=True)
    run_cli("init", "--example", str(ws), "--records", str(records), "--steps", str(steps), log=ws.parent / "setup.log")
    run_cli("run", "split", "-C", str(ws), log=ws.parent / "setup.log")
    marker.write_text(json.dumps(wanted))


def run_factory(ws: Path, env: dict, out: Path) -> dict:
    shutil.rmtree(ws / "outputs", ignore_errors=True)  # no progress checkpoints: no resume
    started_at = time.time()
    run = timed_run(factory_cli("run", "--only", "finetune", "--force", "-C", str(ws)), env=env, cwd=ROOT,
                    log=out / "factory-run.log", ok=(0, 1))  # 1: the training-completed gate failed
    stats = json.loads((ws / "metrics/training-stats.json").read_text())
    gate = json.loads((ws / "metrics/gates/training-completed.json").read_text())
    phase = phase_times(ws / ".factory/status.json", started_at)
    run.update(train_s=stats["train_seconds"], steps=stats["steps"], tokens=stats["tokens"],
               tokens_per_second=stats["tokens_per_second"], final_loss=stats["final_loss"],
               gate_passed=gate["passed"], **phase)
    run["exit_s"] = started_at + run["wall_s"] - run.pop("_ended_at")  # interpreter shutdown
    run["outside_phase_s"] = run["wall_s"] - run["phase_s"]
    run["phase_outside_train_s"] = run["phase_s"] - run["train_s"]  # model load, trainer, adapter save
    return run


def phase_times(status_file: Path, process_started: float) -> dict:
    """From .factory/status.json (millisecond timestamps): where the factory process spent
    its time outside the phase. `process_started` is the epoch time the subprocess began."""
    doc = json.loads(status_file.read_text())
    epoch = lambda iso: datetime.fromisoformat(iso).timestamp()  # noqa: E731
    phase = next(p for p in doc["phases"] if p["name"] == "finetune")
    return {
        "startup_s": epoch(doc["started_at"]) - process_started,  # interpreter, imports, CLI, config
        "fingerprint_s": epoch(phase["started_at"]) - epoch(doc["started_at"]),  # status + input hashes
        "phase_s": phase["duration_seconds"],
        "after_phase_s": epoch(doc["ended_at"]) - epoch(phase["ended_at"]),  # gate, status
        "_ended_at": epoch(doc["ended_at"]),
    }


def run_bare(ws: Path, bare: Path, env: dict, out: Path, arm: str, steps: int) -> dict:
    target = out / f"{arm}-out"
    shutil.rmtree(target, ignore_errors=True)
    log = out / f"{arm}-run.log"
    command = [sys.executable, str(bare), str(ws), str(steps), "nosave" if arm == "bare-nosave" else "save", str(target)]
    if arm == "bare-trl-default":
        command.append("trl-default-precision")
    run = timed_run(command, env=env, cwd=ROOT, log=log)
    line = next(l for l in log.read_text().splitlines() if l.startswith("BARE "))
    report = json.loads(line[5:])
    report["train_runtime_s"] = report.pop("train_runtime")
    run.update(report)
    return run


def measure_startup(out: Path, reps: int = 3) -> dict:
    """CLI start-up (`factory --help`) and the bare imports, each a fresh process, interleaved."""
    env = thread_env(1)
    cli, imports = [], []
    for _ in range(reps):
        cli.append(quiet_run(lambda: timed_run(factory_cli("--help"), env=env, cwd=ROOT))["wall_s"])
        imports.append(quiet_run(lambda: timed_run([sys.executable, "-c", "import torch, datasets, peft, transformers, trl; "
                                                    "from trl import SFTTrainer, SFTConfig"], env=env, cwd=ROOT))["wall_s"])
    return {"factory_help_s": median(cli), "bare_imports_s": median(imports)}


def summarize(runs: dict[str, list[dict]]) -> dict:
    med = lambda arm, key: median([r[key] for r in runs[arm] if key in r])  # noqa: E731
    s = {arm: {k: med(arm, k) for k in ("wall_s", "cpu_s", "train_s") if all(k in r for r in runs[arm])}
         for arm in runs}
    f, b = s["factory"], s["bare"]
    s["factory"].update({k: med("factory", k) for k in ("startup_s", "fingerprint_s", "phase_s", "after_phase_s",
                                                         "exit_s", "outside_phase_s", "phase_outside_train_s")})
    s["bare"].update({k: med("bare", k) for k in ("import_s", "load_s", "build_s", "save_s", "train_runtime_s")})
    for arm in runs:  # everything but trainer.train(): steadier than the wall times, whose noise is in training
        s[arm]["outside_train_s"] = median([r["wall_s"] - r["train_s"] for r in runs[arm]])
    s["fixed_overhead_s"] = f["outside_train_s"] - b["outside_train_s"]
    s["fixed_overhead_pct_of_factory_wall"] = 100 * s["fixed_overhead_s"] / f["wall_s"]
    s["overhead_wall_s"] = f["wall_s"] - b["wall_s"]
    s["overhead_pct_of_factory_wall"] = 100 * (f["wall_s"] - b["wall_s"]) / f["wall_s"]
    s["wall_ratio"] = f["wall_s"] / b["wall_s"]
    s["train_ratio"] = f["train_s"] / b["train_s"]
    # per-pair ratios (each factory run against the bare run next to it)
    s["pair_wall_ratios"] = [fr["wall_s"] / br["wall_s"] for fr, br in zip(runs["factory"], runs["bare"])]
    if "bare-nosave" in runs:
        s["checkpoints_s"] = b["train_s"] - s["bare-nosave"]["train_s"]
    return s


def print_summary(setting: str, n_threads: int, s: dict) -> None:
    f, b = s["factory"], s["bare"]
    print(f"  median wall: factory {f['wall_s']:.2f}s, bare {b['wall_s']:.2f}s -> factory/bare {s['wall_ratio']:.3f}"
          f" (overhead {s['overhead_wall_s']:+.2f}s = {s['overhead_pct_of_factory_wall']:.1f}% of factory's wall)")
    print(f"  outside trainer.train(): factory {f['outside_train_s']:.2f}s, bare {b['outside_train_s']:.2f}s -> factory's fixed"
          f" overhead {s['fixed_overhead_s']:+.2f}s = {s['fixed_overhead_pct_of_factory_wall']:.1f}% of its wall")
    print(f"  median train: factory {f['train_s']:.2f}s, bare {b['train_s']:.2f}s (train_runtime {b['train_runtime_s']:.2f}s)"
          f" -> {s['train_ratio']:.3f}")
    if "bare-trl-default" in s:
        t = s["bare-trl-default"]
        print(f"  bare with TRL's default precision (bf16 autocast): wall {t['wall_s']:.2f}s, train {t['train_s']:.2f}s"
              f" ({t['train_s'] / b['train_s']:.2f}x the bare run's training)")
    if "bare-nosave" in s:
        print(f"  bare without checkpoints: wall {s['bare-nosave']['wall_s']:.2f}s, train {s['bare-nosave']['train_s']:.2f}s"
              f" (the 4 checkpoints: {s['checkpoints_s']:.2f}s)")
    print(f"  factory: start-up {f['startup_s']:.2f}s, fingerprints+status {f['fingerprint_s']:.2f}s, phase {f['phase_s']:.2f}s"
          f" (of which outside trainer.train() {f['phase_outside_train_s']:.2f}s), gate+status {f['after_phase_s']:.2f}s,"
          f" exit {f['exit_s']:.2f}s")
    print(f"  bare: imports {b['import_s']:.2f}s, load {b['load_s']:.2f}s, trainer {b['build_s']:.2f}s, save {b['save_s']:.2f}s")


def profile_factory(ws: Path, out: Path) -> dict:
    """One factory run under cProfile: the cumulative time of the factory-specific parts."""
    shutil.rmtree(ws / "outputs", ignore_errors=True)
    prof = out / "factory.prof"
    wait_until_quiet()
    timed_run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "factory", "run", "--only", "finetune",
               "--force", "-C", str(ws)], env=thread_env(1), cwd=ROOT, log=out / "factory-profile.log")
    import pstats

    stats = pstats.Stats(str(prof))
    wanted = {
        "compute_fingerprint": ("runner.py", "compute_fingerprint"),
        "_store_fingerprint": ("runner.py", "_store_fingerprint"),
        "phase _fingerprint": ("finetune.py", "_fingerprint"),
        "StatusWriter.write": ("status.py", "write"),
        "TrainingStatus._write": ("status.py", "_write"),
        "StatusCallback.on_save": ("finetune.py", "on_save"),
        "Trainer._save_checkpoint": ("trainer.py", "_save_checkpoint"),
        "check_gate": ("gates.py", "check_gate"),
        "load_config": ("config.py", "load_config"),
        "phase run": ("finetune.py", "run"),
        "Trainer.train": ("trainer.py", "train"),
        "adapter save_pretrained": ("peft_model.py", "save_pretrained"),
    }
    found = {}
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
        for label, (suffix, name) in wanted.items():
            if func == name and file.endswith(suffix):
                found[label] = max(found.get(label, 0.0), ct)
    total = max(v[3] for v in stats.stats.values())
    print("\n== cProfile of one factory run (cumulative seconds; profiling slows Python code):")
    print(f"  whole run {total:.2f}s")
    for label, seconds in sorted(found.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<26} {seconds:8.3f}s")
    return {"total_s": total, **found}


if __name__ == "__main__":
    main()
