"""Adapter-only checkpoints when ``transformers.Trainer`` trains a natively attached adapter.

``Trainer`` writes every checkpoint with the model's own ``save_pretrained``: the whole
model (88 MB for all-MiniLM-L6-v2, 13 GB for a 7B model), and it resumes by loading that
back. ``AdapterTrainer`` is ``Trainer`` whose checkpoints (``checkpoint-N/``, and
``save_model()``) hold the adapter only: ``adapted.save`` — the gates, the trained
modules (a task head), the record with every hash — beside Trainer's own optimizer,
scheduler, RNG and state files, which it writes as usual. Resuming
(``trainer.train(resume_from_checkpoint=...)``) and ``load_best_model_at_end`` put the
saved adapter back into the live one (``Adapted.restore``: every check of ``load``),
and Trainer restores the optimizer and the step as usual, so a resumed run continues
where the saved one stopped. ``save_model()`` into an output directory that already holds
``checkpoint-*`` folders writes the adapter beside them and touches nothing else
(``atomic_dir``).

``AdapterCheckpoints`` is the same as a mixin, for another ``Trainer`` subclass
(``class MyTrainer(AdapterCheckpoints, SFTTrainer)``).
"""
from __future__ import annotations

from transformers import Trainer

from qcircuit import QCError

from .adapter import Adapted

__all__ = ["AdapterCheckpoints", "AdapterTrainer"]


class AdapterCheckpoints:
    """A ``Trainer`` mixin: checkpoints hold ``adapter`` (an ``Adapted``) only."""

    def __init__(self, *args, adapter: Adapted, **kwargs):
        if not isinstance(adapter, Adapted):
            raise QCError(f"adapter= takes what attach or load returned, got "
                          f"{type(adapter).__name__}")
        if not args and "model" not in kwargs:
            kwargs["model"] = adapter.model
        super().__init__(*args, **kwargs)
        if self.model is not adapter.model:
            raise QCError("the Trainer's model is not the adapter's model: pass "
                          "model=adapted.model (or leave model out)")
        self.adapter = adapter

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapter, where Trainer would write the whole model (every rank calls this:
        the adapter's save is collective, rank 0 writes)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self.adapter.save(output_dir)
        if self.args.should_save and self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume: the checkpoint's adapter into the live one (Trainer restores the rest)."""
        self.adapter.restore(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self.adapter.restore(self.state.best_model_checkpoint)


class AdapterTrainer(AdapterCheckpoints, Trainer):
    """``transformers.Trainer`` with adapter-only checkpoints:
    ``AdapterTrainer(adapter=attach(model, "adapter.qc"), args=..., train_dataset=...)``."""
