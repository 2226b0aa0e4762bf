"""Test-time search (`sdpo_rl.solve`), its CLI and its benchmark, on tiny in-process models."""

import argparse
import importlib.util
import json
import operator
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import make_model, make_tokenizer

from sdpo_rl import Scored, SDPOConfig
from sdpo_rl.cli.solve import add_parser as add_solve_parser
from sdpo_rl.cli.solve import parse_columns, problem_from_args
from sdpo_rl.cli.solve import run as run_solve
from sdpo_rl.model_state import _Restore
from sdpo_rl.solving import _fit, best_of_k, multi_turn, solve

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is the capital of France?"
FAST = dict(max_completion_length=4, progress=False)


class SucceedsInRound:
    """Fails with feedback until round `round`, where attempt `index` succeeds; records each call's batch size."""

    __name__ = "succeeds_in_round"

    def __init__(self, round=None, index=0):
        self.round, self.index, self.calls = round, index, []

    def __call__(self, prompts, completions, completion_ids, **columns):
        self.calls.append(len(completions))
        success = len(self.calls) == self.round
        return [Scored(1.0) if success and i == self.index else Scored(0.0, "wrong") for i in range(len(completions))]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def model(tokenizer):
    return make_model(tokenizer)


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_unchanged(before, model):
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name].detach(), value), name


@pytest.mark.slow
def test_solve_stops_at_the_first_success_without_a_step_after_it(model, tokenizer):
    reward = SucceedsInRound(round=3, index=2)
    result = solve(model, tokenizer, PROMPT, reward, max_attempts=40, attempts_per_round=4, learning_rate=1e-3, **FAST)
    assert result.solved and result.method == "sdpo"
    assert result.attempts == 2 * 4 + 3, "the first success is attempt 3 of round 3"
    assert result.solution == result.rounds[2].attempts[2]
    assert reward.calls == [4, 4, 4], "no round after the success"
    assert result.steps == 2, "one step after each failed round, none after the success"
    assert [r.loss is None for r in result.rounds] == [False, False, True]
    assert [r.feedback for r in result.rounds[:2]] == [["wrong"] * 4] * 2


def test_solve_takes_no_step_when_the_first_round_succeeds(model, tokenizer):
    result = solve(model, tokenizer, PROMPT, SucceedsInRound(round=1), max_attempts=8, attempts_per_round=4, **FAST)
    assert (result.solved, result.attempts, result.steps, len(result.rounds)) == (True, 1, 0, 1)


@pytest.mark.slow
def test_solve_never_scores_more_than_max_attempts(model, tokenizer):
    reward = SucceedsInRound(round=None)
    result = solve(model, tokenizer, PROMPT, reward, max_attempts=10, attempts_per_round=4, **FAST)
    assert not result.solved and result.solution is None
    assert reward.calls == [4, 4, 2], "the last round scores only the two attempts left"
    assert result.attempts == 10 == sum(len(r.attempts) for r in result.rounds)
    assert result.steps == 2 and result.rounds[-1].loss is None
    assert result.best_reward == 0.0


@pytest.mark.slow
def test_solve_trains_a_copy_and_leaves_the_callers_model_and_tokenizer_unchanged(model, tokenizer):
    before, template, training = parameters(model), tokenizer.chat_template, model.training
    result = solve(model, tokenizer, PROMPT, SucceedsInRound(3), max_attempts=16, attempts_per_round=4, **FAST)
    assert result.steps == 2 and all(r.loss is not None and r.loss > 0 for r in result.rounds[:2])
    assert_unchanged(before, model)
    assert model.training == training and tokenizer.chat_template == template


def model_state(model):
    """Each module (by name) and configuration with its attributes, the items of those that are containers
    (submodules, parameters, buffers, hooks); each parameter's value and `requires_grad` flag; and the logits."""
    objects = [*model.named_modules(), ("config", model.config), ("generation_config", model.generation_config)]
    attributes = [(name, obj, {key: (v, _items(v)) for key, v in vars(obj).items()}) for name, obj in objects]
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 5, 6, 7, 8]])).logits  # 1, 2: the chat template's special tokens
    return attributes, flags, parameters(model), logits


def _items(value):
    if isinstance(value, dict):
        return tuple(value), tuple(value.values())
    if isinstance(value, set):
        return frozenset(value), ()
    return ((), tuple(value)) if isinstance(value, list) else None


def assert_state_is(before, model):
    """`model` is as in the `model_state` `before`: the same objects, attributes, flags, values and logits."""
    attributes, flags, values, logits = before
    after, flags_after, _, logits_after = model_state(model)
    assert [name for name, *_ in after] == [name for name, *_ in attributes]
    for (name, obj, attrs), (_, obj_after, attrs_after) in zip(attributes, after, strict=True):
        assert obj_after is obj, f"{name!r} is another object"
        assert attrs_after.keys() == attrs.keys(), f"{name!r}: attributes {attrs_after.keys() ^ attrs.keys()}"
        for key, (value, items) in attrs.items():
            value_after, items_after = attrs_after[key]
            assert value_after is value, f"{name!r}.{key} is another object"
            if items is not None:
                keys, contents = items
                assert items_after[0] == keys, f"{name!r}.{key} has other keys"
                assert all(map(operator.is_, items_after[1], contents)) and len(contents) == len(items_after[1]), key
    assert flags_after == flags
    assert_unchanged(values, model)
    assert torch.equal(logits_after, logits)


SPECIAL_IDS = [1, 2]  # <|im_start|>, <|im_end|>: in every prompt, so trainable tokens learn them
PEFT_OPTIONS = {
    "lora": dict(target_modules=["q_proj", "v_proj"]),
    "modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "trainable_token_indices": dict(target_modules=["q_proj"], trainable_token_indices=SPECIAL_IDS),
}


@pytest.mark.slow
@pytest.mark.parametrize("options", list(PEFT_OPTIONS))
def test_solve_with_a_peft_config_leaves_the_callers_model_exactly_as_it_was(model, tokenizer, options):
    peft = pytest.importorskip("peft")
    model.eval()
    before = model_state(model)
    config = peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **PEFT_OPTIONS[options])
    result = solve(
        model, tokenizer, PROMPT, SucceedsInRound(3), max_attempts=16, attempts_per_round=4, peft_config=config,
        learning_rate=1e-2, **FAST,
    )  # fmt: skip
    assert result.steps == 2 and all(r.loss is not None for r in result.rounds[:2])
    assert_state_is(before, model)
    assert not model.training


class FailsInRound(SucceedsInRound):
    """Fails with feedback, then raises in round `round` (after a step has trained the adapter)."""

    def __call__(self, prompts, completions, completion_ids, **columns):
        if len(self.calls) + 1 == self.round:
            raise OSError("the sandbox is gone")
        return super().__call__(prompts, completions, completion_ids, **columns)


@pytest.mark.slow
@pytest.mark.parametrize("options", list(PEFT_OPTIONS))
def test_solve_with_a_peft_config_raises_an_error_of_the_search_and_still_restores_the_model(model, tokenizer, options):
    peft = pytest.importorskip("peft")
    before = model_state(model)
    config = peft.LoraConfig(r=4, task_type="CAUSAL_LM", **PEFT_OPTIONS[options])
    with pytest.raises(RuntimeError, match=r"reward_func 'succeeds_in_round' raised OSError \(the sandbox is gone\)"):
        solve(
            model, tokenizer, PROMPT, FailsInRound(round=2), max_attempts=16, attempts_per_round=4,
            peft_config=config, learning_rate=1e-2, **FAST,
        )  # fmt: skip
    assert_state_is(before, model)


def test_solve_with_a_peft_config_restores_the_model_after_an_error_in_the_trainers_setup(model, tokenizer):
    peft = pytest.importorskip("peft")
    before = model_state(model)
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="teacher_mode='ema'"):  # the trainer refuses a full EMA copy of a PEFT model
        solve(
            model, tokenizer, PROMPT, SucceedsInRound(), max_attempts=8, attempts_per_round=4, peft_config=config,
            sdpo_config=SDPOConfig(teacher_mode="ema"), **FAST,
        )  # fmt: skip
    assert_state_is(before, model)


def test_a_failure_to_restore_the_model_is_chained_to_the_error_of_the_search(model, tokenizer, monkeypatch):
    peft = pytest.importorskip("peft")

    def fails(self):
        raise KeyError("lm_head.original_module.weight")

    monkeypatch.setattr(_Restore, "__call__", fails)
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    message = r"could not restore the caller's model after RuntimeError \(reward_func"
    with pytest.raises(RuntimeError, match=message) as error:
        solve(
            model, tokenizer, PROMPT, FailsInRound(round=1), max_attempts=8, attempts_per_round=4,
            peft_config=config, **FAST,
        )  # fmt: skip
    assert "KeyError ('lm_head.original_module.weight')" in str(error.value)
    assert isinstance(error.value.__cause__, RuntimeError) and "the sandbox is gone" in str(error.value.__cause__)


def test_feedback_through_last_feedback_reaches_the_rounds(model, tokenizer):
    def plain(completions, **kwargs):
        plain.last_feedback = ["too long"] * len(completions)
        return [0.0] * len(completions)

    result = solve(model, tokenizer, PROMPT, plain, max_attempts=4, attempts_per_round=2, **FAST)
    assert [r.feedback for r in result.rounds] == [["too long"] * 2] * 2 and result.steps == 1


def test_columns_reach_the_reward_function_once_per_attempt(model, tokenizer):
    seen = []

    def reward(completions, tests, **kwargs):
        seen.append(tests)
        return [Scored(0.0, "failed")] * len(completions)

    best_of_k(model, tokenizer, PROMPT, reward, max_attempts=3, attempts_per_round=3, columns={"tests": ["t"]}, **FAST)
    assert seen == [[["t"]] * 3]


def test_best_of_k_is_seeded_and_leaves_the_model_unchanged(model, tokenizer):
    before = parameters(model)
    runs = [
        best_of_k(model, tokenizer, PROMPT, SucceedsInRound(), max_attempts=6, attempts_per_round=4, seed=s, **FAST)
        for s in (0, 0, 1)
    ]
    assert [len(r.attempts) for r in runs[0].rounds] == [4, 2] and runs[0].steps == 0
    assert [r.attempts for r in runs[0].rounds] == [r.attempts for r in runs[1].rounds]
    assert [r.attempts for r in runs[0].rounds] != [r.attempts for r in runs[2].rounds]
    assert_unchanged(before, model)


def test_best_of_k_needs_no_feedback_but_solve_and_multi_turn_do(model, tokenizer):
    def silent(completions, **kwargs):
        return [0.0] * len(completions)

    assert not best_of_k(model, tokenizer, PROMPT, silent, max_attempts=4, attempts_per_round=2, **FAST).solved
    for method in (solve, multi_turn):
        with pytest.raises(ValueError, match=r"reward_func 'silent' gave no feedback .* Scored\(value, feedback\)"):
            method(model, tokenizer, PROMPT, silent, max_attempts=4, attempts_per_round=2, **FAST)


def test_multi_turn_stops_at_the_first_success(model, tokenizer):
    reward = SucceedsInRound(round=2, index=1)
    result = multi_turn(model, tokenizer, PROMPT, reward, max_attempts=12, attempts_per_round=3, **FAST)
    assert (result.solved, result.attempts, reward.calls, result.steps) == (True, 5, [3, 3], 0)


def test_multi_turn_context_drops_the_oldest_attempts_first_and_keeps_the_prompt(tokenizer):
    prompt = [{"role": "user", "content": PROMPT}]
    turns = [{"role": r, "content": f"{r} turn {i} " * 5} for i in range(4) for r in ("assistant", "user")]
    conversation = prompt + turns

    def length(messages):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    limit = length(prompt + turns[-4:])
    _fit(conversation, 1, tokenizer, limit)
    assert conversation == prompt + turns[-4:]
    _fit(conversation, 1, tokenizer, 1)
    assert conversation == prompt, "the prompt always stays"


def raises(*args, **kwargs):
    raise KeyError("no tests column")


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        (dict(max_attempts=3, attempts_per_round=4), ValueError, r"max_attempts \(3\) must be >= attempts_per_round"),
        (dict(max_attempts="8"), ValueError, r"max_attempts must be an integer >= 1, got '8'"),
        (dict(attempts_per_round=1), ValueError, r"attempts_per_round must be an integer >= 2, got 1"),
        (dict(prompt=5), TypeError, r"prompt must be a str or a non-empty list of chat messages"),
        (dict(prompt=[{"role": "assistant", "content": "x"}]), ValueError, r"prompt must end with a user turn"),
        (dict(reward_func="my:reward"), TypeError, r"reward_func must be a reward function"),
        (dict(reward_func=raises), RuntimeError, r"reward_func 'raises' raised KeyError .*Fix the reward function"),
        (dict(sdpo_config={"alpha": 1}), TypeError, r"sdpo_config must be an SDPOConfig"),
        (dict(sdpo_config=SDPOConfig(enabled=False)), ValueError, r"does not distil"),
        (dict(learning_rate=0), ValueError, r"learning_rate must be a positive number, got 0"),
        (dict(columns=["tests"]), TypeError, r"columns must be a dict"),
        (dict(columns={"prompts": 1}), ValueError, r"columns may not be named \['prompts'\]"),
        (dict(seed=1.5), TypeError, r"seed must be an int"),
        (dict(model="gpt2"), TypeError, r"model must be a transformers causal LM"),
    ],
)
def test_bad_arguments_name_the_argument_value_and_fix(model, tokenizer, arguments, error, message):
    call = dict(model=model, tokenizer=tokenizer, prompt=PROMPT, reward_func=SucceedsInRound(), max_attempts=8)
    call.update(attempts_per_round=4, **FAST)
    call.update(arguments)
    with pytest.raises(error, match=message):
        solve(**call)


def test_an_async_reward_function_is_refused(model, tokenizer):
    async def reward(completions, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(TypeError, match="is async"):
        best_of_k(model, tokenizer, PROMPT, reward, max_attempts=2, attempts_per_round=2, **FAST)


def test_a_reward_returning_the_wrong_number_of_values_is_refused(model, tokenizer):
    with pytest.raises(ValueError, match=r"returned \[1.0\] for 2 attempts"):
        best_of_k(model, tokenizer, PROMPT, lambda **kwargs: [1.0], max_attempts=2, attempts_per_round=2, **FAST)


# ---- the CLI -------------------------------------------------------------------------------------------------------


def parse(argv):
    parser = argparse.ArgumentParser(prog="sdpo-rl")
    add_solve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["solve", *argv])


def test_cli_takes_a_problem_from_a_builtin_task():
    from sdpo_rl.apps.tasks import get_task

    args = parse(["--task", "short_answer", "--index", "3", "--method", "best_of_k", "--max-attempts", "16"])
    messages, reward, columns = problem_from_args(args)
    train_rows = get_task("short_answer").rows()[0]
    assert messages == train_rows[3]["prompt"] and columns == {k: v for k, v in train_rows[3].items() if k != "prompt"}
    assert reward.__name__ == "short_answer_reward"
    assert (args.method, args.max_attempts, args.attempts_per_round, args.func) == ("best_of_k", 16, 8, run_solve)


def test_cli_takes_a_prompt_with_a_reward_by_import_path_and_json_columns(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def check(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = parse(["--prompt", "Add.", "--reward", "my_rewards:check", "--column", 'tests=["assert f() == 1"]'])
    messages, reward, columns = problem_from_args(args)
    assert messages == [{"role": "user", "content": "Add."}] and reward.__name__ == "check"
    assert columns == {"tests": ["assert f() == 1"]}
    assert parse_columns(["name=plain text", "n=3"]) == {"name": "plain text", "n": 3}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "short_answer"], "--index must be between 0 and"),
        (["--task", "short_answer", "--index", "999"], "got 999"),
        (["--task", "short_answer", "--index", "0", "--prompt", "x"], "not both"),
        (["--prompt", "x"], "name the problem"),
        (["--prompt", "x", "--reward", "no_such_module:f"], "--reward 'no_such_module:f': cannot import"),
        (["--prompt", "x", "--reward", "json:loads", "--column", "novalue"], "is not NAME=VALUE"),
        (["--task", "nope", "--index", "0"], "Unknown task 'nope'"),
        (["--task", "capitals", "--index", "0", "--max-attempts", "4"], r"--max-attempts \(4\) must be >= --attempts"),
        (["--task", "capitals", "--index", "0", "--attempts-per-round", "1"], "--attempts-per-round must be an"),
        (["--task", "capitals", "--index", "0", "--method", "best_of_k", "--lr", "1e-4"], "--lr sets the learning"),
    ],
)
def test_cli_errors_exit_2_with_the_flag_and_the_fix_before_loading_a_model(argv, message, capsys):
    assert run_solve(parse(argv)) == 2
    error = capsys.readouterr().err
    assert error.startswith("sdpo-rl solve: error: ") and re.search(message, error), error


# ---- the benchmark -------------------------------------------------------------------------------------------------


def benchmark_module():
    spec = importlib.util.spec_from_file_location("discovery", ROOT / "benchmarks" / "discovery.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_benchmark_feedback_describes_the_form_and_never_accepts_a_wrong_one():
    bench = benchmark_module()
    for name in bench.PROBLEMS:
        reward = bench.FormReward(name)
        values = reward(completions=[[{"role": "assistant", "content": "The Sky Is Blue Today, Friend And More"}]])
        assert float(values[0]) == 0.0 and values[0].feedback.startswith("Not accepted: "), name
    assert bench.discovery([{"attempts_to_solve": 3}, {"attempts_to_solve": None}], 4) == [0.0, 0.0, 0.5, 0.5]


def test_benchmark_report_counts_only_the_benchmark_runs_and_states_the_goal():
    bench = benchmark_module()

    def run(method, problem, seed, attempts, budget=8):
        return dict(
            method=method, problem=problem, seed=seed, budget=budget, attempts_to_solve=attempts, wall_seconds=2
        )

    results = {
        "runs": [
            run("best_of_k", "p", 0, 6), run("best_of_k", "p", 1, None), run("sdpo", "p", 0, 2),
            run("sdpo", "p", 1, 4), run("multi_turn", "p", 0, None), run("multi_turn", "p", 1, 8),
            run("sdpo", "p", 2, 1, budget=128), run("sdpo", "other", 0, 1),  # a pilot's and an unlisted problem's
        ]
    }  # fmt: skip
    runs = bench.benchmark_runs(results, ["p"], 8)
    assert [len(runs[m]) for m in bench.METHODS] == [2, 2, 2]
    assert bench.attempts_to_reach([0.0, 0.5, 0.5, 1.0], 0.5) == 2 and bench.attempts_to_reach([0.0, 0.25], 0.5) is None
    report = bench.summarise(runs, 8, {"p": {"successes": 1, "samples": 64}}, first_round=4)
    assert "| sdpo | 2 | 2 | 1.00 | 2 |" in report and "| best_of_k | 2 | 1 | 0.50 | 2 |" in report
    assert "- sdpo: 2 (goal: at most 4)" in report and "- multi_turn: 8" in report
    assert "| p | 1/64 | 2 4 | 6 - | - 8 |" in report
    assert "| best_of_k | 2 | 0.50 |" in report and "| multi_turn | 2 | 0.50 |" in report  # left after 4: 6 -, - 8
    assert "| sdpo | 0 |" not in report, "sdpo solved both runs within the first round"
    assert (
        "sdpo's discovery@4 minus best_of_k's discovery@8: +0.50 (95% bootstrap interval over problems +0.50 to +0.50"
        in report
    )

    def solved_at(method, problem, attempts):
        return [run(method, problem, seed, a) for seed, a in enumerate(attempts)]

    sdpo = solved_at("sdpo", "a", [1, 1]) + solved_at("sdpo", "b", [None, None])
    best_of_k = solved_at("best_of_k", "a", [8, None]) + solved_at("best_of_k", "b", [1, 1])
    # resampling problems: a twice (1 - 0.5), b twice (0 - 1) or one of each (0.5 - 0.75)
    assert bench.goal_margin_interval(sdpo, best_of_k, 8) == (-1.0, 0.5)


def test_benchmark_pass_at_1_retries_each_failure_with_its_feedback(monkeypatch):
    from sdpo_rl import evaluation, models

    bench = benchmark_module()
    calls = []

    def fake_sample(model, tokenizer, prompts, *, samples_per_prompt, **kwargs):
        calls.append([p[-1]["content"] for p in prompts])
        if len(calls) == 1:  # the problem: one answer of five words, two failures
            return [[("It is blue today friend", 5), ("Blue", 2), ("The sky is blue", 5)]]
        return [[("Clear blue sky above us", 5)], [("Blue", 2)]]  # the retries, one per failure

    monkeypatch.setattr(models, "load_default_model", lambda: (None, None))
    monkeypatch.setattr(evaluation, "sample_completions", fake_sample)
    record = bench.measure_pass_at_1("q0-exactly_5", samples=3, seed=0, max_completion_length=8)
    assert (record["successes"], record["retries_with_feedback"], record["retry_successes"]) == (1, 2, 1)
    assert abs(record["pass_at_1"] - 1 / 3) < 1e-12 and record["pass_at_1_with_feedback"] == 0.5
    assert calls[0] == [bench.problem_prompt("q0-exactly_5")]
    assert "it must have exactly 5" in calls[1][0] and calls[1][0].startswith(calls[0][0])
    assert set(bench.PROBLEMS) <= set(bench.CANDIDATES)


def test_benchmark_problems_are_the_candidates_measured_hard():
    bench = benchmark_module()
    measured = json.loads((ROOT / "benchmarks" / "results" / "discovery.json").read_text())["pass_at_1"]
    assert len(bench.PROBLEMS) >= 12
    for name in bench.PROBLEMS:
        assert measured[name]["samples"] == 64 and measured[name]["pass_at_1"] <= 0.05, name
    hard = {name for name, record in measured.items() if record["pass_at_1"] <= 0.05}
    assert hard == set(bench.PROBLEMS), "every candidate measured at 5% or less is a problem, and only those"


@pytest.mark.slow
def test_benchmark_quick_mode_writes_every_run_and_skips_them_on_a_rerun(tmp_path):
    results = tmp_path / "quick.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "discovery.py"), "--quick", "--results", str(results)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    runs = json.loads(results.read_text())["runs"]
    assert sorted(r["method"] for r in runs) == ["best_of_k", "multi_turn", "sdpo"]
    for run in runs:
        assert run["budget"] == 8 and run["seed"] == 0
        assert run["attempts_to_solve"] is None or 1 <= run["attempts_to_solve"] <= 8
    assert results.with_suffix(".png").exists() and "| sdpo | 1 |" in completed.stdout
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "jobs to do" not in again.stdout, "a rerun must skip finished runs"


@pytest.mark.parametrize("method", ["sdpo", "best_of_k", "multi_turn"])
def test_cli_runs_a_search_and_reports_it(method, monkeypatch, capsys, tokenizer):
    import sdpo_rl.models

    monkeypatch.setattr(sdpo_rl.models, "load_model", lambda name=None: (make_model(tokenizer), tokenizer))
    argv = ["--task", "capitals", "--index", "0", "--method", method, "--max-attempts", "4"]
    code = run_solve(parse([*argv, "--attempts-per-round", "2", "--max-completion-length", "3", "--no-progress"]))
    output = capsys.readouterr().out
    assert output.startswith("Problem: What is the capital of France?")
    if code == 0:
        assert f"Solved by {method} in " in output
    else:
        assert code == 1 and f"Not solved by {method} in 4 attempts" in output


def test_sdpo_rl_solve_is_the_search_function():
    import sdpo_rl

    assert sdpo_rl.solve is solve
    assert "solve" in sdpo_rl.__all__
