"""Benchmark: the quantize phase (merge, GGUF export, verification) on the tiny example model
and on a Gemma-3 270M-sized model with random weights, against a plain fp32 merge.

    python bench/quantize.py --model tiny
    python bench/quantize.py --model gemma3-270m --types F16,Q8_0,Q4_K_M

Builds a workspace under bench/out/quantize/<model>/ (`factory init --example`, with the base
model rebuilt at the requested size: for gemma3-270m the Gemma 3 270M config, hidden 640, 18
layers, 4 heads, 1 KV head, head_dim 256, MLP 2048, vocab 262,144, saved in bf16 like the
real checkpoint), the test split, and a random LoRA adapter (r 16 on every linear layer,
B ~ N(0, 0.02), so the merge changes the model). Then, each as a fresh subprocess, after
waiting for a quiet machine:

  factory   `factory run --only quantize --force`: the 16-bit merge with its logit checks,
            scoring the merged model, every GGUF type (converter or quantize API), and the
            verification of each file through llama.cpp. Times and peak memory per step come
            from metrics/quantization.json (merge.peak_rss_mb is the process's peak at the end
            of the merge; converter_peak_rss_mb the converter child's).
  fp32      the merge as a plain script did it on CPU with transformers 4's default dtype
            (seed 002's warning): AutoModelForCausalLM in fp32, PeftModel, merge_and_unload,
            save_pretrained.

Prints the table and writes bench/out/quantize/<model>/results.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, ROOT, factory_cli, quiet_run, run_cli, thread_env, timed_run  # noqa: E402

MODELS = {
    "tiny": {},
    "gemma3-270m": dict(hidden=640, layers=18, heads=4, kv_heads=1, head_dim=256, intermediate=2048,
                        padded_vocab=262_144, max_positions=32_768, sliding_window=512, save_dtype="bfloat16",
                        initializer_range=0.02),
}

FP32_MERGE = r'''
import json, resource, sys, time
t0 = time.monotonic()
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out, result = sys.argv[1:5]
# fp32, as transformers 4 loads on CPU by default (transformers 5 defaults to the checkpoint's dtype)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
json.dump({"seconds": time.monotonic() - t0,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, open(result, "w"))
'''


def build(ws: Path, model: str, types: list[str]) -> None:
    from factory import example

    if ws.exists():
        shutil.rmtree(ws)
    run_cli("init", "--example", str(ws))
    if MODELS[model]:
        shutil.rmtree(ws / example.BASE_MODEL_DIR)
        example.write_example_workspace(ws, records=4200, **MODELS[model])
    run_cli("run", "split", "-C", str(ws))
    _random_adapter(ws)
    config = (ws / "factory.yaml").read_text()
    config = config.replace("[Q8_0, Q4_K_M]", "[" + ", ".join(types) + "]")
    (ws / "factory.yaml").write_text(config + "  max_examples: 16\n")  # appended to the evaluation section


def _random_adapter(ws: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = ws / "models" / "base"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    out = ws / "models" / "checkpoints" / "lora"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="tiny")
    parser.add_argument("--types", default="F16,Q8_0,Q4_K_M,Q6_K")
    parser.add_argument("--max-wait", type=float, default=600, help="seconds to wait for a quiet machine per run")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    types = args.types.split(",")
    out = OUT / "quantize" / args.model
    ws = out / "ws"
    if args.build_only:
        build(ws, args.model, types)
        return
    # The model is built in a child: Linux carries a parent's peak RSS into the ru_maxrss of
    # the children it forks, so the measuring process must stay small.
    print(f"building {args.model} in {ws}", flush=True)
    run_child = [sys.executable, __file__, "--build-only", "--model", args.model, "--types", args.types]
    timed_run(run_child, env=thread_env(None), cwd=ROOT, log=out.parent / f"build-{args.model}.log")
    env = thread_env(None)
    base_size = sum(f.stat().st_size for f in (ws / "models" / "base").glob("*.safetensors"))

    factory = quiet_run(lambda: timed_run(factory_cli("run", "--only", "quantize", "--force", "-C", str(ws)),
                                          env=env, cwd=ROOT, log=out / "factory.log", ok=(0, 1)), max_wait_s=args.max_wait)
    metrics = json.loads((ws / "metrics" / "quantization.json").read_text())

    script = out / "fp32_merge.py"
    script.write_text(FP32_MERGE)
    fp32_dir, fp32_result = out / "fp32-merged", out / "fp32.json"
    shutil.rmtree(fp32_dir, ignore_errors=True)
    fp32 = quiet_run(lambda: timed_run([sys.executable, str(script), str(ws / "models" / "base"),
                                        str(ws / "models" / "checkpoints" / "lora"), str(fp32_dir), str(fp32_result)],
                                       env=env, cwd=ROOT, log=out / "fp32.log"), max_wait_s=args.max_wait)
    fp32.update(json.loads(fp32_result.read_text()))
    fp32["size_bytes"] = sum(f.stat().st_size for f in fp32_dir.glob("*.safetensors"))
    shutil.rmtree(fp32_dir)

    merge = metrics["merge"]
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {__import__('os').cpu_count()} cores",
        "model": args.model,
        "base_checkpoint_bytes": base_size,
        "factory": {**factory, "merge": {k: merge[k] for k in ("seconds", "check_seconds", "peak_rss_mb", "size_bytes", "dtype",
                                                                 "max_abs_diff_vs_adapter", "max_abs_diff_vs_base")},
                    "types": [{k: t.get(k) for k in ("type", "method", "export_seconds", "converter_peak_rss_mb",
                                                     "size_bytes", "bits_per_weight", "expected_bits_per_weight",
                                                     "relative_score_drop", "perplexity_ratio", "mean_kl",
                                                     "tokenizer_agreement", "generation_stops")}
                              for t in metrics["types"]]},
        "fp32_merge": fp32,
        "ratios": {"merge_peak_rss_factory_over_fp32": merge["peak_rss_mb"] / fp32["peak_rss_mb"],
                   "merge_seconds_factory_over_fp32": merge["seconds"] / fp32["seconds"],
                   "merged_size_factory_over_fp32": merge["size_bytes"] / fp32["size_bytes"]},
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"\n{args.model}: base checkpoint {base_size / 1e6:.1f} MB; factory quantize run {factory['wall_s']:.1f} s wall "
          f"(clean: {factory['clean']})")
    print(f"merge (bf16, with checks): {merge['seconds']:.2f} s ({merge['check_seconds']:.2f} s of checks), peak RSS {merge['peak_rss_mb']:.0f} MB, "
          f"{merge['size_bytes'] / 1e6:.1f} MB on disk")
    print(f"fp32 merge script:         {fp32['seconds']:.2f} s, peak RSS {fp32['peak_rss_mb']:.0f} MB, "
          f"{fp32['size_bytes'] / 1e6:.1f} MB on disk")
    print("ratios factory/fp32: " + ", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items()))
    print(f"{'type':8} {'method':42} {'s':>7} {'child RSS MB':>12} {'MB':>8} {'bpw':>6} {'KL':>9} {'ppl ratio':>9}")
    for t in result["factory"]["types"]:
        print(f"{t['type']:8} {t['method']:42} {t['export_seconds']:7.2f} {t['converter_peak_rss_mb'] or 0:12.0f} "
              f"{t['size_bytes'] / 1e6:8.2f} {t['bits_per_weight']:6.2f} {t['mean_kl']:9.2e} {t['perplexity_ratio']:9.4f}")


if __name__ == "__main__":
    main()
