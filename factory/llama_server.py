"""`python -m factory.llama_server ARGS`: llama-cpp-python's OpenAI-compatible server
(`python -m llama_cpp.server`, the `server` extra), with the same arguments.

The only difference from `python -m llama_cpp.server` is the one `factory.llama_cpp.load`
makes for in-process models: on a CPU with AMX, ggml's extra CPU buffer types crashed on
small models, so there the plain CPU kernels are used (the server has no option for it; the
default model parameters are wrapped before it loads the model). `factory serve-model` and
`factory compare` start this module.
"""

from __future__ import annotations


def main() -> None:
    from factory import llama_cpp

    if llama_cpp.placement()["plain_cpu_kernels"]:
        llama_cpp.use_plain_cpu_kernels()
    from llama_cpp.server.__main__ import main as server_main

    server_main()


if __name__ == "__main__":
    main()
