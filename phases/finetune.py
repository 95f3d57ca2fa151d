"""finetune: LoRA fine-tuning with Unsloth or TRL + PEFT (not implemented yet)."""

from factory.phase import Phase

PHASE = Phase(
    name="finetune",
    summary="Fine-tune LoRA adapters on the train split",
    metrics="training-stats",
    run=None,
    unavailable_reason="the finetune phase is not available yet (model phases are planned in the next release)",
)
