"""`python -m factory.llama_server ARGS`: llama-cpp-python's OpenAI-compatible server
(`python -m llama_cpp.server`, the `server` extra), with the same arguments.

Three differences from `python -m llama_cpp.server`, none of which it has an option for:
- the one `factory.llama_cpp.load` makes for in-process models: on a CPU with AMX, ggml's
  extra CPU buffer types crashed on small models, so there the plain CPU kernels are used;
- every answer stops within max_tokens + 3 tokens, even when its text is not whole UTF-8
  (see bounded_answers);
- chat prompts from the GGUF's template get BOS where the vocabulary adds one and the template
  does not write it, and a system message in the first user message where the template
  refuses one, as llama-server gives them (see factory.llama_cpp.runtime).
`factory serve-model` and `factory compare` start this module.
"""

from __future__ import annotations


def main() -> None:
    from factory import llama_cpp

    llama_cpp.runtime()  # chat prompts as llama-server renders them (see runtime)
    if llama_cpp.placement()["plain_cpu_kernels"]:
        llama_cpp.use_plain_cpu_kernels()
    bounded_answers()
    from llama_cpp.server.__main__ import main as server_main

    server_main()


def bounded_answers() -> None:
    """Every completion stops within max_tokens + 3 tokens.

    llama-cpp-python 0.3.36 checks max_tokens only while the answer's text is whole UTF-8. A
    model that keeps writing the lead byte of a multi-byte character (the example's fine-tuned
    tiny model, asked something it never learned, writes byte 0xF0 over and over) generates on
    to the end of the context, where decoding fails and the request answers HTTP 500
    ("llama_decode returned 1"): 2 of 120 multi-turn conversations here. The 3 spare tokens
    let a 4-byte character complete.
    """
    from llama_cpp import llama as module

    create = module.Llama._create_completion

    def create_bounded(self, prompt, suffix=None, max_tokens=16, *args, stopping_criteria=None, **kwargs):
        if max_tokens is not None and max_tokens > 0:
            generated = 0

            def enough(input_ids, logits) -> bool:
                nonlocal generated
                generated += 1
                return generated >= max_tokens + 3

            stopping_criteria = module.StoppingCriteriaList([*(stopping_criteria or []), enough])
        return create(self, prompt, suffix, max_tokens, *args, stopping_criteria=stopping_criteria, **kwargs)

    module.Llama._create_completion = create_bounded


if __name__ == "__main__":
    main()
