"""Several training processes (training.distributed) for real, on this CPU machine: torchrun
with 2 processes (gloo) trains the example model with DDP and gives the losses and adapter of
one process with the same effective batch; status files stay schema-valid throughout; a rank
killed with SIGKILL fails the run with that rank's error and the next run resumes; two
"machines" on 127.0.0.1 (two `factory run` with nnodes 2) train the same. Plus the config
contract (environment, Slurm, what is refused).

Tolerances: the training loss at every step within 1e-4 (relative) and the adapter within 1e-5
(absolute) of the single process: the steps stay inside the first epoch, where DDP sees the
same examples per optimizer step as one process accumulating; the order of the float sums
differs only. The validation loss within 2e-2: DDP pads the last evaluation batch of a rank
with a repeated example and groups the rest differently, so the batch means differ.
Not testable here: FSDP and DeepSpeed (accelerate shards only on GPUs; on CPUs the config is
refused), NCCL, several GPUs per machine.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from factory.config import load_config, parse_config
from factory.errors import ConfigError
from status_poller import StatusPoller

ENV = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
STEPS = 8  # x effective batch 16 = 128 examples, inside the first epoch of the 270-record train split
LOSS_RTOL, ADAPTER_ATOL, EVAL_RTOL = 1e-4, 1e-5, 2e-2


def factory(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "factory", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(root: Path) -> dict:
    return json.loads((root / "metrics" / "training-stats.json").read_text())


def adapter(root: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(root / "models" / "checkpoints" / "last" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The example workspace split, trained for STEPS steps of batch 8 x accumulation 2."""
    root = tmp_path_factory.mktemp("distributed") / "base"
    assert factory("init", "--example", root, "--records", 300, "--steps", STEPS).returncode == 0
    config = (root / "factory.yaml").read_text()
    config = config.replace("  per_device_train_batch_size: 16\n  gradient_accumulation_steps: 1\n",
                            "  per_device_train_batch_size: 8\n  gradient_accumulation_steps: 2\n")
    config = config.replace("  logging_steps: 10\n", "  logging_steps: 1\n  eval_steps: 4\n")
    (root / "factory.yaml").write_text(config)
    factory("run", "split", "-C", root)  # the 15-record test split fails its gate; finetune needs none
    assert (root / "data" / "splits" / "train.jsonl").exists()
    return root


def workspace(base: Path, tmp_path: Path, distributed: str) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(base, root)
    config = (root / "factory.yaml").read_text()
    (root / "factory.yaml").write_text(config.replace("  eval_steps: 4\n", f"  eval_steps: 4\n  distributed: {distributed}\n"))
    return root


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory) -> Path:
    root = workspace(base, tmp_path_factory.mktemp("one"), "{nproc_per_node: 1}")
    proc = factory("run", "--only", "finetune", "-C", root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def assert_same_training(run: dict, ref: dict, loss_rtol=LOSS_RTOL):
    assert [h["step"] for h in run["loss_history"]] == [h["step"] for h in ref["loss_history"]] == list(range(1, STEPS + 1))
    assert [h["loss"] for h in run["loss_history"]] == pytest.approx([h["loss"] for h in ref["loss_history"]], rel=loss_rtol)
    assert [e["step"] for e in run["eval_history"]] == [e["step"] for e in ref["eval_history"]]
    assert [e["eval_loss"] for e in run["eval_history"]] == pytest.approx([e["eval_loss"] for e in ref["eval_history"]],
                                                                          rel=EVAL_RTOL)


def assert_same_adapter(root: Path, ref_root: Path, atol=ADAPTER_ATOL):
    mine, theirs = adapter(root), adapter(ref_root)
    assert mine.keys() == theirs.keys()
    worst = max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
    moved = max(float(theirs[k].abs().max()) for k in theirs if "lora_B" in k)  # lora_B starts at zero
    assert worst <= atol < moved / 100, (worst, moved)


def worker_pid(parent: int, rank: int) -> int | None:
    import psutil

    for child in psutil.Process(parent).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "worker" in child.cmdline():
                return child.pid
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
def test_two_processes_train_like_one_and_a_killed_rank_fails_the_run_then_it_resumes(base, reference, tmp_path):
    root = workspace(base, tmp_path, f"{{nproc_per_node: 2, master_port: {free_port()}}}")
    marker = root / "outputs" / "checkpoint-2" / "training_state.json"
    with StatusPoller(root) as poller:
        proc = subprocess.Popen([sys.executable, "-m", "factory", "run", "--only", "finetune", "-C", str(root)],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        victim = worker_pid(proc.pid, 1)
        assert victim, "rank 1 was not found among the run's processes"
        os.kill(victim, signal.SIGKILL)
        stderr = proc.communicate(timeout=120)[1]
        assert proc.returncode == 2, stderr[-3000:]
        assert not (root / "metrics" / "training-stats.json").exists(), "the run ended before rank 1 was killed"
        status = json.loads((root / ".factory" / "status.json").read_text())
        training = json.loads((root / ".factory" / "training-status.json").read_text())
        assert status["state"] == "failed" and status["error"]["type"] == "RankFailed"
        assert "rank 1 was killed by SIGKILL" in status["error"]["message"]
        assert training["status"] == "failed" and not training["running"]
        assert "rank 1 was killed by SIGKILL" in training["error"] and "rank 1" in stderr
        assert worker_pid(os.getpid(), 0) is None  # nothing left running

        resumed = factory("run", "--only", "finetune", "-C", root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    stats, ref = metrics(root), metrics(reference)
    assert stats["resumed_from_step"] >= 2 and stats["steps"] == STEPS and stats["completed"]
    assert stats["distributed"] == {"world_size": 2, "strategy": "ddp", "nnodes": 1, "per_device_train_batch_size": 8,
                                    "gradient_accumulation_steps_per_process": 1, "effective_batch_size": 16,
                                    "accelerate": "MULTI_CPU", "sharded_parameters": 0}
    assert ref["distributed"]["world_size"] == 1 and ref["distributed"]["effective_batch_size"] == 16
    # the killed and the resumed training together: the single process's curve and adapter
    assert_same_training(stats, ref)
    assert_same_adapter(root, reference)
    # the status files, valid at every read, followed both runs live through rank 0
    assert poller.problems == []
    assert {doc["status"] for doc in poller.training()} >= {"running", "failed", "succeeded"}
    steps = [doc["step"] for doc in poller.training() if doc["running"] and doc["run_id"] == stats["run_id"]]
    assert len(set(steps)) >= 3 and steps == sorted(steps)
    # the processes log to their own files
    logs = root / "logs"
    assert "rank 1 factory.finetune" in (logs / "rank-1.log").read_text()
    assert (logs / "training.rank-1.log").stat().st_size > 0
    assert "2 processes (2 per machine x 1 machines, strategy ddp)" in (logs / "factory.log").read_text()


@pytest.mark.slow
def test_two_machines_on_one_host_train_like_one_process(base, reference, tmp_path):
    """Two `factory run` with nnodes 2 (one process each) on 127.0.0.1, in one workspace (a shared
    filesystem): machine 1 only joins the finetune phase, machine 0 runs it and writes the results."""
    root = workspace(base, tmp_path, "{nproc_per_node: 1}")
    rendezvous = {**ENV, "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    stderr = [tmp_path / f"machine-{rank}.err" for rank in (0, 1)]
    machines = []
    for rank in (0, 1):
        with stderr[rank].open("w") as err_file:  # the child keeps its own descriptor
            machines.append(subprocess.Popen(
                [sys.executable, "-m", "factory", "run", "--only", "finetune", "-C", str(root)],
                env={**rendezvous, "NODE_RANK": str(rank)}, stdout=subprocess.DEVNULL, stderr=err_file,
                start_new_session=True))
    first, second = machines
    deadline = time.monotonic() + 600
    try:  # a machine that fails leaves the other waiting at the rendezvous: stop both at the first failure
        while any(m.poll() is None for m in machines) and not any(m.poll() for m in machines):
            assert time.monotonic() < deadline, "the two machines did not finish within 600 s"
            time.sleep(1)
    finally:
        for m in machines:
            if m.poll() is None:
                os.killpg(m.pid, signal.SIGKILL)  # with its torchrun and workers
            m.wait()
    first_err, err = (path.read_text() for path in stderr)
    assert (first.returncode, second.returncode) == (0, 0), f"machine 0:\n{first_err[-2000:]}\nmachine 1:\n{err[-2000:]}"
    assert "machine 1 of 2: 1 processes join the finetune phase" in err
    stats, ref = metrics(root), metrics(reference)
    assert stats["distributed"]["world_size"] == 2 and stats["distributed"]["nnodes"] == 2
    assert stats["tokens"] == ref["tokens"]  # the same examples, counted over both processes
    assert_same_training(stats, ref)
    assert_same_adapter(root, reference)
    status = json.loads((root / ".factory" / "status.json").read_text())
    assert status["state"] == "succeeded" and status["pid"] != second.pid  # written by machine 0's runner only


def test_fsdp_and_deepspeed_on_a_cpu_are_refused_before_any_process_starts(tmp_path):
    root = tmp_path / "ws"
    assert factory("init", root).returncode == 0
    (root / "data" / "splits").mkdir(parents=True)
    (root / "factory.yaml").write_text("training: {distributed: {nproc_per_node: 2, strategy: fsdp}}\n")
    proc = factory("run", "--only", "finetune", "-C", root)
    assert proc.returncode == 2
    assert "strategy fsdp needs CUDA GPUs" in proc.stderr and not (root / "logs" / "torchrun.log").exists()


# --- the config contract ----------------------------------------------------------------------


def test_rendezvous_comes_from_the_environment_and_slurm_unless_the_file_sets_it(tmp_path):
    config = tmp_path / "factory.yaml"
    config.write_text("training: {distributed: {master_port: 29999}}\n")
    d = load_config(config, {"NNODES": "4", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "1234"}).training.distributed
    assert (d.nnodes, d.node_rank, d.master_addr, d.master_port) == (4, 2, "10.0.0.7", 29999)
    slurm = {"SLURM_NNODES": "3", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu-a,gpu-b,gpu-c"}
    d = load_config(tmp_path / "absent.yaml", slurm).training.distributed
    assert (d.nnodes, d.node_rank, d.master_addr, d.nproc_per_node) == (3, 1, "gpu-a", "auto")
    # the launcher's own variables win over Slurm's
    d = load_config(tmp_path / "absent.yaml", {**slurm, "NODE_RANK": "0", "MASTER_ADDR": "head"}).training.distributed
    assert (d.node_rank, d.master_addr) == (0, "head")
    with pytest.raises(ConfigError, match="node_rank 3 must be below nnodes 2"):
        load_config(tmp_path / "absent.yaml", {"NNODES": "2", "NODE_RANK": "3"})


def test_the_rendezvous_is_not_part_of_the_fingerprint():
    a = parse_config({"training": {"distributed": {"nproc_per_node": 2, "master_port": 1, "node_rank": 0}}})
    b = parse_config({"training": {"distributed": {"nproc_per_node": 2, "master_port": 2, "master_addr": "x"}}})
    assert a.section("training") == b.section("training")
    assert a.section("training")["distributed"] == {"nproc_per_node": 2, "strategy": "ddp", "nnodes": 1}


def test_unsloth_cannot_shard_and_the_batch_split_must_keep_the_effective_batch():
    from factory import plan

    for strategy in ("fsdp", "deepspeed_zero3"):
        with pytest.raises(ConfigError, match="unsloth backend's 4-bit weights cannot be sharded"):
            parse_config({"model": {"backend": "unsloth"}, "training": {"distributed": {"strategy": strategy}}})
    parse_config({"model": {"backend": "unsloth"}, "training": {"distributed": {"strategy": "deepspeed_zero2"}}})
    cfg = parse_config({"training": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 6}})
    resolved = plan.resolve(cfg, None, world_size=3)
    assert (resolved.gradient_accumulation_steps, resolved.effective_batch_size) == (2, 24)
    with pytest.raises(ConfigError, match="cannot be shared by 4 training processes.*multiple of 4"):
        plan.resolve(cfg, None, world_size=4)
