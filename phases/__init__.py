"""The pipeline, in order. Each module exposes PHASE; see factory.phase for the contract."""

from __future__ import annotations

from phases import baseline, compare, evaluate, finetune, format, quantize, split
from factory.phase import Phase

PIPELINE: tuple[Phase, ...] = (
    format.PHASE,
    split.PHASE,
    baseline.PHASE,
    finetune.PHASE,
    evaluate.PHASE,
    quantize.PHASE,
)

# Run on request, after the pipeline, never by `factory run`: `factory compare`.
ON_REQUEST: tuple[Phase, ...] = (compare.PHASE,)

BY_NAME: dict[str, Phase] = {phase.name: phase for phase in PIPELINE}
