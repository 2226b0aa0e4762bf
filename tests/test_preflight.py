"""`sdpo_rl.preflight` and `sdpo-rl preflight` on the tiny model: the trainer's own selection and teacher prompts, the
verdict without a teacher signal, errors on bad input, the JSON report, the caller's objects left as they were."""

import json
import random
import re

import numpy as np
import pytest
import torch
from datasets import Dataset
from test_train_cli import write_config
from tiny import ParityReward, grpo_args, make_dataset, make_model, make_tokenizer

from sdpo_rl import SDPOConfig, cli
from sdpo_rl.metrics import FEEDBACK_USED_FRACTION, REPROMPT_SAMPLE_FRACTION, SUCCESS_SAMPLE_FRACTION, TEACHER_EDGE
from sdpo_rl.preflight import Edge, Interval, PreflightReport, preflight, recommend
from sdpo_rl.reprompt import render_teacher_prompt
from sdpo_rl.trainer import SDPOTrainer

PROMPTS, SAMPLES = 4, 2


class Rollouts:
    """Spies on `SDPOTrainer.rollout_with_teacher_batch` and `_generate_single_turn` during a preflight."""

    def __init__(self, monkeypatch):
        self.rollouts, self.teacher_calls, self.in_rollout = [], [], False
        rollout, generate = SDPOTrainer.rollout_with_teacher_batch, SDPOTrainer._generate_single_turn

        def spy_rollout(trainer, inputs):
            self.in_rollout = True
            try:
                batch, teacher_batch = rollout(trainer, inputs)
            finally:
                self.in_rollout = False
            self.trainer = trainer
            self.rollouts.append((inputs, batch, teacher_batch))
            return batch, teacher_batch

        def spy_generate(trainer, prompt_ids, *args):
            if not self.in_rollout:
                self.teacher_calls.extend(prompt_ids)
            return generate(trainer, prompt_ids, *args)

        monkeypatch.setattr(SDPOTrainer, "rollout_with_teacher_batch", spy_rollout)
        monkeypatch.setattr(SDPOTrainer, "_generate_single_turn", spy_generate)


def run(tmp_path, reward=None, dataset=None, sdpo_config=None, model=None, tokenizer=None, **args):
    tokenizer = tokenizer or make_tokenizer()
    return preflight(
        model if model is not None else make_model(tokenizer),
        tokenizer,
        dataset if dataset is not None else make_dataset(n=8),
        [reward or ParityReward()],
        args=grpo_args(tmp_path, **args),
        sdpo_config=sdpo_config,
        prompts=PROMPTS,
        teacher_samples=SAMPLES,
        progress=False,
    )


@pytest.mark.slow
def test_coverage_is_the_trainers_own_selection(tmp_path, monkeypatch):
    spy = Rollouts(monkeypatch)
    report = run(tmp_path)
    masks = torch.cat([teacher_batch.tensors["self_distillation_mask"] for _, _, teacher_batch in spy.rollouts])
    logged = spy.trainer._metrics["train"]
    calls = len(spy.rollouts)
    # TRL's batch and the fractions SDPOTrainer logs, averaged over the rollout calls (equal sizes).
    assert report.no_signal == pytest.approx(1 - float(masks.mean()))
    assert report.no_signal == pytest.approx(1 - sum(logged[REPROMPT_SAMPLE_FRACTION]) / calls)
    assert report.demonstration_only + report.demonstration_and_feedback == pytest.approx(
        sum(logged[SUCCESS_SAMPLE_FRACTION]) / calls
    )
    assert report.feedback_only + report.demonstration_and_feedback == pytest.approx(
        sum(logged[FEEDBACK_USED_FRACTION]) / calls
    )
    assert report.prompts == PROMPTS and report.num_generations == 4
    assert 0 < report.failed_with_signal <= 1  # ParityReward gives every failure feedback


@pytest.mark.slow
def test_teacher_samples_read_exactly_the_prompt_the_trainer_builds(tmp_path, monkeypatch):
    spy = Rollouts(monkeypatch)
    tokenizer = make_tokenizer()
    report = run(tmp_path, tokenizer=tokenizer)
    config, trainer = SDPOConfig(), spy.trainer
    expected = []
    for inputs, _, teacher_batch in spy.rollouts:
        for i, signal in enumerate(teacher_batch.signals):
            if teacher_batch.rewards[i] < config.success_reward_threshold and signal.has_signal:
                rendered = render_teacher_prompt(
                    inputs[i]["prompt"],
                    signal,
                    tokenizer,
                    config.template_settings(),
                    chat_template_kwargs={"chat_template": trainer.chat_template, "tools": None},
                )
                expected += [rendered.text] * SAMPLES
    sampled = [tokenizer.decode(ids) for ids in spy.teacher_calls]
    assert sampled == expected
    assert report.edge.failures * SAMPLES == len(expected) > 0


@pytest.mark.slow
def test_no_feedback_and_no_success_means_no_teacher_signal(tmp_path):
    def never(completions, **kwargs):
        return [0.0] * len(completions)

    report = run(tmp_path, reward=never)
    assert report.student_pass_rate == 0 and report.failed_with_signal == 0
    assert report.edge.edge is None and report.log_prob_gain is None
    assert report.verdict == "grpo" and report.recommended_config == {"enabled": False}
    assert "no failed completion gets a demonstration or feedback" in report.reason


@pytest.mark.slow
def test_the_report_round_trips_through_json(tmp_path):
    report = run(tmp_path)
    text = json.dumps(report.to_dict())
    assert PreflightReport.from_dict(json.loads(text)) == report
    assert report.verdict in ("grpo", "hybrid") and report.reason


@pytest.mark.slow
def test_the_callers_model_arguments_and_random_state_are_left_as_they_were(tmp_path):
    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    modules = dict(model.named_modules())
    attributes = {name: dict(vars(module)) for name, module in modules.items()}
    parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
    args, config = grpo_args(tmp_path), SDPOConfig(teacher_update_rate=0.5)
    args_before, config_before = args.to_dict(), repr(config)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    preflight(model, tokenizer, make_dataset(n=8), [ParityReward()], args=args, sdpo_config=config, prompts=2,
              teacher_samples=1, progress=False)  # fmt: skip
    assert dict(model.named_modules()) == modules
    for name, module in modules.items():
        assert vars(module).keys() == attributes[name].keys(), name
        for key, value in attributes[name].items():
            assert vars(module)[key] is value or vars(module)[key] == value, (name, key)
    for name, p in model.named_parameters():
        assert torch.equal(p, parameters[name]), name
    assert args.to_dict() == args_before and repr(config) == config_before
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])


@pytest.mark.slow
def test_a_seed_gives_the_same_report(tmp_path):
    first, second = run(tmp_path), run(tmp_path)
    first.seconds = second.seconds = first.step_cost_vs_grpo = second.step_cost_vs_grpo = 0.0
    assert first == second


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(dataset=Dataset.from_list([])), "train_dataset"),
        (dict(num_generations=1), "num_generations=1"),
        (dict(prompts=0), "prompts=0"),
        (dict(teacher_samples=-1), "teacher_samples=-1"),
    ],
)
def test_bad_input_gives_a_clear_error(tmp_path, change, message):
    tokenizer = make_tokenizer()
    options = dict(prompts=PROMPTS, teacher_samples=SAMPLES)
    for key in ("prompts", "teacher_samples"):
        options[key] = change.pop(key, options[key])
    dataset = change.pop("dataset", make_dataset(n=8))
    args = grpo_args(tmp_path)
    for name, value in change.items():  # GRPOConfig refuses num_generations=1 when built; a caller may set it later
        setattr(args, name, value)
    with pytest.raises(ValueError, match=message):
        preflight(make_model(tokenizer), tokenizer, dataset, [ParityReward()], args=args, progress=False, **options)


def test_a_reward_that_raises_is_named(tmp_path):
    def broken_reward(completions, **kwargs):
        raise KeyError("answer")

    with pytest.raises(KeyError) as error:
        run(tmp_path, reward=broken_reward)
    assert "Raised by the reward function 'broken_reward'." in error.value.__notes__


def test_a_reward_of_the_wrong_length_is_named(tmp_path):
    def short_reward(completions, **kwargs):
        return [1.0] * (len(completions) - 1)

    with pytest.raises(ValueError, match="'short_reward' returned 3 rewards, but 4 were expected"):
        run(tmp_path, reward=short_reward)


@pytest.mark.slow
def test_the_command_measures_a_train_config_and_writes_json(tmp_path, model_dir, capsys):
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in make_dataset()))
    path = write_config(tmp_path, model_dir, dataset)  # the same YAML file as `sdpo-rl train`
    out = tmp_path / "report.json"
    argv = ["preflight", "--config", str(path), "--prompts", "2", "--teacher-samples", "1", "--no-progress"]
    assert cli.main([*argv, "--json", str(out), "--max_completion_length", "4"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["prompts"] == 2 and f"Verdict: {report['verdict']}" in printed
    assert "teacher edge (all)" in printed and "student pass rate" in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["preflight"], "--config CONFIG.yaml"),
        (["preflight", "--task", "capitals", "--config", "c.yaml"], "not both"),
        (["preflight", "--task", "capitals", "--beta", "0.1"], "--config only"),
        (["preflight", "--task", "nope"], "Unknown task 'nope'"),
    ],
)
def test_the_command_names_what_is_wrong(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_other_commands_still_reject_unknown_arguments():
    with pytest.raises(SystemExit):
        cli.main(["solve", "--task", "capitals", "--index", "0", "--nope"])


class HalfRight:
    """Every other completion of a call succeeds; the others get feedback: each group has a signalled failure."""

    __name__ = "half_right"

    def __call__(self, completions, **kwargs):
        rewards = [float(i % 2 == 0) for i in range(len(completions))]
        self.last_feedback = ["" if r else "Wrong." for r in rewards]
        return rewards


@pytest.mark.slow
@pytest.mark.parametrize("every, measured_steps", [(1, 2), (2, 1), (None, 0)])
def test_training_logs_the_teacher_edge_every_so_many_steps(tmp_path, every, measured_steps):
    tokenizer = make_tokenizer()
    trainer = SDPOTrainer(
        model=make_model(tokenizer),
        args=grpo_args(tmp_path),
        sdpo_config=SDPOConfig(teacher_edge_every=every),
        processing_class=tokenizer,
        reward_funcs=[HalfRight()],
        train_dataset=make_dataset(),
    )
    trainer.train()
    edges = [entry[TEACHER_EDGE] for entry in trainer.state.log_history if TEACHER_EDGE in entry]
    assert len(edges) == measured_steps
    # Half of each group succeeds (pass rate 0.5), so the teacher's pass rate minus it lies in [-0.5, 0.5].
    assert all(-0.5 <= edge <= 0.5 for edge in edges)


def measured(failed_with_signal, edge=None, prompts=8) -> PreflightReport:
    """A report with only the measures the verdict reads set (the others are placeholders)."""
    interval = None if edge is None else Interval(*edge)
    measure = Edge(failures=3 * prompts, prompts=prompts, teacher_pass_rate=0.3, student_pass_rate=0.1, edge=interval)
    fractions = dict.fromkeys(
        ["student_pass_rate", "student_mean_reward", "groups_without_success", "groups_with_some_success"], 0.1
    )
    fractions |= dict.fromkeys(["groups_all_successful", "grpo_signal_fraction", "demonstration_only"], 0.1)
    fractions |= dict.fromkeys(["feedback_only", "demonstration_and_feedback", "no_signal"], 0.1)
    return PreflightReport(
        prompts=prompts,
        num_generations=4,
        teacher_samples=4,
        failed_with_signal=failed_with_signal,
        edge=measure,
        edge_demonstration=measure,
        edge_feedback_only=measure,
        log_prob_gain=None,
        frame_share=None,
        step_cost_vs_grpo=1.5,
        verdict="",
        reason="",
        **fractions,
    )


@pytest.mark.parametrize(
    ("report", "verdict", "config", "reason"),
    [
        (measured(None), "grpo", {"enabled": False}, "every completion already succeeds"),
        (measured(0.0), "grpo", {"enabled": False}, "no failed completion gets a demonstration or feedback"),
        (measured(0.5, (0.3, 0.1, 0.5), prompts=4), "grpo", {"enabled": False}, "only 4 prompts had a failed"),
        (measured(0.5, (0.05, 0.0, 0.1)), "grpo", {"enabled": False}, "not clearly better than the student"),
        (measured(0.5, (-0.1, -0.2, 0.0)), "grpo", {"enabled": False}, r"edge -0.100 \[-0.200, \+0.000\]"),
        (measured(0.5, (0.26, 0.17, 0.34)), "hybrid", {"grpo_weight": 0.8}, "add its distillation to GRPO's loss"),
    ],
)
def test_the_verdict_follows_the_documented_rules(report, verdict, config, reason):
    """docs/preflight.md's table, row by row: only an edge whose whole interval is above 0, over at least 5 prompts,
    recommends distillation, and then added to GRPO's loss (the measured 135M outcome), never pure SDPO."""
    got_verdict, got_reason, got_config = recommend(report)
    assert (got_verdict, got_config) == (verdict, config)
    assert re.search(reason, got_reason)
    SDPOConfig(**got_config)  # a valid configuration
