"""Models to talk to: OpenAI-compatible endpoints, local llama.cpp servers for GGUF files,
in-process Hugging Face models (base + adapter) and plain Python functions.

Everything that generates text in an evaluation (a model under comparison, the judge, the user
simulator) is a `ModelSource` in factory.yaml and becomes a `ChatModel` here, with one method:
`chat(messages, ...) -> str`.

- `base_url`: any OpenAI-compatible server the user runs (llama-server, vLLM, a hosted API),
  through the `openai` client (its timeouts and retries). The API key is read from the
  environment variable the config names, at the moment the client is made, and is never
  written to a log, status or metrics file.
- `gguf`: a local server for the file, `python -m factory.llama_server` (llama-cpp-python's
  `llama_cpp.server` on the plain CPU kernels) on a free port of 127.0.0.1, started and waited
  for (until /v1/models answers) by `LocalServer`, and stopped afterwards whatever happens.
  A Hugging Face model folder given as `gguf` is converted once with the pinned converter.
- `hf` / `adapter`: generated in this process with the evaluate phase's code (transformers).
- `function`: `module:function`, called with the messages (a rule-based model).

Failures the user can act on (the server would not start, the port is taken, no answer
within the timeout, the server died mid-run, a missing API key) raise EndpointError (exit 2),
whose message names the model, the address and the log file.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, TypeVar

from factory.errors import FactoryError, InputError
from factory.workspace import Workspace

T = TypeVar("T")
R = TypeVar("R")
LOG_TAIL_LINES = 15


class EndpointError(FactoryError):
    """A model endpoint or a local model server failed; the message says which and why."""


class ChatModel(Protocol):
    name: str

    def chat(self, messages: list[dict], *, max_tokens: int, temperature: float, seed: int,
             stop: list[str] | None = None) -> str: ...

    def describe(self) -> dict[str, Any]: ...


# --- local llama.cpp servers -----------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise EndpointError(f"port {port} on {host} is in use; pick another port (0 picks a free one)") from None
            raise EndpointError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _die_with_parent() -> None:
    """In the server's process, before exec: get SIGTERM when the factory process dies (even
    by kill -9), so that no server outlives the evaluation that started it (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class LocalServer:
    """llama-cpp-python's OpenAI-compatible server for one GGUF file, on this machine.

    Use as a context manager: entering starts the server and waits until /v1/models answers;
    leaving stops it (SIGTERM, then SIGKILL). Start it from the main thread: the server is
    told to exit when the thread that started it ends.
    """

    gguf: Path
    name: str
    log_file: Path
    host: str = "127.0.0.1"
    port: int = 0
    n_ctx: int = 4096
    threads: int | None = None
    startup_timeout: float = 300.0
    process: subprocess.Popen | None = field(default=None, init=False)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> "LocalServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.launch()
        self.wait_until_ready()

    def launch(self) -> None:
        """Start the server process (wait_until_ready waits for it): several servers boot at once."""
        if not self.gguf.is_file():
            raise EndpointError(f"model {self.name!r}: {self.gguf} is not a file")
        from factory import llama_cpp

        llama_cpp.runtime()  # a clear message when llama-cpp-python is missing
        try:
            import uvicorn  # noqa: F401  (what the server extra brings)
            import fastapi  # noqa: F401
        except ImportError:
            raise EndpointError("llama-cpp-python's server extra is not installed: "
                                'pip install "llama-cpp-python[server]" (or pip install -e ".[gguf]")') from None
        if self.port:
            check_port_free(self.host, self.port)
        else:
            self.port = free_port(self.host)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "factory.llama_server", "--model", str(self.gguf), "--model_alias", self.name,
                   "--host", self.host, "--port", str(self.port), "--n_ctx", str(self.n_ctx),
                   "--n_threads", str(self.threads or max(1, os.cpu_count() or 1)),
                   "--n_gpu_layers", str(llama_cpp.placement()["n_gpu_layers"])]
        with open(self.log_file, "w", encoding="utf-8") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def wait_until_ready(self) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise EndpointError(self._died_message(code, "while starting"))
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() >= deadline:
                self.stop()
                raise EndpointError(f"the local server for model {self.name!r} ({self.gguf}) did not answer at "
                                    f"{self.base_url}/models within {self.startup_timeout:g} s; it was stopped. "
                                    f"Its log: {self.log_file}{self._log_tail()}")
            time.sleep(0.1)

    def check_alive(self) -> None:
        """Raise EndpointError when the server process has exited."""
        if self.process is not None and (code := self.process.poll()) is not None:
            raise EndpointError(self._died_message(code, "during the run"))

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _died_message(self, code: int, when: str) -> str:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        tail = self._log_tail()
        hint = ""
        if "address already in use" in tail.lower():
            hint = f" Port {self.port} was taken by another program; use another port (0 picks a free one)."
        return (f"the local server for model {self.name!r} ({self.gguf}, {self.base_url}) {how} {when}.{hint} "
                f"Its log: {self.log_file}{tail}")

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        lines = [line for line in lines if line.strip()][-LOG_TAIL_LINES:]
        return ("\n" + "\n".join(f"  | {line}" for line in lines)) if lines else ""


# --- chat models -------------------------------------------------------------------------------


@dataclass
class EndpointSettings:
    """How requests are made: the same for every model of an evaluation."""

    request_timeout: float = 120.0
    max_retries: int = 2
    n_ctx: int = 4096
    startup_timeout: float = 300.0
    threads: int | None = None


class OpenAIChat:
    """A model behind an OpenAI-compatible endpoint (chat completions)."""

    def __init__(self, name: str, base_url: str, model: str | None, *, api_key_env: str | None,
                 settings: EndpointSettings, server: LocalServer | None = None, gguf: str | None = None):
        from openai import OpenAI

        self.name, self.base_url, self.api_key_env, self.server = name, base_url.rstrip("/"), api_key_env, server
        self.gguf = gguf  # how to show the served file (relative to the workspace)
        self.settings = settings
        key = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise EndpointError(f"model {name!r}: the environment variable {api_key_env} (api_key_env) is not set "
                                    "or empty; export it with the API key")
        # Local servers need no key; the client insists on one, so it gets a placeholder.
        self.client = OpenAI(base_url=self.base_url, api_key=key or "no-key", timeout=settings.request_timeout,
                             max_retries=settings.max_retries)
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        models = self._call(lambda: self.client.models.list())
        ids = [m.id for m in models.data]
        if not ids:
            raise EndpointError(f"model {self.name!r}: {self.base_url}/models lists no model; set `model`")
        return ids[0]

    def chat(self, messages: list[dict], *, max_tokens: int, temperature: float, seed: int,
             stop: list[str] | None = None) -> str:
        response = self._call(lambda: self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature, seed=seed,
            stop=stop or None))
        if not response.choices:
            raise EndpointError(f"model {self.name!r} at {self.base_url} answered without a choice")
        return (response.choices[0].message.content or "").strip()

    def _call(self, request: Callable[[], T]) -> T:
        import openai

        try:
            return request()
        except openai.APITimeoutError:
            self._check_server()
            raise EndpointError(f"model {self.name!r} at {self.base_url} gave no answer within "
                                f"{self.settings.request_timeout:g} s ({self.settings.max_retries} retries); raise "
                                "evaluation.compare.request_timeout or check the server") from None
        except openai.APIConnectionError as e:
            self._check_server()
            raise EndpointError(f"model {self.name!r}: cannot reach {self.base_url} ({e.__cause__ or e}); "
                                "is the server running?") from None
        except openai.APIStatusError as e:
            self._check_server()
            raise EndpointError(f"model {self.name!r} at {self.base_url} answered HTTP {e.status_code}: "
                                f"{_short(e.message)}") from None

    def _check_server(self) -> None:
        if self.server is not None:
            time.sleep(0.2)  # a server being killed closes its sockets a moment before it is reaped
            self.server.check_alive()

    def describe(self) -> dict[str, Any]:
        # the name of the key's variable, never the key
        described = {"kind": "gguf" if self.server else "endpoint", "base_url": self.base_url, "model": self.model}
        if self.server:
            described["gguf"] = self.gguf or str(self.server.gguf)
        if self.api_key_env:
            described["api_key_env"] = self.api_key_env
        return described


class FunctionChat:
    """A Python function `module:function` taking the messages and returning the reply."""

    def __init__(self, name: str, spec: str):
        self.name, self.spec = name, spec
        self.function = load_function(spec, what=f"model {name!r}")

    def chat(self, messages: list[dict], *, max_tokens: int, temperature: float, seed: int,
             stop: list[str] | None = None) -> str:
        return str(self.function(messages)).strip()

    def describe(self) -> dict[str, Any]:
        return {"kind": "function", "function": self.spec}


class HFChat:
    """A Hugging Face model (plus a LoRA adapter) generating in this process, as the evaluate
    phase does. One generation at a time: concurrency would only share the same cores."""

    def __init__(self, name: str, cfg, ws: Workspace, *, hf: str | None, adapter: str | None):
        from factory import modeling

        self.name, self.hf, self.adapter = name, hf or cfg.model.name, adapter
        backend = modeling.select_backend(cfg.model.backend)
        adapter_path = ws.path(adapter) if adapter else None
        if adapter_path is not None and not (adapter_path / "adapter_config.json").exists():
            raise InputError(f"model {name!r}: {ws.rel(adapter_path)} has no adapter (adapter_config.json)")
        path = modeling.model_path(self.hf, ws)
        self.model, self.chat_format = modeling.load_for_inference(cfg, ws, backend, path=path, adapter=adapter_path)
        self.lock = threading.Lock()

    def chat(self, messages: list[dict], *, max_tokens: int, temperature: float, seed: int,
             stop: list[str] | None = None) -> str:
        import torch

        from factory import modeling

        # generate() answers a record's last turn from the turns before it
        record = {"conversations": [*messages, {"role": "assistant", "content": ""}]}
        with self.lock:
            torch.manual_seed(seed)
            (generation,) = modeling.generate(self.model, self.chat_format, [record], batch_size=1,
                                              max_new_tokens=max_tokens, temperature=temperature)
        answer = generation.text
        for token in stop or []:
            answer = answer.split(token, 1)[0]
        return answer.strip()

    def describe(self) -> dict[str, Any]:
        return {"kind": "hf", "hf": self.hf, **({"adapter": self.adapter} if self.adapter else {})}


def load_function(spec: str, *, what: str) -> Callable:
    """Import `module:function` (the module must be importable: on PYTHONPATH or installed)."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise InputError(f"{what}: {spec!r} is not module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(f"{what}: cannot import {module_name!r} for {spec!r}: {e}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise InputError(f"{what}: {module_name} has no function {function_name!r}")
    return function


def open_models(sources: dict, cfg, ws: Workspace, stack, settings: EndpointSettings, log) -> dict[str, ChatModel]:
    """A ChatModel for every config ModelSource, by name. The local servers boot together, and
    are stopped when `stack` (a contextlib.ExitStack) closes, whatever happens."""
    servers: dict[str, tuple[LocalServer, Path]] = {}
    for name, source in sources.items():
        if source.gguf:
            gguf = gguf_for(ws.path(source.gguf), ws, log)
            server = LocalServer(gguf, _alias(name), ws.logs_dir / f"server-{_alias(name)}.log", n_ctx=settings.n_ctx,
                                 threads=settings.threads, startup_timeout=settings.startup_timeout)
            stack.callback(server.stop)
            server.launch()
            servers[name] = (server, gguf)
    opened: dict[str, ChatModel] = {}
    for name, source in sources.items():
        if source.function:
            opened[name] = FunctionChat(name, source.function)
        elif source.base_url:
            opened[name] = OpenAIChat(name, source.base_url, source.model, api_key_env=source.api_key_env,
                                      settings=settings)
        elif source.gguf:
            server, gguf = servers[name]
            server.wait_until_ready()
            log.info("model %s: %s served at %s (log %s)", name, ws.rel(gguf), server.base_url, ws.rel(server.log_file))
            opened[name] = OpenAIChat(name, server.base_url, server.name, api_key_env=None, settings=settings,
                                      server=server, gguf=ws.rel(gguf))
        else:
            opened[name] = HFChat(name, cfg, ws, hf=source.hf, adapter=source.adapter)
    return opened


def _alias(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def gguf_for(path: Path, ws: Workspace, log) -> Path:
    """A GGUF file as it is; a Hugging Face model folder converted once (F16, the pinned
    llama.cpp converter) into models/gguf/, and again when a file in the folder is newer."""
    if path.is_file():
        return path
    if not (path / "config.json").is_file():
        raise InputError(f"{ws.rel(path)} is neither a GGUF file nor a Hugging Face model folder (config.json)")
    from factory import llama_cpp

    out = ws.models_dir / "gguf" / f"{path.name}-F16.gguf"
    newest = max(p.stat().st_mtime for p in path.rglob("*") if p.is_file())
    if out.is_file() and out.stat().st_mtime >= newest:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to %s with llama.cpp's converter", ws.rel(path), ws.rel(out))
    ws.logs_dir.mkdir(parents=True, exist_ok=True)
    llama_cpp.convert(llama_cpp.converter_dir(None), path, out, "f16", ws.logs_dir / f"gguf-convert-{path.name}.log")
    return out


# --- running many requests ---------------------------------------------------------------------


def run_concurrently(items: Iterable[T], work: Callable[[T], R], *, concurrency: int,
                     on_done: Callable[[int], None] | None = None) -> list[R]:
    """work(item) for every item, at most `concurrency` at once; results in the items' order.

    The first exception stops the rest (queued work is cancelled) and is raised."""
    items = list(items)
    results: list[Any] = [None] * len(items)
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = {pool.submit(work, item): i for i, item in enumerate(items)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()
                results[futures[future]] = future.result()
                if on_done:
                    on_done(1)
    return results


def _short(text: Any, limit: int = 300) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "…"
