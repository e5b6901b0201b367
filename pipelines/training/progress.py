"""One progress bar per training run: steps done, loss, learning rate and the ETA.

transformers prints every logged step as a raw dict (its `PrinterCallback` without tqdm, and
its `ProgressCallback` writes the same dict under the bar); with `logging_steps: 1` that is one
line per step. `use_progress_bar` swaps both for this bar; the full curve still goes to
`plots/train/<name>.csv` and MLflow.
"""

from __future__ import annotations

from typing import Any

from transformers import PrinterCallback, ProgressCallback, TrainerCallback


class ProgressBar(TrainerCallback):
    """A tqdm bar over optimizer steps, with the latest loss and learning rate."""

    def __init__(self, desc: str, enabled: bool = True):
        self.desc, self.enabled = desc, enabled
        self.bar: Any = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.enabled and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc=self.desc,
                unit="step",
                dynamic_ncols=True,
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(
                loss=f"{logs['loss']:.4f}",
                lr=f"{logs.get('learning_rate', 0.0):.2e}",
                refresh=False,
            )

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def use_progress_bar(trainer: Any, desc: str, enabled: bool = True) -> None:
    """Replace transformers' per-step printing on `trainer` with one `ProgressBar`."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressBar(desc, enabled))
