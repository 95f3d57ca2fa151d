"""Real tokenizers offline: Llama 3, Qwen 2, Llama 2, Phi-3 and GPT-2, from llama.cpp's vocabularies.

llama.cpp tests its tokenizers with vocabulary-only GGUF files (`models/ggml-vocab-*.gguf` in
its source, which `factory setup-gguf` keeps from the pinned llama-cpp-python sdist). Each holds
a real model's full vocabulary: `llama-bpe` is Llama 3's (128,256 tokens), `qwen2` Qwen 2's,
`llama-spm` Llama 2's SentencePiece model (32,000 pieces), `phi-3` Phi-3's (Llama 2's plus
its chat tokens) and `gpt-2` GPT-2's (50,257 tokens; `<|endoftext|>` is both BOS and EOS). This
module turns each into an ordinary Hugging Face tokenizer folder, once, and keeps it next to
the files it came from (`<converter folder>/tokenizers/<name>/`, so it is keyed by the sdist
version): reading a GGUF vocabulary takes a minute or more, a saved folder
loads in seconds. The example models of factory.example build on these folders.

What a folder holds is what the real model's folder holds for its tokenizer:
- BPE vocabularies (llama-bpe, qwen2, gpt-2): tokenizer.json, read by transformers from the GGUF; Llama
  3's pre-tokenizer, which transformers does not restore from the GGUF, is set as Llama 3's own
  tokenizer.json has it, so llama.cpp's converter recognises it by its hash.
- SentencePiece vocabularies (llama-spm, phi-3): tokenizer.model, rebuilt from the GGUF's pieces,
  scores and types with Llama 2's normalizer settings (llama.cpp's converter reads this file),
  and a tokenizer.json with the same merges, ranked by score as SentencePiece applies them.
Special tokens are as the GGUF has them; a model family's own names and flags (Llama 3.1's,
Qwen 2.5's) are the example's business.

Each vocabulary's `.inp`/`.out` files give test texts and the ids the original tokenizer
produced for them; `reference_tokenizations` serves them to the tests.

torch-free, but needs transformers, sentencepiece and the `gguf` package (the train extra).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from factory import llama_cpp

SENTENCEPIECE_VOCABS = {"llama-spm": 32000, "phi-3": 32000}
"""SentencePiece vocabularies and the size of their SentencePiece model; the GGUF's tokens past
it are the model's added tokens (Phi-3's chat tokens) and the converter's padding."""

# Llama 3's tokenizer.json, as meta-llama/Meta-Llama-3.1-8B-Instruct ships it: the regex split
# that llama.cpp calls `llama-bpe`, byte-level bytes, whole words looked up before merging, and
# <|begin_of_text|> added in front of every text.
LLAMA3_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
                                           "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
     "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
]}
LLAMA3_BOS = "<|begin_of_text|>"


def folder(name: str) -> Path:
    """The Hugging Face tokenizer folder of vocabulary `name` (one of llama_cpp.VOCABS), built on
    first use. Building writes a temporary folder and renames it into place, so a concurrent or
    interrupted build never leaves half a folder."""
    target = llama_cpp.default_converter_dir() / "tokenizers" / name
    if (target / "tokenizer.json").is_file():
        return target
    gguf_file = llama_cpp.vocab_file(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        staging = Path(tmp) / name
        if name in SENTENCEPIECE_VOCABS:
            _build_sentencepiece(gguf_file, staging, SENTENCEPIECE_VOCABS[name])
        else:
            _build_bpe(gguf_file, staging)
        try:
            staging.rename(target)
        except OSError:  # another process built it first
            if not (target / "tokenizer.json").is_file():
                raise
    return target


def build_all(log=print) -> None:
    """Build every vocabulary's folder (install time; a few minutes on 2 cores the first time)."""
    import time

    for name in llama_cpp.VOCABS:
        start = time.monotonic()
        path = folder(name)
        log(f"tokenizer {name} ready ({time.monotonic() - start:.0f} s)")
    log(f"tokenizers in {path.parent}")


def reference_tokenizations(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's test texts for vocabulary `name` and the ids the original Hugging Face
    tokenizer gave each (without special tokens)."""
    # each text ends with a separator line; one line of ids per text
    texts = llama_cpp.vocab_file(name, ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    ids = llama_cpp.vocab_file(name, ".out").read_text(encoding="utf-8").splitlines()
    if len(texts) != len(ids):
        raise RuntimeError(f"{name}: {len(texts)} test texts but {len(ids)} lines of ids")
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, ids)]


def _build_bpe(gguf_file: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer.save_pretrained(out)
    path = out / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    special = {t["content"] for t in spec["added_tokens"]}
    # the GGUF's padding entries ([PAD151646]...) and the special tokens are not BPE vocabulary
    spec["model"]["vocab"] = {k: v for k, v in spec["model"]["vocab"].items()
                              if k not in special and not (k.startswith("[PAD") and k.endswith("]"))}
    if LLAMA3_BOS in special:
        bos_id = next(t["id"] for t in spec["added_tokens"] if t["content"] == LLAMA3_BOS)
        spec["normalizer"] = None
        spec["pre_tokenizer"] = LLAMA3_PRE_TOKENIZER
        spec["model"].update(fuse_unk=False, byte_fallback=False, ignore_merges=True)
        spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
        bos = {"SpecialToken": {"id": LLAMA3_BOS, "type_id": 0}}
        spec["post_processor"] = {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": LLAMA3_BOS, "type_id": 1}},
                      {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {LLAMA3_BOS: {"id": LLAMA3_BOS, "ids": [bos_id], "tokens": [LLAMA3_BOS]}}},
        ]}
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")


def _build_sentencepiece(gguf_file: Path, out: Path, pieces: int) -> None:
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    reader = GGUFReader(gguf_file)

    def values(key: str) -> list:
        field = reader.fields[key]
        return [field.parts[i] for i in field.data]

    tokens = [bytes(part).decode("utf-8") for part in values("tokenizer.ggml.tokens")]
    scores = [float(part[0]) for part in values("tokenizer.ggml.scores")]
    # Llama 2's tokenizer.model: a BPE model with byte fallback, <unk> <s> </s> at 0, 1, 2,
    # a space prefix, spaces kept as they are, digits split
    model = sp_pb2.ModelProto()
    kind = sp_pb2.ModelProto.SentencePiece
    for i, (piece, score) in enumerate(zip(tokens[:pieces], scores)):
        entry = model.pieces.add(piece=piece, score=score)
        entry.type = (kind.UNKNOWN if i == 0 else kind.CONTROL if i in (1, 2)
                      else kind.BYTE if piece.startswith("<0x") and len(piece) == 6 else kind.NORMAL)
    model.trainer_spec.model_type = sp_pb2.TrainerSpec.BPE
    model.trainer_spec.vocab_size = pieces
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.split_digits = True
    model.trainer_spec.unk_id, model.trainer_spec.bos_id, model.trainer_spec.eos_id, model.trainer_spec.pad_id = 0, 1, 2, -1
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = False
    model.normalizer_spec.escape_whitespaces = True
    out.mkdir(parents=True)
    (out / "tokenizer.model").write_bytes(model.SerializeToString())

    # SentencePiece merges the pair whose result scores highest. transformers' own conversion
    # of tokenizer.model ranks merges by piece id, which differs where a piece's score is out of
    # id order (Llama 2's "▁▁" scores -1e9: "\n  -" would become "▁▁" "-", not "▁" "▁-").
    vocab = {piece: i for i, piece in enumerate(tokens[:pieces])}
    merges = generate_merges(vocab, dict(zip(tokens[:pieces], scores)))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, legacy=True, add_bos_token=True)
    added = [t for t in tokens[pieces:] if not (t.startswith("[PAD") and t.endswith("]"))]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in added], special_tokens=True)
    if len(tokenizer) != pieces + len(added):
        raise RuntimeError(f"{gguf_file.name}: added tokens did not take the GGUF's ids")
    tokenizer.save_pretrained(out)


def copy_files(name: str, dest: Path) -> None:
    """Copy vocabulary `name`'s tokenizer.json (and tokenizer.model) into a model folder."""
    source = folder(name)
    for file in ("tokenizer.json", "tokenizer.model"):
        if (source / file).is_file():
            shutil.copyfile(source / file, dest / file)
