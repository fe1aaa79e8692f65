"""A test callback that holds a training run still right after one checkpoint, so a test can kill it at a known
point instead of racing a run that may finish in under a second (``plugins='[tests.training.pause_callback]'``,
``+callbacks.pause.at_step=2`` ``+callbacks.pause.run=branch-code``).

On the chosen run (matched by its run directory's name) it writes ``<run>/paused`` after saving the ``at_step``
checkpoint, then waits until ``<run>/release`` exists or ``timeout`` seconds pass. It changes no weights, and a run
resumed from that checkpoint does not save it again, so it does not pause twice."""

from __future__ import annotations

import time

from connito.training.callbacks import Callback, register_callback


@register_callback("pause")
class PauseCallback(Callback):
    def __init__(self, at_step: int, run: str, timeout: float = 600.0):
        self.at_step, self.run, self.timeout = at_step, run, timeout

    def on_save(self, trainer, checkpoint) -> None:
        if trainer.state.step != self.at_step or trainer.run_dir.name != self.run:
            return
        (trainer.run_dir / "paused").write_text(str(checkpoint))
        deadline = time.monotonic() + self.timeout
        while not (trainer.run_dir / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
