"""A test callback that holds every rank still right after one checkpoint so a test can kill one rank at a known
point (``plugins='[tests.training.hold_ranks_callback]'``, ``+callbacks.hold_ranks.at_step=3``).

After saving the ``at_step`` checkpoint each rank writes its pid to ``<run>/held_rank<r>`` and waits until
``<run>/release`` exists or ``timeout`` seconds pass. It changes no weights, and a run resumed from that checkpoint
does not save it again, so it does not hold twice."""

from __future__ import annotations

import os
import time

from connito.training.callbacks import Callback, register_callback


@register_callback("hold_ranks")
class HoldRanksCallback(Callback):
    def __init__(self, at_step: int, timeout: float = 300.0):
        self.at_step, self.timeout = at_step, timeout

    def on_save(self, trainer, checkpoint) -> None:
        if trainer.state.step != self.at_step:
            return
        (trainer.run_dir / f"held_rank{trainer.info.rank}").write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout
        while not (trainer.run_dir / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
