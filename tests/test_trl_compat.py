import pytest
import trl
from trl import GRPOTrainer

from sdpo_rl import _trl_compat
from sdpo_rl._trl_compat import IncompatibleTRLError, check_batch, check_trl


def test_installed_trl_is_supported():
    check_trl()


def test_unsupported_version_names_the_supported_range(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.17.2")
    with pytest.raises(IncompatibleTRLError, match=r"trl>=1\.16\.0,<1\.17\.0 \(found trl 1\.17\.2"):
        check_trl()


def test_a_missing_internal_is_named(monkeypatch):
    monkeypatch.delattr(GRPOTrainer, "_calculate_rewards")
    with pytest.raises(IncompatibleTRLError, match="GRPOTrainer._calculate_rewards no longer exists"):
        check_trl()


def test_a_changed_signature_is_named(monkeypatch):
    monkeypatch.setattr(GRPOTrainer, "_compute_loss", lambda self, inputs: None)
    with pytest.raises(IncompatibleTRLError, match="_compute_loss takes"):
        check_trl()


def test_loss_scaling_contract_is_checked(monkeypatch):
    monkeypatch.setattr(GRPOTrainer, "loss_is_scaled_for_ga", False)
    with pytest.raises(IncompatibleTRLError, match="gradient accumulation"):
        check_trl()


def test_batch_keys_are_checked():
    with pytest.raises(IncompatibleTRLError, match="no longer returns completion_mask"):
        check_batch({key: None for key in _trl_compat.BATCH_KEYS if key != "completion_mask"})


def test_a_renamed_optional_batch_key_is_named(monkeypatch):
    def loss_without_tool_mask(self, model, inputs):
        mask = inputs["completion_mask"] * inputs.get("old_per_token_logps") * inputs["importance_sampling_ratio"]
        return mask.sum()

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", loss_without_tool_mask)
    with pytest.raises(IncompatibleTRLError, match="_compute_loss no longer reads the batch key 'tool_mask'"):
        check_trl()


def test_a_missing_grpo_config_field_is_named(monkeypatch):
    from trl import GRPOConfig

    fields = {k: v for k, v in GRPOConfig.__dataclass_fields__.items() if k != "top_entropy_quantile"}
    monkeypatch.setattr(GRPOConfig, "__dataclass_fields__", fields)
    with pytest.raises(IncompatibleTRLError, match="GRPOConfig no longer has top_entropy_quantile"):
        check_trl()


def test_a_changed_logprob_kernel_is_named(monkeypatch):
    from trl import kernels

    monkeypatch.setattr(kernels.ChunkedLogProbFunction, "forward", staticmethod(lambda ctx, hidden, weight: None))
    with pytest.raises(IncompatibleTRLError, match="ChunkedLogProbFunction.forward takes"):
        check_trl()
