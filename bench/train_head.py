"""Benchmark: a CPU training step with the head at every position (the model's own loss, as
the finetune phase computed it before) against the head only where a token is trained (the
phase's loss now), on the example families' tiny models (real vocabularies: Phi-3 32,064,
Llama 3.1 128,256); and the phase's loss with its logits in chunks of N values, recomputed in
the backward pass (`--chunks`, modeling.TRAINING_LOGIT_VALUES), against all trained positions'
logits at once (`whole`, the phase before chunking).

    python bench/train_head.py                     # phi-3 and llama-3.1, batch 16, 8 steps x 3 pairs
    python bench/train_head.py --families phi-3 --batch 16 --steps 8 --reps 3
    python bench/train_head.py --families mistral --chunks whole,4194304,1048576
    python bench/train_head.py --families mistral --chunks whole,4194304 --trained-head   # lm_head in modules_to_save

Each family's model is built by factory.example (bench/out/train-head/<family>/), given the
example's LoRA (r 16 on every linear layer), and trained on the example's own records rendered
by its chat format, one torch thread. The two losses alternate (own, answer-only, own, ...) on
the same batches; each timing is forward + backward + an AdamW step. Prints medians and the
ratio, and the loss of both on the first batch (they must agree).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

OUT = Path(__file__).parent / "out" / "train-head"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", default="phi-3,llama-3.1")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--chunks", default="", help="comma-separated logit values per chunk of the answer-only "
                        "loss, or `whole`; each is timed against `own` (default: the phase's setting only)")
    parser.add_argument("--trained-head", action="store_true", help="train the output embedding whole "
                        "(lora.modules_to_save: [lm_head])")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    for family in args.families.split(","):
        run_family(family, args.batch, args.steps, args.reps, [c for c in args.chunks.split(",") if c],
                   args.trained_head)


def run_family(family: str, batch_size: int, steps: int, reps: int, chunks: list[str], trained_head: bool) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from factory import example, modeling
    from factory.chat import ChatFormat
    from phases.finetune import _cpu_safe_trainer, _token_dataset

    folder = OUT / family
    if not (folder / "config.json").exists():
        example.build_family_model(folder, example.FAMILIES[family])
    chat = ChatFormat.from_tokenizer(AutoTokenizer.from_pretrained(folder))
    records = [{"conversations": [{"role": "system", "content": r["instruction"]}, {"role": "user", "content": r["input"]},
                                  {"role": "assistant", "content": r["output"]}]}
               for r in example.generate_task_records(batch_size * steps, seed=1)]
    dataset, _ = _token_dataset(chat, records, 128)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM",
                                      modules_to_save=["lm_head"] if trained_head else None))
    trainer = _cpu_safe_trainer()(model=model, processing_class=chat.tokenizer, train_dataset=dataset,
                                  args=SFTConfig(output_dir=str(OUT / "trainer"), use_cpu=True, report_to=[],
                                                 per_device_train_batch_size=batch_size, max_steps=1,
                                                 dataset_kwargs={"skip_prepare_dataset": True}))
    batches = list(trainer.get_train_dataloader())[:steps]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    losses = {"own": lambda b: model(**b, use_cache=False).loss}
    default = modeling.TRAINING_LOGIT_VALUES

    def answer_only(values: int):
        def loss_of(b):
            modeling.TRAINING_LOGIT_VALUES = values
            try:
                return trainer.compute_loss(model, dict(b))
            finally:
                modeling.TRAINING_LOGIT_VALUES = default
        return loss_of

    for chunk in chunks or [str(default)]:
        losses[f"answer-only {chunk}"] = answer_only(1 << 62 if chunk == "whole" else int(chunk))
    first = {name: float(loss(batches[0])) for name, loss in losses.items()}
    times: dict[str, list[float]] = {name: [] for name in losses}
    for _ in range(reps):
        for name, loss_of in losses.items():
            started = time.perf_counter()
            for batch in batches:
                optimizer.zero_grad()
                loss_of(batch).backward()
                optimizer.step()
            times[name].append((time.perf_counter() - started) / len(batches))
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    trained = sum(int((b["labels"] != -100).sum()) for b in batches) / len(batches)
    own = statistics.median(times["own"])
    print(f"{family}: vocabulary {model.config.vocab_size}, batch {batch_size} ({tokens:.0f} tokens, {trained:.0f} trained)"
          + (", head trained whole" if trained_head else ""))
    print(f"  own loss (head at every position): {own * 1000:.0f} ms/step   first-batch loss {first['own']:.5f}")
    for name in losses:
        if name != "own":
            ours = statistics.median(times[name])
            print(f"  {name + ' logit values a chunk:':35s}{ours * 1000:.0f} ms/step   first-batch loss {first[name]:.5f}"
                  f"   ratio to own {ours / own:.2f}")


if __name__ == "__main__":
    main()
