"""Where the Hydra configs are: ``configs/`` of a source checkout, or ``connito/_configs`` of an installed copy."""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]


def config_dir() -> str:
    for candidate in (_PACKAGE.parent / "configs", _PACKAGE / "_configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"Connito's Hydra configs are missing (looked in {_PACKAGE.parent / 'configs'} and {_PACKAGE / '_configs'}). "
        "Reinstall the package: pip install -e ."
    )
