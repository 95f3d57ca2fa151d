"""The example model families: each tiny model has its real model's architecture, vocabulary,
special tokens and chat template, its tokenizer gives the ids the original one gives (llama.cpp's
reference tokenizations), and llama.cpp's converter turns it into a GGUF whose tokenizer agrees
with the Hugging Face one on chat conversations.

The tokenizers come from factory.real_tokenizers, built by `factory setup-gguf` at install time;
on a machine where that has not run, the first test builds them (several minutes, once).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from factory import chat, example, llama_cpp, real_tokenizers

ENV = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
CUSTOM = "custom"  # example.CUSTOM_TEMPLATE_MODEL: another family with a template of its own
MODELS = [*example.FAMILIES, CUSTOM]

# What the real models have, written down here from their model cards and files, independently
# of the example's tables: architecture, vocabulary (config, tokenizer), tied embeddings, the
# end-of-turn text after each answer, BOS/EOS, and the RoPE settings that differ from defaults.
REAL = {
    "gemma-3": dict(arch="Gemma3ForCausalLM", vocab=None, tied=True, eot="<end_of_turn>", bos="<bos>", eos="<eos>"),
    "gemma-3-vision": dict(arch="Gemma3ForConditionalGeneration", vocab=None, tied=True, eot="<end_of_turn>",
                           bos="<bos>", eos="<eos>"),
    "llama-3.1": dict(arch="LlamaForCausalLM", vocab=(128256, 128256), tied=False, eot="<|eot_id|>",
                      bos="<|begin_of_text|>", eos="<|eot_id|>",
                      rope={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen-2.5": dict(arch="Qwen2ForCausalLM", vocab=(152064, 151665), tied=False, eot="<|im_end|>", bos=None,
                     eos="<|im_end|>", pad="<|endoftext|>", rope={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen-3": dict(arch="Qwen3ForCausalLM", vocab=(151936, 151669), tied=True, eot="<|im_end|>", bos=None,
                   eos="<|im_end|>", pad="<|endoftext|>", rope={"rope_type": "default", "rope_theta": 1000000}),
    "deepseek-r1": dict(arch="LlamaForCausalLM", vocab=(128256, 128256), tied=False, eot="<｜end▁of▁sentence｜>",
                        bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", pad="<｜end▁of▁sentence｜>",
                        opening="<think>\n",
                        rope={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "mistral": dict(arch="MistralForCausalLM", vocab=(32000, 32000), tied=False, eot="</s>", bos="<s>", eos="</s>",
                    rope={"rope_type": "default", "rope_theta": 10000.0}),
    "phi-3": dict(arch="Phi3ForCausalLM", vocab=(32064, 32011), tied=False, eot="<|end|>", bos="<s>",
                  eos="<|endoftext|>", pad="<|endoftext|>", rope={"rope_type": "default", "rope_theta": 10000.0}),
    CUSTOM: dict(arch="LlamaForCausalLM", vocab=(32000, 32000), tied=False, eot="</s>", bos="<s>", eos="</s>",
                 pad=None, rope={"rope_type": "default", "rope_theta": 10000.0}),
}
# The llama.cpp vocabulary each tokenizer must reproduce. Mistral's is Llama 2's with no space
# prefix (add_prefix_space false), so llama-spm's reference ids are those of the custom model.
REFERENCE_VOCAB = {"llama-3.1": "llama-bpe", "deepseek-r1": "llama-bpe", "qwen-2.5": "qwen2", "qwen-3": "qwen2", "phi-3": "phi-3", CUSTOM: "llama-spm"}
TRL_TEMPLATES = {"gemma-3": "gemma3", "deepseek-r1": "deepseek_r1_distill", "llama-3.1": "llama3_1", "qwen-2.5": "qwen2_5", "qwen-3": "qwen3", "phi-3": "phi3"}

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}],
    [{"role": "system", "content": "Format the date and amount for the locale."},
     {"role": "user", "content": "Locale: de-DE. Date: 2024-03-07. Amount: 1234.50 EUR."},
     {"role": "assistant", "content": "07.03.2024 | 1.234,50 €"}],
    [{"role": "user", "content": "Écris « bonjour » en japonais, s'il te plaît.\n\nMerci !"},
     {"role": "assistant", "content": "こんにちは (konnichiwa)\n  - with two spaces\tand a tab"}],
]
ROUND_TRIP_TEXTS = ["Hello world", "07.03.2024 | 1.234,50 €", "  two leading spaces\nand\ttabs\n\n",
                    "こんにちは 🦙 Äpfel", "<not a special token>"]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Every family's tiny model, built once; the Gemma one on the example's own records."""
    root = tmp_path_factory.mktemp("families")
    built = {}
    for name in MODELS:
        out = root / name
        if name == CUSTOM:
            example.build_custom_template_model(out)
        elif example.FAMILIES[name].vocab is None:
            records = example.generate_task_records(200)
            example.build_tiny_gemma3(out, corpus=example.record_texts(records), vision=example.FAMILIES[name].vision)
        else:
            example.build_family_model(out, example.FAMILIES[name])
        built[name] = out
    return built


def _tokenizer(path):
    """The tokenizer as the pipeline loads it (DeepSeek-R1-Distill-Llama's needs modeling.load_tokenizer)."""
    from factory import modeling

    return modeling.load_tokenizer(str(path))


def test_named_templates_that_trl_ships_are_trls_byte_for_byte():
    """TRL swaps in its {% generation %} training variant only for an exact match."""
    import trl

    trl_dir = os.path.join(os.path.dirname(trl.__file__), "chat_templates")
    for name, trl_name in TRL_TEMPLATES.items():
        with open(os.path.join(trl_dir, f"{trl_name}.jinja"), encoding="utf-8") as f:
            assert chat.read_named_template(name) == f.read(), name
    assert {p.stem for p in chat.TEMPLATES_DIR.glob("*.jinja")} >= {*(f.template for f in example.FAMILIES.values()), "alpaca", "chatml"}


def test_a_model_with_learned_positions_refuses_what_it_cannot_read_with_the_key_to_change(models, tmp_path):
    """GPT-2 reads at most n_positions tokens (its `wpe` has that many rows): a longer sequence
    was torch's IndexError (exit 3). Training longer than that, and a test record or prompt
    that does not fit, are input errors that say which setting to change; a rotary model
    (Mistral's) reads the same length."""
    from transformers import AutoModelForCausalLM

    from factory.chat import ChatFormat
    from factory.errors import InputError
    from factory.modeling import answer_loss, generate, require_positions

    gpt2 = AutoModelForCausalLM.from_pretrained(example.build_gpt2_base_model(tmp_path / "gpt2"))
    rows = gpt2.get_decoder().wpe.num_embeddings
    with pytest.raises(InputError, match=f"model.max_seq_length is 2048 tokens, and the model reads at most {rows}.*"
                                         f"set model.max_seq_length to {rows} or less"):
        require_positions(gpt2, 2048, "model.max_seq_length", "set model.max_seq_length to {limit} or less")
    long = [list(range(100, 100 + rows + 1)), [-100] * rows + [7]]
    with pytest.raises(InputError, match="a test record .prompt and answer. is 1025 tokens"):
        answer_loss(gpt2, [long], batch_size=1, pad_token_id=0)
    chat = ChatFormat.from_tokenizer(_tokenizer(tmp_path / "gpt2"), "chatml")
    record = {"conversations": [{"role": "user", "content": "word " * rows}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(InputError, match="lower evaluation.max_new_tokens"):
        generate(gpt2, chat, [record], batch_size=1, max_new_tokens=4)
    assert answer_loss(gpt2, [(long[0][:rows], long[1][:rows])], batch_size=1, pad_token_id=0)[1] == 0
    mistral = AutoModelForCausalLM.from_pretrained(models["mistral"])
    assert answer_loss(mistral, [long], batch_size=1, pad_token_id=0)[1] == 1


def test_a_gpt_neox_model_merged_by_transformers_5_converts_to_gguf(tmp_path):
    """Pythia's config.json gives `rotary_pct`, which transformers 5 reads into rope_parameters
    and neither writes back nor returns from AutoConfig; llama.cpp's converter looks it up by
    that name. The merged folder gets it back from the base model's config.json, and the
    converter sees config.json's own entries: the GGUF's rotary dimension is rotary_pct of a head."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from factory.modeling import complete_saved_files

    hub, merged = tmp_path / "pythia", tmp_path / "merged"
    config = AutoConfig.for_model("gpt_neox", vocab_size=50257, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=256, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(hub)
    AutoTokenizer.from_pretrained(real_tokenizers.folder("gpt-2")).save_pretrained(hub)
    written = json.loads((hub / "config.json").read_text())  # as EleutherAI's config.json has them
    (hub / "config.json").write_text(json.dumps({**written, "rotary_pct": 0.25, "rotary_emb_base": 10000}))
    AutoModelForCausalLM.from_pretrained(hub).save_pretrained(merged)  # what the quantize phase's merge writes
    AutoTokenizer.from_pretrained(hub).save_pretrained(merged)
    assert "rotary_pct" not in json.loads((merged / "config.json").read_text())
    assert "config.json:rotary_pct" in complete_saved_files(str(hub), merged)
    out = tmp_path / "model.gguf"
    llama_cpp.convert(llama_cpp.converter_dir(None), merged, out, "q8_0", tmp_path / "convert.log")
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "gptneox"
    assert reader.fields["gptneox.rope.dimension_count"].contents() == 4  # 0.25 x 16


@pytest.mark.parametrize("model_type, kept_f32", [("phi", set()), ("gpt2", {"transformer.wpe.weight"}),
                                                   ("mixtral", {f"model.layers.{i}.mlp.gate.weight" for i in range(2)})])
def test_the_size_check_counts_every_weight_of_a_text_model_once(model_type, kept_f32):
    """modeling.text_model_shapes, what a GGUF's size is checked against: every parameter of a
    text model once (Phi-2's head has a bias), and as F32 (1-D) the ones llama.cpp's converter
    keeps in F32 whatever the type: GPT-2's learned position embeddings, Mixtral's routers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from factory.modeling import text_model_shapes

    config = AutoConfig.for_model(model_type, vocab_size=5000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    params = dict(model.named_parameters())
    expected = sorted((p.numel(),) if name in kept_f32 else tuple(p.shape) for name, p in params.items())
    assert all(name in params for name in kept_f32)
    assert sorted(text_model_shapes(model)) == expected


@pytest.mark.parametrize("name", list(REFERENCE_VOCAB))
def test_tokenizer_gives_the_original_tokenizers_ids(models, name):
    """llama.cpp's test texts, tokenized by the original Hugging Face tokenizer (the .out files),
    against ours. transformers 5 never adds the SentencePiece space prefix to a text that already
    starts with a space, where the original did (" Hello" -> "▁" "▁Hello"): for SentencePiece
    vocabularies those texts are checked against the SentencePiece model (tokenizer.model) only."""
    import sentencepiece

    tokenizer = _tokenizer(models[name])
    references = real_tokenizers.reference_tokenizations(REFERENCE_VOCAB[name])
    assert len(references) > 40
    spm_file = models[name] / "tokenizer.model"
    spm = sentencepiece.SentencePieceProcessor(model_file=str(spm_file)) if spm_file.exists() else None
    for text, ids in references:
        if spm is not None:
            assert spm.encode(text) == ids, text
            if text.startswith(" "):
                continue
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids, text
    if spm is not None:  # runs of spaces inside a text: SentencePiece merges by score, not by piece id
        for text in ["x\n  - y", "a  b   c    d\t\t e", *(t for t in ROUND_TRIP_TEXTS if not t.startswith(" "))]:
            assert tokenizer(text, add_special_tokens=False)["input_ids"] == spm.encode(text), text


@pytest.mark.parametrize("name", MODELS)
def test_model_has_the_real_architecture_vocabulary_and_special_tokens(models, name):
    from transformers import AutoConfig, AutoModelForCausalLM

    real = REAL[name]
    config = AutoConfig.from_pretrained(models[name])
    text_config = config.get_text_config()  # an image-text model's language model
    tokenizer = _tokenizer(models[name])
    model = AutoModelForCausalLM.from_pretrained(models[name])
    assert type(model).__name__ == real["arch"] == config.architectures[0]
    if real["vocab"]:
        assert (text_config.vocab_size, len(tokenizer)) == real["vocab"]
    assert model.get_input_embeddings().weight.shape[0] == text_config.vocab_size
    assert config.tie_word_embeddings is real["tied"]
    shared = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert shared is real["tied"]
    if "rope" in real:
        assert {k: config.rope_parameters.get(k) for k in real["rope"]} == real["rope"]
    assert (tokenizer.bos_token, tokenizer.eos_token) == (real["bos"], real["eos"])
    if "pad" in real:
        assert tokenizer.pad_token == real["pad"]
    eot_id = tokenizer.convert_tokens_to_ids(real["eot"])
    assert eot_id == tokenizer.eos_token_id or tokenizer.added_tokens_decoder[eot_id].special
    assert text_config.hidden_size <= 64 and sum(p.numel() for p in model.parameters()) < 25_000_000


def test_a_llama_3_vocabulary_under_llamas_sentencepiece_class_name_keeps_its_byte_level_tokenizer(models, tmp_path):
    """DeepSeek-R1-Distill-Llama's tokenizer_config.json names LlamaTokenizerFast over Llama 3's
    byte-level vocabulary. transformers 5 loads that as LlamaTokenizer with SentencePiece's
    pre-tokenizer, and every text lost its spaces ("Hello 2024 world": 4 ids, none of them Llama
    3's), in training and in the merged model, whose GGUF llama.cpp then read as a SentencePiece
    vocabulary and aborted on (std::out_of_range in byte_to_token, exit 134). The factory's
    tokenizer gives llama.cpp's reference ids of Llama 3's own tokenizer."""
    from factory import modeling

    folder = tmp_path / "r1-distill-llama"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((models["llama-3.1"] / name).read_bytes())
    settings = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    settings.update(tokenizer_class="LlamaTokenizerFast", legacy=True, add_bos_token=True, unk_token=None)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")
    tokenizer = modeling.load_tokenizer(str(folder))
    references = real_tokenizers.reference_tokenizations("llama-bpe")
    assert len(references) > 40
    for text, ids in references:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids, text
    assert tokenizer.decode(tokenizer("Hello 2024 world")["input_ids"], skip_special_tokens=True) == "Hello 2024 world"
    assert tokenizer("a")["input_ids"][0] == 128000  # BOS, as the tokenizer_config says
    gemma = modeling.load_tokenizer(str(models["gemma-3"]))  # a SentencePiece one stays as transformers loads it
    assert type(gemma).__name__ == type(_tokenizer(models["gemma-3"])).__name__


def test_a_sentencepiece_vocabulary_under_a_qwen2_model_keeps_its_spaces(tmp_path):
    """transformers 5 loads every qwen2 model's tokenizer as Qwen2Tokenizer, whatever
    tokenizer_config.json names, and that puts a byte-level pre-tokenizer over a SentencePiece
    vocabulary: "Format the date" became "Format", "the", "date", the spaces gone (the example's
    Qwen 2.5 with `--vocab task`). The factory's tokenizer gives what tokenizer.json gives."""
    from tokenizers import Tokenizer

    from factory import modeling

    folder = example.build_family_model(tmp_path / "qwen", example.FAMILIES["qwen-2.5"],
                                        task_records=example.generate_task_records(200))
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen2"
    tokenizer = modeling.load_tokenizer(str(folder))
    own = Tokenizer.from_file(str(folder / "tokenizer.json"))  # the file itself, not transformers
    for text in ("Format the date and amount.", "Locale: de-DE. Date: 2016-09-01.", "  two  spaces\n\nand lines"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == own.encode(text, add_special_tokens=False).ids, text
        assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("name", MODELS)
def test_tokenizer_round_trips_and_template_renders_two_turns(models, name):
    tokenizer = _tokenizer(models[name])
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids).strip(" ") == text.strip(" "), (text, ids)
    conversation = CONVERSATIONS[0]
    full = tokenizer.apply_chat_template(conversation, tokenize=False)
    prompt = tokenizer.apply_chat_template(conversation[:3], tokenize=False, add_generation_prompt=True)
    eot = REAL[name]["eot"]
    # prefix-preserving, but for what R1's generation prompt opens and an answer does not begin with
    assert full.startswith(prompt.removesuffix(REAL[name].get("opening", ""))), (prompt, full)
    assert all(m["content"] in full for m in conversation)
    assert full.count(eot) >= 2 and f"4{eot}" in full and f"6{eot}" in full, full  # each answer ends its turn


def test_an_image_text_model_loads_as_its_processor_and_the_chat_format_reads_its_tokenizer(models):
    """Gemma 3 4B-27B load through AutoProcessor as a Gemma3Processor (what Unsloth's FastModel
    returns for them): its image tokens are where the model's config says, and the chat format
    built from the processor's text half is the one built from the tokenizer."""
    from transformers import AutoConfig, AutoProcessor

    from factory.modeling import text_tokenizer

    folder = models["gemma-3-vision"]
    processor = AutoProcessor.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)
    assert type(processor).__name__ == "Gemma3Processor"
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids(example.IMAGE_TOKENS) == [config.boi_token_index, config.eoi_token_index,
                                                                     config.image_token_index]
    assert text_tokenizer(processor) is tokenizer and text_tokenizer(tokenizer) is tokenizer
    from_processor, from_tokenizer = chat.ChatFormat.from_tokenizer(text_tokenizer(processor)), \
        chat.ChatFormat.from_tokenizer(_tokenizer(folder))
    for field in ("eot_token_id", "stop_token_ids", "pad_token_id", "bos_token_id", "instruction_part", "response_part"):
        assert getattr(from_processor, field) == getattr(from_tokenizer, field), field


UNSLOTH_CONVERSATIONS = [
    *CONVERSATIONS,
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there, friend."},
     {"role": "user", "content": "A list?"}, {"role": "assistant", "content": "[1, 2] is a list"}],
]


@pytest.mark.parametrize("name", MODELS)
def test_unsloth_markers_occur_as_token_ids_at_every_turn(models, name):
    """Unsloth's train_on_responses_only finds the turns by the markers' ids, each tokenized
    alone, in the tokenized conversation (seed 004's text, BOS left to the tokenizer). On
    conversations other than the chat format's probe (answers that open with a digit, a word, a
    bracket, non-Latin text; multi-turn), the user marker's ids occur once per user turn and
    the response marker's once per answer, each followed by its answer. With the markers read
    off Mistral's template as text (`[INST] `, `[/INST] `) the ids never occurred and Unsloth
    masked every label (the run stopped on a GPU). The custom model's Llama 2 tokenizer (legacy
    SentencePiece) writes `▁` before any text tokenized alone, so no marker of its template can
    match mid-text: the chat format says so (the unsloth backend then stops before training,
    exit 2, naming model.backend: hf), as Unsloth's own matcher, run on it, masks every label."""
    from phases.finetune import _text_dataset

    tokenizer = _tokenizer(models[name])
    fmt = chat.ChatFormat.from_tokenizer(tokenizer)
    if name == CUSTOM:
        response = tokenizer(fmt.response_part, add_special_tokens=False)["input_ids"]
        text = _text_dataset(fmt, [{"conversations": CONVERSATIONS[0]}])[0]["text"]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert not fmt.markers_match_tokens and tokenizer.convert_ids_to_tokens(response[0]).startswith("▁")
        assert not any(ids[i : i + len(response)] == response for i in range(len(ids)))
        return
    assert fmt.markers_match_tokens
    for turns in UNSLOTH_CONVERSATIONS:
        text = _text_dataset(fmt, [{"conversations": turns}])[0]["text"]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]

        def occurrences(part):
            part_ids = tokenizer(part, add_special_tokens=False)["input_ids"]
            return [i + len(part_ids) for i in range(len(ids)) if ids[i : i + len(part_ids)] == part_ids]

        assert len(occurrences(fmt.instruction_part)) == sum(t["role"] == "user" for t in turns), (text, ids)
        answers = [t["content"] for t in turns if t["role"] == "assistant"]
        after = occurrences(fmt.response_part)
        assert len(after) == len(answers), (fmt.response_part, text)
        for answer, start in zip(answers, after):
            following = tokenizer.decode(ids[start:])
            assert answer.split()[0] in following[: len(answer) + 30], (answer, following)


@pytest.fixture(scope="session")
def ggufs(models, tmp_path_factory):
    """Every model converted by llama.cpp's converter as the quantize phase runs it, two at a
    time (the converter is mostly one Python thread)."""
    from concurrent.futures import ThreadPoolExecutor

    out = tmp_path_factory.mktemp("ggufs")
    converter = llama_cpp.converter_dir(None)

    def convert(name):
        folder = models[name]
        if name == "deepseek-r1":  # converted, as in the quantize phase, with the tokenizer saved as the factory loads it
            import shutil

            folder = shutil.copytree(models[name], out / f"{name}-merged")
            _tokenizer(models[name]).save_pretrained(folder)
        llama_cpp.convert(converter, folder, out / f"{name}.gguf", "f16", out / f"{name}.log")
        return out / f"{name}.gguf"

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(MODELS, pool.map(convert, MODELS)))


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_gguf_tokenizer_agrees_with_the_hugging_face_one(models, ggufs, name):
    """The folder converts with llama.cpp's converter as the quantize phase runs it, and the
    GGUF's tokenizer gives the same ids as transformers on rendered conversations, adds a BOS
    where transformers does, and carries the same special tokens and template."""
    tokenizer = _tokenizer(models[name])
    llm = llama_cpp.runtime().Llama(str(ggufs[name]), vocab_only=True, verbose=False)
    for conversation in CONVERSATIONS:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == expected, text
    for text in ROUND_TRIP_TEXTS[:2]:
        assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == tokenizer(text)["input_ids"], text
    assert llm.token_eos() == tokenizer.eos_token_id
    if tokenizer.bos_token is not None:
        assert llm.token_bos() == tokenizer.bos_token_id
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, family in example.FAMILIES.items() if family.vocab])
def test_a_task_vocabulary_converts_to_a_gguf_that_tokenizes_as_transformers_does(name, tmp_path):
    """`factory init --example --family F --vocab task`: a SentencePiece vocabulary trained on the
    task, without the dummy prefix, under each family's converter. llama.cpp's converter writes
    `add_space_prefix` from it only for Llama; Qwen's and Phi-3's GGUFs put a space before every
    text, and the tokenizer agreement of quantization-verified was 0."""
    folder = example.build_family_model(tmp_path / name, example.FAMILIES[name],
                                        task_records=example.generate_task_records(200))
    tokenizer = _tokenizer(folder)
    assert len(tokenizer) < 1000
    llama_cpp.convert(llama_cpp.converter_dir(None), folder, tmp_path / "m.gguf", "f16", tmp_path / "m.log")
    llm = llama_cpp.runtime().Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    conversations = [example.task_messages(r) for r in example.generate_task_records(5, seed=9)] + CONVERSATIONS
    for conversation in conversations:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == expected, text
    assert llm.token_eos() == tokenizer.eos_token_id


def test_init_example_family_writes_a_workspace_for_that_family(tmp_path):
    ws = tmp_path / "ws"
    proc = subprocess.run([sys.executable, "-m", "factory", "init", "--example", str(ws), "--family", "phi-3",
                           "--records", "60"], capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((ws / "models" / "base" / "config.json").read_text())
    assert config["architectures"] == ["Phi3ForCausalLM"] and config["vocab_size"] == 32064
    assert "microsoft/Phi-3-mini-4k-instruct" in (ws / "factory.yaml").read_text()
    assert len((ws / "data" / "raw" / "localization.jsonl").read_text().splitlines()) == 60
    proc = subprocess.run([sys.executable, "-m", "factory", "validate", "-C", str(ws)], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    proc = subprocess.run([sys.executable, "-m", "factory", "init", "--example", str(tmp_path / "x"), "--family",
                           "llama-2"], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2 and "llama-3.1" in proc.stderr and not (tmp_path / "x" / "factory.yaml").exists()


@pytest.mark.parametrize("name, trained_whole", [("gemma-3", []), ("phi-3", []), ("mistral", ["lm_head"])])
def test_cpu_training_loss_on_trained_positions_equals_the_models_own(models, name, trained_whole, tmp_path,
                                                                      monkeypatch):
    """Off CUDA the finetune phase applies the head only where a token is trained, a few
    positions at a time (recomputed in the backward pass; 5 here, so a batch is many chunks):
    its loss, gradients and validation loss are those of the model's own cross-entropy over
    every position's logits (Phi-3 pads on the left; Gemma's head is checked for soft-capping;
    a head in lora.modules_to_save is PEFT's trained copy, and gets its gradient)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from factory import modeling
    from phases.finetune import _cpu_safe_trainer, _token_dataset

    monkeypatch.setattr(modeling, "TRAINING_LOGIT_VALUES", 5 * AutoConfig.from_pretrained(models[name]).vocab_size)

    chat_format = chat.ChatFormat.from_tokenizer(AutoTokenizer.from_pretrained(models[name]))
    records = [{"conversations": [{"role": "user", "content": r["input"]}, {"role": "assistant", "content": r["output"]}]}
               for r in example.generate_task_records(6, seed=5)]
    dataset, _ = _token_dataset(chat_format, records, 128)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(models[name]),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"] if name != "phi-3" else ["qkv_proj"],
                                      init_lora_weights=False, modules_to_save=trained_whole or None))
    trainer = _cpu_safe_trainer()(model=model, processing_class=chat_format.tokenizer, train_dataset=dataset,
                                  args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                                 per_device_train_batch_size=6, max_steps=1,
                                                 dataset_kwargs={"skip_prepare_dataset": True}))
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).float().mean() > 0.5  # prompts are most tokens, and padding
    model.train()

    def loss_and_grads(loss_of):
        model.zero_grad()
        loss = loss_of()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    ours, our_grads = loss_and_grads(lambda: trainer.compute_loss(model, dict(batch)))
    own, own_grads = loss_and_grads(lambda: model(**batch, use_cache=False).loss)
    assert trainer._head is not False
    assert sum("modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad) == len(trained_whole)
    assert torch.allclose(ours, own, rtol=1e-5), (ours, own)
    # fp32 sums in another order (chunk by chunk): equal to rounding, relative to each tensor's scale
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(b.abs().max())))
               for a, b in zip(our_grads, own_grads))
    model.eval()
    with torch.no_grad():
        loss, _, _ = trainer.prediction_step(model, dict(batch), prediction_loss_only=True)
        assert torch.allclose(loss, model(**batch, use_cache=False).loss, rtol=1e-5)


def test_a_lora_adapter_on_the_output_embedding_is_refused_with_the_key_to_change(models):
    """TRL's SFTTrainer takes the loss from lm_head.weight, so an adapter there would never be
    trained: refused before training, naming the key (it was an internal error, exit 3)."""
    from transformers import AutoModelForCausalLM

    from factory.config import parse_config
    from factory.errors import InputError
    from factory.modeling import Backend, add_lora

    cfg = parse_config({"lora": {"target_modules": ["q_proj", "v_proj", "lm_head"]}})
    model = AutoModelForCausalLM.from_pretrained(models["mistral"])
    with pytest.raises(InputError, match=r"lora.target_modules: 'lm_head' is the output embedding"):
        add_lora(model, cfg, Backend("hf", "test", "cpu"), rank=4)
    cfg = parse_config({"lora": {"target_modules": ["q_proj", "v_proj"]}})
    adapted = {name.rsplit(".", 1)[-1] for name, module in add_lora(model, cfg, Backend("hf", "test", "cpu"), rank=4)
               .named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}


@pytest.mark.parametrize("settings, adapted", [
    ({}, {"language_model.attention", "language_model.mlp"}),
    ({"finetune_vision_layers": True}, {"language_model.attention", "language_model.mlp", "vision.attention",
                                        "vision.mlp"}),
    ({"finetune_mlp_modules": False}, {"language_model.attention"}),
    ({"finetune_attention_modules": False, "finetune_vision_layers": True}, {"language_model.mlp", "vision.mlp"}),
    ({"finetune_language_layers": False, "finetune_vision_layers": True}, {"vision.attention", "vision.mlp"}),
])
def test_lora_finetune_settings_select_the_layers_on_the_hf_backend(models, settings, adapted):
    """lora.finetune_{vision,language}_layers and finetune_{attention,mlp}_modules choose among
    target_modules on the hf backend as on Unsloth's: an image-text Gemma 3 gets no adapter
    on its vision tower by default (it did, on every SigLIP q/k/v/out and fc layer)."""
    from transformers import AutoModelForCausalLM

    from factory.config import parse_config
    from factory.errors import InputError
    from factory.modeling import Backend, add_lora

    cfg = parse_config({"lora": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "fc1", "fc2",
                                                    "gate_proj", "up_proj", "down_proj"], **settings}})
    model = add_lora(AutoModelForCausalLM.from_pretrained(models["gemma-3-vision"]), cfg, Backend("hf", "test", "cpu"),
                     rank=4)
    kinds = {("vision" if "vision_tower" in name else "language_model") + "." +
             ("attention" if "attn" in name else "mlp") for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert kinds == adapted
    cfg = parse_config({"lora": {"finetune_language_layers": False}})
    with pytest.raises(InputError, match="match no layer of the model that the lora.finetune_. settings select"):
        add_lora(AutoModelForCausalLM.from_pretrained(models["gemma-3"]), cfg, Backend("hf", "test", "cpu"), rank=4)


@pytest.mark.parametrize("name", ["gemma-3", "llama-3.1", "qwen-3", "mistral", "phi-3"])
def test_the_default_adapts_every_linear_layer_of_the_language_model_but_the_head(models, name):
    """lora.target_modules `all-linear` (the default): for Llama, Qwen, Mistral and Gemma the
    seed's seven projections; for Phi-3 also its fused qkv_proj and gate_up_proj, which the
    seed's list (the default before) left without an adapter (o_proj and down_proj only)."""
    import torch
    from transformers import AutoModelForCausalLM

    from factory.config import parse_config
    from factory.modeling import Backend, add_lora

    base = AutoModelForCausalLM.from_pretrained(models[name])
    linear = {n for n, m in base.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"}
    model = add_lora(base, parse_config({}), Backend("hf", "test", "cpu"), rank=4)
    adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == linear and len(adapted) == base.config.num_hidden_layers * (4 if name == "phi-3" else 7)


@pytest.mark.parametrize("name", ["gemma-3", "mistral"])
def test_modules_to_save_trains_the_head_whole_and_a_tied_one_stays_tied(models, name, tmp_path):
    """lora.modules_to_save: [lm_head] trains PEFT's copy of the head, which the merge puts in
    the model. Gemma ties its head to the input embedding, and llama.cpp's converter drops
    Gemma's lm_head: the trained matrix must stay the one tied matrix, or the GGUF loses it."""
    import torch
    from transformers import AutoModelForCausalLM

    from factory.config import parse_config
    from factory.errors import InputError
    from factory.modeling import Backend, add_lora

    base = AutoModelForCausalLM.from_pretrained(models[name])
    head, embedding = (base.get_output_embeddings().weight.detach().clone(),
                       base.get_input_embeddings().weight.detach().clone())
    cfg = parse_config({"lora": {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}})
    model = add_lora(base, cfg, Backend("hf", "test", "cpu"), rank=4)
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    new_head, new_embedding = merged.get_output_embeddings().weight, merged.get_input_embeddings().weight
    assert not torch.equal(new_head, head)
    if name == "gemma-3":
        assert merged.config.tie_word_embeddings and torch.equal(new_head, new_embedding)
    else:
        assert not merged.config.tie_word_embeddings and torch.equal(new_embedding, embedding)
    cfg = parse_config({"lora": {"modules_to_save": ["lm_head", "embed"]}})
    with pytest.raises(InputError, match=r"lora.modules_to_save: \['embed'\] match no layer of the model"):
        add_lora(AutoModelForCausalLM.from_pretrained(models[name]), cfg, Backend("hf", "test", "cpu"), rank=4)


def _trl_template(name: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def test_a_template_that_rewrites_earlier_turns_trains_with_trls_variant_and_scores_after_reasoning(models):
    """Qwen 3's template drops the reasoning block of every answer but the last, so it is not
    prefix-preserving (it was exit 2 before any training). The masks come from TRL's training
    variant, checked against that variant's own {% generation %} markers (transformers'
    assistant mask, an independent masking); the generation prompt stays the model's own, and
    an answer is scored on what follows its reasoning block."""
    tokenizer = _tokenizer(models["qwen-3"])
    chat_format = chat.ChatFormat.from_tokenizer(_tokenizer(models["qwen-3"]))
    assert "TRL's training variant" in chat_format.template_source and chat_format.reasoning_end == "</think>"
    record = {"conversations": [{"role": "system", "content": "Be brief."}, *CONVERSATIONS[0]]}
    row = chat_format.training_example(record)
    theirs = tokenizer.apply_chat_template(record["conversations"], chat_template=_trl_template("qwen3_training"),
                                           tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert row["input_ids"] == theirs["input_ids"]
    assert [label != -100 for label in row["labels"]] == [bool(m) for m in theirs["assistant_masks"]]
    trained = tokenizer.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != -100])
    assert trained == "<think>\n\n</think>\n\n4<|im_end|>\n<think>\n\n</think>\n\n6<|im_end|>\n"
    # generation starts where the model's own template puts it
    prompt = tokenizer.decode(chat_format.prompt_ids(record))
    assert prompt == tokenizer.apply_chat_template(record["conversations"][:-1], tokenize=False,
                                                   add_generation_prompt=True)
    assert chat_format.answer_text("<think>\nadd 3 and 3\n</think>\n\n6") == "6"
    assert chat_format.answer_text(" 6 ") == "6"
    # scored on the answers: a reference with its reasoning (a reasoning dataset) and a plain one
    from factory.config import parse_config
    from factory.evaluation import score_predictions

    records = [{"conversations": [*CONVERSATIONS[0][:3], {"role": "assistant", "content": reference}]}
               for reference in ("<think>\n3 + 3\n</think>\n\n6", "6")]
    scored = score_predictions(parse_config({}), chat_format, records, ["<think>\n\n</think>\n\n6", "6"],
                               seconds=1.0, ws=None)
    assert [e["scores"]["exact_match"] for e in scored["examples"]] == [1.0, 1.0], scored["examples"]


# SmolLM2-Instruct's template and special tokens (HuggingFaceTB/SmolLM2-135M-Instruct): its BOS
# is <|im_start|>, which the template writes at every turn and the tokenizer never adds.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_a_bos_that_the_template_writes_and_the_tokenizer_never_adds_stays_in_the_ollama_template(models):
    """SmolLM2's BOS is its turn token <|im_start|>: left out of the Ollama template and the
    unsloth backend's training text as a BOS that the tokenizer adds, every Ollama chat and
    training text began `system\n...` without it. It stays where the tokenizer does not add
    BOS, and goes where it does (Gemma's <bos>)."""
    tokenizer = _tokenizer(models["qwen-2.5"])
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = "<|im_start|>", "<|im_end|>", "<|im_end|>"
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    chat_format = chat.ChatFormat.from_tokenizer(tokenizer)
    assert tokenizer("a")["input_ids"] == tokenizer("a", add_special_tokens=False)["input_ids"]  # no BOS added
    assert chat_format.bos_token_id is None and chat_format.eot_token == "<|im_end|>"
    # the unsloth backend's training text (its tokenizer adds nothing in front) keeps it too
    assert chat_format.training_text(CONVERSATIONS[0]).startswith("<|im_start|>system\nYou are a helpful")
    template = chat_format.ollama_template
    assert '{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n<|im_start|>user\n' in template
    assert ("{{ if eq $i 0 }}<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n<|im_start|>user\n{{ end }}") in template
    gemma = chat.ChatFormat.from_tokenizer(_tokenizer(models["gemma-3"]))
    assert gemma.tokenizer.bos_token == "<bos>" and "<bos>" not in gemma.ollama_template
    assert "{{ if eq $i 0 }}<start_of_turn>user\n{{ end }}" in gemma.ollama_template


def _r1_chat_format(models) -> chat.ChatFormat:
    """DeepSeek-R1-Distill-Qwen's tokenizer (Qwen 2's vocabulary, its own special tokens) and template."""
    tokenizer = _tokenizer(models["qwen-2.5"])
    tokenizer.add_special_tokens({"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
                                  "additional_special_tokens": ["<｜User｜>", "<｜Assistant｜>"]})
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = _trl_template("deepseek_r1_distill")
    return chat.ChatFormat.from_tokenizer(tokenizer)


def test_reasoning_that_the_template_leaves_out_of_training_is_counted_and_warned_about(models, caplog):
    """DeepSeek R1-Distill's template as the hub has had it (llama.cpp keeps two revisions)
    writes only what follows `</think>` of every answer: a model trained through it learns the
    answers of reasoning data without their reasoning, silently. The finetune phase now says
    how many answers lose it; TRL's training variant (the `deepseek-r1` named template's) keeps it."""
    import logging

    from factory.modeling import Backend
    from phases.finetune import _dataset

    record = {"conversations": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "<think>\nThree and three.\n</think>\n\n6"}]}
    plain = {"conversations": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    for revision in ("deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja", "llama-cpp-deepseek-r1.jinja"):
        tokenizer = _tokenizer(models["deepseek-r1"])
        tokenizer.chat_template = (llama_cpp.default_converter_dir() / llama_cpp.TEMPLATES / revision).read_text()
        rendered = tokenizer.apply_chat_template(record["conversations"], tokenize=False)
        assert "Two and two" not in rendered and "Three and three" not in rendered  # the template's own doing
        chat_format = chat.ChatFormat.from_tokenizer(tokenizer)
        assert chat_format.reasoning_left_out(record) == 2 and chat_format.reasoning_left_out(plain) == 0
    theirs = chat.ChatFormat.from_tokenizer(_tokenizer(models["deepseek-r1"]), "deepseek-r1")
    assert "TRL's training variant" in theirs.template_source and theirs.reasoning_left_out(record) == 0
    caplog.set_level(logging.WARNING)
    _dataset(Backend("hf", "test", "cpu"), chat_format, [record, plain, record], 128, "training", logging.getLogger("test"))
    assert "4 training answers hold reasoning (before </think>)" in caplog.text


def test_a_template_whose_generation_prompt_opens_the_reasoning_block_trains_with_and_without_reasoning(models):
    """DeepSeek-R1-Distill's template (every distill checkpoint's) prefills `<think>\\n` after the
    assistant header and drops the reasoning of every answer: no conversation could be masked
    (exit 2 before any training). With TRL's training variant, an answer written with its
    reasoning trains from inside the block the prompt opened, one without it from the header,
    and a generated answer is scored on what follows `</think>`."""
    chat_format = _r1_chat_format(models)
    tokenizer = chat_format.tokenizer
    assert "TRL's training variant" in chat_format.template_source and chat_format.multi_turn
    assert chat_format.reasoning_end == "</think>" and chat_format.stop_tokens == ["<｜end▁of▁sentence｜>"]

    def trained(first, second):
        record = {"conversations": [{"role": "system", "content": "Be brief."}, *CONVERSATIONS[0][:1],
                                    {"role": "assistant", "content": first}, *CONVERSATIONS[0][2:3],
                                    {"role": "assistant", "content": second}]}
        row = chat_format.training_example(record)
        return tokenizer.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != -100])

    assert trained("4", "6") == "4<｜end▁of▁sentence｜>6<｜end▁of▁sentence｜>"
    assert trained("<think>\n2 and 2\n</think>\n\n4", "<think>\n3 and 3\n</think>\n\n6") == (
        "2 and 2\n</think>\n\n4<｜end▁of▁sentence｜>3 and 3\n</think>\n\n6<｜end▁of▁sentence｜>")
    prompt = tokenizer.decode(chat_format.prompt_ids({"conversations": CONVERSATIONS[0][:2]}))
    assert prompt == "<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜><think>\n"  # inside the block
    assert chat_format.answer_text("2 and 2 make 4\n</think>\n\n4") == "4"
    # Ollama: the last user message is followed by the template's generation prompt, earlier ones by
    # the header their answers follow
    assert "{{ .Content }}{{ if $last }}<｜Assistant｜><think>\n{{ else }}<｜Assistant｜>{{ end }}" in \
        chat_format.ollama_template


def test_answers_cut_off_inside_the_reasoning_block_are_named_as_the_cause_of_a_low_stop_rate(models):
    """A reasoning model evaluated with a short max_new_tokens never reaches its answer: the
    stop-rate causes say so, counting the cut answers that never closed the block."""
    from factory.evaluation import stopping
    from factory.modeling import Generation

    chat_format = _r1_chat_format(models)
    records = [{"conversations": [*CONVERSATIONS[0][:1], {"role": "assistant", "content": "4"}]}] * 4
    generations = [Generation("2 and 2 make", False), Generation("2 and 2 make 4, so", False),
                   Generation("2 and 2\n</think>\n\n4 and", False), Generation("2 and 2\n</think>\n\n4", True)]
    causes = stopping(chat_format, records, generations, max_new_tokens=8)["causes"]
    assert any(c.startswith("2 of 4 answers ran to max_new_tokens (8) before closing the reasoning block with "
                            "'</think>'") for c in causes), causes
    plain = chat.ChatFormat.from_tokenizer(_tokenizer(models["qwen-2.5"]))  # no reasoning block: not a cause
    assert not any("reasoning" in c for c in stopping(plain, records, generations, max_new_tokens=8)["causes"])


def test_a_template_without_a_system_role_gets_the_system_message_in_the_first_user_turn(models):
    """Gemma 1 and 2's template raises on a system message (the format phase makes one of
    every Alpaca instruction: exit 3 in finetune before). The system message opens the first
    user turn, as Gemma 3's template writes it, in training, generation and the Ollama template."""
    tokenizer = _tokenizer(models["gemma-3"])
    tokenizer.chat_template = _trl_template("gemma")
    chat_format = chat.ChatFormat.from_tokenizer(tokenizer)
    assert chat_format.system_folded and chat_format.reasoning_end is None
    record = {"conversations": [{"role": "system", "content": "Be brief."}, *CONVERSATIONS[0]]}
    row = chat_format.training_example(record)
    assert tokenizer.decode(row["input_ids"]) == (
        "<bos><start_of_turn>user\nBe brief.\n\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n<start_of_turn>model\n6<end_of_turn>\n")
    trained = tokenizer.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != -100])
    assert trained == "4<end_of_turn>\n6<end_of_turn>\n"
    assert chat_format.prompt_messages(record)[0] == {"role": "user", "content": "Be brief.\n\nWhat is 2+2?"}
    assert tokenizer.decode(chat_format.prompt_ids(record)).startswith("<bos><start_of_turn>user\nBe brief.\n\nWhat")
    assert '{{ if eq .Role "system" }}<start_of_turn>user\n{{ .Content }}\n\n' in chat_format.ollama_template


# A template that writes the system message into the last user message only, as Mistral
# v0.3's and Mistral Nemo's do: once an answer follows, the system message is gone.
SYSTEM_IN_LAST_USER_TURN = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)


def test_a_template_that_moves_the_system_message_gets_it_in_the_first_user_turn(models):
    """Rendered as the template writes it, the prompt of a record with a system message is not
    the start of the whole conversation (exit 2 on every Alpaca record before): the system
    message opens the first user turn instead, where this template puts it for single-turn
    prompts, and the same in training and generation."""
    tokenizer = _tokenizer(models["mistral"])
    tokenizer.chat_template = SYSTEM_IN_LAST_USER_TURN
    chat_format = chat.ChatFormat.from_tokenizer(tokenizer)
    assert chat_format.system_folded
    record = {"conversations": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}
    row = chat_format.training_example(record)
    assert tokenizer.decode(row["input_ids"]) == "<s>[INST] Be brief.\n\nWhat is 2+2?[/INST] 4</s>"
    assert tokenizer.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != -100]).strip() == "4</s>"
    prompt = tokenizer.apply_chat_template(record["conversations"][:-1], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(chat_format.prompt_ids(record)) == prompt  # the template's own single-turn prompt


def test_a_template_that_rewrites_earlier_turns_without_a_trl_variant_trains_each_answer_in_its_own_sequence(models):
    """Qwen 3's template with one byte changed (as a model's revised template would be; llama.cpp
    keeps an older revision of Qwen3-0.6B's) is no longer TRL's, so there is no training variant.
    A multi-turn record stopped the finetune phase with exit 2. It trains as one sequence per
    answer: the conversation before it as the template renders it when the model writes that
    answer (earlier answers without their reasoning block), and the answer as the template writes
    the last one (its empty reasoning block, the answer, the end of turn)."""
    from phases.finetune import _token_dataset

    tokenizer = _tokenizer(models["qwen-3"])
    tokenizer.chat_template = _trl_template("qwen3") + "\n"
    chat_format = chat.ChatFormat.from_tokenizer(tokenizer)
    assert not chat_format.multi_turn and chat_format.training_template is None
    assert "each answer in a sequence of its own" in chat_format.template_source
    single = {"conversations": [{"role": "system", "content": "Be brief."}, *CONVERSATIONS[0][:2]]}
    two = {"conversations": [{"role": "system", "content": "Be brief."}, *CONVERSATIONS[0]]}
    dataset, dropped = _token_dataset(chat_format, [single, two], 128)
    assert len(dataset) == 3 and dropped == 0
    for row, turns in zip(dataset, [single["conversations"], two["conversations"][:3], two["conversations"]]):
        # the whole sequence is the template's own rendering of the conversation up to the answer
        assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(turns, tokenize=False)
        trained = tokenizer.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != -100])
        assert trained == f"<think>\n\n</think>\n\n{turns[-1]['content']}<|im_end|>\n"
    # the second answer's sequence has the first answer as the template writes history: no block
    assert "<|im_start|>assistant\n4<|im_end|>" in tokenizer.decode(dataset[2]["input_ids"])


# llama.cpp's collection keeps tool-use variants beside models' default templates: these render
# nothing without the `tools` or `functions` a caller passes, or (Command R7B's) write a generation
# prompt after every conversation. A model's tokenizer_config.json names its default one.
TOOL_USE_TEMPLATES = {"CohereForAI-c4ai-command-r-plus-tool_use", "CohereForAI-c4ai-command-r7b-12-2024-tool_use",
                      "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use", "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
                      "fireworks-ai-llama-3-firefunction-v2"}
# The markers a template writes, which its model's tokenizer has as special tokens: <|im_end|>,
# <｜User｜>, <turn|>, [INST], <end_of_turn>, MiniMax's ]~b] and [e~[, Hunyuan's <｜hy_User:opensource｜>, ...
TEMPLATE_MARKERS = re.compile(r"<\|[^|<>'\"\s]{1,40}\|>|<｜[^｜'\"]{1,40}｜>|<\|[A-Za-z_]{2,30}>|<[A-Za-z_]{2,30}\|>"
                              r"|\[[A-Z_]{3,30}\]|<(?:start|end)_of_turn>|\]~!?b\]|\[e~\[|<SPECIAL_\d+>|<seed:[a-z_]+>"
                              r"|</?think:[a-z]+>")


def test_every_real_template_in_llama_cpps_collection_trains_its_answers_and_nothing_else(models):
    """llama.cpp keeps 70 real models' chat templates for its own tests (Gemma 4, DeepSeek R1 and
    V3, GLM 4, Kimi, gpt-oss, Granite, Cohere, ...). On a real tokenizer (Llama 3's, with the
    markers each template writes as special tokens), each gives a chat format whose sequences
    train both answers of a two-turn conversation and an end of turn after each, and none of the
    system or user text; its generation prompt ends with the assistant header. Twelve of them (Gemma 4's, QwQ's, R1-Distill's, GLM 4.7's, DeepSeek V3.2's,
    MiniMax M2's, Cohere 2's, ...: generation prompts that open a reasoning block or write an
    empty one) stopped the run with exit 2; three (Qwen3-0.6B's older revision, StepFun 3.5's,
    Nemotron Nano 2's) trained no multi-turn record."""
    from factory.errors import InputError

    files = llama_cpp.chat_template_files()
    assert len(files) >= 60, files
    record = {"conversations": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                                {"role": "assistant", "content": "Hello 7"},
                                {"role": "user", "content": "What is 2 and 2"},
                                {"role": "assistant", "content": "It is 4"}]}
    tokenizer = _tokenizer(models["llama-3.1"])
    markers = set()
    for path in files:  # in the source, and as rendered (Hunyuan's are built by the template)
        tokenizer.chat_template = path.read_text(encoding="utf-8")
        try:
            rendered = tokenizer.apply_chat_template(record["conversations"], tokenize=False, add_generation_prompt=True)
        except Exception:  # the tool-use variants
            rendered = ""
        markers |= set(TEMPLATE_MARKERS.findall(tokenizer.chat_template + rendered))
    tokenizer.add_special_tokens({"additional_special_tokens": sorted(markers)}, replace_extra_special_tokens=False)
    tokenizer.add_tokens(["<think>", "</think>"])
    failures = {}
    for path in files:
        tokenizer.chat_template = path.read_text(encoding="utf-8")
        if path.stem in TOOL_USE_TEMPLATES:
            with pytest.raises(InputError, match="chat template"):
                chat.ChatFormat.from_tokenizer(tokenizer)
            continue
        try:
            chat_format = chat.ChatFormat.from_tokenizer(tokenizer)
            sequences = chat_format.training_examples(record)
        except InputError as e:
            failures[path.stem] = str(e)[:200]
            continue
        trained = [tokenizer.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != -100])
                   for row in sequences]
        everything = "".join(trained)
        ends = [chat_format.eot_token_id in row["labels"] for row in sequences]
        # generation: the prompt ends with the assistant header and what the template opens after it
        prompt = tokenizer.decode(chat_format.prompt_ids(record))
        header = (chat_format.probe["generation_prompt"] or chat_format.response_part).rstrip()
        if not (everything.count("Hello 7") == everything.count("It is 4") == 1 and all(ends)) \
                or any(text in everything for text in ("Be brief", "Hi there", "What is")) \
                or not prompt.rstrip().endswith(header) or "It is 4" in prompt or "{{ .Content }}" not in chat_format.ollama_template:
            failures[path.stem] = f"{chat_format.template_source}: trained {trained}, end of turn {ends}, prompt {prompt!r}"
    assert not failures, json.dumps(failures, indent=1, ensure_ascii=False)


def test_gguf_chat_prompts_are_rendered_as_llama_server_renders_them():
    """llama-cpp-python's chats from a GGUF's template (the quantize phase's chat check,
    `factory sample`, compare's local servers) get BOS where the template leaves it to the
    tokenizer (Phi-3's chats had none: 1 of 8 matched greedy completions), and a system message
    in the first user message where the template refuses a system role (Gemma 1/2's raised)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llama_cpp.runtime()
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    phi3 = Jinja2ChatFormatter(template=_trl_template("phi3"), eos_token="<|endoftext|>", bos_token="<s>")(
        messages=conversation)
    assert not phi3.prompt.startswith("<s>") and not phi3.added_special  # so the tokenizer adds BOS
    llama = Jinja2ChatFormatter(template=_trl_template("llama3_1"), eos_token="<|eot_id|>",
                                bos_token="<|begin_of_text|>")(messages=conversation)
    assert llama.prompt.startswith("<|begin_of_text|>") and llama.added_special  # written once, by the template
    gemma = Jinja2ChatFormatter(template=_trl_template("gemma"), eos_token="<eos>", bos_token="<bos>")(
        messages=conversation)
    assert gemma.prompt == "<bos><start_of_turn>user\nBe brief.\n\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
