"""`python -m factory.llama_server ARGS`: llama-cpp-python's OpenAI-compatible server
(`python -m llama_cpp.server`, the `server` extra), with the same arguments, on llama.cpp's
plain CPU kernels.

The only difference from `python -m llama_cpp.server` is the one `factory.llama_cpp.load`
makes for in-process models: ggml's extra CPU buffer types (AMX and repacked weights) crashed
on small models; the server has no option for it, so the default model parameters are wrapped
before it loads the model. `factory serve-model` and `factory compare` start this module.
"""

from __future__ import annotations


def main() -> None:
    from factory import llama_cpp

    llama_cpp.runtime()
    llama_cpp.use_plain_cpu_kernels()
    from llama_cpp.server.__main__ import main as server_main

    server_main()


if __name__ == "__main__":
    main()
