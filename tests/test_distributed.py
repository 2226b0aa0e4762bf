"""Two CPU processes (torchrun, gloo) train exactly like one process on the same global batch (issue #7), and the
teachers' behaviour under parameter sharding (DeepSpeed ZeRO-3, FSDP).

`distributed_worker.py` fixes the completions by their global index, so both runs see the same global batch; its
middle group of four is split over the two processes. The two-process runs start once, in one `torchrun`, for all
the tests of this module; the one-process runs happen in the test process. `exit_worker.py` checks that the processes
of a run exit cleanly (issue #16).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import distributed_worker as worker
import pytest
import torch
from safetensors.torch import load_file
from tiny import make_model, make_tokenizer

import sdpo_rl.teacher as teacher_module
import sdpo_rl.teacher.copied as copied_teacher_module
from sdpo_rl import SDPOConfig
from sdpo_rl.metrics import ONE_PASS_HYBRID, PROMPT_SHARING
from sdpo_rl.sharding import paired_shards
from sdpo_rl.teacher import Teacher, build_teacher, ema_update_
from sdpo_rl.teacher.checkpoint import save_teacher

PROCESSES = 2
# Logged once per micro-batch as the mean over that micro-batch's tokens: with several micro-batches per step they
# depend on how TRL's local shuffle splits the batch, which differs between one and two processes.
PER_MICRO_BATCH_METRICS = {"self_distillation/student_entropy", "self_distillation/teacher_entropy"}
# How a run executed, not what it learned: prompt sharing exists on a CPU in one process only (docs/teachers.md).
EXECUTION_METRICS = {PROMPT_SHARING, ONE_PASS_HYBRID}
COMPARED_METRICS = ("loss", "grad_norm", "reward", "reward_std")


def worker_environment() -> dict[str, str]:
    """The environment of the worker processes; they import this checkout's `sdpo_rl`, not an installed one."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }


def run_worker(output: Path, *names: str, timeout: float) -> None:
    """Run `distributed_worker.py`'s `names` in `PROCESSES` processes."""
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(PROCESSES)),
        *(str(Path(worker.__file__)), str(output), *names),
    ]
    completed = subprocess.run(command, env=worker_environment(), capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("two_processes")
    run_worker(output, *worker.SCENARIOS, worker.FSDP2_CHECK, timeout=600)
    return output


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, Path]:
    folders = {}
    for scenario in worker.SCENARIOS:
        folders[scenario] = tmp_path_factory.mktemp(scenario)
        worker.run(scenario, str(folders[scenario]))
    return folders


def report(folder: Path, rank: int = 0) -> dict:
    return json.loads((folder / f"rank{rank}.json").read_text())


def weights(folder: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(folder / f"rank{rank}.safetensors")


@pytest.mark.parametrize("scenario", worker.SCENARIOS)
@pytest.mark.slow
def test_demonstrations_and_feedback_are_those_of_one_process(two_processes, one_process, scenario):
    expected = report(one_process[scenario])["generations"]
    assert len(expected) == 2
    for rank in range(PROCESSES):
        generations = report(two_processes / scenario, rank)["generations"]
        for got, want in zip(generations, expected, strict=True):
            assert got["completions"] == want["completions"], "the runs must see the same global batch"
            assert got["prompts"] == want["prompts"]
            assert got["teacher_prompts"] == want["teacher_prompts"]

    # The split group (global indices 4-7, process 0 holds 4 and 5): its one success is on the other process.
    first, second = expected
    assert all("Correct solution:\n\nParis 7 0\n" in first["teacher_prompts"][i] for i in (4, 5, 6))
    assert all("Correct solution:\n\nParis 4 1\n" in second["teacher_prompts"][i] for i in (5, 6, 7))
    # A group without success gets each completion's own feedback.
    assert "Attempt 'Lima 9 0' is wrong." in first["teacher_prompts"][9]


@pytest.mark.parametrize("scenario", worker.SCENARIOS)
@pytest.mark.slow
def test_losses_metrics_and_weights_are_those_of_one_process(two_processes, one_process, scenario):
    expected_logs = [entry for entry in report(one_process[scenario])["log_history"] if "loss" in entry]
    expected_weights = weights(one_process[scenario])
    several_micro_batches = worker.SCENARIOS[scenario]["gradient_accumulation_steps"] > 1
    for rank in range(PROCESSES):
        logs = [entry for entry in report(two_processes / scenario, rank)["log_history"] if "loss" in entry]
        assert len(logs) == len(expected_logs) == 2
        for got, want in zip(logs, expected_logs, strict=True):
            names = [n for n in want if n.startswith("self_distillation/") or n in COMPARED_METRICS]
            names = [n for n in names if n not in EXECUTION_METRICS]
            names = [n for n in names if not (several_micro_batches and n in PER_MICRO_BATCH_METRICS)]
            assert "self_distillation/distillation_loss" in names
            settings = worker.SCENARIOS[scenario]
            uses_grpo = settings["grpo_weight"] > 0 or settings.get("sample_routing", False)
            assert ("self_distillation/grpo_loss" in names) == uses_grpo
            for name in names:
                assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-7, nan_ok=True), name
        got_weights = weights(two_processes / scenario, rank)
        assert got_weights.keys() == expected_weights.keys()
        for name, tensor in expected_weights.items():
            torch.testing.assert_close(got_weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)

    # The run trained: the student moved, and the EMA teacher moved toward it without reaching it.
    students = {n.removeprefix("student."): t for n, t in expected_weights.items() if n.startswith("student.")}
    teachers = {n.removeprefix("teacher."): t for n, t in expected_weights.items() if n.startswith("teacher.")}
    initial = {n.removeprefix("initial."): t for n, t in expected_weights.items() if n.startswith("initial.")}
    assert max(float((students[n] - initial[n]).abs().max()) for n in students) > 1e-3
    assert max(float((teachers[n] - initial[n]).abs().max()) for n in teachers) > 1e-3
    assert max(float((teachers[n] - students[n]).abs().max()) for n in teachers) > 1e-3


@pytest.mark.slow
def test_lora_ema_update_of_fsdp2_shards_equals_the_update_of_whole_tensors(two_processes):
    for rank in range(PROCESSES):
        result = report(two_processes / worker.FSDP2_CHECK, rank)
        assert result["teacher_is_sharded"]
        assert result["max_change"] > 0.1
        assert result["max_error"] < 1e-6
        assert "do not line up" in result["full_copy_refusal"]


@pytest.mark.slow
def test_every_process_runs_as_many_forwards_of_a_sharded_teacher(tmp_path):
    """Issue #26, item 7: unequal signal rows leave no process waiting in a sharded teacher's collectives.

    Process 0 distils three rows, process 1 none, with teacher-entropy weights and hindsight contrast, on a `lora_ema`
    teacher sharded by FSDP2. Without equal forwards, the processes meet in different collectives and gloo fails after
    `COLLECTIVE_TIMEOUT`, so the run fails rather than hangs.
    """
    timeout = worker.COLLECTIVE_TIMEOUT.total_seconds() + 240  # a failed collective is reported before this
    run_worker(tmp_path, worker.TEACHER_FORWARDS_CHECK, timeout=timeout)
    reports = [report(tmp_path / worker.TEACHER_FORWARDS_CHECK, rank) for rank in range(PROCESSES)]
    assert [r["distilled_rows"] for r in reports] == [3, 0]
    # Building the batch: two chunks of two distilled rows. The loss: per micro-batch, the teacher and the frame.
    assert all(r["teacher_forwards"] == {"build": 2, "loss": 4} for r in reports), reports


EXIT_RUNS = 5
GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")  # ProcessGroupGloo's workers and gloo's transport loop


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc (Linux)")
def test_processes_exit_cleanly_after_end_training(tmp_path):
    """Issue #16: a gloo thread freeing a collective's tensors while the interpreter finalizes aborts the process.

    `sdpo_rl.process_group.end_training` frees the process group, and joins its threads, before the script ends.
    The abort is a race, so the worker runs several times; that no gloo thread is left is checked every time.
    """
    environment = worker_environment()
    worker = Path(__file__).with_name("exit_worker.py")
    for run in range(EXIT_RUNS):
        output = tmp_path / str(run)
        output.mkdir()
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(PROCESSES)]
        completed = subprocess.run(
            [*command, str(worker), str(output)], env=environment, capture_output=True, text=True, timeout=300
        )
        assert completed.returncode == 0, f"run {run}:\n{completed.stderr[-6000:]}"
        assert "terminate called" not in completed.stderr, f"run {run}:\n{completed.stderr[-6000:]}"
        for rank in range(PROCESSES):
            threads = report(output, rank)
            assert set(GLOO_THREADS) <= set(threads["before"]), threads["before"]
            assert not set(GLOO_THREADS) & set(threads["after"]), f"run {run}, rank {rank}: {threads['after']}"


def zero3_like_parameter(shard: torch.Tensor) -> torch.nn.Parameter:
    """A stand-in for a DeepSpeed ZeRO-3 parameter, as DeepSpeed is not installed here.

    Like DeepSpeed's, it is an empty placeholder whose process-local shard is `ds_tensor`.
    """
    param = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    param.ds_tensor = shard
    return param


def test_ema_updates_zero3_shards_in_place():
    teacher, student = zero3_like_parameter(torch.zeros(3)), zero3_like_parameter(torch.tensor([4.0, 8.0, 12.0]))
    ema_update_(paired_shards({"w": teacher}, {"w": student}), 0.25)
    assert torch.equal(teacher.ds_tensor, torch.tensor([1.0, 2.0, 3.0]))


def test_a_sharded_teacher_is_not_saved_silently_empty(tmp_path):
    class ShardedTeacher(Teacher):
        def state_tensors(self):
            return {"w": zero3_like_parameter(torch.ones(3))}

    with pytest.raises(NotImplementedError, match="save_strategy='no'"):
        save_teacher(ShardedTeacher(), str(tmp_path), "lora_ema")


@pytest.mark.parametrize("sharding", ["DeepSpeed ZeRO-3", "FSDP2"])
@pytest.mark.parametrize("mode", ["ema", "frozen", "trust_region"])
def test_full_copy_teachers_are_refused_when_parameters_are_sharded(monkeypatch, sharding, mode):
    monkeypatch.setattr(copied_teacher_module, "parameter_sharding", lambda: sharding)
    with pytest.raises(ValueError, match=rf"shards parameters \({sharding}\).*teacher_mode='lora_ema'"):
        build_teacher(SDPOConfig(teacher_mode=mode), make_model(make_tokenizer()))


def test_fsdp1_is_refused_with_the_setting_to_change(monkeypatch):
    monkeypatch.setattr(teacher_module, "parameter_sharding", lambda: "FSDP1")
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        build_teacher(SDPOConfig(teacher_mode="frozen"), make_model(make_tokenizer()))


@pytest.mark.parametrize("mode", ["ema", "trust_region"])
def test_a_full_copy_teacher_follows_the_student_to_its_device(mode):
    """Under DeepSpeed and FSDP the trainer builds the teacher on the CPU and moves the student only later."""
    student = make_model(make_tokenizer())
    teacher = build_teacher(SDPOConfig(teacher_mode=mode), student)
    teacher.to(torch.device("meta"))
    copy = teacher.model if mode == "ema" else teacher.reference.model
    assert all(p.device.type == "meta" for p in copy.parameters())
    assert all(p.device.type == "cpu" for p in student.parameters())
