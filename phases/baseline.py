"""baseline: score the base model on the test split, so the fine-tune has something to beat.

Loads the base model (model.name) exactly as evaluate will load it, generates an answer for
every test example with the evaluation decoding (greedy, batched), scores each one, and
returns per-example predictions and scores, the aggregates, the decoding settings and the
fingerprints of the model and the test split (metrics/baseline.json). The
baseline-established gate checks that every selected test example was scored: the whole
split, or its first `evaluation.max_examples`.
"""

from __future__ import annotations

from typing import Any

from factory import modeling
from factory.phase import Phase, PhaseContext


def run(ctx: PhaseContext) -> dict[str, Any]:
    from factory import evaluation

    cfg, ws = ctx.config, ctx.workspace
    test_file = ws.split_file("test")
    split = evaluation.read_split(test_file, ws)
    records = split[: cfg.evaluation.max_examples]

    backend = modeling.select_backend(cfg.model.backend)
    ctx.log.info("scoring the base model %s on %d test examples (%s)", cfg.model.name, len(records), backend.device)
    model, chat = modeling.load_for_inference(cfg, ws, backend)
    result = evaluation.score_model(ctx, model, chat, records, what="base")

    extra = {}
    if cfg.evaluation.second_test_set:
        second = evaluation.read_split(ws.path(cfg.evaluation.second_test_set), ws)
        extra["second_test_set"] = {
            **evaluation.split_identity(ws, ws.path(cfg.evaluation.second_test_set)),
            **evaluation.score_model(ctx, model, chat, second, what="base, second set"),
        }
    return {
        "model": cfg.model.name,
        "device": backend.device,
        "test_split": {**evaluation.split_identity(ws, test_file), "records": len(split)},
        "max_examples": cfg.evaluation.max_examples,
        "examples_selected": len(records),
        **result,
        **extra,
    }


PHASE = Phase(
    name="baseline",
    summary="Evaluate the base model on the test split",
    metrics="baseline",
    run=run,
    config_sections=("model", "evaluation"),
    inputs=lambda cfg, ws: [ws.split_file("test"), *modeling.local_model_inputs(cfg, ws),
                            *modeling.second_test_set(cfg, ws)],
)
