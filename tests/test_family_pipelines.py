"""Every model family through every phase, and data beyond the example's chat task.

Each family's example (`factory init --example --family F`: a tiny model of the family's real
architecture, vocabulary, tokenizer and chat template, random weights), a Llama-architecture
model with a chat template of its own and no pad token (the issue's original report: it died in
finetune with exit 3), and a GPT-2 base model trained with a named template, run format -> split -> baseline -> finetune -> evaluate -> quantize at a
small size, through the CLI as a user runs them. The gates need not pass on these small runs;
every phase must run and every artifact be right, checked against what each real model is known
to write (the tables below), not against what the factory derived from it:
- the training masks the finetune phase builds, token by token;
- generation stops at end of turn: the evaluate phase's answers against a greedy decoding here
  that stops at the real end-of-turn token;
- the GGUF: converted by llama.cpp's converter, its tokenizer agrees with the Hugging Face one,
  llama.cpp marks the end-of-turn token as end of generation, and a chat completion with the
  file's embedded template stops there; the Modelfile names the stop token.
Plain text (the `text` input format) on a base model without a chat template trains as language
modelling and is scored by loss and perplexity.

The pipelines run two at a time (one torch thread each), once per module.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
# One thread: on 2 cores shared with other work, two OpenMP threads train far slower.
ENV = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

PHASES = ("baseline", "finetune", "evaluate", "quantize")
METRICS = {"baseline": "baseline", "finetune": "training-stats", "evaluate": "evaluation", "quantize": "quantization"}
CUSTOM = "custom"  # example.build_custom_template_model: Llama 2 architecture, an Alpaca-like template of its own
GPT2 = "gpt-2 base"  # example.build_gpt2_base_model: GPT-2's architecture and vocabulary, no chat template
BUILDERS = {CUSTOM: "build_custom_template_model", GPT2: "build_gpt2_base_model"}  # the user's own model folders

# What each real model writes, from its model card and files, independently of the factory:
# the end-of-turn token after every answer, the text before every answer (the assistant
# header), what may follow the end of turn in a trained span (a newline; Phi-3's template ends
# a conversation with EOS), and llama.cpp's architecture name for it. Qwen 3 writes an empty
# reasoning block before each answer (TRL's training variant of its template, which the model
# is trained on, writes it before every answer), and its answers are what follows `</think>`.
REAL = {
    "gemma-3": dict(eot="<end_of_turn>", header="<start_of_turn>model\n", arch="gemma3"),
    "gemma-3-vision": dict(eot="<end_of_turn>", header="<start_of_turn>model\n", arch="gemma3"),
    "llama-3.1": dict(eot="<|eot_id|>", header="<|start_header_id|>assistant<|end_header_id|>\n\n", arch="llama"),
    "qwen-2.5": dict(eot="<|im_end|>", header="<|im_start|>assistant\n", arch="qwen2"),
    "qwen-3": dict(eot="<|im_end|>", header="<|im_start|>assistant\n", arch="qwen3",
                   answer_prefix="<think>\n\n</think>\n\n", reasoning_end="</think>", training_template="qwen3_training"),
    "deepseek-r1": dict(eot="<｜end▁of▁sentence｜>", header="<｜Assistant｜>", arch="llama", reasoning_end="</think>",
                        training_template="deepseek_r1_distill_training"),
    "mistral": dict(eot="</s>", header="[/INST]", arch="llama"),
    "phi-3": dict(eot="<|end|>", header="<|assistant|>\n", arch="phi3", final_tail="<|endoftext|>"),
    CUSTOM: dict(eot="</s>", header="### Answer:\n", arch="llama"),
}
MODELS = list(REAL)
RECORDS = 400  # 360 train, 20 val, 20 test records (the splits-ready gate wants 20)
# training steps of batch 4: enough for some answers to end at end of turn; the tiny Gemma's
# steps cost little (a 400-token vocabulary) and it needs more of them to stop; so does the tiny
# Qwen 3, whose output embedding is its input embedding, frozen (80 steps: no answer stopped);
# and the tiny Phi-3 on some draws of the split and some CPUs (80 steps, split seeds 3406-3409:
# 7, 0, 3 and 8 of 8 answers stopped; 160 steps, seeds 3404, 3407-3409: 8, 7, 5 and 7 on an AMD
# EPYC, 0 of 8 on an Intel Xeon with AVX-512, where 240 steps stop 8 of 8)
STEPS = {"gemma-3": 240, "gemma-3-vision": 240, "qwen-3": 200, "phi-3": 240}
DEFAULT_STEPS = 80
EXAMPLES = 8  # evaluation.max_examples: test examples generated and scored
MAX_NEW_TOKENS = 32  # the example's evaluation.max_new_tokens


def factory(*args, check_rc=None, timeout=1500, log: Path | None = None):
    proc = subprocess.run([sys.executable, "-m", "factory", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)
    if log is not None:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ factory {' '.join(map(str, args))}\n{proc.stdout}{proc.stderr}\nexit {proc.returncode}\n")
    if check_rc is not None:
        assert proc.returncode in ((check_rc,) if isinstance(check_rc, int) else check_rc), \
            proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metrics(ws: Path, stem: str) -> dict:
    return json.loads((ws / "metrics" / f"{stem}.json").read_text())


def small_run(root: Path, *, examples: int | None = None) -> None:
    """Batches of 4 and one GGUF type (and `examples` test examples scored, validation every
    20 steps): a full vocabulary (up to Qwen's 151,936) makes every token's logits cost, and
    these runs check that each phase works, not how well."""
    config = root / "factory.yaml"
    text = config.read_text().replace("per_device_train_batch_size: 16", "per_device_train_batch_size: 4")
    text = text.replace("gguf_quantization: [Q8_0, Q4_K_M]", "gguf_quantization: [Q8_0]")
    if examples:
        text = text.replace("  logging_steps: 10\n", "  logging_steps: 10\n  eval_steps: 20\n")
        text = text.replace("  batch_size: 64\n", f"  batch_size: 64\n  max_examples: {examples}\n")
    config.write_text(text)


# The CLI's own entry point, called once per command in one process: each command runs as
# `factory ...` does (argument parsing, runner, exit code), without importing torch,
# transformers and TRL again for every phase (most of a small run's time on 2 cores).
CLI_SEQUENCE = """
import json, sys
from factory.cli import main
for args in json.loads(sys.argv[1]):
    sys.argv = ["factory", *args]
    try:
        main()
    except SystemExit as e:
        print("factory", *args, "-> exit", e.code, flush=True)
        if e.code not in (0, 1) or args[1] == "split" and e.code:
            sys.exit(e.code)
"""


def run_every_phase(root: Path, log: Path | None = None) -> None:
    """format and split (their gates must pass), then each model phase on its own: a failed
    gate (exit 1) on a small run does not stop the next phase from being tried."""
    commands = [["run", "split", "-C", str(root)], *(["run", "--only", p, "-C", str(root)] for p in PHASES)]
    proc = subprocess.run([sys.executable, "-c", CLI_SEQUENCE, json.dumps(commands)], capture_output=True, text=True,
                          env=ENV, timeout=3000)
    if log is not None:
        with open(log, "a", encoding="utf-8") as f:
            f.write(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for phase in PHASES:
        assert (root / "metrics" / f"{METRICS[phase]}.json").exists(), phase


# --- every family through every phase ---------------------------------------------------------


def _run_model(root: Path, name: str) -> Path:
    log = root.parent / f"{name}.log"
    factory("init", "--example", root, *(["--family", name] if name not in BUILDERS else []), "--records", RECORDS,
            "--steps", STEPS.get(name, DEFAULT_STEPS), check_rc=0, log=log)
    if name in BUILDERS:  # the user's own model folder in place of the example's
        import shutil

        shutil.rmtree(root / "models" / "base")
        subprocess.run([sys.executable, "-c", f"import sys; from factory.example import {BUILDERS[name]}; "
                        f"{BUILDERS[name]}(sys.argv[1])", root / "models" / "base"],
                       check=True, env=ENV, capture_output=True, timeout=600)
    if name == GPT2:  # a base model: the user names a template
        with open(root / "factory.yaml", "a", encoding="utf-8") as f:
            f.write("\ndataset:\n  chat_template: chatml\n")
    small_run(root, examples=EXAMPLES)
    run_every_phase(root, log)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every model's workspace after the whole pipeline, or the error that stopped it. The
    largest vocabularies first, so that the two workers finish together."""
    base = tmp_path_factory.mktemp("pipelines")
    order = ["qwen-3", "qwen-2.5", "llama-3.1", "deepseek-r1", "phi-3", GPT2, "mistral", CUSTOM, "gemma-3", "gemma-3-vision"]

    def attempt(name):
        try:
            return _run_model(base / name, name)
        except BaseException as e:  # reported by each of that model's tests
            return e

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(order, pool.map(attempt, order)))


@pytest.fixture
def run(runs, request):
    name = request.node.callspec.params["name"]
    if isinstance(runs[name], BaseException):
        raise runs[name]
    return runs[name]


def _tokenizer(root: Path):
    """The tokenizer as the pipeline loads it (DeepSeek-R1-Distill-Llama's needs modeling.load_tokenizer)."""
    from factory import modeling

    return modeling.load_tokenizer(str(root / "models" / "base"))


def _token(tokenizer, text: str) -> int:
    (token_id,) = tokenizer(text, add_special_tokens=False)["input_ids"]
    return token_id


def _trl_template(name: str | None) -> str | None:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8") if name else None


def _template_messages(record: dict) -> list[dict]:
    return [{"role": t["role"], "content": t["content"]} for t in record["conversations"]]


def _ids(tokenizer, text: str) -> list[int]:
    """The ids of a rendered conversation: BOS in front where the tokenizer adds one and the
    template did not write it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    adds_bos = tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id] and tokenizer.bos_token_id is not None
    return [tokenizer.bos_token_id, *ids] if adds_bos and not text.startswith(tokenizer.bos_token) else ids


def _trained_runs(labels: list[int]) -> list[range]:
    runs, start = [], None
    for i, label in enumerate([*labels, -100]):
        if label != -100 and start is None:
            start = i
        elif label == -100 and start is not None:
            runs.append(range(start, i))
            start = None
    return runs


def check_masks(tokenizer, name: str, record: dict, ids: list[int], labels: list[int], max_length: int) -> None:
    """Token by token: the ids are the rendered conversation's; each answer is one trained run
    (its tokens, then the end-of-turn token, then at most a newline, or Phi-3's closing EOS);
    everything else is -100."""
    real = REAL[name]
    turns = _template_messages(record)
    text = tokenizer.apply_chat_template(turns, tokenize=False, chat_template=_trl_template(real.get("training_template")))
    assert ids == _ids(tokenizer, text)[:max_length], text
    assert all(label in (-100, token) for token, label in zip(ids, labels))
    answers = [t["content"] for t in turns if t["role"] == "assistant"]
    runs = _trained_runs(labels)
    assert len(runs) == len(answers), [tokenizer.decode([ids[i] for i in r]) for r in runs]
    eot_id = _token(tokenizer, real["eot"])
    untrained_start = 0
    prefix = tokenizer(real.get("answer_prefix", ""), add_special_tokens=False)["input_ids"]
    for k, (span, answer) in enumerate(zip(runs, answers)):
        trained = [ids[i] for i in span]
        assert trained[:len(prefix)] == prefix
        trained = trained[len(prefix):]
        # the answer's tokens; the first may carry the space the template writes before it
        # (SentencePiece's `▁07`, or a lone `▁` before a digit)
        first = tokenizer.decode(trained[:1]).strip()
        piece = tokenizer.convert_ids_to_tokens(trained[0])
        assert answer.startswith(first) and (first or set(piece) <= {"▁", " "}), (piece, answer)
        eot_at = trained.index(eot_id)
        assert tokenizer.decode(trained[:eot_at]).strip() == answer
        tail = tokenizer.decode(trained[eot_at + 1:]).strip()
        assert tail == "" or (k == len(answers) - 1 and tail == real.get("final_tail")), tail
        # what comes before it is untrained and ends with the assistant header
        prompt = tokenizer.decode(ids[untrained_start:span.start])
        assert prompt.rstrip().endswith(real["header"].rstrip()), prompt
        untrained_start = span.stop
    assert all(label == -100 for label in labels[untrained_start:])


MULTI_TURN = {"conversations": [
    {"role": "user", "content": "Locale: de-DE. Date: 2024-03-07. Amount: 1234.50 EUR."},
    {"role": "assistant", "content": "07.03.2024 | 1.234,50 €"},
    {"role": "user", "content": "And for ja-JP?"},
    {"role": "assistant", "content": "2024/03/07 | €1,234.50"}]}


@pytest.mark.parametrize("name", MODELS)
def test_every_phase_runs_and_records_the_real_chat_format(run, name):
    baseline, stats, evaluation, quantization = (metrics(run, METRICS[p]) for p in PHASES)
    eot = REAL[name]["eot"]
    assert stats["completed"] and stats["steps"] == STEPS.get(name, DEFAULT_STEPS)
    assert stats["chat_format"]["end_of_turn"] == eot
    assert stats["chat_format"]["template"].startswith("auto")  # the model's own template
    for scored in (baseline, evaluation):
        assert scored["num_examples"] == EXAMPLES and scored["stopping"]["end_of_turn"] == eot
        assert scored["stopping"]["rate"] is not None and scored["loss"] is not None
    assert evaluation["comparison"]["metric"] == "exact_match"
    assert quantization["gguf_files"] == 1 and quantization["merge"]["max_abs_diff_vs_base"] > 0


@pytest.mark.parametrize("name", MODELS)
def test_training_masks_token_by_token(run, name):
    """The finetune phase's own training set (train split and a multi-turn record), checked
    against the tokenizer's rendering of each conversation."""
    from transformers import GenerationConfig

    from factory.chat import ChatFormat
    from factory.config import load_config
    from phases.finetune import _token_dataset

    tokenizer = _tokenizer(run)
    cfg = load_config(run / "factory.yaml", {})
    chat = ChatFormat.from_tokenizer(_tokenizer(run), cfg.dataset.chat_template,
                                     GenerationConfig.from_pretrained(run / "models" / "base"))
    records = [json.loads(line) for line in (run / "data" / "splits" / "train.jsonl").read_text().splitlines()[:24]]
    records.append(MULTI_TURN)
    dataset, dropped = _token_dataset(chat, records, cfg.model.max_seq_length)
    assert dropped == 0 and len(dataset) == len(records)
    for record, row in zip(records, dataset):
        check_masks(tokenizer, name, record, row["input_ids"], row["labels"], cfg.model.max_seq_length)
        assert chat.pad_token_id not in row["input_ids"]


def _stop_ids(tokenizer, root: Path, name: str) -> set[int]:
    """The real end-of-turn token and the EOS ids the model's generation_config.json lists."""
    config = json.loads((root / "models" / "base" / "generation_config.json").read_text())
    eos = config.get("eos_token_id")
    return {_token(tokenizer, REAL[name]["eot"]), *(eos if isinstance(eos, list) else [eos] if eos is not None else [])}


@pytest.mark.parametrize("name", MODELS)
def test_generation_stops_at_end_of_turn(run, name):
    """The evaluate phase's answers are the fine-tuned model's greedy continuations, cut at the
    end of turn or another of the model's stop tokens: each is checked against a plain argmax
    loop here (no stop criteria, prompts from the tokenizer's own template), and some answers
    must end there (the model learned to stop; a Phi-3 trained this little ends with the EOS its
    template writes after the last turn, before it learns `<|end|>`)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer(run)
    evaluation = metrics(run, "evaluation")
    records = [json.loads(line) for line in (run / "data" / "splits" / "test.jsonl").read_text().splitlines()]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "models" / "base"),
                                      run / evaluation["adapter"]).eval()
    stops = _stop_ids(tokenizer, run, name)
    stopped = 0
    for example in evaluation["examples"]:
        turns = _template_messages(records[example["index"]])[:-1]
        ids = _ids(tokenizer, tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True))
        new = []
        with torch.inference_mode():
            for _ in range(MAX_NEW_TOKENS):
                logits = model(input_ids=torch.tensor([ids + new]), logits_to_keep=1, use_cache=False).logits
                new.append(int(logits[0, -1].argmax()))
                if new[-1] in stops:
                    break
        ended = new[-1] in stops
        answer = tokenizer.decode(new[:-1] if ended else new, skip_special_tokens=True)
        if REAL[name].get("reasoning_end"):
            answer = answer.split(REAL[name]["reasoning_end"])[-1]
        answer = answer.strip()
        assert (example["prediction"], example["stopped"]) == (answer, ended), tokenizer.decode(new)
        stopped += ended
    assert stopped > 0 and evaluation["stopping"]["rate"] == stopped / len(evaluation["examples"])


# No text starts with a space: there transformers 5 leaves out the SentencePiece space prefix
# that the original tokenizers and llama.cpp write (see tests/test_families.py). A rendered
# conversation starts with the template's own text.
ROUND_TRIP_TEXTS = ["Hello world", "07.03.2024 | 1.234,50 €", "two  spaces\n  and\ttabs\n\n",
                    "こんにちは 🦙 Äpfel", "<not a special token>"]


@pytest.mark.parametrize("name", MODELS)
def test_gguf_tokenizer_template_and_stop_tokens(run, name):
    """The quantize phase's GGUF, read by llama.cpp: the family's architecture, the Hugging Face
    tokenizer's ids on conversations and text, the end-of-turn token marked end of generation
    (llama_vocab_is_eog, what llama-server, llama-cli and Ollama stop on), the embedded template
    ending a chat completion there; the Modelfile stops at it."""
    import llama_cpp

    from factory import llama_cpp as factory_llama_cpp

    tokenizer = _tokenizer(run)
    quantization = metrics(run, "quantization")
    (gguf,) = quantization["types"]
    path = run / gguf["path"]
    assert path.name == "model-Q8_0.gguf" and "convert_hf_to_gguf" in gguf["method"]
    # greedy chats with the embedded template answer as greedy completions from the Hugging Face
    # prompt ids (Phi-3's lost BOS in llama-cpp-python's chats; Qwen 3's reasoning block)
    assert gguf["chat_matches_greedy"] == 1.0
    # loaded as the product loads a GGUF: on an AMX CPU, ggml's AMX and repacked kernels crash
    # on these tiny models (factory.llama_cpp.placement), and llama_cpp.Llama's defaults use them
    llm = factory_llama_cpp.load(path, n_ctx=256, threads=1)
    assert llm.metadata["general.architecture"] == REAL[name]["arch"]
    records = [json.loads(line) for line in (run / "data" / "splits" / "test.jsonl").read_text().splitlines()]
    texts = [tokenizer.apply_chat_template(_template_messages(r), tokenize=False) for r in [*records, MULTI_TURN]]
    for text in texts + ROUND_TRIP_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
            tokenizer(text, add_special_tokens=False)["input_ids"], text
    for text in ROUND_TRIP_TEXTS[:2]:  # BOS where transformers adds it
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"], text

    eot = REAL[name]["eot"]
    eot_id = _token(tokenizer, eot)
    assert llm.tokenize(eot.encode(), add_bos=False, special=True) == [eot_id]
    assert llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), eot_id)
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    prompt = _template_messages(records[0])[:-1]
    # the end-of-turn token made certain: the completion ends there, with nothing of it in the text
    out = llm.create_chat_completion(prompt, max_tokens=8, temperature=0.0, logit_bias={eot_id: 100.0})
    assert out["choices"][0]["finish_reason"] == "stop" and out["choices"][0]["message"]["content"] == ""
    # and forbidden: the same completion runs on to max_tokens
    llm.reset()
    out = llm.create_chat_completion(prompt, max_tokens=8, temperature=0.0,
                                     logit_bias={i: -100.0 for i in _stop_ids(tokenizer, run, name)})
    assert out["choices"][0]["finish_reason"] == "length"

    modelfile = (run / "models" / "quantized" / "Modelfile").read_text()
    assert "FROM ./model-Q8_0.gguf" in modelfile and 'TEMPLATE """' in modelfile
    assert f'PARAMETER stop "{eot}"' in modelfile.splitlines()
    # the sampling settings of the model's generation_config.json, under Ollama's names
    generation = json.loads((run / "models" / "base" / "generation_config.json").read_text())
    ollama_names = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repeat_penalty"}
    parameters = dict(line.split()[1:3] for line in modelfile.splitlines() if line.startswith("PARAMETER "))
    assert {k: float(v) for k, v in parameters.items() if k not in ("stop", "num_ctx")} == \
        {ollama_names[k]: float(v) for k, v in generation.items() if k in ollama_names}


def test_a_model_with_a_template_of_its_own_and_no_pad_token_keeps_them(runs):
    """The custom model is what a user brings: no pad token, a template none of the factory's;
    the factory pads with a token that never occurs in a conversation (not EOS, its end of turn)."""
    from transformers import AutoTokenizer

    run = runs[CUSTOM]
    if isinstance(run, BaseException):
        raise run
    base = AutoTokenizer.from_pretrained(run / "models" / "base")
    assert base.pad_token is None and base.chat_template
    shipped = (Path(__file__).parents[1] / "factory" / "templates").glob("*.jinja")
    assert not any(base.chat_template == p.read_text() for p in shipped)
    pad = metrics(run, "training-stats")["chat_format"]["pad_token"]
    assert pad not in (None, base.eos_token, base.bos_token)


def test_a_base_model_of_another_architecture_trains_with_a_named_template(runs):
    """GPT-2 as a user brings it: Conv1D layers named none of Llama's, learned position
    embeddings, `<|endoftext|>` both BOS and EOS, no chat template (`dataset.chat_template:
    chatml`, whose `<|im_end|>` is plain text in this vocabulary). Every linear layer gets an
    adapter; each answer trains as its text, ChatML's end and EOS; generation stops at EOS and
    the answer is what precedes `<|im_end|>`; the GGUF keeps the position embeddings in F32 and
    its size is what the type implies; the Modelfile stops at both."""
    import gguf
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.pytorch_utils import Conv1D

    from factory.chat import ChatFormat
    from factory.config import load_config
    from phases.finetune import _token_dataset

    run = runs[GPT2]
    if isinstance(run, BaseException):
        raise run
    tokenizer = _tokenizer(run)
    eos = tokenizer.eos_token_id
    assert tokenizer.chat_template is None and tokenizer.bos_token_id == eos == 50256
    chatml = (Path(__file__).parents[1] / "factory" / "templates" / "chatml.jinja").read_text()
    stats, evaluation, quantization = (metrics(run, METRICS[p]) for p in ("finetune", "evaluate", "quantize"))
    assert stats["chat_format"]["template"] == "chatml" and stats["chat_format"]["stop_token_ids"] == [eos]

    # adapters: on every Conv1D layer of the model, read from the adapter's own file
    base = AutoModelForCausalLM.from_pretrained(run / "models" / "base")
    conv1d = {name for name, module in base.named_modules() if isinstance(module, Conv1D)}
    with safe_open(run / evaluation["adapter"] / "adapter_model.safetensors", "pt") as f:
        adapted = {key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for key in f.keys()}
    assert len(conv1d) == 16 and adapted == conv1d

    # masks: the answer, `<|im_end|>\n` and EOS trained; the prompt ends with the assistant header
    cfg = load_config(run / "factory.yaml", {})
    chat = ChatFormat.from_tokenizer(_tokenizer(run), cfg.dataset.chat_template,
                                     GenerationConfig.from_pretrained(run / "models" / "base"))
    records = [json.loads(line) for line in (run / "data" / "splits" / "train.jsonl").read_text().splitlines()[:16]]
    dataset, _ = _token_dataset(chat, [*records, MULTI_TURN], cfg.model.max_seq_length)
    for record, row in zip([*records, MULTI_TURN], dataset):
        turns = _template_messages(record)
        # ChatML's text turn by turn (a turn's end is a pre-token boundary), EOS after each answer
        assert row["input_ids"] == [i for t in turns for i in [
            *tokenizer(f"<|im_start|>{t['role']}\n{t['content']}<|im_end|>\n")["input_ids"],
            *([eos] if t["role"] == "assistant" else [])]][:cfg.model.max_seq_length]
        answers = [t["content"] for t in turns if t["role"] == "assistant"]
        spans = _trained_runs(row["labels"])
        assert [tokenizer.decode([row["input_ids"][i] for i in span]) for span in spans] == \
            [f"{answer}<|im_end|>\n<|endoftext|>" for answer in answers]
        before = tokenizer.decode(row["input_ids"][:spans[-1].start])
        assert before.endswith("<|im_start|>assistant\n") and before.count("<|endoftext|>") == len(answers) - 1

    # generation: a plain argmax loop from the chatml prompt, stopped at EOS, cut at `<|im_end|>`
    model = PeftModel.from_pretrained(base, run / evaluation["adapter"]).eval()
    test = [json.loads(line) for line in (run / "data" / "splits" / "test.jsonl").read_text().splitlines()]
    stopped = 0
    for example in evaluation["examples"]:
        prompt = tokenizer.apply_chat_template(_template_messages(test[example["index"]])[:-1], tokenize=False,
                                               add_generation_prompt=True, chat_template=chatml)
        ids, new = tokenizer(prompt)["input_ids"], []
        with torch.inference_mode():
            while len(new) < MAX_NEW_TOKENS and (not new or new[-1] != eos):
                new.append(int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
        ended = new[-1] == eos
        answer = tokenizer.decode(new[:-1] if ended else new).split("<|im_end|>")[0].strip()
        assert (example["prediction"], example["stopped"]) == (answer, ended), tokenizer.decode(new)
        stopped += ended
    assert stopped > 0 and evaluation["stopping"]["rate"] == stopped / len(evaluation["examples"])

    # the GGUF: GPT-2's architecture, the position embeddings in F32, every other matrix Q8_0
    (q8,) = quantization["types"]
    reader = gguf.GGUFReader(run / q8["path"])
    assert reader.fields["general.architecture"].contents() == "gpt2"
    types = {t.name: t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    assert types.pop("position_embd.weight") == "F32" and set(types.values()) == {"Q8_0"}
    assert q8["size_within_bounds"] and q8["tokenizer_agreement"] == 1.0
    modelfile = (run / "models" / "quantized" / "Modelfile").read_text().splitlines()
    assert {'PARAMETER stop "<|endoftext|>"', 'PARAMETER stop "<|im_end|>"'} <= set(modelfile)


def test_an_image_text_model_trains_and_exports_its_language_model(runs):
    """Gemma 3 4B-27B are Gemma3ForConditionalGeneration: adapters go on the language model
    only (lora.finetune_vision_layers is off), the vision tower comes through the merge
    unchanged, and the GGUF (the language model; the image part goes to llama.cpp's projector
    file) is checked for size against the language model's weights alone."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    run = runs["gemma-3-vision"]
    if isinstance(run, BaseException):
        raise run
    with safe_open(run / "models" / "checkpoints" / "lora" / "adapter_model.safetensors", "pt") as f:
        adapted = list(f.keys())
    assert adapted and all(".language_model." in k for k in adapted), [k for k in adapted if "language_model" not in k]
    base = AutoModelForCausalLM.from_pretrained(run / "models" / "base")
    merged = AutoModelForCausalLM.from_pretrained(run / "models" / "checkpoints" / "merged")
    assert type(base).__name__ == type(merged).__name__ == "Gemma3ForConditionalGeneration"
    tower = {n: p for n, p in base.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n}
    merged_weights = dict(merged.named_parameters())
    assert tower and all(torch.equal(p.to(merged_weights[n].dtype), merged_weights[n]) for n, p in tower.items())
    (gguf,) = metrics(run, "quantization")["types"]
    language_model = sum(p.numel() for p in base.model.language_model.parameters())  # the head is tied to it
    assert gguf["parameters"] == language_model < sum(p.numel() for p in base.parameters())
    assert gguf["size_within_bounds"]


def test_an_image_text_model_gets_a_vision_projector_that_embeds_images_as_the_model_does(runs, tmp_path):
    """The vision tower and projector go to llama.cpp's projector file (llama-server --mmproj),
    whose tensors hold every vision parameter, and llama.cpp's multimodal library embeds fixed
    images as the merged model does. A projector file of another model fails the same check."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from factory import llama_cpp, modeling
    from phases import quantize

    run = runs["gemma-3-vision"]
    if isinstance(run, BaseException):
        raise run
    quantization = metrics(run, "quantization")
    projector = quantization["vision_projector"]
    path = run / projector["path"]
    merged_dir = run / "models" / "checkpoints" / "merged"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    vision = sum(p.numel() for n, p in merged.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n)
    assert projector["exported"] and projector["parameters"] == projector["expected_parameters"] == vision
    assert sum(int(t.n_elements) for t in GGUFReader(path).tensors) == vision
    assert projector["image_tokens"] == [[1, 1], [1, 1]]  # mm_tokens_per_image
    assert projector["min_cosine"] >= 0.99
    commands = quantization["commands"]
    assert f"--mmproj {projector['path']}" in commands["llama_server"]

    # the projector of a model whose projection differs (its sign flipped) fails the check
    other = tmp_path / "other"
    with torch.no_grad():
        merged.model.multi_modal_projector.mm_input_projection_weight.neg_()
    merged.save_pretrained(other)
    for name in ("preprocessor_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        (other / name).write_bytes((merged_dir / name).read_bytes())
    converter = llama_cpp.converter_dir(None)
    llama_cpp.convert(converter, other, tmp_path / "mmproj.gguf", "f16", tmp_path / "convert.log", mmproj=True)
    original = AutoModelForCausalLM.from_pretrained(merged_dir)
    reference = quantize._vision_reference(original, merged_dir, modeling.text_model_shapes(original))
    text_gguf = run / quantization["types"][0]["path"]
    assert quantize._verify_projector(path, text_gguf, reference)["min_cosine"] >= 0.99
    assert quantize._verify_projector(tmp_path / "mmproj.gguf", text_gguf, reference)["min_cosine"] < 0


# --- plain text ---------------------------------------------------------------------------


def test_plain_text_trains_as_language_modelling_on_a_base_model_without_chat_template(tmp_path):
    """The `text` input format (seed 000's plain corpus) on a base model with no chat template:
    language modelling on the text itself, scored by loss and perplexity, exported to GGUF."""
    import random

    from factory.example import generate_task_records

    root = tmp_path / "text"
    factory("init", "--example", root, "--records", 300, "--steps", 120, check_rc=0)
    small_run(root)
    raw = root / "data" / "raw"
    for f in raw.iterdir():
        f.unlink()
    rng = random.Random(0)
    for i, r in enumerate(generate_task_records(400, seed=1)):
        (raw / f"doc{i:04d}.txt").write_text(f"{r['input']} -> {r['output']}\n" * rng.randint(1, 3))
    yaml_file = root / "factory.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("data/raw/localization.jsonl", "data/raw"))
    base = root / "models" / "base"
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    run_every_phase(root)
    baseline, stats, evaluation, quantization = (metrics(root, METRICS[p]) for p in PHASES)
    assert stats["completed"] and stats["chat_format"]["template"] == "none"
    assert baseline["language_modelling"] and evaluation["language_modelling"]
    assert evaluation["primary"] == "token_probability" and evaluation["perplexity"] < baseline["perplexity"]
    assert evaluation["comparison"]["finetuned"] > evaluation["comparison"]["baseline"]
    assert "all_generations_stop" not in quantization
    assert all(g["tokenizer_agreement"] == 1.0 and g["perplexity_ratio"] < 1.1 for g in quantization["types"])
    assert "TEMPLATE" not in (root / "models" / "quantized" / "Modelfile").read_text()
