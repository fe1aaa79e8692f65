"""What the composition pipeline tests share: a typed config with dotted changes, the small-data arguments that
make a whole pipeline run in about a minute, and running ``connito`` in a clean child process."""

import subprocess
import sys
from pathlib import Path

from tests.helpers import clean_env

TRAIN = ["train.micro_batch_size=4", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
         "logging.progress=false"]  # fmt: skip


def config(cls, tmp_path: Path, name: str, **changes):
    """``cls()`` with ``run`` under ``tmp_path/name`` and each ``"a.b": value`` change set."""
    cfg = cls()
    cfg.run.root, cfg.run.name = str(tmp_path), name
    for key, value in changes.items():
        target = cfg
        *path, last = key.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, last, value)
    return cfg


def small(command: str, tmp_path: Path, data_cache: Path, name: str, *extra: str, train=TRAIN) -> list[str]:
    """``connito <command>`` arguments on small data (vocab 512, rows of 64 tokens), every trainer quiet."""
    return [
        command, f"run.root={tmp_path}", f"run.name={name}", f"data.cache_dir={data_cache}",
        "data.max_chars_per_domain=120000", "data.vocab_size=512", "data.seq_len=64",
        "train_overrides=[" + ",".join(f"'{o}'" for o in train) + "]", *extra,
    ]  # fmt: skip


def connito(args: list[str], cwd: Path, timeout: int = 900, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "connito", *args], cwd=cwd, env=clean_env(**env),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
