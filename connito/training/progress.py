"""A progress bar for rank 0: step, loss and tokens/s."""

from tqdm.auto import tqdm


class Progress:
    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self._bar = None
        if enabled:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self._bar is None:
            return
        self._bar.n = step
        self._bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
