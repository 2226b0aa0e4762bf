"""The `sdpo-rl` command line and its demo: help, the plot, and a one-step smoke run of the demo on the real model."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdpo_rl import cli
from sdpo_rl.apps import demo, plotting
from sdpo_rl.cli import demo as demo_cli


def test_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["sdpo-rl"] == "sdpo_rl.cli:main"


def test_demo_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--max-steps", "--output-dir", "--seed", "--task", "--lr", "capitals", "short_answer"):
        assert option in text
    assert f"(default: {demo.DEMO_MAX_STEPS})" in text


def test_demo_and_solve_offer_every_task_answer_checked_first(capsys):
    from sdpo_rl.apps.tasks import TASKS

    parser = cli.build_parser()
    assert parser.parse_args(["demo"]).task == "capitals"
    assert parser.parse_args(["demo", "--task", "one_word_form"]).task == "one_word_form"
    with pytest.raises(SystemExit):
        cli.main(["demo", "--task", "chess"])
    assert "'capitals', 'short_answer', 'one_word', 'capitals_hard'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["solve", "--help"])
    assert ", ".join(TASKS) in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_installed_command_runs_help():
    command = shutil.which("sdpo-rl") or shutil.which("sdpo-rl", path=str(sys.prefix) + "/bin")
    args = [command] if command else [sys.executable, "-m", "sdpo_rl.cli"]
    result = subprocess.run([*args, "demo", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "usage: sdpo-rl demo" in result.stdout


def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([])
    assert exit_.value.code == 2


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit, match="num-generations"):
        cli.main(["demo", "--num-generations", "1"])


def test_demo_settings_are_the_library_defaults_in_the_benchmarked_hybrid():
    import dataclasses

    from sdpo_rl import SDPOConfig

    assert demo.DEMO_SDPO_CONFIG.grpo_weight == 0.8  # hybrid_0.8 of benchmarks/learning.py
    assert dataclasses.replace(demo.DEMO_SDPO_CONFIG, grpo_weight=0.0) == SDPOConfig()


LOG_HISTORY = [
    {"step": 1, "reward": 0.25, "self_distillation/distillation_loss": 0.5, "completions/mean_length": 9.0},
    {"step": 2, "reward": 0.5, "self_distillation/distillation_loss": float("nan"), "completions/mean_length": 8.0},
    {"step": 2, "train_runtime": 10.0},
]


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = plotting.plot_metrics(LOG_HISTORY, tmp_path / "plot.png")
    assert path == tmp_path / "plot.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_is_skipped_with_a_message_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert plotting.plot_metrics(LOG_HISTORY, tmp_path / "plot.png") is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "plot.png").exists()


@pytest.mark.slow
def test_demo_smoke_run_one_step_on_the_real_model(tmp_path, capsys):
    """One training step with tiny settings; uses (and on first use fills) the default model cache."""
    start = time.monotonic()
    code = cli.main(
        [
            "demo",
            "--max-steps=1",
            f"--output-dir={tmp_path}",
            "--num-generations=2",
            "--prompts-per-step=1",
            "--max-completion-length=8",
            "--eval-samples-per-prompt=1",
            "--eval-prompts=2",
            "--save-model",
        ]
    )
    print(f"demo smoke run took {time.monotonic() - start:.1f} s")
    assert code == 0
    out = capsys.readouterr().out
    assert "Held-out accuracy (capitals):" in out and "before ->" in out

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["max_steps"] == 1
    assert 0.0 <= summary["heldout_accuracy_before"] <= 1.0 and 0.0 <= summary["heldout_accuracy_after"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if "reward" in r)
    assert step["step"] == 1 and "self_distillation/distillation_loss" in step
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 1
    saved = tmp_path / "model"
    assert (saved / "adapter_config.json").is_file() and (saved / "tokenizer_config.json").is_file()
    assert not list(saved.rglob("*sdpo_teacher*")), "the saved model is the student's adapter only, not the teacher's"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "training_metrics.png").is_file()


def test_the_demo_names_the_method_it_trains():
    assert demo.method_name(0.0) == "SDPO"
    assert demo.method_name(0.8) == "the SDPO+GRPO hybrid (grpo_weight=0.8)"
    assert demo.method_name(1.0).startswith("GRPO")


def test_the_micro_batch_must_divide_the_completions_of_a_step():
    with pytest.raises(SystemExit, match="--micro-batch=3 does not divide the 16 completions"):
        cli.main(["demo", "--micro-batch", "3"])


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ([], 4),
        (["--num-generations=2", "--prompts-per-step=1"], 2),
        (["--prompts-per-step=3"], 4),
        (["--micro-batch=8"], 8),
    ],
)
def test_the_demo_accumulates_a_step_over_micro_batches(options, expected, tmp_path):
    args = cli.build_parser().parse_args(["demo", f"--output-dir={tmp_path}", *options])
    config = demo.demo_grpo_config(args, use_cuda=False)
    assert config.per_device_train_batch_size == expected
    completions = args.num_generations * args.prompts_per_step
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps == completions
    assert not config.activation_checkpointing


@pytest.mark.parametrize(("options", "bf16"), [([], False), (["--bf16"], True), (["--bf16", "--no-bf16"], False)])
def test_the_demo_trains_in_bfloat16_mixed_precision_only_when_asked(options, bf16, tmp_path):
    args = cli.build_parser().parse_args(["demo", f"--output-dir={tmp_path}", *options])
    assert demo.demo_grpo_config(args, use_cuda=False).bf16 is bf16


@pytest.mark.parametrize(("idle_fraction", "expected"), [(1.0, 2), (0.7, 1), (0.4, 1), (0.0, 1)])
def test_the_demo_uses_one_thread_per_idle_core(monkeypatch, idle_fraction, expected):
    readings = iter([(0, 0), (1000, round(1000 * idle_fraction))])  # (all, idle) ticks before and after
    monkeypatch.setattr(demo, "_cpu_seconds", lambda: next(readings))
    monkeypatch.setattr(demo.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    assert demo.idle_cores(interval=0.0) == expected


def test_the_thread_count_falls_back_to_the_cores_without_proc_stat(monkeypatch):
    def unreadable():
        raise OSError("no /proc/stat")

    monkeypatch.setattr(demo, "_cpu_seconds", unreadable)
    monkeypatch.setattr(demo.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert demo.idle_cores(interval=0.0) == 3


@pytest.mark.parametrize(
    ("options", "rate", "teacher_mode"),
    [
        ([], demo.DEMO_LORA_LEARNING_RATE, "lora_ema"),
        (["--no-lora"], demo.DEMO_FULL_LEARNING_RATE, "ema"),
        (["--lr=1e-3"], 1e-3, "lora_ema"),
        (["--no-lora", "--lr=1e-3"], 1e-3, "ema"),
    ],
)
def test_the_demo_trains_a_lora_adapter_unless_told_not_to(options, rate, teacher_mode, tmp_path):
    from tiny import make_model, make_tokenizer

    from sdpo_rl.apps.tasks import get_task

    args = cli.build_parser().parse_args(["demo", f"--output-dir={tmp_path}", *options])
    demo_cli.check_demo_arguments(args)
    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    trainer = demo.build_demo_trainer(args, model, tokenizer, get_task("capitals"), use_cuda=False)
    assert trainer.args.learning_rate == rate and trainer.sdpo_config.teacher_mode == teacher_mode
    assert trainer.sdpo_config.grpo_weight == 0.8
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    everything = sum(p.numel() for p in trainer.model.parameters())
    assert (trained < everything / 2) if teacher_mode == "lora_ema" else (trained == everything)


def test_the_demo_names_the_fix_when_peft_is_missing(monkeypatch):
    real_find_spec = demo_cli.importlib.util.find_spec
    monkeypatch.setattr(
        demo_cli.importlib.util, "find_spec", lambda name: None if name == "peft" else real_find_spec(name)
    )
    with pytest.raises(SystemExit, match=r"needs peft.*pip install 'sdpo-rl\[embedded\]'.*--no-lora"):
        cli.main(["demo"])
    args = cli.build_parser().parse_args(["demo", "--no-lora"])
    demo_cli.check_demo_arguments(args)  # fine-tuning every weight does not need peft


@pytest.mark.parametrize("rate", ["0.0", "-0.5", "nan"])
def test_the_demo_rejects_a_learning_rate_that_is_not_positive(rate):
    with pytest.raises(SystemExit, match=rf"--lr={rate}.* must be a positive number"):
        cli.main(["demo", f"--lr={rate}"])
