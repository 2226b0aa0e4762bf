"""Put a caller's model back exactly as it was after a trainer has been built around it.

Building a trainer changes the model it is given in place: TRL adds an instance `forward` (its fused LM head), zeroes
dropout, may patch or replace the head; `SDPOTrainer` may add a teacher adapter to a PEFT model. `restored(model)`
records every module's attributes and its dicts of submodules, parameters, buffers and hooks, and puts them back on
exit, so that the same module objects hold the same parameters, flags and hooks as before. Parameter values are not
copied: use it around work that does not train.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def restored(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block `model` may be changed in place, except its parameter values; on exit (also after an error)
    every module that was in it has its attributes, submodules, parameters, buffers and hooks as they were."""
    saved = [(module, _attributes(module)) for module in model.modules()]
    try:
        yield model
    finally:
        for module, attributes in saved:
            _put_back(module, attributes)


def _attributes(module: nn.Module) -> dict:
    """A copy of `module.__dict__`, with its dict values (submodules, parameters, buffers, hooks) copied one level."""
    return {name: (value, dict(value) if isinstance(value, dict) else None) for name, value in vars(module).items()}


def _put_back(module: nn.Module, attributes: dict) -> None:
    state = vars(module)
    for name in set(state) - set(attributes):
        del state[name]
    for name, (value, contents) in attributes.items():
        state[name] = value
        if contents is not None:  # the same dict object, with its former contents (an OrderedDict keeps its order)
            value.clear()
            value.update(contents)
