"""Where the commands look when no path is given: what the README's first command (``connito quickstart``) or
``connito train`` with no arguments wrote, whichever was written last.

* ``connito train`` (run ``runs/quickstart``): the export ``runs/quickstart/hf``, its routing analysis
  ``runs/quickstart/analysis``;
* ``connito quickstart`` (pipeline ``runs/lifecycle``): the base ``runs/lifecycle/base/hf``, its analysis
  ``runs/lifecycle/analysis`` (:mod:`connito.orchestration.quickstart` lays them out so); ``connito analyze`` of that
  base writes ``runs/lifecycle/base/analysis`` (next to the model).

Paths are relative to the working directory, as the commands' own defaults are.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = (Path("runs/quickstart/hf"), Path("runs/lifecycle/base/hf"))
ANALYSES = (Path("runs/quickstart/analysis"), Path("runs/lifecycle/analysis"), Path("runs/lifecycle/base/analysis"))


def _newest(candidates: tuple[Path, ...], marker: str) -> Path:
    written = [path for path in candidates if (path / marker).is_file()]
    if not written:
        return candidates[0]
    return max(written, key=lambda path: (path / marker).stat().st_mtime)


def default_checkpoint() -> Path:
    """The newest of the checkpoints the quickstart and ``connito train`` write; the first when neither exists."""
    return _newest(CHECKPOINTS, "config.json")


def default_analysis() -> Path:
    """The newest of their routing analyses; the first when neither exists."""
    return _newest(ANALYSES, "analysis.json")


HINT = "run `connito quickstart` (or `connito train`) first"
