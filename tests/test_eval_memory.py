"""Evaluation numbers that hold at real sizes: the answer loss against the models' own loss
(several architectures, Gemma's logit softcapping, PEFT, a pad id that occurs inside the
conversation), the paired tests, the bootstrap in bounded memory, and the llama.cpp
settings (GPU offload, the AMX workaround, the context length from the plan)."""

import random
import tracemalloc

import pytest
import torch
from scipy import stats

from factory import modeling
from factory.errors import InputError
from factory.scoring import compare

VOCAB = 97
EOS = 1  # also the pad id below: it occurs inside every conversation


def tiny(kind: str, **extra):
    """A tiny random model of one architecture (built here, nothing downloaded)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, eos_token_id=EOS, pad_token_id=EOS)
    if kind == "gemma3":  # a short sliding window, so padded rows cross it; a softcap small enough to bite
        config = tf.Gemma3TextConfig(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                                     final_logit_softcapping=1.5, initializer_range=0.5, **extra)
        model = tf.Gemma3ForCausalLM(config)
    elif kind == "gemma3-multimodal":  # what AutoModelForCausalLM loads for a real Gemma 3 4B
        text = tf.Gemma3TextConfig(**common, head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                                   final_logit_softcapping=1.5, initializer_range=0.5)
        vision = tf.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=28, patch_size=14)
        model = tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(text_config=text, vision_config=vision,
                                                                  mm_tokens_per_image=1, image_token_index=VOCAB - 1))
    elif kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, initializer_range=0.2, **extra))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, initializer_range=0.2, tie_word_embeddings=True))
    elif kind == "cohere":
        model = tf.CohereForCausalLM(tf.CohereConfig(**common, logit_scale=0.25, initializer_range=0.2))
    elif kind == "granite":
        model = tf.GraniteForCausalLM(tf.GraniteConfig(**common, logits_scaling=4.0, initializer_range=0.2))
    else:
        raise ValueError(kind)
    return model.eval()


def conversations(n: int = 7, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) rows of different lengths: eos ends every prompt turn (as in Llama 3
    or Mistral with pad = eos); only the answer, and its eos, is labelled. One row has two
    labelled turns, as a multi-turn training example has."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = [rng.randrange(2, VOCAB - 1) for _ in range(rng.randrange(3, 30))] + [EOS]
        answer = [rng.randrange(2, VOCAB - 1) for _ in range(rng.randrange(1, 12))] + [EOS]
        ids, labels = prompt + answer, [-100] * len(prompt) + answer
        if i == 2:
            more = [rng.randrange(2, VOCAB - 1) for _ in range(5)] + [EOS] + [7, 8, EOS]
            ids, labels = ids + more, labels + [-100] * 6 + [7, 8, EOS]
        rows.append((ids, labels))
    return rows


def own_loss(model, rows) -> tuple[float, int]:
    """The naive way, each row alone, no padding: the model's own full-logits loss (its forward
    applies its own logit post-processing), summed over the labelled tokens."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids, labels in rows:
            n = sum(label != -100 for label in labels[1:])
            total += float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss) * n
            count += n
    return total / count, count


@pytest.mark.parametrize("kind", ["gemma3", "gemma3-multimodal", "llama", "qwen2", "cohere", "granite"])
def test_answer_loss_equals_the_models_own_loss(kind):
    torch.manual_seed(0)
    model = tiny(kind)
    rows = conversations()
    expected, tokens = own_loss(model, rows)
    loss, count = modeling.answer_loss(model, rows, batch_size=3, pad_token_id=EOS)
    assert count == tokens
    assert loss == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_pad_id_inside_the_conversation_masks_nothing():
    """With pad = eos, masking by `ids != pad` (what answer_loss did) hides every end of turn
    from attention; the mask from each row's length does not."""
    torch.manual_seed(0)
    model = tiny("llama")
    rows = conversations()
    expected, _ = own_loss(model, rows)
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [EOS] * (width - len(i)) for i, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    with torch.inference_mode():  # the old mask, for contrast: the check below can fail
        logits = model(input_ids=ids, attention_mask=(labels != -100) | (ids != EOS)).logits
    old = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    assert abs(float(old) - expected) > 1e-3
    assert modeling.answer_loss(model, rows, batch_size=len(rows), pad_token_id=EOS)[0] == pytest.approx(expected, rel=1e-5)


def test_softcapping_is_applied():
    """Gemma3ForCausalLM caps its logits (final_logit_softcapping); the cap changes the loss,
    so the equality with the model's own loss above would catch a head that dropped it."""
    torch.manual_seed(0)
    model = tiny("gemma3")
    rows = conversations()
    capped = modeling.answer_loss(model, rows, batch_size=4, pad_token_id=EOS)[0]
    model.config.final_logit_softcapping = None
    uncapped = modeling.answer_loss(model, rows, batch_size=4, pad_token_id=EOS)[0]
    assert uncapped == pytest.approx(own_loss(model, rows)[0], rel=1e-5)
    assert abs(capped - uncapped) > 1e-2


def test_peft_model_and_small_chunks(monkeypatch):
    """A LoRA-wrapped model scores its adapter (not the base), and scoring three positions at a
    time (chunk boundaries inside rows and across them) gives the same loss."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = tiny("gemma3")
    rows = conversations()
    base_loss = own_loss(base, rows)[0]
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False)).eval()
    expected = own_loss(model, rows)[0]
    assert abs(expected - base_loss) > 1e-3  # the adapter changes the model
    monkeypatch.setattr(modeling, "LOGIT_VALUES", 3 * VOCAB)
    assert modeling.LogitHead(model, probe=rows[0][0]).positions == 3
    assert modeling.answer_loss(model, rows, batch_size=2, pad_token_id=EOS)[0] == pytest.approx(expected, rel=1e-5)


def test_unknown_logit_post_processing_is_an_error_naming_the_fix():
    torch.manual_seed(0)
    model = tiny("llama")
    forward = model.forward

    def scaled(*args, **kwargs):  # a model whose forward changes its logits in a way no config key says
        out = forward(*args, **kwargs)
        out.logits = out.logits * 3
        return out

    model.forward = scaled
    with pytest.raises(InputError, match="evaluation.loss: false"):
        modeling.answer_loss(model, conversations(), batch_size=2, pad_token_id=EOS)


# --- paired tests and the bootstrap ------------------------------------------------------


def test_zero_one_scores_use_mcnemars_exact_test():
    base = [0, 0, 1, 0, 0, 0, 1, 0, 0, 1, 1, 1]
    tuned = [1, 1, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1]
    result = compare(base, tuned)
    assert result["test"] == "mcnemar_exact" and result["test_name"] == "McNemar's exact test"
    assert result["discordant"] == {"improved": 5, "regressed": 1}
    assert result["p_value"] == pytest.approx(stats.binomtest(5, 6, 0.5).pvalue)  # 0.21875
    assert result["p_value"] == pytest.approx(2 * (1 + 6) / 2**6)  # by hand: P(X <= 1) + P(X >= 5), n = 6


@pytest.mark.parametrize("n", [3, 6, 30])
def test_a_constant_shift_is_never_p_zero(n):
    binary = compare([0] * n, [1] * n)
    continuous = compare([0.25] * n, [0.5] * n)  # zero-variance differences: no t statistic
    assert binary["test"] == "mcnemar_exact" and continuous["test"] == "sign_test"
    for result in (binary, continuous):
        assert result["p_value"] == pytest.approx(2 * 0.5**n) and result["p_value"] > 0
    assert compare([1] * n, [1] * n)["p_value"] == 1.0
    assert compare([0.3] * n, [0.3] * n)["p_value"] == 1.0


def test_continuous_scores_keep_the_paired_t_test():
    rng = random.Random(1)
    base = [rng.random() for _ in range(40)]
    tuned = [b + rng.gauss(0.05, 0.1) for b in base]
    result = compare(base, tuned)
    assert result["test"] == "paired_t"
    assert result["p_value"] == pytest.approx(stats.ttest_rel(tuned, base).pvalue)


def test_bootstrap_memory_is_bounded_at_50000_examples():
    """The old bootstrap held resamples x n indices and values at once (1,000 x 50,000 x 16
    bytes = 800 MB here; 8 GB at the default 10,000 resamples); the interval must still be
    right."""
    import numpy as np

    rng = np.random.default_rng(0)
    base = (rng.random(50_000) < 0.3).astype(float)
    tuned = np.where(rng.random(50_000) < 0.1, 1.0, base)
    tracemalloc.start()
    result = compare(base, tuned, bootstrap=1_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 150 * 2**20, peak
    diff = tuned - base
    se = diff.std(ddof=1) / np.sqrt(diff.size)  # the normal interval, independent of the resampling
    low, high = result["ci95"]
    assert low == pytest.approx(diff.mean() - 1.96 * se, abs=se / 4)
    assert high == pytest.approx(diff.mean() + 1.96 * se, abs=se / 4)


# --- llama.cpp settings ---------------------------------------------------------------------


def test_amx_is_read_from_cpuinfo(tmp_path):
    from factory.llama_cpp import cpu_has_amx

    intel = tmp_path / "intel"
    intel.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile amx_int8\n\n")
    amd = tmp_path / "amd"
    amd.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 sha_ni\nbugs\t\t: amx_fake\n")
    assert cpu_has_amx(intel) and not cpu_has_amx(amd) and not cpu_has_amx(tmp_path / "absent")


def test_context_length_comes_from_the_plan():
    from factory import plan
    from factory.config import FactoryConfig

    assert plan.context_length(FactoryConfig.model_validate({"model": {"max_seq_length": 3000}})) == 3000
    auto = FactoryConfig.model_validate({"model": {"max_seq_length": "auto"}})
    assert plan.context_length(auto) == plan.resolve(auto, plan.accelerator_memory_gib()).max_seq_length


# --- the GGUF divergence check, streamed --------------------------------------------------


@pytest.mark.slow
def test_streamed_divergence_equals_the_full_logits_computation(tmp_path, monkeypatch):
    """quantize's KL and perplexities, from the merged model's kept hidden states, a few
    positions at a time, against the old way: every answer position's full log-softmax of
    both models in memory at once (numpy, written out here)."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factory import example, llama_cpp
    from factory.chat import ChatFormat
    from phases import quantize

    cases = example.generate_task_records(6, seed=3)
    folder = example.build_tiny_gemma3(tmp_path / "model", corpus=example.record_texts(example.generate_task_records(300)))
    gguf = tmp_path / "model-Q8_0.gguf"
    llama_cpp.convert(llama_cpp.converter_dir(None), folder, gguf, "q8_0", tmp_path / "convert.log")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    chat = ChatFormat.from_tokenizer(AutoTokenizer.from_pretrained(folder))
    records = [{"conversations": [{"role": "user", "content": f"{r['instruction']}\n{r['input']}"},
                                  {"role": "assistant", "content": r["output"]}]} for r in cases]
    llm = llama_cpp.load(gguf, n_ctx=256, logits_all=True)

    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    nll_gguf = nll_merged = kl = 0.0
    tokens = 0
    for record in records:
        ids, labels = chat.answer_example(record)
        head = next(i for i, label in enumerate(labels) if label != -100)
        with torch.inference_mode():
            ref = log_softmax(model(input_ids=torch.tensor([ids])).logits[0, head - 1 : -1].double().numpy())
        llm.reset()
        llm.eval(ids)
        mine = log_softmax(np.asarray(llm.scores[head - 1 : len(ids) - 1], dtype=np.float64))
        rows, targets = np.arange(len(ids) - head), np.asarray(ids[head:])
        nll_gguf -= mine[rows, targets].sum()
        nll_merged -= ref[rows, targets].sum()
        kl += (np.exp(ref) * (ref - mine)).sum()
        tokens += len(targets)

    monkeypatch.setattr(modeling, "LOGIT_VALUES", 3 * model.config.vocab_size)  # 3 positions a chunk
    reference = quantize._divergence_reference(model, chat, records, 256)
    assert reference.head.positions == 3 and all(len(hidden) > 3 for _, _, hidden in reference.examples)
    streamed = quantize._divergence(llm, reference)
    assert streamed[3] == tokens
    assert streamed[0] == pytest.approx(nll_gguf, rel=1e-5) and streamed[1] == pytest.approx(nll_merged, rel=1e-5)
    assert kl > 0 and streamed[2] == pytest.approx(kl, rel=1e-3, abs=1e-7)


# --- evaluation.max_examples with the shipped gates -----------------------------------------


@pytest.mark.slow
def test_max_examples_passes_the_baseline_gate_honestly(tmp_path):
    """baseline on the first 8 test examples: the shipped baseline-established gate passes,
    and fails when one of those 8 was not scored."""
    import json
    import os
    import subprocess
    import sys

    def factory(*args):
        return subprocess.run([sys.executable, "-m", "factory", *map(str, args)], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)

    ws = tmp_path / "ws"
    assert factory("init", "--example", ws, "--records", 600, "--steps", 10).returncode == 0
    (ws / "factory.yaml").write_text((ws / "factory.yaml").read_text() + "  max_examples: 8\n")  # the evaluation section
    run = factory("run", "baseline", "-C", ws)
    assert run.returncode == 0 and "gate baseline-established: passed" in run.stderr, run.stderr[-3000:]
    baseline = json.loads((ws / "metrics" / "baseline.json").read_text())
    split = json.loads((ws / "metrics" / "split.json").read_text())
    assert baseline["num_examples"] == baseline["examples_selected"] == 8 < split["counts"]["test"]
    assert baseline["test_split"]["records"] == split["counts"]["test"]

    baseline["num_examples"] = 7
    (ws / "metrics" / "baseline.json").write_text(json.dumps(baseline))
    check = factory("gate", "check", "baseline-established", "-C", ws)
    assert check.returncode == 1, check.stdout + check.stderr
