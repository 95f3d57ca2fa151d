"""The `factory` command. Config is read and validated here, once, and passed in.

Exit codes, everywhere: 0 ok, 1 a gate failed, 2 bad input, config or usage (an unknown
command or option included) or a full disk, 3 an internal error (a bug: please report it with
the --debug traceback), 130 interrupted.
"""

# No `from __future__ import annotations`: Typer would then evaluate every command's annotations
# from strings at every start (about 20 ms of each command).
import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from factory import __version__, hub
from factory.example import FAMILIES, VOCABULARIES
from factory.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, Cancelled, FactoryError, GateFailed, InputError
from factory.workspace import Workspace

app = typer.Typer(
    help=(
        "Turn raw instruction data into a fine-tuned, evaluated, quantized model, one checked "
        "phase at a time: format -> split -> baseline -> finetune -> evaluate -> quantize.\n\n"
        "Start with `factory init`, put data in data/raw/, then `factory run split`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
gate_app = typer.Typer(help="List and check the quality gates (gates/*.yaml).", no_args_is_help=True)
app.add_typer(gate_app, name="gate")

def _stderr_console() -> Console:
    """The terminal's stderr for messages and progress bars, on a descriptor of its own: a C
    library whose chatter is sent to a file for a moment (llama.cpp, by redirecting fd 2) then
    cannot swallow a live progress display or an error message."""
    try:
        stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                           errors="backslashreplace")
    except (OSError, ValueError, AttributeError):  # no real stderr (embedded, closed)
        return Console(stderr=True)
    return Console(file=stream)


out = Console()
err = _stderr_console()

WorkspaceOpt = Annotated[
    Path, typer.Option("--workspace", "-C", help="The workspace folder (holds factory.yaml).", show_default="current folder")
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
_debug = False


def _pipeline():
    import phases

    return phases.PIPELINE


def _phase_names() -> list[str]:
    """The phases in order, from the pipeline definition (the one list)."""
    return [p.name for p in _pipeline()]


def _setup(workspace: Path, debug: bool) -> Workspace:
    """The workspace a command works on. A status left "running" by a run that was killed
    outright is finalized here, by whichever command comes next."""
    from factory.status import finalize_abandoned

    global _debug
    _debug = _debug or debug
    ws = Workspace.at(workspace)
    if not ws.root.is_dir():
        raise FactoryError(f"workspace {ws.root} does not exist; create it with `factory init {workspace}`")
    if ws.state_dir.is_dir():
        try:
            rewritten = finalize_abandoned(ws)
        except OSError as e:  # a read-only workspace can still be looked at
            rewritten = []
            err.print(f"[yellow]note[/]: could not check the last run's status: {escape(str(e))}", highlight=False)
        for path in rewritten:
            err.print(f"[yellow]note[/]: {path}: the last run disappeared without writing its final state "
                      "(killed?); now marked failed", highlight=False)
    return ws


def _config(ws: Workspace):
    from factory.config import load_config

    return load_config(ws.config_file, os.environ)


def _version(value: bool) -> None:
    if value:
        out.print(f"factory {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = None,
) -> None:
    pass


EXAMPLE_FAMILIES = tuple(FAMILIES)  # the first is the default


# --- init ----------------------------------------------------------------------------------


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Where to create the workspace.")] = Path("."),
    example: Annotated[bool, typer.Option("--example", help=(
        "Make a self-contained offline example: a generated localization dataset and a tiny model with "
        "random weights, the real tokenizer and the real chat template of a model family (needs the train "
        "extra; the tokenizers come from `factory setup-gguf`)."))] = False,
    family: Annotated[str, typer.Option("--family", help=(
        f"With --example: the model family, one of {', '.join(EXAMPLE_FAMILIES)}. The tiny model has the "
        "architecture, special tokens and chat template of the real model (Gemma 3 1B; Gemma 3 4B, an "
        "image-text model; Llama 3.1 8B, Qwen 2.5 7B, Qwen 3 0.6B, Mistral 7B v0.1, Phi-3 mini) and its full "
        "vocabulary (see --vocab), except Gemma's: a small tokenizer trained on the task."))] = EXAMPLE_FAMILIES[0],
    vocabulary: Annotated[Optional[str], typer.Option("--vocab", help=(
        "With --example: `real`, the family's full vocabulary (the default), or `task`, about 400 pieces "
        "trained on the example's data with the family's special tokens and template kept, as Gemma's always "
        "is: a demo-sized run of a family then learns the task on a CPU (Qwen 3's passes every gate; "
        "Llama-style models without normalised queries and keys do not learn it through LoRA at this size)."),
        show_default=False)] = None,
    records: Annotated[int, typer.Option("--records", help="With --example: how many records to generate.")] = 4200,
    steps: Annotated[Optional[int], typer.Option("--steps", help=(
        "With --example: training steps in factory.yaml; by default the family's "
        "(" + ", ".join(f"{name} {FAMILIES[name].steps:,}" for name in EXAMPLE_FAMILIES) + ")."),
        show_default=False)] = None,
    locales: Annotated[Optional[str], typer.Option("--locales", help=(
        "With --example: a comma-separated subset of the task's locales; fewer locales learn in fewer "
        "steps, e.g. en-US,de-DE,ja-JP."))] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing factory.yaml.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Create a workspace: a commented factory.yaml, data/raw/, gates/ and output folders.

    With --example, a complete offline workspace that `factory run` takes from raw data to an
    evaluated model on a CPU in a few minutes.
    """
    from factory import resources
    from factory.config import commented_template

    global _debug
    _debug = debug
    if family not in EXAMPLE_FAMILIES or (family != EXAMPLE_FAMILIES[0] and not example):
        raise FactoryError(f"--family {family}: use it with --example, and one of {', '.join(EXAMPLE_FAMILIES)}")
    if vocabulary is not None and (vocabulary not in VOCABULARIES or not example):
        raise FactoryError(f"--vocab {vocabulary}: use it with --example, and one of {', '.join(VOCABULARIES)}")
    if vocabulary == "real" and FAMILIES[family].vocab is None:
        raise FactoryError(f"--vocab real: {family}'s real vocabulary is not among llama.cpp's, so its example has "
                           "only the task vocabulary; leave --vocab out")
    ws = Workspace.at(directory)
    config = ws.root / "factory.yaml"
    if config.exists() and not force:
        raise FactoryError(f"{config} already exists; use --force to overwrite it")
    for folder in (ws.root / "data" / "raw", ws.models_dir, ws.metrics_dir, ws.state_dir, ws.gates_dir):
        folder.mkdir(parents=True, exist_ok=True)
    header = (
        "# factory.yaml: the whole pipeline's configuration. Every key is shown at its default.\n"
        "# Check it with `factory validate`; run with `factory run [PHASE]`.\n\n"
    )
    if example:
        from factory import example as example_workspace

        err.print(f"Generating {records} records and a tiny {family} model in {ws.root} ...")
        example_workspace.write_example_workspace(
            ws.root, records=records, family=family, locales=locales.split(",") if locales else None,
            vocabulary="task" if FAMILIES[family].vocab is None else vocabulary or "real")
        config.write_text(example_workspace.example_config(steps=steps, family=family), encoding="utf-8")
    else:
        config.write_text(header + commented_template() + "\n", encoding="utf-8")
    for gate in sorted(resources.data_dir("gates").glob("*.yaml")):
        if not (ws.gates_dir / gate.name).exists():
            shutil.copy(gate, ws.gates_dir / gate.name)
    out.print(f"Created workspace in {ws.root}")
    out.print("  factory.yaml   configuration (commented)")
    out.print("  data/raw/      put your .jsonl / .json / .csv / .tsv / .txt files here")
    out.print("  gates/         quality gates; edit thresholds here")
    where = "" if directory == Path(".") else f" -C {directory}"
    out.print(f"Next: `factory run{where}`" if example else f"Next: add data, then `factory run split{where}`")


# --- run -----------------------------------------------------------------------------------


@app.command()
def run(
    phase: Annotated[Optional[str], typer.Argument(help="Run the pipeline up to this phase (all when omitted).", show_default=False)] = None,
    only: Annotated[Optional[str], typer.Option("--only", help="Run just this one phase.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-run phases even when unchanged.")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="finetune: ignore progress checkpoints and start over.")] = False,
    workspace: WorkspaceOpt = Path("."),
    debug: DebugOpt = False,
) -> None:
    """Run phases in order, skipping unchanged ones and stopping on a failed gate.

    Phases: format -> split -> baseline -> finetune -> evaluate -> quantize.
    Progress goes to the terminal and to .factory/status.json.
    """
    import phases
    from factory.runner import run_pipeline
    from factory.terminal import RunReporter

    if phase and only:
        raise FactoryError("give either PHASE (run up to it) or --only PHASE, not both")
    ws = _setup(workspace, debug)
    cfg = _config(ws)
    if cfg.training.distributed.node_rank > 0:
        _join_training(cfg, ws, phase, only)
        return
    reporter = RunReporter(err)
    try:
        with reporter:
            result = run_pipeline(cfg, ws, phases.PIPELINE, target=phase, only=only, force=force, reporter=reporter,
                                  options={"restart": restart})
    except GateFailed as e:
        for outcome in e.results:
            _gate_table(outcome)
        raise
    reporter.summary(ws)
    if "quantize" in result.ran + result.skipped:
        _handoff(cfg, ws, result.handoff)
    if not result.ran and result.skipped:
        err.print("Nothing to do: every phase is unchanged (use --force to re-run).")


def _join_training(cfg, ws: Workspace, phase: Optional[str], only: Optional[str]) -> None:
    """Machine node_rank > 0 of a multi-machine training: its processes join machine 0's
    distributed phase (finetune); machine 0 runs the pipeline and writes status and results."""
    import phases
    from factory import distributed
    from factory.runner import select_phases

    d = cfg.training.distributed
    joined = [p for p in select_phases(phases.PIPELINE, phase, only) if p.distributed]
    if not joined:
        err.print(f"machine {d.node_rank} of {d.nnodes} runs only the distributed phases "
                  f"({', '.join(p.name for p in phases.PIPELINE if p.distributed)}); machine 0 runs the rest")
        return
    err.print(f"machine {d.node_rank} of {d.nnodes}: {distributed.processes_per_node(cfg)} processes join the "
              f"{joined[0].name} phase at {d.master_addr}:{d.master_port} (machine 0 writes status and results; "
              f"logs in {ws.rel(ws.logs_dir)})", highlight=False)
    distributed.join(cfg, ws, joined[0])
    err.print(f"machine {d.node_rank}: {joined[0].name} finished")


def _handoff(cfg, ws: Workspace, written: list[Path]) -> None:
    """After a verified quantize: where everything is and how to run it (the pipeline wrote
    the model cards)."""
    from factory import handoff

    err.print("[bold]Your model[/]", highlight=False)
    cards = [ws.path(card) for card in handoff.model_card_paths(cfg, ws) if ws.path(card).exists()]
    for line in handoff.summary_lines(cfg, ws) + [f"model card: {ws.rel(c)}" for c in cards]:
        err.print(f"  {line}", highlight=False, soft_wrap=True)


@app.command("setup-gguf")
def setup_gguf(
    dest: Annotated[Optional[Path], typer.Option("--dest", help="Where to put it (default: inside this Python environment).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Install llama.cpp's GGUF converter for the quantize phase (once, needs the package registry).

    Takes convert_hf_to_gguf.py and its gguf-py from the llama-cpp-python sdist of the pinned
    version, the same llama.cpp as the runtime that verifies the files, so that quantize never
    clones, builds or downloads anything. `make install` runs this. It also keeps the sdist's
    real models' chat templates and the vocabularies of Llama 3, Qwen 2, Llama 2, Phi-3 and GPT-2 and,
    when the train extra is installed,
    turns them into the tokenizers of `factory init --example --family` (a few minutes, once).
    """
    import importlib.util

    from factory.llama_cpp import fetch_converter

    _setup(Path("."), debug)
    log = lambda line: err.print(line, highlight=False)  # noqa: E731
    fetch_converter(dest, log=log)
    if dest is None and all(importlib.util.find_spec(m) for m in ("transformers", "gguf", "sentencepiece")):
        from factory import real_tokenizers

        real_tokenizers.build_all(log=log)


# --- gates ---------------------------------------------------------------------------------


@gate_app.command("list")
def gate_list(workspace: WorkspaceOpt = Path("."), debug: DebugOpt = False) -> None:
    """List the gates, the phase each follows, and their last result."""
    from factory.gates import load_gates

    ws = _setup(workspace, debug)
    gates = load_gates(ws, _config(ws))
    table = Table("gate", "after", "criteria", "last result", "file")
    order = {name: i for i, name in enumerate(_phase_names())}
    for gate in sorted(gates.values(), key=lambda g: (order.get(g.after, 99), g.name)):
        result_file = ws.gate_results_dir / f"{gate.name}.json"
        last = "[dim]not checked[/]"
        if result_file.exists():
            last = "[green]passed[/]" if orjson.loads(result_file.read_bytes())["passed"] else "[red]failed[/]"
        table.add_row(gate.name, gate.after, str(len(gate.criteria)), last, ws.rel(gate.source))
    out.print(table)


@gate_app.command("check")
def gate_check(
    name: Annotated[str, typer.Argument(help="The gate, e.g. data-valid or model-performance.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    workspace: WorkspaceOpt = Path("."),
    debug: DebugOpt = False,
) -> None:
    """Check one gate against the current metrics. Exit 0 pass, 1 fail, 2 missing metrics."""
    import phases
    from factory.gates import check_gate, load_gates
    from factory.runner import metrics_producers

    ws = _setup(workspace, debug)
    gates = load_gates(ws, _config(ws))
    if name not in gates:
        raise FactoryError(f"no gate named {name!r}; gates: {', '.join(sorted(gates))}")
    result = check_gate(gates[name], ws, metrics_producers(phases.PIPELINE + phases.ON_REQUEST))
    if as_json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _gate_table(result)
    if not result["passed"]:
        raise GateFailed(f"gate {name} failed", [result])


def _gate_table(result: dict) -> None:
    mark = "[green]PASSED[/]" if result["passed"] else "[red]FAILED[/]"
    table = Table(title=f"gate {result['gate']} (after {result['after']}): {mark}", title_justify="left")
    for column in ("metric", "observed", "op", "required", "result"):
        table.add_column(column)
    for c in result["criteria"]:
        verdict = {True: "[green]pass[/]", False: "[red]fail[/]", None: "[dim]skipped[/]"}[c["passed"]]
        required = c["required"] if c["required"] is not None else c["value"]
        if isinstance(c["value"], str) and c["required"] is not None:
            required = f"{_fmt(c['required'])} ({c['value']})"
        table.add_row(c["metric"], _fmt(c["observed"]), c["op"], _fmt(required), verdict)
    out.print(table)
    for c in result["criteria"]:
        if c["passed"] is False and c.get("description"):
            out.print(f"  [red]✗[/] {c['metric']}: {c['description']}")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


# --- submit: remote runs ----------------------------------------------------------------------


@app.command()
def submit(
    hf_jobs: Annotated[bool, typer.Option("--hf-jobs", help="Run on Hugging Face Jobs (needs `hf auth login`).")] = False,
    flavor: Annotated[str, typer.Option("--flavor", help="The Jobs hardware, e.g. a10g-large, a100-large, l40sx1.")] = "a10g-large",
    timeout: Annotated[str, typer.Option("--timeout", help=(
        "Longest the job may run (s, m, h, d). Always set: Jobs' own default, 30 minutes, ends most trainings."))] = "6h",
    phases: Annotated[str, typer.Option("--phases", help=(
        "Comma-separated phases the job runs, each `factory run --only PHASE`, on the splits shipped with it."))] = "finetune",
    push_to: Annotated[Optional[str], typer.Option("--push-to", help=(
        "Where the results go (the adapter, metrics, status files, logs): a model repo OWNER/NAME (created "
        "private when absent), or bucket:OWNER/NAME, a bucket mounted in the job."))] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the job script, the command and what would be uploaded; submit nothing.")] = False,
    show_status: Annotated[bool, typer.Option("--status", help="The job's stage, written to .factory/status.json for `factory status` and the dashboard.")] = False,
    show_logs: Annotated[bool, typer.Option("--logs", help="Print the job's logs.")] = False,
    cancel: Annotated[bool, typer.Option("--cancel", help="Cancel the job.")] = False,
    job: Annotated[Optional[str], typer.Option("--job", help="The job id for --status/--logs/--cancel (default: the last one submitted here).")] = None,
    workspace: WorkspaceOpt = Path("."),
    debug: DebugOpt = False,
) -> None:
    """Run phases (default finetune) remotely on Hugging Face Jobs, and follow or cancel the job.

    The job is a uv script (PEP 723: this factory version with its train extra) with the workspace's
    config, gates and splits; the token of your login is passed as the job's HF_TOKEN secret.
    """
    from factory import hf_jobs as jobs

    if not hf_jobs:
        raise FactoryError("factory submit needs a target: --hf-jobs (Hugging Face Jobs)")
    if sum((show_status, show_logs, cancel)) > 1:
        raise FactoryError("give one of --status, --logs, --cancel")
    ws = _setup(workspace, debug)
    if show_logs:
        for line in jobs.logs(ws, job):
            out.print(line, highlight=False, markup=False, soft_wrap=True)
        return
    if show_status or cancel:
        info, doc = (jobs.cancel if cancel else jobs.inspect)(ws, job)
        out.print(f"job {info.id}: {info.status.stage.value if hasattr(info.status.stage, 'value') else info.status.stage}"
                  f"{' (' + info.status.message + ')' if info.status.message else ''} -> status {doc['state']}; {info.url}",
                  highlight=False, soft_wrap=True)
        return
    cfg = _config(ws)
    asked = [p.strip() for p in phases.split(",") if p.strip()]
    unknown = [p for p in asked if p not in _phase_names()]
    if unknown or not asked:
        raise FactoryError(f"--phases {phases!r}: phases are {', '.join(_phase_names())}")
    plan = jobs.submit(cfg, ws, phases=asked, flavor=flavor, timeout=timeout, push_to=push_to, dry_run=dry_run)
    if dry_run:  # plain text, never wrapped: the script and the command stay copyable
        typer.echo(f"# {ws.rel(plan['script_path'])}")
        typer.echo(plan["script_text"])
        typer.echo("# the same submission from a shell (the token of your login goes as the HF_TOKEN secret):")
        typer.echo(jobs.shell_command(plan["command"]))
        typer.echo(f"# uploaded: {ws.rel(plan['script_path'])} and {ws.rel(plan['archive'])} "
                   f"({plan['archive'].stat().st_size} bytes), which holds:")
        for name, size in plan["uploads"]:
            typer.echo(f"  {name}  {size}")
        return
    info = plan["job"]
    out.print(f"submitted job {info.id} ({flavor}, timeout {timeout}): {info.url}", highlight=False, soft_wrap=True)
    out.print("follow it: `factory submit --hf-jobs --status` (then `factory status`), `--logs`; stop it: `--cancel`",
              highlight=False)


# --- status & validate -----------------------------------------------------------------------


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print .factory/status.json as it is.")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help=(
        "Redraw the table and the training progress (with a loss sparkline) until the run ends."))] = False,
    workspace: WorkspaceOpt = Path("."),
    debug: DebugOpt = False,
) -> None:
    """Show the pipeline state: each phase, its timing, progress and gates."""
    from factory.status import idle_status, read_status

    if as_json and watch:
        raise FactoryError("give --json or --watch, not both")
    ws = _setup(workspace, debug)
    if watch:
        from factory.watch import watch as watch_run

        watch_run(ws, out, _phase_names(), {})
        return
    doc = read_status(ws) or idle_status(_phase_names(), {})
    if as_json:
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    from factory.terminal import status_table

    out.print(status_table(doc))


@app.command()
def validate(workspace: WorkspaceOpt = Path("."), debug: DebugOpt = False) -> None:
    """Check factory.yaml, the gate files and the input paths; report every problem at once."""
    from factory.config import load_config
    from factory.errors import ConfigError
    from factory.gates import load_gates

    ws = _setup(workspace, debug)
    problems: list[str] = []
    cfg = None
    try:
        cfg = load_config(ws.config_file, os.environ)
    except ConfigError as e:
        problems.append(str(e))
    if cfg is not None:
        try:
            load_gates(ws, cfg)
        except ConfigError as e:
            problems.append(str(e))
        for spec in cfg.data.inputs:
            if spec.path.startswith(hub.DATASET_PREFIX):  # its form only: the hub is asked when format runs
                try:
                    hub.parse_dataset_uri(spec.path)
                except InputError as e:
                    problems.append(f"data.inputs: {e}")
            elif not ws.path(spec.path).exists():
                problems.append(f"data.inputs: {spec.path} does not exist (relative paths are under {ws.root})")
    if problems:
        raise FactoryError("\n".join(problems))
    source = ws.rel(ws.config_file) if ws.config_file.exists() else "defaults (no factory.yaml)"
    out.print(f"[green]OK[/]: {source}, gates and inputs are valid")


# --- plan & sample ---------------------------------------------------------------------------


@app.command()
def plan(workspace: WorkspaceOpt = Path("."), debug: DebugOpt = False) -> None:
    """Show the resolved training settings and a memory estimate; warn if it will not fit.

    `auto` values follow the VRAM table of the Unsloth spec; the estimate adds weights, LoRA,
    optimizer state, activations and the logits (vocab x sequence x 4 bytes).
    """
    import psutil

    from factory import distributed, modeling, plan as planning
    from factory.config import SHARDING_STRATEGIES

    ws = _setup(workspace, debug)
    cfg = _config(ws)
    processes = distributed.world_size(cfg)
    strategy = cfg.training.distributed.strategy
    backend = modeling.select_backend(cfg.model.backend, sharded=processes > 1 and strategy in SHARDING_STRATEGIES)
    memory = planning.accelerator_memory_gib()
    resolved = planning.resolve(cfg, memory, world_size=processes)
    each = " per process" if processes > 1 else ""
    table = Table("setting", "value", title=f"plan: backend {backend.name} on {backend.device} ({backend.reason})",
                  title_justify="left")
    for key, value in (("model", cfg.model.name), ("LoRA rank", resolved.rank),
                       ("training processes", f"{processes}" + (f" ({strategy}, under torchrun)" if processes > 1 else "")),
                       ("batch size", f"{resolved.batch_size}{each}"),
                       ("gradient accumulation", f"{resolved.gradient_accumulation_steps}{each}"),
                       ("effective batch", resolved.effective_batch_size),
                       ("max sequence length", resolved.max_seq_length),
                       ("4-bit", cfg.model.load_in_4bit and backend.device == "cuda")):
        table.add_row(key, str(value))
    model_config = planning.read_model_config(ws.path(cfg.model.name))
    if model_config is None:
        out.print(table)
        err.print(f"no memory estimate: {cfg.model.name} is not a local folder with config.json")
        return
    estimate = planning.estimate(model_config, resolved, load_in_4bit=cfg.model.load_in_4bit and backend.device == "cuda",
                                 n_targets=7 if cfg.lora.target_modules == "all-linear" else len(cfg.lora.target_modules),
                                 trained_whole=tuple(cfg.lora.modules_to_save),
                                 gradient_checkpointing=bool(cfg.lora.use_gradient_checkpointing))
    for key, value in dataclasses.asdict(estimate).items():
        table.add_row(key.replace("_gib", " (GiB)").replace("_", " "), f"{value:,}" if isinstance(value, int) else f"{value:.3f}")
    available = memory if memory is not None else psutil.virtual_memory().available / 2**30
    table.add_row("available (GiB)", f"{available:.1f} ({'GPU' if memory is not None else 'RAM'})")
    out.print(table)
    if estimate.total_gib > available:
        err.print(f"[yellow]warning[/]: the estimate ({estimate.total_gib:.1f} GiB) exceeds the available {available:.1f} GiB; "
                  "lower max_seq_length or the batch size, or raise gradient accumulation")


@app.command()
def sample(
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A user message (repeatable).")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help=(
        "base, adapter (base + LoRA), merged, a model folder, or a .gguf file (run by llama.cpp)."))] = "adapter",
    chat: Annotated[bool, typer.Option("--chat", help="An interactive loop; the conversation is kept.")] = False,
    system: Annotated[Optional[str], typer.Option("--system", help="A system message.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 256,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="0 for greedy. Default: the model's.")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Default: the model's.")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Default: the model's.")] = None,
    workspace: WorkspaceOpt = Path("."),
    debug: DebugOpt = False,
) -> None:
    """Generate from the base model, the adapter, the merged model or a GGUF, streaming tokens.

    Sampling defaults are the model's own (its generation_config.json; for a GGUF, the merged
    model's), and answers stop at the end-of-turn token of its chat template.
    """
    from factory import sampling

    ws = _setup(workspace, debug)
    cfg = _config(ws)
    if not prompt and not chat:
        raise FactoryError("give --prompt TEXT or --chat")
    generator = sampling.open_sampler(cfg, ws, model, max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=top_p, top_k=top_k)
    history = [{"role": "system", "content": system}] if system else []
    for text in prompt or []:
        out.print(f"[bold]user[/]: {text}")
        generator.reply([*history, {"role": "user", "content": text}], sys.stdout.write)
        sys.stdout.write("\n")
    if chat:
        err.print("chat: empty line or Ctrl-D to stop")
        while True:
            try:
                text = input("> ").strip()
            except EOFError:
                break
            if not text:
                break
            history.append({"role": "user", "content": text})
            answer = generator.reply(history, sys.stdout.write)
            sys.stdout.write("\n")
            history.append({"role": "assistant", "content": answer})


# --- models behind endpoints, and comparisons ---------------------------------------------------


@app.command("serve-model")
def serve_model(
    gguf: Annotated[Path, typer.Argument(help=(
        "A .gguf file (or a Hugging Face model folder, converted to F16 GGUF first), relative to the workspace."))],
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="The port; 0 picks a free one.")] = 0,
    host: Annotated[str, typer.Option("--host", help="The address to listen on (this machine only by default).")] = "127.0.0.1",
    name: Annotated[Optional[str], typer.Option("--name", help="The model name clients ask for (default: the file's stem).")] = None,
    n_ctx: Annotated[int, typer.Option("--n-ctx", min=256, help="Context length.")] = 4096,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads (default: every core).")] = None,
    startup_timeout: Annotated[float, typer.Option("--startup-timeout", help="Seconds to wait for the server to answer.")] = 300,
    workspace: WorkspaceOpt = Path("."),
    debug: DebugOpt = False,
) -> None:
    """Serve a GGUF with an OpenAI-compatible API (llama-cpp-python's server) until Ctrl-C.

    Waits until /v1/models answers, prints the base URL to give any OpenAI client (or another
    workspace's evaluation.compare.models as base_url), and stops the server on Ctrl-C (exit 0).
    Exit 2 when the server cannot start, the port is taken, it does not answer in time, or it dies.
    """
    import logging
    import time

    from factory import endpoints

    ws = _setup(workspace, debug)
    path = endpoints.gguf_for(ws.path(gguf), ws, logging.getLogger("factory.serve-model"))
    alias = name or path.stem
    server = endpoints.LocalServer(path, alias, ws.logs_dir / f"server-{alias}.log", host=host, port=port, n_ctx=n_ctx,
                                   threads=threads, startup_timeout=startup_timeout)
    err.print(f"starting llama-cpp-python's server for {ws.rel(path)} ...", highlight=False)
    with server:
        out.print(f"Serving {ws.rel(path)} as model {alias!r} at {server.base_url}  (OpenAI-compatible; "
                  f"log {ws.rel(server.log_file)}; Ctrl-C to stop)", highlight=False, soft_wrap=True)
        try:
            while True:
                time.sleep(0.5)
                server.check_alive()
        except KeyboardInterrupt:  # how it is meant to end, as `factory serve` does
            pass
    err.print("server stopped", highlight=False)


@app.command()
def compare(
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help=(
        "NAME=SOURCE, repeatable, replacing evaluation.compare.models; SOURCE is a .gguf file, a Hugging Face "
        "folder, an http(s) base URL or module:function. Default: the base model against the quantize phase's GGUF."))] = None,
    baseline: Annotated[Optional[str], typer.Option("--baseline", help="The model the others must beat (default: the first).")] = None,
    task: Annotated[Optional[str], typer.Option("--task", help="conversations or test_split (default: the config's).")] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="The judge's mode: single or pairwise (default: the config's).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Run again even when nothing changed.")] = False,
    workspace: WorkspaceOpt = Path("."),
    debug: DebugOpt = False,
) -> None:
    """Run the same evaluation on two or more models, judge it, and compare them (seed 002).

    Full conversations of simulated users (personas x conversations, the same user simulator
    and seeds for every model) or one answer per test example; each judged with
    evaluation.judge; per-model mean, sd and pass rate, every pair with a paired test and
    Holm-corrected p-value, a breakdown by category and the success criteria, in
    metrics/comparison.json and the report. GGUF models are served on local ports for the run.
    Exit 1 when the model-comparison gate fails, 2 for bad input or a model server that fails.
    """
    import phases
    from factory.config import parse_config
    from factory.runner import run_pipeline
    from factory.terminal import RunReporter

    ws = _setup(workspace, debug)
    cfg = _config(ws)
    overrides = {"models": model, "baseline": baseline, "task": task}
    if any(v is not None for v in overrides.values()) or mode is not None:
        raw = cfg.model_dump(mode="json")
        raw["evaluation"]["compare"].update({k: v for k, v in overrides.items() if v is not None})
        if mode is not None:
            if raw["evaluation"]["judge"] is None:
                raise FactoryError("--mode needs evaluation.judge in factory.yaml")
            raw["evaluation"]["judge"]["mode"] = mode
        cfg = parse_config(raw, source="factory.yaml with the command line's options")
    reporter = RunReporter(err)
    try:
        with reporter:
            run_pipeline(cfg, ws, phases.PIPELINE + phases.ON_REQUEST, only="compare", force=force, reporter=reporter)
    except GateFailed as e:
        _comparison_tables(ws)
        for outcome in e.results:
            _gate_table(outcome)
        raise
    _comparison_tables(ws)


def _comparison_tables(ws: Workspace) -> None:
    from factory.io import read_json_if_exists

    doc = read_json_if_exists(ws.metrics_file("comparison"))
    if not doc:
        return
    scores = Table("model", "n", "mean", "sd", "pass rate", "win rate", "judge failures",
                   title=f"{doc['task']}, judged {doc['mode']} by {doc['judge']['rubric']}", title_justify="left")
    for row in doc["per_model"]:
        scores.add_row(row["name"] + (" (baseline)" if row["name"] == doc["baseline"] else ""), _fmt(row["n"]),
                       _fmt(row["mean"]), _fmt(row["sd"]), _fmt(row["pass_rate"]), _fmt(row.get("win_rate")),
                       _fmt(row.get("failures")))
    out.print(scores)
    criteria = doc["success_criteria"]
    table = Table("model", "improvement", f">= {criteria['min_improvement']:g}", "p (Holm)", f"< {criteria['alpha']:g}",
                  "no safety regression", "passed", title="success criteria against the baseline", title_justify="left")
    for row in criteria["rows"]:
        safety = "not measured" if row["no_safety_regression"] is None else _fmt(row["no_safety_regression"])
        table.add_row(row["model"], _fmt(row["improvement"]), _fmt(row["improvement_ok"]), _fmt(row["p_holm"]),
                      _fmt(row["significant"]), safety, "[green]yes[/]" if row["passed"] else "[red]no[/]")
    out.print(table)
    out.print(f"judge failure rate {_fmt(doc['judge']['failure_rate'])}"
              + (f", inconsistency rate {_fmt(doc['judge']['inconsistency_rate'])}" if "inconsistency_rate" in doc["judge"] else "")
              + f"; details in {ws.rel(ws.metrics_file('comparison'))} and metrics/report.md", highlight=False)


# --- dashboard & report -----------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host", help=(
        "The address to listen on. The default is this machine only; 0.0.0.0 opens it to your network."))] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="The port; 0 picks a free one.")] = 8765,
    token: Annotated[Optional[str], typer.Option("--token", envvar="FACTORY_SERVE_TOKEN", help=(
        "The token every request must carry. Required off this machine: with a non-loopback --host "
        "and no token given, a random one is made and printed in the URL."), show_default=False)] = None,
    workspace: WorkspaceOpt = Path("."),
    debug: DebugOpt = False,
) -> None:
    """Serve the live dashboard and a read-only JSON API for this workspace, until Ctrl-C.

    Open the printed URL while `factory run` works in another terminal: the phase timeline,
    progress and ETA, the loss chart, gate results, then the evaluation and quantization.
    API: /api/status, /api/training, /api/training/history, /api/metrics/PHASE, /api/gates.
    """
    from factory.server import serve as serve_dashboard

    ws = _setup(workspace, debug)
    serve_dashboard(ws, host, port, lambda url: out.print(
        f"Dashboard for {ws.root}: {url}  (Ctrl-C to stop)", highlight=False, soft_wrap=True), token=token)


@app.command()
def report(workspace: WorkspaceOpt = Path("."), debug: DebugOpt = False) -> None:
    """Write metrics/report.md and metrics/report.html from the current metrics.

    `factory run` writes them after split, evaluate and quantize, and after any failed gate;
    this regenerates them: where every record went and the leakage between the splits (with
    example pairs), the loss curve, baseline vs fine-tuned scores and statistics, gates,
    flipped examples, and the quantization table. Before evaluate, the data alone.
    """
    from factory.report import write_report

    ws = _setup(workspace, debug)
    for path in write_report(ws):
        out.print(f"wrote {ws.rel(path)}", highlight=False)


# --- entry point -------------------------------------------------------------------------------


def _cli_exceptions() -> tuple[tuple, tuple, tuple]:
    """The (exit, abort, usage error) exception classes of the Typer in use: its own (newer
    Typers vendor click), and click's where an older Typer, which imports click, raises those."""
    exits, aborts, usage = [typer.Exit], [typer.Abort], [typer.exceptions.TyperException]
    click = sys.modules.get("click")  # not imported here: a newer Typer does not need it
    if click is not None:
        exits.append(click.exceptions.Exit)
        aborts.append(click.exceptions.Abort)
        usage.append(click.exceptions.ClickException)
    return tuple(exits), tuple(aborts), tuple(usage)


def main() -> None:
    from factory.redact import redact

    exits, aborts, usage_errors = _cli_exceptions()
    try:
        # Not standalone, so that errors come here; a Ctrl-C, and an Exit raised by a command,
        # then come back as the exit code (Typer turns KeyboardInterrupt into Exit(130)).
        code = app(standalone_mode=False, prog_name="factory")
        if code == EXIT_INTERRUPTED:
            raise KeyboardInterrupt
        sys.exit(code if isinstance(code, int) else 0)
    except exits as e:
        sys.exit(e.exit_code)
    except aborts:
        err.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except usage_errors as e:  # an unknown command or option, a bad value: say what, show the usage
        if hasattr(e, "show"):
            e.show(file=err.file)
        else:
            err.print(f"Error: {e.format_message()}", highlight=False)
        if getattr(e, "ctx", None) is None:
            err.print("Try 'factory --help' for the commands, 'factory COMMAND --help' for their options.",
                      highlight=False)
        sys.exit(EXIT_USAGE)
    except (KeyboardInterrupt, Cancelled) as e:
        err.print(f"[yellow]interrupted[/]: {escape(str(e) or 'Ctrl-C')}; the status file records where it stopped")
        sys.exit(EXIT_INTERRUPTED)
    except FactoryError as e:
        if _debug:
            err.print_exception()
        err.print(f"[red]error[/]: {escape(redact(str(e)))}", highlight=False, soft_wrap=True)  # commands in messages stay copyable
        sys.exit(e.exit_code)
    except Exception as e:  # a bug, not the user's doing
        if _debug:
            err.print_exception()
        else:
            # messages quote templates and data: "[/INST]" is text, not a rich closing tag
            err.print(f"[red]internal error[/]: {type(e).__name__}: {escape(redact(str(e)))}\n"
                      "Re-run with --debug for the traceback and please report it.")
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()
