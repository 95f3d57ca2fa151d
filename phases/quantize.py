"""quantize: merge the adapter in 16-bit, export GGUF with llama.cpp, and check every file.

Reads top to bottom like a recipe:

1. merge base + LoRA adapter into save.merged_path in 16-bit (seed 002: never fp32), with
   PEFT's merge_and_unload (Unsloth's save_pretrained_merged on that backend), and put back
   the tokenizer files llama.cpp needs (tokenizer.model, special-token flags);
2. check the merge: the saved model's logits equal base + adapter on a few test prompts (up
   to 16-bit rounding) and differ from the base model's (a merge that dropped the adapter
   fails the quantization-verified gate);
3. score the merged model on the test split with the evaluate phase's scorers: the
   reference every GGUF is compared with;
4. export each save.gguf_quantization type with llama.cpp's converter (F32/F16/BF16/Q8_0)
   or its quantizer (the K-quants and the rest), pinned, offline;
5. verify each GGUF through llama.cpp's runtime: tokenizer agreement with the HF tokenizer,
   the scorers on the test split, perplexity and KL divergence of the next-token
   distribution against the merged model, and chat generation that stops at end of turn
   with the template embedded in the file. An image-text model's vision tower and projector
   go to llama.cpp's separate projector file (mmproj-model-F16.gguf, what llama-server
   --mmproj takes), checked by encoding fixed images through llama.cpp's multimodal library
   against the merged model's own embeddings;
6. hand off: an Ollama Modelfile next to the GGUF and the commands to run it.

The model cards (which include gate results) are written after the gates, by the runner
(`after_gates`). The merged folder and each GGUF file appear whole or not at all.
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory import handoff, llama_cpp, modeling, plan
from factory.chat import messages
from factory.config import FactoryConfig
from factory.errors import InputError
from factory.phase import GGUF_LIBRARIES, Phase, PhaseContext
from factory.workspace import Workspace, record_created, remove_if_created, staged_dir

MERGE_PROBES = 8  # test prompts whose logits check the merge
MERGE_PROBE_TOKENS = 8  # answer tokens per probe whose logits are kept (3 models x 8 x 8 x vocabulary in fp32:
# 200 MB for Gemma 3's 262k vocabulary, whatever the answers' length)
DIVERGENCE_EXAMPLES = 32  # test examples for perplexity and KL (the merged model's final hidden states on
# their answer tokens stay in memory, not its logits: 32 x 500 tokens x 2,560 x 4 bytes = 164 MB for Gemma 3 4B)
STOP_CHECKS = 8  # chat completions that must end at end of turn
PROJECTOR_FILE = "mmproj-model-F16.gguf"  # F16: what llama.cpp's converter and released projector files use


def run(ctx: PhaseContext) -> dict[str, Any]:
    from factory import evaluation

    cfg, ws, log = ctx.config, ctx.workspace, ctx.log
    # Both halves of llama.cpp must be there before anything slow starts.
    converter = llama_cpp.converter_dir(ws.path(cfg.save.llama_cpp_dir) if cfg.save.llama_cpp_dir else None)
    llama_cpp.runtime()
    adapter = ws.path(cfg.save.lora_path)
    if not (adapter / "adapter_config.json").exists():
        raise InputError(f"{ws.rel(adapter)} has no adapter; run `factory run finetune` first")
    types = [llama_cpp.TYPES[name] for name in cfg.save.gguf_quantization]
    records = evaluation.read_split(ws.split_file("test"), ws, cfg.evaluation.max_examples)
    backend = modeling.select_backend(cfg.model.backend)

    # 1-2. merge and check
    merged_dir = ws.path(cfg.save.merged_path)
    log.info("merging %s into %s (%s)", ws.rel(adapter), ws.rel(merged_dir), cfg.save.merged_dtype)
    with staged_dir(ws, merged_dir, "save.merged_path") as staging:
        merge = _merge(ctx, backend, adapter, merged_dir, staging, records[:MERGE_PROBES])
    log.info("merge check: max |merged - (base + adapter)| %.4g, max |merged - base| %.4g",
             merge["max_abs_diff_vs_adapter"], merge["max_abs_diff_vs_base"])

    # 3. the merged model's scores and next-token distributions: the reference
    model, chat = modeling.load_for_inference(cfg, ws, backend, path=str(merged_dir))
    reference = evaluation.score_model(ctx, model, chat, records, what="merged")
    divergence = _divergence_reference(model, chat, records[:DIVERGENCE_EXAMPLES], plan.context_length(cfg))
    shapes = modeling.text_model_shapes(model)  # what each file's size is checked against
    vision = _vision_reference(model, merged_dir, shapes) if modeling.has_vision_tower(model) else None
    del model  # the divergence reference keeps only the output embedding
    gc.collect()

    # 4. GGUF files
    quantized_dir = ws.path(cfg.save.gguf_path)
    exported = _export(ctx, converter, merged_dir, quantized_dir, types)
    remove_if_created(ws, quantized_dir / PROJECTOR_FILE)  # an earlier run's would pass for this model's
    projector = _export_projector(ctx, converter, merged_dir, quantized_dir, vision) if vision else None

    # 5. verify each file with llama.cpp's runtime
    verified = []
    for gtype in types:
        path = llama_cpp.gguf_file(quantized_dir, gtype.name)
        log.info("verifying %s with llama.cpp", ws.rel(path))
        verified.append({
            "type": gtype.name,
            "path": ws.rel(path),
            **exported[gtype.name],
            **_verify(ctx, path, gtype, shapes, chat, records, reference, divergence),
        })

    if projector and projector.get("exported"):
        log.info("verifying %s with llama.cpp's multimodal library", projector["path"])
        projector.update(_verify_projector(ws.path(projector["path"]),
                                           llama_cpp.gguf_file(quantized_dir, verified[0]["type"]), vision))

    # 6. handoff
    modelfile = _write_modelfile(cfg, ws, quantized_dir, verified[0]["type"], chat, projector)
    commands = _run_commands(cfg, ws, quantized_dir, verified[0]["type"], modelfile, projector)
    for line in commands.values():
        log.info("run it: %s", line)
    return {
        "merge": merge,
        "reference": {key: reference[key] for key in ("num_examples", "scores", "primary", "primary_score",
                                                        "perplexity", "decoding") if key in reference},
        "gguf_files": sum(1 for v in verified if Path(ws.path(v["path"])).is_file()),
        "worst_relative_score_drop": (None if any(v["relative_score_drop"] is None for v in verified)
                                      else max(v["relative_score_drop"] for v in verified)),
        "all_sizes_within_bounds": all(v["size_within_bounds"] for v in verified),
        **({} if reference.get("language_modelling") else  # plain text: no turns to end
           {"all_generations_stop": all(v["generation_stops"] == 1.0 for v in verified)}),
        "min_tokenizer_agreement": min(v["tokenizer_agreement"] for v in verified),
        "types": verified,
        **({"vision_projector": projector} if projector else {}),
        "llama_cpp": {"converter": str(converter), "llama_cpp_python": llama_cpp.LLAMA_CPP_PYTHON_VERSION,
                      **llama_cpp.placement()},
        "modelfile": ws.rel(modelfile),
        "commands": commands,
    }


PHASE = Phase(
    name="quantize",
    summary="Merge the adapter, export GGUF and verify the quantized model",
    metrics="quantization",
    run=run,
    config_sections=("model", "save", "evaluation"),
    inputs=lambda cfg, ws: [ws.split_file("test"), ws.path(cfg.save.lora_path), *modeling.local_model_inputs(cfg, ws)],
    outputs=lambda cfg, ws: [ws.path(cfg.save.merged_path),
                             *(llama_cpp.gguf_file(ws.path(cfg.save.gguf_path), t) for t in cfg.save.gguf_quantization)],
    libraries=GGUF_LIBRARIES,
    after_gates=handoff.write_model_cards,
)


# --- 1-2. merge -------------------------------------------------------------------------------


def _merge(ctx: PhaseContext, backend, adapter: Path, merged_dir: Path, staging: Path, probes: list[dict]) -> dict[str, Any]:
    """Merge into `staging`, which takes merged_dir's place when this returns."""
    import torch
    from transformers import AutoModelForCausalLM

    from factory.chat import ChatFormat

    cfg, ws = ctx.config, ctx.workspace
    dtype = getattr(torch, cfg.save.merged_dtype)
    base = modeling.model_path(cfg.model.name, ws)
    started = time.monotonic()
    # the base model's tokenizer with the chat format it was trained with (a saved copy can lose
    # settings such as SentencePiece's `legacy`, which change the ids)
    chat = ChatFormat.from_tokenizer(modeling.load_tokenizer(base), cfg.dataset.chat_template)
    # Causal: the logits of the first answer tokens do not depend on the rest of the conversation.
    probe_ids = [(ids[: head + MERGE_PROBE_TOKENS], head) for ids, head in (_ids_and_head(chat, r) for r in probes)]
    ctx.progress.start(3, "merge steps")

    if backend.name == "unsloth":
        from unsloth import FastModel

        model, _ = FastModel.from_pretrained(model_name=str(adapter), dtype=dtype, load_in_4bit=False)
    else:
        from peft import PeftModel

        # from_pretrained with a 16-bit dtype reads the safetensors straight into 16-bit
        # tensors: the base never exists in fp32.
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        model = PeftModel.from_pretrained(model, str(adapter)).to(backend.device if backend.device != "mps" else "cpu")
    checking = time.monotonic()
    adapter_logits = [_answer_logits(model, ids, head) for ids, head in probe_ids]
    with model.disable_adapter():
        base_logits = [_answer_logits(model, ids, head) for ids, head in probe_ids]
    checking = time.monotonic() - checking
    ctx.progress.advance()

    if backend.name == "unsloth":
        model.save_pretrained_merged(str(staging), chat.tokenizer, save_method="merged_16bit")
        method = "unsloth save_pretrained_merged (merged_16bit)"
    else:
        model = model.merge_and_unload()
        model.save_pretrained(staging, max_shard_size="4GB")
        chat.tokenizer.save_pretrained(staging)
        method = "peft merge_and_unload"
    del model
    gc.collect()
    restored = modeling.complete_saved_files(base, staging)
    recast = modeling.cast_saved_weights(staging, cfg.save.merged_dtype)
    if recast:
        ctx.log.info("%s wrote the base checkpoint's own type; rewrote %s as %s", method, ", ".join(recast),
                     cfg.save.merged_dtype)
    ctx.progress.advance()

    # The check reads the model back from disk: a merge or a save that lost the adapter shows here.
    reloading = time.monotonic()
    reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=dtype).to(backend.device if backend.device == "cuda" else "cpu")
    merged_logits = [_answer_logits(reloaded, ids, head) for ids, head in probe_ids]
    del reloaded
    gc.collect()
    checking += time.monotonic() - reloading
    ctx.progress.advance()

    vs_adapter = max(float((m - a).abs().max()) for m, a in zip(merged_logits, adapter_logits))
    vs_base = max(float((m - b).abs().max()) for m, b in zip(merged_logits, base_logits))
    positions = sum(m.shape[0] for m in merged_logits)
    agree = sum(int((m.argmax(-1) == a.argmax(-1)).sum()) for m, a in zip(merged_logits, adapter_logits))
    return {
        "path": ws.rel(merged_dir),
        "method": method,
        "dtype": "/".join(modeling.saved_float_types(staging)),  # read from the files written
        "files_recast": recast,
        "probe_prompts": len(probe_ids),
        "max_abs_diff_vs_adapter": vs_adapter,
        "max_abs_diff_vs_base": vs_base,
        "diff_ratio": vs_adapter / vs_base if vs_base else None,  # None: the merged model is the base
        "argmax_agreement_vs_adapter": agree / positions if positions else None,
        "logit_scale": max(float(a.abs().max()) for a in adapter_logits),
        "files_restored": restored,
        "size_bytes": sum(f.stat().st_size for f in staging.glob("*.safetensors")),
        "seconds": round(time.monotonic() - started, 3),
        "check_seconds": round(checking, 3),
        "check_note": "of `seconds`: the probe forwards (adapter, base, merged) and reading the merged model back",
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_note": "the process peak so far: earlier phases in the same process and the memory-mapped checkpoint pages count",
    }


def _ids_and_head(chat, record: dict) -> tuple[list[int], int]:
    """The whole conversation's token ids and the length of the prompt part."""
    ids, labels = chat.answer_example(record)
    return ids, next(i for i, label in enumerate(labels) if label != -100)


def _answer_logits(model, ids: list[int], head: int):
    """Logits at the positions that predict the answer's tokens (head - 1 to the second last);
    only those are computed (`logits_to_keep`), so a 262k vocabulary costs little."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=device), logits_to_keep=len(ids) - head + 1, use_cache=False).logits
    return logits[0, :-1].float().cpu()


@dataclass
class DivergenceReference:
    """What the KL and perplexity check needs of the merged model, in bounded memory: per
    example the token ids, the answer tokens' positions and the final hidden states that
    predict them; and the model's head, which turns those into logits a bounded number of
    positions at a time (modeling.LogitHead). Never all the logits at once."""

    head: Any  # modeling.LogitHead
    examples: list[tuple[list[int], list[int], Any]]  # (token ids, labelled positions, hidden states)


def _divergence_reference(model, chat, records: list[dict], context: int) -> DivergenceReference:
    # cut to the context the GGUF is loaded with (training saw no more); rows left with no
    # answer token are left out
    rows = [(ids[:context], labels[:context]) for ids, labels in map(chat.answer_example, records)]
    rows = [(ids, labels) for ids, labels in rows if any(label != -100 for label in labels[1:])]
    if not rows:  # nothing to compare: perplexity and KL come out as None
        return DivergenceReference(None, [])
    examples = []
    # batch_size 1: one example's states at a time, no padding (so the pad id is never used)
    for (index,), hidden, _ in modeling.answer_hidden_states(model, rows, batch_size=1, pad_token_id=0):
        ids, labels = rows[index]
        examples.append((ids, [t for t in range(1, len(ids)) if labels[t] != -100], hidden.cpu()))
    return DivergenceReference(modeling.LogitHead(model, probe=rows[0][0]), examples)


# --- 4. export --------------------------------------------------------------------------------


def _export(ctx: PhaseContext, converter: Path, merged_dir: Path, out_dir: Path, types: list) -> dict[str, dict]:
    cfg, ws, log = ctx.config, ctx.workspace, ctx.log
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = {t.name for t in types}
    for stale in out_dir.glob("model-*.gguf"):  # types no longer asked for would pass for current ones
        if stale.stem.removeprefix("model-") not in wanted and not remove_if_created(ws, stale):
            log.warning("%s is not one of the asked types and was not written by the factory; left as it is", ws.rel(stale))
    # The quantizer starts from a 16-bit GGUF of the merged model's own type.
    source_type = llama_cpp.TYPES["BF16" if cfg.save.merged_dtype == "bfloat16" else "F16"]
    needs_source = any(t.ftype for t in types)
    direct = [t for t in types if t.converter]
    if needs_source and source_type not in direct:
        direct.append(source_type)
    source = llama_cpp.gguf_file(out_dir, source_type.name)
    ctx.progress.start(len(direct) + sum(1 for t in types if t.ftype), "GGUF files")
    ws.logs_dir.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    for gtype in direct:
        path = llama_cpp.gguf_file(out_dir, gtype.name)
        started = time.monotonic()
        log.info("converting %s to %s", ws.rel(merged_dir), ws.rel(path))
        llama_cpp.convert(converter, merged_dir, path, gtype.converter, ws.logs_dir / f"gguf-convert-{gtype.name}.log")
        record_created(ws, path)
        done[gtype.name] = {"method": f"convert_hf_to_gguf.py --outtype {gtype.converter}",
                            "export_seconds": round(time.monotonic() - started, 3),
                            # the converter runs as a child: the largest child's peak so far
                            "converter_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}
        ctx.progress.advance()
    threads = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    for gtype in (t for t in types if t.ftype):
        path = llama_cpp.gguf_file(out_dir, gtype.name)
        started = time.monotonic()
        log.info("quantizing %s to %s", source.name, ws.rel(path))
        llama_cpp.quantize(source, path, gtype, threads, ws.logs_dir / f"gguf-quantize-{gtype.name}.log")
        record_created(ws, path)
        done[gtype.name] = {"method": f"llama_model_quantize from {source_type.name}",
                            "export_seconds": round(time.monotonic() - started, 3)}
        ctx.progress.advance()
    if source_type.name not in wanted:
        source.unlink(missing_ok=True)  # an intermediate, not asked for
    return done


def _export_projector(ctx: PhaseContext, converter: Path, merged_dir: Path, out_dir: Path,
                      vision: dict[str, Any]) -> dict[str, Any]:
    """The vision tower and projector as llama.cpp's projector file. A model whose vision part
    cannot be exported or checked (llama.cpp's converter does not know it, or it is not
    embedded the way _vision_reference checks) still has its verified text GGUFs: the reason is
    recorded (and warned about), not raised."""
    ws, log = ctx.workspace, ctx.log
    path = out_dir / PROJECTOR_FILE
    reason = vision.get("unsupported")
    started = time.monotonic()
    if not reason:
        log.info("converting the vision tower of %s to %s", ws.rel(merged_dir), ws.rel(path))
        try:
            llama_cpp.convert(converter, merged_dir, path, "f16", ws.logs_dir / "gguf-convert-mmproj.log", mmproj=True)
        except InputError as e:  # the converter wrote nothing at `path`
            reason = str(e)[:2000]
    if reason:
        log.warning("no vision projector file: %s", reason)
        return {"exported": False, "path": ws.rel(path), "reason": reason}
    record_created(ws, path)
    return {"exported": True, "path": ws.rel(path), "method": "convert_hf_to_gguf.py --mmproj --outtype f16",
            "export_seconds": round(time.monotonic() - started, 3), "size_bytes": path.stat().st_size}


# --- 5. verification --------------------------------------------------------------------------


def _vision_reference(model, merged_dir: Path, text_shapes: list[tuple[int, ...]]) -> dict[str, Any]:
    """What the projector file is checked against: the merged model's embeddings of fixed
    images and its vision parameter count (all parameters but the language model's). Or
    {"unsupported": why} for a model without an image processor file, or whose image features
    need more than pixels at one fixed size (Qwen 2.5 VL's grid, Llama 3.2 Vision's tiles)."""
    settings_file = merged_dir / "preprocessor_config.json"
    if not settings_file.is_file():
        return {"unsupported": "the model has no preprocessor_config.json (its image processor settings), which "
                               "llama.cpp's converter needs for the projector file"}
    settings = json.loads(settings_file.read_text(encoding="utf-8"))
    try:
        images = modeling.probe_images(settings)
        features = modeling.image_features(model, settings, images)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        return {"unsupported": f"{type(model).__name__} does not embed an image from its pixels at one fixed size "
                               f"({type(e).__name__}: {e}); the factory checks projector files of Gemma 3-style models"}
    return {"images": images, "features": features,
            "parameters": sum(p.numel() for p in model.parameters()) - sum(math.prod(s) for s in text_shapes)}


def _verify_projector(path: Path, text_gguf: Path, reference: dict[str, Any]) -> dict[str, Any]:
    """Encode the reference images with llama.cpp's multimodal library (what llama-server
    --mmproj runs) and compare with the merged model's embeddings, token by token."""
    import numpy as np
    from gguf import GGUFReader

    parameters = sum(int(t.n_elements) for t in GGUFReader(path).tensors)
    counts = {"parameters": parameters, "expected_parameters": reference["parameters"],
              "parameters_match": parameters == reference["parameters"]}
    llm = llama_cpp.load(text_gguf, n_ctx=256)
    try:
        embedded = llama_cpp.image_embeddings(path, llm, reference["images"])
    except InputError as e:  # a file llama.cpp cannot use fails the gate (min_cosine null), it does not stop the phase
        return {**counts, "images": 0, "image_tokens": [], "min_cosine": None, "max_relative_difference": None,
                "error": str(e)}
    finally:
        del llm
        gc.collect()
    cosines, differences, tokens = [], [], []
    for mine, theirs in zip(embedded, reference["features"]):
        tokens.append([len(mine), len(theirs)])
        if mine.shape != theirs.shape:
            continue
        norms = np.linalg.norm(mine, axis=-1) * np.linalg.norm(theirs, axis=-1)
        cosines += list((mine * theirs).sum(-1) / np.maximum(norms, 1e-12))
        differences.append(float(np.abs(mine - theirs).max() / max(1e-12, float(np.abs(theirs).max()))))
    same_shape = all(a == b for a, b in tokens)
    return {
        **counts,
        "images": len(tokens),
        "image_tokens": tokens,  # [llama.cpp, merged model] per image
        "min_cosine": float(min(cosines)) if same_shape and cosines else None,
        "max_relative_difference": max(differences) if same_shape and differences else None,
    }


def _verify(ctx: PhaseContext, path: Path, gtype, shapes: list[tuple[int, ...]], chat, records: list[dict], reference: dict,
            divergence: DivergenceReference) -> dict[str, Any]:
    from factory import evaluation

    cfg = ctx.config
    language_modelling = bool(reference.get("language_modelling"))  # plain text: nothing to generate
    n_ctx = plan.context_length(cfg) + cfg.evaluation.max_new_tokens
    llm = llama_cpp.load(path, n_ctx=n_ctx, logits_all=True)  # the divergence check's scores: n_ctx x vocabulary
    # A test prompt can be longer than the training context (a tool-call conversation with its
    # tool definitions), and the merged model answered it whole: generation gets a context that
    # holds the longest prompt, without the scores buffer.
    prompts = [] if language_modelling else [chat.prompt_ids(r) for r in records]
    needed = max(map(len, prompts), default=0) + cfg.evaluation.max_new_tokens
    generator = llm if needed <= n_ctx else llama_cpp.load(path, n_ctx=needed)
    size = path.stat().st_size
    runtime = llama_cpp.runtime()
    n_params = runtime.llama_model_n_params(llm.model)
    bits_per_weight = runtime.llama_model_size(llm.model) * 8 / n_params  # tensor bytes, as llama.cpp reports BPW
    low, high = llama_cpp.expected_bits_per_weight(gtype, shapes)

    # tokenizer: the same ids as the HF tokenizer on every test conversation
    texts = [r["conversations"][0]["content"] if language_modelling else
             chat.render(messages(r["conversations"]), generation_prompt=False) for r in records]
    same = sum(chat.tokenizer(t, add_special_tokens=False)["input_ids"] == llm.tokenize(t.encode(), add_bos=False, special=True)
               for t in texts)

    # the evaluate phase's scorers, greedy, from the same prompt ids the merged model saw
    ctx.progress.start(len(records), f"examples ({gtype.name})")
    started = time.monotonic()
    predictions = []
    for prompt in prompts:
        out = generator.create_completion(prompt, max_tokens=cfg.evaluation.max_new_tokens, temperature=0.0, top_k=1)
        predictions.append(chat.answer_text(out["choices"][0]["text"]))
        ctx.progress.advance()
    nll_gguf, nll_merged, kl, tokens = _divergence(llm, divergence)
    if language_modelling:  # the GGUF's token probability on the divergence documents vs the merged model's
        score, merged_score = math.exp(-nll_gguf / tokens), math.exp(-nll_merged / tokens)
        scored = {"scores": {reference["primary"]: score}, "examples_per_second": None, "examples": []}
    else:
        scored = evaluation.score_predictions(cfg, chat, records, predictions, seconds=time.monotonic() - started,
                                              ws=ctx.workspace)
        score, merged_score = scored["primary_score"], reference["primary_score"]
    if score is None or merged_score is None:  # a judge metric that judged nothing
        drop = None
    else:
        drop = (merged_score - score) / merged_score if merged_score else merged_score - score

    # chat completion with the file's own template must stop at end of turn
    stops = agree = 0
    checks = [] if language_modelling else records[:STOP_CHECKS]
    for record, prediction in zip(checks, predictions):
        generator.reset()
        out = generator.create_chat_completion(chat.prompt_messages(record), max_tokens=cfg.evaluation.max_new_tokens,
                                               temperature=0.0, top_k=1)
        stops += out["choices"][0]["finish_reason"] == "stop"
        agree += chat.answer_text(out["choices"][0]["message"]["content"] or "") == prediction
    embedded_template = llm.metadata.get("tokenizer.chat_template")
    del llm, generator
    gc.collect()

    return {
        "size_bytes": size,
        "parameters": n_params,
        "bits_per_weight": round(bits_per_weight, 4),
        "expected_bits_per_weight": [round(low, 4), round(high, 4)],
        "size_within_bounds": low - 0.01 <= bits_per_weight <= high + 0.01,
        "tokenizer_agreement": same / len(texts),
        "score": score,
        "merged_score": merged_score,
        "relative_score_drop": drop,
        "scores": scored["scores"],
        "perplexity": math.exp(nll_gguf / tokens) if tokens else None,
        "perplexity_merged": math.exp(nll_merged / tokens) if tokens else None,
        "perplexity_ratio": math.exp((nll_gguf - nll_merged) / tokens) if tokens else None,
        "mean_kl": kl / tokens if tokens else None,
        "divergence_tokens": tokens,
        "generation_stops": stops / len(checks) if checks else None,
        "chat_template_embedded": embedded_template == chat.tokenizer.chat_template,
        "chat_matches_greedy": agree / len(checks) if checks else None,
        "examples_per_second": scored["examples_per_second"],
        "examples": scored["examples"][:20],
    }


def _divergence(llm, reference: DivergenceReference) -> tuple[float, float, float, int]:
    """Negative log-likelihood of the answer tokens under the GGUF and the merged model, and
    the KL divergence of the GGUF's next-token distribution from the merged model's, summed
    over the answer tokens (and their number). Streamed: one example at a time, and within it
    a bounded number of positions (llama.cpp's scores of one example, at most n_ctx x vocabulary,
    are the only full-vocabulary array; they are its own buffer)."""
    import torch

    nll_gguf = nll_merged = kl = 0.0
    tokens = 0
    for ids, positions, hidden in reference.examples:
        llm.reset()
        llm.eval(ids)
        targets = torch.tensor([ids[t] for t in positions])
        for start, merged in reference.head.chunks(hidden):
            end = start + len(merged)
            ref = torch.log_softmax(merged.cpu(), dim=-1)
            del merged
            rows = [t - 1 for t in positions[start:end]]  # the logits at t - 1 predict token t
            mine = torch.log_softmax(torch.from_numpy(llm.scores[rows, : ref.shape[1]]), dim=-1)
            chunk = targets[start:end, None]
            nll_gguf -= float(mine.gather(1, chunk).double().sum())
            nll_merged -= float(ref.gather(1, chunk).double().sum())
            # in place, so that a chunk costs three (positions x vocabulary) arrays, not six
            difference = mine.neg_().add_(ref)  # log p_merged - log p_gguf
            kl += float(difference.mul_(ref.exp_()).sum(dtype=torch.float64))
        tokens += len(targets)
    return nll_gguf, nll_merged, kl, tokens


# --- 6. handoff -------------------------------------------------------------------------------


# Ollama's names for the generation config's settings where they differ (the rest are the same)
OLLAMA_PARAMETERS = {"repetition_penalty": "repeat_penalty"}


def _write_modelfile(cfg: FactoryConfig, ws: Workspace, quantized_dir: Path, type_name: str, chat,
                     projector: dict | None) -> Path:
    """An Ollama Modelfile next to the GGUF: FROM, the TEMPLATE in Ollama's Go syntax and the
    stop tokens (both read off the model's own chat template), its sampling defaults, num_ctx.
    Text only: Ollama does not take a separate llama.cpp projector file for an imported GGUF."""

    from factory.io import atomic_write_bytes

    lines = [f"# Ollama: ollama create {_model_name(cfg)} -f {ws.rel(quantized_dir / 'Modelfile')}"]
    if projector and projector.get("exported"):
        lines.append(f"# Text only here; for images use llama.cpp: llama-server --mmproj {Path(projector['path']).name}")
    lines.append(f"FROM ./{llama_cpp.gguf_file(quantized_dir, type_name).name}")
    if chat.has_template:
        lines.append(f'TEMPLATE """{chat.ollama_template}"""')
    lines += [f'PARAMETER stop "{token}"' for token in [*chat.stop_tokens, *filter(None, [chat.answer_end_text])]]
    lines += [f"PARAMETER {OLLAMA_PARAMETERS.get(key, key)} {value}" for key, value in chat.sampling.items()]
    lines.append(f"PARAMETER num_ctx {plan.context_length(cfg)}")
    path = quantized_dir / "Modelfile"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def _run_commands(cfg: FactoryConfig, ws: Workspace, quantized_dir: Path, type_name: str, modelfile: Path,
                  projector: dict | None) -> dict[str, str]:
    gguf = ws.rel(llama_cpp.gguf_file(quantized_dir, type_name))
    images = f" --mmproj {projector['path']}" if projector and projector.get("exported") else ""
    return {
        "llama_server": f"llama-server -m {gguf}{images} --port 8080 --jinja",
        "llama_cli": f"llama-mtmd-cli -m {gguf}{images} --jinja" if images else f"llama-cli -m {gguf} --jinja -cnv",
        "ollama": f"ollama create {_model_name(cfg)} -f {ws.rel(modelfile)} && ollama run {_model_name(cfg)}",
        "factory_sample": f"factory sample --model {gguf} --prompt 'Hello'",
    }


def _model_name(cfg: FactoryConfig) -> str:
    """A name for Ollama: the base model's last path part, fine-tuned."""
    base = Path(cfg.model.name.rstrip("/")).name.lower() or "model"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in base) + "-ft"
