"""Where Connito's Hydra configs are (``configs/`` of a source checkout, ``connito/_configs`` of an installed copy)
and the model presets among them (``configs/model/<name>.yaml``).

Layer 1: the faces (``connito.cli``) find their configs here and the pipelines (``connito.orchestration``) read a
preset's family or ``hf_config`` here, without the pipelines importing the command line.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]


def config_dir() -> str:
    """The directory of Connito's Hydra configs; ``FileNotFoundError`` naming the fix when neither copy exists."""
    for candidate in (_PACKAGE.parent / "configs", _PACKAGE / "_configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"Connito's Hydra configs are missing (looked in {_PACKAGE.parent / 'configs'} and {_PACKAGE / '_configs'}). "
        "Reinstall the package: pip install -e ."
    )


def model_preset(name: str, option: str) -> dict:
    """The ``configs/model/<name>.yaml`` preset as a dict; ``option`` (e.g. ``seed.model``) names the setting in the
    error that lists the presets."""
    from omegaconf import OmegaConf

    presets = Path(config_dir()) / "model"
    path = presets / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in presets.glob("*.yaml")))
        raise ValueError(f"{option}={name!r} is not a model preset; the presets: {known}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
