"""quantize: merge, export GGUF and verify it (not implemented yet)."""

from factory.phase import Phase

PHASE = Phase(
    name="quantize",
    summary="Merge the adapter, export GGUF and verify the quantized model",
    metrics="quantization",
    run=None,
    unavailable_reason="the quantize phase is not available yet (planned after the model phases)",
)
