"""Small collectives the checkpoint code shares: a barrier that is a no-op in one process, and one-rank work
whose failure every rank hears about."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger("connito.training")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class ConversionError(RuntimeError):
    """Raised on the ranks that waited for a conversion rank 0 failed; carries rank 0's traceback."""


def convert_once_on_main(marker: Path, convert: Callable[[], None], what: str, is_main: bool) -> None:
    """Collective: rank 0 runs ``convert`` unless ``marker`` already exists (a finished earlier conversion).

    A failure on rank 0 is re-raised there as it is (its traceback intact); every other rank raises
    :class:`ConversionError` with rank 0's formatted traceback, so no rank waits forever for a conversion that
    failed and no rank loses the cause."""
    failure: list[str] = [""]
    error: BaseException | None = None
    if is_main and not marker.is_file():
        log.info("%s", what)
        try:
            convert()
        except Exception as exc:  # noqa: BLE001 - re-raised below after the other ranks heard of it
            error = exc
            failure[0] = traceback.format_exc()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(failure, src=0)
    if error is not None:
        raise error
    if failure[0]:
        raise ConversionError(f"{what} failed on rank 0:\n{failure[0]}")
