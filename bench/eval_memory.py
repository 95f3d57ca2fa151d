"""Benchmark: peak memory of evaluate (answer loss, generation) and of quantize's GGUF
verification (the KL / perplexity check) on a Gemma-3-1B-sized model, with the code they
replaced as the named baseline in the same run.

    python bench/eval_memory.py                      # every step
    python bench/eval_memory.py --steps loss-old,loss-new --rows 4

Builds (in a child, once) bench/out/eval_memory/model/: the Gemma 3 1B text configuration
(hidden 1152, 26 layers, 4 heads, 1 KV head, head_dim 256, MLP 6912, sliding window 512,
vocabulary 262,144) with random weights, saved in bf16 like the real checkpoint, with the
example's tokenizer (its pieces are the first rows of the 262,144: the logits, which are what
this measures, have the real width); and model-Q8_0.gguf from it with llama.cpp's converter.
Test conversations are built to the lengths asked for (--prompt-tokens, --answer-tokens).

Each step runs in its own child, which loads the model as the phases do (fp32 on a CPU),
resets its peak RSS (/proc/self/clear_refs) and reports the peak during the step alone
(VmHWM) over the RSS before it:

  loss-old     the answer loss as factory 669f48b computed it: one batch of every row,
               full-vocabulary fp32 logits, mask from `ids != pad`        (the baseline)
  loss-new     modeling.answer_loss, same rows, same batch size
  loss-2048    modeling.answer_loss on one row of the seed's 2,048 tokens (half answer)
  generate     modeling.generate as evaluate calls it (greedy, batched, max_new_tokens)
  verify-old   quantize's divergence check as in 669f48b: every example's answer
               log-probabilities from the merged model held, then compared with the GGUF's
                                                                            (the baseline)
  verify-new   phases.quantize: the merged model's hidden states kept, the KL streamed
  bootstrap-old  the paired bootstrap as in 669f48b: every resample's indices and values at
               once, at --examples test examples and 10,000 resamples  (the baseline)
  bootstrap-new  scoring.bootstrap_ci95 (scipy.stats.bootstrap in bounded batches)

Prints a line per step and writes bench/out/eval_memory/results-STEPS.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, ROOT, thread_env, wait_until_quiet  # noqa: E402

sys.path.insert(0, str(ROOT))
OUT_DIR = OUT / "eval_memory"
MODEL = OUT_DIR / "model"
GGUF = OUT_DIR / "model-Q8_0.gguf"
GEMMA3_1B = dict(hidden=1152, layers=26, heads=4, kv_heads=1, head_dim=256, intermediate=6912, padded_vocab=262_144,
                 max_positions=32_768, sliding_window=512, save_dtype="bfloat16", initializer_range=0.02)
STEPS = ("loss-old", "loss-new", "loss-2048", "generate", "verify-old", "verify-new", "bootstrap-old", "bootstrap-new")
RESAMPLES = 10_000  # evaluation.bootstrap_samples' default


# --- in the children ----------------------------------------------------------------------


def build() -> None:
    from factory import example, llama_cpp

    records = example.generate_task_records(300)
    example.build_tiny_gemma3(MODEL, corpus=example.record_texts(records), **GEMMA3_1B)
    llama_cpp.convert(llama_cpp.converter_dir(None), MODEL, GGUF, "q8_0", OUT_DIR / "convert.log")


def conversations(n: int, prompt_tokens: int, answer_tokens: int, tokenizer) -> list[dict]:
    """n canonical records whose prompt and answer have about the token counts asked for."""
    from factory import example

    texts = example.record_texts(example.generate_task_records(4 * n * (prompt_tokens + answer_tokens) // 20 + 50, seed=7))

    def text_of(tokens: int, start: int) -> str:
        out, index = [], start
        while len(tokenizer(" ".join(out), add_special_tokens=False)["input_ids"]) < tokens:
            out.append(texts[index % len(texts)])
            index += 1
        return " ".join(out)

    return [{"conversations": [{"role": "user", "content": text_of(prompt_tokens, 97 * i)},
                               {"role": "assistant", "content": text_of(answer_tokens, 97 * i + 50)}]}
            for i in range(n)]


def old_answer_loss(model, chat, records, *, batch_size: int):
    """modeling.answer_loss as of 669f48b (the baseline; the rows now come from the chat format)."""
    import torch

    tokenizer = chat.tokenizer
    device = next(model.parameters()).device
    rows = [chat.answer_example(r) for r in records]
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in chunk], device=device)
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk], device=device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=(labels != -100) | (ids != pad)).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += loss.item()
        count += int((labels[:, 1:] != -100).sum())
    return total / count, count


def old_divergence(model, chat, records, llm):
    """quantize's divergence check as of 669f48b (the baseline): the merged model's answer
    log-probabilities of every example in memory, then each compared with the GGUF's."""
    import numpy as np

    from phases.quantize import _answer_logits

    def logprobs(logits):
        rows = np.asarray(logits, dtype=np.float32)
        rows = rows - rows.max(axis=-1, keepdims=True)
        return rows - np.log(np.exp(rows).sum(axis=-1, keepdims=True))

    divergence = []
    for record in records:
        ids, labels = chat.answer_example(record)
        head = next(i for i, label in enumerate(labels) if label != -100)
        divergence.append((ids, head, logprobs(_answer_logits(model, ids, head))))
    kl, tokens = 0.0, 0
    for ids, head, ref in divergence:
        llm.reset()
        llm.eval(ids)
        mine = logprobs(np.asarray(llm.scores[head - 1 : len(ids) - 1])[:, : ref.shape[1]])
        kl += float((np.exp(ref) * (ref - mine)).sum(dtype=np.float64))
        tokens += len(ids) - head
    return kl / tokens, tokens


def old_bootstrap(diff, resamples: int, seed: int = 0) -> list[float]:
    """The bootstrap interval as of 669f48b (the baseline)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    samples = rng.integers(0, diff.size, size=(resamples, diff.size))
    means = diff[samples].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return [float(low), float(high)]


def measure_bootstrap(step: str, examples: int) -> dict:
    """0/1 scores of two models on `examples` test examples; the interval of their mean difference."""
    import numpy as np

    from factory import scoring

    rng = np.random.default_rng(0)
    base = (rng.random(examples) < 0.3).astype(float)
    diff = np.where(rng.random(examples) < 0.2, 1.0, base) - base
    before = memory_mb()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")
    started = time.monotonic()
    if step == "bootstrap-old":
        value = old_bootstrap(diff, RESAMPLES)
    else:
        value = scoring.bootstrap_ci95(diff, resamples=RESAMPLES, seed=0)
    seconds = time.monotonic() - started
    peak = memory_mb()["VmHWM"]
    return {"step": step, "value": value, "seconds": round(seconds, 2), "rss_before_mb": round(before),
            "peak_mb": round(peak), "step_peak_over_before_mb": round(peak - before), "examples": examples,
            "resamples": RESAMPLES}


def memory_mb() -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def measure(step: str, args) -> dict:
    """One step in this (child) process: peak RSS of the step alone over the RSS before it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factory import llama_cpp, modeling
    from factory.chat import ChatFormat
    from phases import quantize

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    chat = ChatFormat.from_tokenizer(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()  # as load_for_inference on a CPU
    if step == "loss-2048":
        records = conversations(1, 1024, 1024, tokenizer)
    else:
        records = conversations(args.rows, args.prompt_tokens, args.answer_tokens, tokenizer)
    rows = [chat.answer_example(r) for r in records]
    llm = None
    if step.startswith("verify"):
        llm = llama_cpp.load(GGUF, n_ctx=max(len(ids) for ids, _ in rows) + 64, logits_all=True)
    before = memory_mb()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    started = time.monotonic()
    if step == "loss-old":
        value = old_answer_loss(model, chat, records, batch_size=args.rows)
    elif step in ("loss-new", "loss-2048"):
        value = modeling.answer_loss(model, rows, batch_size=args.rows, pad_token_id=chat.pad_token_id)
    elif step == "generate":
        answers = modeling.generate(model, chat, records, batch_size=args.rows, max_new_tokens=args.new_tokens)
        value = (sum(a.stopped for a in answers), len(answers))
    elif step == "verify-old":
        value = old_divergence(model, chat, records, llm)
    else:
        reference = quantize._divergence_reference(model, chat, records, max(len(ids) for ids, _ in rows))
        _, _, kl, tokens = quantize._divergence(llm, reference)
        value = (kl / tokens, tokens)
    seconds = time.monotonic() - started
    peak = memory_mb()["VmHWM"]
    return {"step": step, "value": value, "seconds": round(seconds, 2), "rss_before_mb": round(before),
            "peak_mb": round(peak), "step_peak_over_before_mb": round(peak - before),
            "rows": len(rows), "tokens": [len(ids) for ids, _ in rows],
            "answer_tokens": [sum(label != -100 for label in labels) for _, labels in rows],
            "torch_threads": torch.get_num_threads()}


# --- the parent -----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--rows", type=int, default=4, help="test examples, and the batch size")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--answer-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64, help="generate: max_new_tokens")
    parser.add_argument("--examples", type=int, default=50_000, help="bootstrap: paired test examples")
    parser.add_argument("--max-wait", type=float, default=120, help="seconds to wait for a quiet machine per step")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "build":
        build()
        return
    if args.child:
        result = measure_bootstrap(args.child, args.examples) if args.child.startswith("bootstrap") else measure(args.child, args)
        print(json.dumps(result))
        return

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    env = thread_env(None)
    if not GGUF.exists() and not all(step.startswith("bootstrap") for step in args.steps.split(",")):
        print(f"building the Gemma-3-1B-sized model in {MODEL}", flush=True)
        subprocess.run([sys.executable, __file__, "--child", "build"], env=env, cwd=ROOT, check=True)
    results = []
    for step in args.steps.split(","):
        seen = wait_until_quiet(args.max_wait, quiet=True)
        command = [sys.executable, __file__, "--child", step, "--rows", str(args.rows), "--prompt-tokens",
                   str(args.prompt_tokens), "--answer-tokens", str(args.answer_tokens), "--new-tokens", str(args.new_tokens),
                   "--examples", str(args.examples)]
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{step}: failed ({done.returncode}): {done.stderr[-1500:]}", flush=True)
            results.append({"step": step, "failed": done.returncode, "stderr": done.stderr[-1500:]})
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["machine_busy"] = seen["busy"][:3]
        result["loadavg_1m"] = seen["loadavg_1m"]
        results.append(result)
        print(f"{step:11} peak over before {result['step_peak_over_before_mb']:7,} MB (RSS before "
              f"{result['rss_before_mb']:,} MB), {result['seconds']:7.1f} s, value {result['value']}", flush=True)
    by_step = {r["step"]: r for r in results if "failed" not in r}
    ratios = {f"{new} / {old}": by_step[new]["step_peak_over_before_mb"] / max(1, by_step[old]["step_peak_over_before_mb"])
              for new, old in (("loss-new", "loss-old"), ("verify-new", "verify-old"), ("bootstrap-new", "bootstrap-old"))
              if new in by_step and old in by_step}
    for name, ratio in ratios.items():
        print(f"peak memory of the step, {name}: {ratio:.3f}")
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores", "args": vars(args),
              "results": results, "ratios": ratios}
    (OUT_DIR / f"results-{'+'.join(args.steps.split(','))}.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
