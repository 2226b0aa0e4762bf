"""`end_training(trainer)`: end a run of several processes so that every process exits cleanly.

`Accelerator.end_training` destroys torch.distributed's process group, but that only drops torch's own references to
it: the DDP wrapper of the model holds another, so the group and its gloo worker threads stay alive until the
interpreter exits. A worker thread that frees the tensors of a collective just as the interpreter begins to finalize
must take the GIL; CPython then ends the thread with a forced unwind, which C++ turns into `std::terminate`, and the
process aborts after training has finished ("terminate called without an active exception"; docs/distributed.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import Trainer


def end_training(trainer: Trainer) -> None:
    """Release `trainer`'s wrapped model, end its trackers and destroy the process group.

    When nothing else holds the group (the script keeps no other reference to the wrapped model; FSDP2 holds it
    itself), its threads are joined before this returns. Call it once training, saving and evaluation are done: the
    trainer cannot use several processes afterwards. With one process there is no group to destroy.
    """
    trainer.model_wrapped = trainer.model
    trainer.accelerator.free_memory()  # drops the accelerator's references to the DDP wrapper and collects it
    trainer.accelerator.end_training()
