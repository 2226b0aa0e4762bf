import dataclasses
import math

import pytest

from sdpo_rl import SDPOConfig
from sdpo_rl import config as config_module
from sdpo_rl import loss as loss_module
from sdpo_rl import reprompt as reprompt_module
from sdpo_rl.config import TEMPLATE_PLACEHOLDERS
from sdpo_rl.loss import LossSettings
from sdpo_rl.reprompt import SignalSettings, TemplateSettings

ISSUE_DEFAULTS = {
    "enabled": True,
    "alpha": 0.5,
    "full_logit_distillation": True,
    "distillation_topk": 100,
    "distillation_add_tail": True,
    "is_clip": 2.0,
    "loss_agg_mode": "token-mean",
    "teacher_mode": "ema",
    "teacher_update_rate": 0.05,
    "grpo_weight": 0.0,
    "apply_chat_template_kwargs": {},
    "success_reward_threshold": 1.0,
    "dont_reprompt_on_self_success": True,
    "remove_thinking_from_demonstration": True,
    "include_environment_feedback": True,
    "environment_feedback_only_without_solution": True,
    "max_reprompt_length": 10240,
    "reprompt_truncation": "right",
    # The reference's actor.yaml, which its experiments load (not its dataclass defaults; docs/deviations.md).
    "solution_template": "\nCorrect solution:\n\n{successful_previous_attempt}",
    "feedback_template": "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}",
    "reprompt_template": "{prompt}{solution}{feedback}\n\nCorrectly solve the original question.",
}


def test_defaults_match_the_contract():
    config = SDPOConfig()
    for name, expected in ISSUE_DEFAULTS.items():
        assert getattr(config, name) == expected, name


def test_mutable_default_is_not_shared():
    first, second = SDPOConfig(), SDPOConfig()
    first.apply_chat_template_kwargs["enable_thinking"] = False
    assert second.apply_chat_template_kwargs == {}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("alpha", -0.1),
        ("alpha", 1.5),
        ("alpha", math.nan),
        ("alpha", "0.5"),
        ("distillation_topk", 0),
        ("distillation_topk", 2.5),
        ("distillation_topk", True),
        ("is_clip", 0.0),
        ("is_clip", -1.0),
        ("is_clip", math.inf),
        ("loss_agg_mode", "mean"),
        ("teacher_mode", "ema2"),
        ("teacher_update_rate", 0.0),
        ("teacher_update_rate", 1.1),
        ("grpo_weight", -0.5),
        ("grpo_weight", 2.0),
        ("success_reward_threshold", math.nan),
        ("success_reward_threshold", math.inf),
        ("max_reprompt_length", 0),
        ("max_reprompt_length", 10.0),
        ("reprompt_truncation", "middle"),
        ("enabled", 1),
        ("include_environment_feedback", "yes"),
        ("apply_chat_template_kwargs", None),
        ("sample_routing", 1),
        ("pass_rate_weighting", "yes"),
        ("teacher_entropy_weighting", 0.0),
        ("teacher_entropy_weighting", math.inf),
        ("hindsight_contrast", -1.0),
        ("hindsight_contrast", math.nan),
        ("teacher_edge_every", 0),
        ("teacher_edge_every", True),
        ("teacher_edge_every", 2.0),
    ],
)
def test_invalid_values_name_field_and_value(field, value):
    with pytest.raises(ValueError) as info:
        SDPOConfig(**{field: value})
    assert f"SDPOConfig.{field}=" in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("mode", ["ema", "frozen", "lora_ema", "trust_region"])
def test_every_teacher_mode_is_accepted(mode):
    assert SDPOConfig(teacher_mode=mode).teacher_mode == mode


@pytest.mark.parametrize(
    ("enabled", "grpo_weight", "distills"),
    [(True, 0.0, True), (True, 0.5, True), (True, 1.0, False), (False, 0.0, False)],
)
def test_distills_only_when_enabled_and_not_pure_grpo(enabled, grpo_weight, distills):
    assert SDPOConfig(enabled=enabled, grpo_weight=grpo_weight).distills is distills


def test_sampled_token_mode_requires_reverse_kl():
    with pytest.raises(ValueError, match="alpha=1.0"):
        SDPOConfig(full_logit_distillation=False, alpha=0.5)
    assert SDPOConfig(full_logit_distillation=False, alpha=1.0).alpha == 1.0


def test_sample_routing_needs_pure_sdpo_and_token_mean():
    with pytest.raises(ValueError, match=r"sample_routing=True with grpo_weight=0.5.*grpo_weight=0.0"):
        SDPOConfig(sample_routing=True, grpo_weight=0.5)
    with pytest.raises(ValueError, match=r"sample_routing=True with loss_agg_mode='seq-mean-token-sum'"):
        SDPOConfig(sample_routing=True, loss_agg_mode="seq-mean-token-sum")
    config = SDPOConfig(sample_routing=True, teacher_entropy_weighting=1.0, pass_rate_weighting=True)
    assert config.sample_routing and config.distills


def test_full_vocabulary_and_no_is_clip_are_allowed():
    config = SDPOConfig(distillation_topk=None, is_clip=None)
    assert config.distillation_topk is None and config.is_clip is None


@pytest.mark.parametrize("name", sorted(TEMPLATE_PLACEHOLDERS))
def test_templates_need_their_placeholders(name):
    with pytest.raises(ValueError, match="missing"):
        SDPOConfig(**{name: "no placeholder here"})
    good = ISSUE_DEFAULTS[name]
    with pytest.raises(ValueError, match="unknown"):
        SDPOConfig(**{name: good + "{other}"})
    with pytest.raises(ValueError, match="not a valid str.format template"):
        SDPOConfig(**{name: good + "{"})
    assert getattr(SDPOConfig(**{name: "{{literal}} " + good}), name).startswith("{{literal}}")


def test_every_field_has_help():
    for f in dataclasses.fields(SDPOConfig):
        assert f.metadata.get("help"), f.name


@pytest.mark.parametrize(
    ("method", "settings_class"),
    [("loss_settings", LossSettings), ("signal_settings", SignalSettings), ("template_settings", TemplateSettings)],
)
def test_settings_objects_carry_the_config_values(method, settings_class):
    config = SDPOConfig(
        alpha=1.0,
        full_logit_distillation=False,
        distillation_topk=7,
        distillation_add_tail=False,
        is_clip=None,
        loss_agg_mode="seq-mean-token-sum",
        success_reward_threshold=0.25,
        dont_reprompt_on_self_success=False,
        remove_thinking_from_demonstration=False,
        include_environment_feedback=False,
        environment_feedback_only_without_solution=False,
        max_reprompt_length=99,
        reprompt_truncation="left",
        solution_template="S{successful_previous_attempt}",
        feedback_template="F{feedback_raw}",
        reprompt_template="{prompt}|{solution}|{feedback}",
    )
    settings = getattr(config, method)()
    assert isinstance(settings, settings_class)
    names = [f.name for f in dataclasses.fields(settings_class)]
    assert names and all(getattr(settings, name) == getattr(config, name) for name in names)
    assert all(getattr(settings, name) != ISSUE_DEFAULTS[name] for name in names)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(settings, names[0], None)


def test_allowed_values_come_from_the_modules_that_use_them():
    assert config_module.LOSS_AGG_MODES is loss_module.LOSS_AGG_MODES
    assert config_module.REPROMPT_TRUNCATIONS is reprompt_module.REPROMPT_TRUNCATIONS
