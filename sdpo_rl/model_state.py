"""Put a caller's model back exactly as it was after a trainer has been built around it.

Building and running a trainer changes the model it is given in place: PEFT's adapter layers and wrappers
(`modules_to_save`, trainable tokens) replace modules inside their parents, TRL's fused head sets a `forward`
attribute, dropout is zeroed, PEFT adds `peft_config`, Trainer sets `config.use_cache`, base weights are frozen.
`restored(model)` records every module of the model and every configuration they hold, and puts back each one's
attributes (the same objects, and the same items in those that are dicts, lists or sets: submodules, parameters,
buffers, hooks) and each parameter's `requires_grad` flag. It holds references only and copies no weights: use it
around work that does not change parameter values in place (`sdpo_rl.solve` trains adapters it then removes,
`sdpo_rl.preflight` trains nothing).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


@contextmanager
def restored(model: nn.Module, who: str = "sdpo_rl") -> Iterator[nn.Module]:
    """Within the block `model` may be changed in place (not its parameter values); on exit, also after an error, it is
    put back as it was. An error of the block propagates; one in the restoring is raised after it, chained to it and
    naming `who` restored."""
    restore = _Restore(model)
    try:
        yield model
    except BaseException as error:
        try:
            restore()
        except Exception as cleanup_error:
            raise RuntimeError(
                f"{who} could not restore the caller's model after {type(error).__name__} ({error}): "
                f"{type(cleanup_error).__name__} ({cleanup_error})."
            ) from error
        raise
    restore()


class _Restore:
    """Puts back every module of a model, and every configuration they hold, as it was when this was made."""

    def __init__(self, model: nn.Module):
        self.objects = [(obj, {k: (v, _items(v)) for k, v in vars(obj).items()}) for obj in _modules_and_configs(model)]
        self.flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]

    def __call__(self) -> None:
        for obj, attributes in self.objects:
            state = vars(obj)
            for key in state.keys() - attributes.keys():
                del state[key]
            for key, (value, items) in attributes.items():
                state[key] = value
                if items is not None:
                    _put_back(value, items)
        for parameter, flag in self.flags:
            parameter.requires_grad_(flag)


def _modules_and_configs(model: nn.Module) -> list:
    """Every module of `model` and every configuration (model or generation config, with their sub-configurations)
    that one of them holds: the trainer sets attributes of the model's config, such as `use_cache`."""
    from transformers import GenerationConfig, PretrainedConfig

    found, pending = {}, list(model.modules())
    while pending:
        obj = pending.pop()
        if id(obj) not in found:
            found[id(obj)] = obj
            pending += [v for v in vars(obj).values() if isinstance(v, (PretrainedConfig, GenerationConfig))]
    return list(found.values())


def _items(value: Any) -> tuple | None:
    """A copy of the items of a dict, list or set attribute, whose contents training may change in place."""
    if isinstance(value, dict):
        return tuple(value.items())
    if isinstance(value, (list, set)):
        return tuple(value)
    return None


def _put_back(container: dict | list | set, items: tuple) -> None:
    container.clear()
    container.extend(items) if isinstance(container, list) else container.update(items)
