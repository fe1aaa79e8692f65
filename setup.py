"""Connito: modular Mixture-of-Experts training on DeepSpeed.

Install torch first (``pip install torch==2.13.0`` takes the local CPU wheel on our machines), then
``pip install -e ".[test]"``; see README.md.

torch, deepspeed and transformers are pinned to the versions tested together: Connito reads and rewrites
DeepSpeed 0.19.8's private stage-0 checkpoint files and relies on its AutoEP, which breaks on transformers
5.23.0. ``torch==2.13.0`` also accepts local builds of that version (2.13.0+cpu, 2.13.0+cu126, ...). The other
dependencies are ranges.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

INSTALL_REQUIRES = [
    "torch==2.13.0",  # matches local builds too: 2.13.0+cpu, 2.13.0+cu126
    # Connito parses this version's private ZeRO stage-0 checkpoint files and runs expert parallelism on its AutoEP.
    "deepspeed==0.19.8",
    # DeepSpeed 0.19.8's AutoEP breaks on transformers 5.23.0 (_CanRecordRegistry.get() signature).
    "transformers==5.22.2",
    # Load balancing for every family runs on megatron-core's router utilities (connito.routing.balancing);
    # 0.16.1 is the last release that installs on Python 3.11 (0.17+ needs 3.12), and the one tested.
    "megatron-core==0.16.1",
    "hydra-core>=1.3.2,<1.4",
    "omegaconf>=2.3",
    "datasets>=3.0",
    "tokenizers>=0.21",
    "safetensors>=0.4",
    "wandb>=0.18",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "numpy>=1.26",
]

EXTRAS = {
    "test": ["pytest>=8", "pytest-timeout>=2.3", "triton>=3.9"],
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "triton>=3.9", "ruff>=0.6", "pre-commit>=3"],
}

setup(
    name="connito",
    version="0.1.0",
    description="Train, inspect, adapt, compose and retire the experts of Mixture-of-Experts language models",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["connito", "connito.*"]) + ["connito._configs", "connito.kernels"],
    # The Hydra configs live at the top level (configs/) in the source tree; an installed (non-editable)
    # copy carries them inside the package as connito/_configs. connito.cli.paths finds either. The kernels
    # (kernels/, top level) install as connito.kernels: a top-level "kernels" would shadow Hugging Face's package.
    package_dir={"connito._configs": "configs", "connito.kernels": "kernels"},
    package_data={"connito._configs": ["*.yaml", "*/*.yaml", "*/*/*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["connito=connito.cli.main:main"]},
)
