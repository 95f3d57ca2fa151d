"""llama.cpp, pinned and offline: the GGUF converter, the quantizer and the GGUF types.

One version of llama.cpp serves every step. llama-cpp-python (the `gguf` extra) pins it:
its wheel carries the runtime and the quantize API, and its sdist on the package registry
carries the same llama.cpp source, with `convert_hf_to_gguf.py` and the matching `gguf-py`.
`factory setup-gguf` (run by `make install`) takes the converter from that sdist once, at
install time; at run time nothing is cloned, built or downloaded. The same sdist carries the
vocabulary-only GGUFs llama.cpp tests its tokenizers with; setup-gguf keeps those of the example
model families (factory.real_tokenizers) in the same folder. A llama.cpp checkout of
the user's own can stand in (`save.llama_cpp_dir` or the FACTORY_LLAMA_CPP variable).

The converter writes F32, F16, BF16 and Q8_0 directly; every other type is quantized from
an F16 (or BF16) GGUF through `llama_cpp.llama_model_quantize`.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from factory.errors import InputError, disk_full, is_disk_full

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CONVERTER = "convert_hf_to_gguf.py"
# What the converter needs from the llama.cpp tree (it imports `conversion` and `gguf-py`).
CONVERTER_PARTS = (CONVERTER, "conversion/", "gguf-py/", "LICENSE")
# Real tokenizers, offline: llama.cpp's vocabulary-only GGUFs of Llama 3 (llama-bpe), Qwen 2
# (qwen2), Llama 2 (llama-spm) and Phi-3 (phi-3), each with the test texts (.inp) and the ids the
# original Hugging Face tokenizer gives them (.out), a reference that does not come from us.
VOCABS = ("llama-bpe", "qwen2", "llama-spm", "phi-3", "gpt-2")
VOCAB_PARTS = tuple(f"models/ggml-vocab-{name}.gguf{ext}" for name in VOCABS for ext in ("", ".inp", ".out"))
# Real models' chat templates, as llama.cpp's own tests use them (Gemma 4, DeepSeek, GLM, ...):
# the tests render each through the factory's chat format.
TEMPLATES = "models/templates/"
INSTALL_HINT = ("run `factory setup-gguf` (or `make install`), which takes llama.cpp's converter from the "
                f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist on the package registry; "
                "or point save.llama_cpp_dir (or FACTORY_LLAMA_CPP) at a llama.cpp checkout")


@dataclass(frozen=True)
class GGUFType:
    name: str  # as llama.cpp prints it, and as it appears in the file name
    bits_per_weight: tuple[float, float]
    """Bits per weight of a 2-D tensor, low to high: the block format's own cost, up to the
    higher types that the _S/_M/_L mixes give some tensors."""
    converter: str | None = None  # the converter's --outtype when it writes this type itself
    ftype: str | None = None  # else the llama_cpp LLAMA_FTYPE_MOSTLY_* constant
    fallback: tuple[float, float] | None = None
    """Bits per weight of a tensor whose rows are not a multiple of 256 values: llama.cpp
    cannot store those in a K-quant and falls back (Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to
    Q8_0, Q2_K/Q3_K/IQ4_XS to IQ4_NL; llama-quant.cpp)."""


TYPES = {t.name: t for t in (
    GGUFType("F32", (32.0, 32.0), converter="f32"),
    GGUFType("F16", (16.0, 16.0), converter="f16"),
    GGUFType("BF16", (16.0, 16.0), converter="bf16"),
    GGUFType("Q8_0", (8.5, 8.5), converter="q8_0"),
    GGUFType("Q6_K", (6.5625, 6.5625), ftype="Q6_K", fallback=(8.5, 8.5)),
    GGUFType("Q5_K_M", (5.5, 6.5625), ftype="Q5_K_M", fallback=(6.0, 8.5)),
    GGUFType("Q5_K_S", (5.5, 6.5625), ftype="Q5_K_S", fallback=(6.0, 8.5)),
    GGUFType("Q5_1", (6.0, 6.5625), ftype="Q5_1"),
    GGUFType("Q5_0", (5.5, 6.5625), ftype="Q5_0"),
    GGUFType("Q4_K_M", (4.5, 6.5625), ftype="Q4_K_M", fallback=(5.5, 8.5)),
    GGUFType("Q4_K_S", (4.5, 5.5), ftype="Q4_K_S", fallback=(5.5, 6.0)),
    GGUFType("Q4_1", (5.0, 6.5625), ftype="Q4_1"),
    GGUFType("Q4_0", (4.5, 6.5625), ftype="Q4_0"),
    GGUFType("IQ4_NL", (4.5, 6.5625), ftype="IQ4_NL"),
    GGUFType("IQ4_XS", (4.25, 6.5625), ftype="IQ4_XS", fallback=(4.5, 8.5)),
    GGUFType("Q3_K_L", (3.4375, 6.5625), ftype="Q3_K_L", fallback=(4.5, 8.5)),
    GGUFType("Q3_K_M", (3.4375, 6.5625), ftype="Q3_K_M", fallback=(4.5, 8.5)),
    GGUFType("Q3_K_S", (3.4375, 6.5625), ftype="Q3_K_S", fallback=(4.5, 8.5)),
    GGUFType("Q2_K", (2.625, 6.5625), ftype="Q2_K", fallback=(4.5, 8.5)),
)}
K_QUANT_ROW = 256  # values per K-quant super-block


def expected_bits_per_weight(gtype: GGUFType, shapes: list[tuple[int, ...]]) -> tuple[float, float]:
    """The range of bits per weight a file of this type should have, given the model's tensor
    shapes (rows are the last dimension): 1-D tensors stay F32, K-quant rows that are not a
    multiple of 256 values take the fallback type. A file outside it is not what it claims."""
    low = high = 0.0
    total = 0
    for shape in shapes:
        count = math.prod(shape)
        total += count
        if len(shape) < 2:
            bits = (32.0, 32.0)
        elif gtype.fallback and shape[-1] % K_QUANT_ROW:
            bits = gtype.fallback
        else:
            bits = gtype.bits_per_weight
        low += bits[0] * count
        high += bits[1] * count
    return low / total, high / total


def gguf_file(directory: Path, type_name: str) -> Path:
    return directory / f"model-{type_name}.gguf"


# --- the converter --------------------------------------------------------------------------


def default_converter_dir() -> Path:
    """Where `factory setup-gguf` puts the converter: inside the environment, per version."""
    return Path(sys.prefix) / "share" / "factory" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def converter_dir(configured: Path | None) -> Path:
    """The llama.cpp tree to convert with, or an error that says how to get one."""
    folder = configured or default_converter_dir()
    if not (folder / CONVERTER).is_file() or not (folder / "gguf-py").is_dir():
        where = f"save.llama_cpp_dir {folder}" if configured else f"{folder}"
        raise InputError(f"llama.cpp's converter is not installed: {where} has no {CONVERTER} and gguf-py/; {INSTALL_HINT}")
    return folder


def vocab_file(name: str, suffix: str = "") -> Path:
    """One of the VOCABS GGUFs in the installed folder; suffix ".inp" or ".out" for its test files."""
    gguf = default_converter_dir() / "models" / f"ggml-vocab-{name}.gguf"
    if not gguf.is_file():
        raise InputError(f"llama.cpp's vocabulary {gguf.name} is not installed in {gguf.parent}: {INSTALL_HINT}")
    return gguf.with_name(gguf.name + suffix)


def chat_template_files() -> list[Path]:
    """The real models' chat templates in the installed folder (TEMPLATES)."""
    folder = default_converter_dir() / TEMPLATES
    if not folder.is_dir():
        raise InputError(f"llama.cpp's chat templates are not installed in {folder}: {INSTALL_HINT}")
    return sorted(folder.glob("*.jinja"))


def fetch_converter(dest: Path | None = None, *, log=print) -> Path:
    """Take llama.cpp's converter, the VOCABS files and the chat TEMPLATES out of the pinned
    llama-cpp-python sdist (install time). A folder from an older setup-gguf that lacks the
    vocabularies or the templates is replaced."""
    dest = dest or default_converter_dir()
    if (dest / CONVERTER).is_file() and all((dest / part).is_file() for part in VOCAB_PARTS) \
            and any((dest / TEMPLATES).glob("*.jinja")):
        log(f"llama.cpp converter and vocabularies already in {dest}")
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        log(f"downloading the llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist (llama.cpp source, ~75 MB)")
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp],
            capture_output=True, text=True,
        )
        if done.returncode != 0:
            raise InputError(f"pip could not download llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}: "
                             f"{done.stderr.strip()[-500:]}")
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        staging = Path(tmp) / "llama.cpp"
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        with tarfile.open(sdist) as archive:
            members = []
            for member in archive.getmembers():
                inner = member.name.removeprefix(prefix)
                if (member.name.startswith(prefix) and (member.isfile() or member.isdir())
                        and (inner.startswith((*CONVERTER_PARTS, TEMPLATES)) or inner in VOCAB_PARTS)):
                    member.name = inner
                    members.append(member)
            archive.extractall(staging, members=members, filter="data")
        (staging / "VERSION").write_text(f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}\n", encoding="utf-8")
        dest.parent.mkdir(parents=True, exist_ok=True)
        old = dest.with_name(dest.name + ".old")
        if dest.exists():  # an older install without the vocabularies
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
        shutil.move(str(staging), dest)  # whole folder at once: never a half-extracted converter
        shutil.rmtree(old, ignore_errors=True)
    log(f"llama.cpp converter and vocabularies installed in {dest}")
    return dest


# llama.cpp's converter reads a model's settings through transformers' AutoConfig, and
# transformers 5 drops or renames some that the converter then looks up by their old name in
# config.json (GPT-NeoX's `rotary_pct`: every Pythia failed with KeyError). The converter runs
# with config.json's own entries under the ones AutoConfig gives. And for SentencePiece
# vocabularies it writes `add_space_prefix` only for Llama (from tokenizer_config.json),
# Gemma, BERT and T5: under any other architecture (Qwen, Phi-3) a tokenizer.model without the
# dummy prefix became a GGUF that puts a space before every text (tokenizer agreement 0); the
# tokenizer.model's own setting is written where the converter wrote none.
CONVERTER_WITH_CONFIG_JSON = """
import json, runpy, sys
from pathlib import Path
script = sys.argv.pop(1)
sys.path[:0] = [str(Path(script).parent), str(Path(script).parent / "gguf-py")]
from conversion.base import ModelBase
load = ModelBase.load_hparams
def load_hparams(dir_model, *args, **kwargs):
    hparams = load(dir_model, *args, **kwargs)
    path = Path(dir_model) / "config.json"
    written = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return {**written, **hparams}
ModelBase.load_hparams = staticmethod(load_hparams)
from conversion.base import TextModel
prepare = TextModel.prepare_metadata
def prepare_metadata(self, *args, **kwargs):
    prepare(self, *args, **kwargs)  # which ends with the model's set_vocab
    kv = {k: v for data in self.gguf_writer.kv_data for k, v in data.items()}
    spm = kv.get("tokenizer.ggml.model") is not None and kv["tokenizer.ggml.model"].value == "llama"
    if spm and "tokenizer.ggml.add_space_prefix" not in kv and (self.dir_model / "tokenizer.model").is_file():
        from sentencepiece import sentencepiece_model_pb2
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString((self.dir_model / "tokenizer.model").read_bytes())
        self.gguf_writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
TextModel.prepare_metadata = prepare_metadata
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
"""


def convert(llama_cpp: Path, model_dir: Path, out_file: Path, outtype: str, log_file: Path, *,
            mmproj: bool = False) -> None:
    """Run llama.cpp's converter on a Hugging Face folder; its output goes to `log_file`.
    `mmproj`: write an image-text model's vision tower and projector (llama.cpp's separate
    multimodal projector file) instead of its language model."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use the matching gguf-py
    env["HF_HUB_OFFLINE"] = "1"
    tmp = out_file.with_suffix(".gguf.partial")
    with open(log_file, "w", encoding="utf-8") as log:
        done = subprocess.run(
            [sys.executable, *(["-c", CONVERTER_WITH_CONFIG_JSON] if (llama_cpp / "conversion" / "base.py").is_file() else []),
             str(llama_cpp / CONVERTER), str(model_dir), "--outfile", str(tmp), "--outtype", outtype,
             *(["--mmproj"] if mmproj else [])],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    if done.returncode != 0:
        tail = "".join(log_file.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-15:])
        full = _out_of_space(out_file.parent, tail)
        tmp.unlink(missing_ok=True)
        if full:
            raise disk_full(out_file.parent, f"writing {out_file.name}")
        raise InputError(f"llama.cpp's converter failed on {model_dir} (exit {done.returncode}); "
                         f"full log in {log_file}:\n{tail}")
    os.replace(tmp, out_file)


def quantize(source: Path, out_file: Path, gtype: GGUFType, threads: int, log_file: Path) -> None:
    """Quantize a GGUF through llama.cpp's own quantizer (the llama-quantize code); what it
    prints (a line per tensor that needs a fallback type) goes to `log_file`."""
    llama_cpp = runtime()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gtype.ftype}")
    params.nthread = threads
    tmp = out_file.with_suffix(".gguf.partial")
    with _native_stderr_to(log_file):
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
    if code != 0:
        full = _out_of_space(out_file.parent, log_file.read_text(encoding="utf-8", errors="replace")[-4000:])
        tmp.unlink(missing_ok=True)
        if full:
            raise disk_full(out_file.parent, f"writing {out_file.name}")
        raise InputError(f"llama.cpp could not quantize {source.name} to {gtype.name} (code {code}); see {log_file}")
    os.replace(tmp, out_file)


def _out_of_space(folder: Path, log_text: str) -> bool:
    """Whether a llama.cpp write into `folder` failed for lack of space: its log says so, or
    (when the log itself could not be written) the disk is full now, before the partial file
    is removed."""
    return is_disk_full(OSError(log_text), folder)


@contextmanager
def _native_stderr_to(path: Path | str) -> Iterator[None]:
    """Send what C code writes to stderr (llama.cpp prints some lines past its log callback)
    into a file, for the duration of the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as target:
        os.dup2(target.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def runtime():
    """The llama_cpp module (llama-cpp-python), or an error naming the install command."""
    try:
        import llama_cpp
    except ImportError:
        raise InputError(f'llama-cpp-python is not installed: pip install -e ".[gguf]" '
                         f"(llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}; it builds from source once, ~5 min)") from None
    from llama_cpp import _logger

    _logger.set_verbose(False)  # llama.cpp's own log (every tensor of every file) only on errors
    _template_prompts_as_in_llama_server()
    return llama_cpp


def _template_prompts_as_in_llama_server() -> None:
    """Chat prompts rendered from a GGUF's template get what llama-server gives them: BOS when
    the vocabulary adds one and the template did not write it, and a system message in the
    first user message when the template refuses one.

    llama-cpp-python 0.3's Jinja2ChatFormatter marks every rendered prompt as already holding
    its special tokens, so a template that leaves BOS to the tokenizer (Phi-3's) chatted
    without it: the GGUF's chats then disagreed with its own completions on 7 of 8 answers of
    the tiny Phi-3. And a template without a system role (Gemma 1 and 2's raise) failed every
    chat that had a system message. Patched once per process, for `factory sample`, the
    quantize phase's chat check and `factory.llama_server`.
    """
    from llama_cpp import llama_chat_format

    formatter = llama_chat_format.Jinja2ChatFormatter
    if getattr(formatter, "_factory_patched", False):
        return
    render = formatter.__call__

    def render_as_llama_server(self, *, messages, **kwargs):
        try:
            result = render(self, messages=messages, **kwargs)
        except Exception:
            if not (len(messages) > 1 and messages[0]["role"] == "system" and messages[1]["role"] == "user"):
                raise
            first = {**messages[1], "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
            result = render(self, messages=[first, *messages[2:]], **kwargs)
        result.added_special = bool(self.bos_token) and result.prompt.startswith(self.bos_token)
        return result

    formatter.__call__ = render_as_llama_server
    formatter._factory_patched = True


def placement() -> dict[str, Any]:
    """Where `load` puts a model: every layer on the GPU when llama.cpp was built with one
    (CUDA, Metal, ...), else none; and whether the plain CPU kernels are forced.

    On a CPU with AMX, ggml's extra CPU buffer types (the AMX and repacked-weight kernels,
    what llama.cpp's --no-repack turns off) crashed with a segfault on this project's tiny
    test model (Q8_0, 64-wide rows) on any batch of more than one token; there the plain
    kernels, llama.cpp's reference path, are used. Elsewhere llama.cpp's defaults stay.
    """
    return {"n_gpu_layers": -1 if runtime().llama_supports_gpu_offload() else 0, "plain_cpu_kernels": cpu_has_amx()}


def load(path: Path, *, n_ctx: int, logits_all: bool = False, threads: int | None = None):
    """A llama_cpp.Llama placed as `placement()` says; an InputError with llama.cpp's reason
    when it cannot load the file (an architecture or a tensor shape this llama.cpp does not know)."""
    runtime_module = runtime()
    where = placement()

    def attempt(verbose: bool):
        return _bounded(runtime_module.Llama)(str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=verbose, seed=0,
                                              n_gpu_layers=where["n_gpu_layers"], n_threads=threads or max(1, os.cpu_count() or 1))

    with _kernels(plain=where["plain_cpu_kernels"]):
        try:
            with _native_stderr_to(os.devnull):  # notes such as "using full-size SWA cache"
                return attempt(verbose=False)
        except ValueError as e:
            failure = e
        # again, verbose, for llama.cpp's reason (verbose=False silences its log)
        with tempfile.TemporaryDirectory() as tmp:
            native, logged = Path(tmp) / "native.log", Path(tmp) / "logged.log"
            try:  # llama-cpp-python prints llama.cpp's log to sys.stderr, which a caller may have replaced
                with _native_stderr_to(native), open(logged, "w", encoding="utf-8") as out, redirect_stderr(out):
                    attempt(verbose=True)
            except ValueError:
                pass
            finally:
                runtime()  # llama.cpp's log back to errors only
            log_text = logged.read_text(encoding="utf-8") + native.read_text(encoding="utf-8", errors="replace")
            reasons = [" ".join(line.split()) for line in log_text.splitlines() if "error" in line.lower()]
    raise InputError(f"llama.cpp (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}) cannot load {path}: "
                     f"{' '.join(reasons[:2]) or failure}. The model's architecture may be newer than this llama.cpp, "
                     "or its config.json may not describe its weights as llama.cpp reads them; the merged model is "
                     "there without it (`factory run evaluate` stops before quantize)")


def image_embeddings(mmproj: Path, text_model, images: list) -> list:
    """What llama.cpp's multimodal library (mtmd, as llama-server --mmproj uses it) feeds the
    language model for each image (H x W x 3 uint8 arrays): one (image tokens x hidden) float
    array per image, or an InputError when the projector file does not load or encode.
    `text_model` is a loaded Llama of the same model (mtmd checks that the two fit)."""
    import ctypes

    import numpy as np
    from llama_cpp import mtmd_cpp as mtmd

    params = mtmd.mtmd_context_params_default()
    params.use_gpu = placement()["n_gpu_layers"] != 0
    params.print_timings = False
    params.warmup = False
    params.n_threads = max(1, os.cpu_count() or 1)
    with _native_stderr_to(os.devnull):  # clip's per-tensor log
        context = mtmd.mtmd_init_from_file(str(mmproj).encode(), text_model.model, params)
    if not context:
        raise InputError(f"llama.cpp could not load the vision projector {mmproj} with its language model")
    hidden = runtime().llama_model_n_embd(text_model.model)
    marker = mtmd.mtmd_default_marker()
    embeddings = []
    try:
        for image in images:
            height, width, _ = image.shape
            pixels = np.ascontiguousarray(image, dtype=np.uint8)
            bitmap = mtmd.mtmd_bitmap_init(width, height, pixels.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
            chunks = mtmd.mtmd_input_chunks_init()
            try:
                text = mtmd.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
                with _native_stderr_to(os.devnull):
                    failed = mtmd.mtmd_tokenize(context, chunks, ctypes.byref(text),
                                                (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
                images_in = [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))]
                images_in = [c for c in images_in if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE]
                if failed or len(images_in) != 1:
                    raise InputError(f"llama.cpp could not tokenize an image with {mmproj} (code {failed})")
                with _native_stderr_to(os.devnull):
                    failed = mtmd.mtmd_encode_chunk(context, images_in[0])
                if failed:
                    raise InputError(f"llama.cpp could not encode an image with {mmproj} (code {failed})")
                tokens = mtmd.mtmd_input_chunk_get_n_tokens(images_in[0])
                output = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(context), shape=(tokens * hidden,))
                embeddings.append(output.reshape(tokens, hidden).copy())
            finally:
                mtmd.mtmd_input_chunks_free(chunks)
                mtmd.mtmd_bitmap_free(bitmap)
    finally:
        mtmd.mtmd_free(context)
    return embeddings


@contextmanager
def _kernels(*, plain: bool) -> Iterator[None]:
    """llama-cpp-python has no argument for the plain CPU kernels, so the default model
    parameters are wrapped while a model loads inside the block."""
    from llama_cpp import llama as llama_module

    defaults = llama_module.llama_cpp.llama_model_default_params
    if plain:
        use_plain_cpu_kernels()
    try:
        yield
    finally:
        llama_module.llama_cpp.llama_model_default_params = defaults


def use_plain_cpu_kernels() -> None:
    """From now on, in this process, models load on the plain CPU kernels (see placement; the
    local server process of factory.llama_server calls it on an AMX CPU)."""
    from llama_cpp import llama as llama_module

    defaults = llama_module.llama_cpp.llama_model_default_params

    def plain_kernels():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = plain_kernels


def _bounded(llama_class):
    """Llama whose generation ends at the end of its context instead of failing there.

    llama-cpp-python 0.3's completion loop holds back a token that ends in an incomplete UTF-8
    sequence and then skips its own max_tokens check (`continue`), so a model that keeps
    emitting such byte tokens (an undertrained one does) generates until the context is full
    and dies with "could not broadcast input array ... into shape (0,)": an internal error on
    the user's model. Stopping there gives a completion that ends with finish_reason "length".
    """

    class BoundedLlama(llama_class):
        def generate(self, tokens, *args, **kwargs):
            rows = self.scores.shape[0]
            for token in super().generate(tokens, *args, **kwargs):
                if self.n_tokens >= rows:  # evaluating this token would run past the context
                    return
                yield token

    return BoundedLlama


def cpu_has_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU has Intel AMX (the amx_tile / amx_int8 / amx_bf16 flags Linux reports)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(flag.startswith("amx") for line in text.splitlines() if line.startswith("flags")
               for flag in line.split(":", 1)[1].split())
