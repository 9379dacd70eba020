"""``last.ckpt``: the training state at the end of every epoch, for resuming and for evaluating the final model."""

from __future__ import annotations

from pytorch_lightning.callbacks import ModelCheckpoint

__all__ = ["LastCheckpoint"]


class LastCheckpoint(ModelCheckpoint):
    """Write ``<checkpoint dir>/last.ckpt`` at the end of every training epoch, overwriting the previous one.

    Lightning's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` only when its top-k checkpoint is saved,
    which with a monitored metric means only when the metric improves: ``last.ckpt`` would then hold the best
    epoch, and resuming from it would repeat every epoch since. This callback has no monitor, so it saves after
    each epoch whatever the validation schedule; the best checkpoint stays the job of a monitored
    ``ModelCheckpoint`` next to it.
    """

    def __init__(self) -> None:
        super().__init__(
            filename="last",
            monitor=None,
            save_top_k=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )
