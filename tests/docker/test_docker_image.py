"""The CPU image of docker/Dockerfile, built and run for real on this machine (no Docker daemon, no image registry).

docker/build_local.sh makes a debootstrap base, fills a wheelhouse from the host's pip and builds the image with
buildah; docker/run_local.sh runs `connito train` in it with the run directory and a data cache prepared on the host
mounted. The exported model is then read on the host with plain transformers. Needs root and
`apt-get install -y debootstrap podman buildah`; skips otherwise, or fails under CI=true (tests/infra.py).
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, clean_env, run_cli, small_overrides
from tests.infra import require

IMAGE = "localhost/connito:cpu"
TOOLS = ("debootstrap", "podman", "buildah")


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (debootstrap and buildah's chroot isolation)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)}: apt-get install -y debootstrap podman buildah"
    return None


pytestmark = pytest.mark.docker


@pytest.fixture(autouse=True)
def _image_tools() -> None:
    require(_why_not())


def _script(name: str, args: list[str], timeout: int, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(REPO / "docker" / name), *args],
        cwd=REPO,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_missing_base_image_or_wheelhouse_names_the_command_that_makes_it(tmp_path):
    # A copy of the script in a tree without a wheelhouse, asked for a base image nobody made.
    (tmp_path / "docker").mkdir()
    shutil.copy(REPO / "docker" / "build_local.sh", tmp_path / "docker")
    proc = subprocess.run(
        [str(tmp_path / "docker" / "build_local.sh"), "image"],
        env=clean_env(BASE_IMAGE="localhost/connito-test-no-such-base:none"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "no base image localhost/connito-test-no-such-base:none" in proc.stderr
    assert "'docker/build_local.sh base'" in proc.stderr
    assert "'docker/build_local.sh wheels'" in proc.stderr

    proc = _script("run_local.sh", ["train"], timeout=60, IMAGE="localhost/connito-test-no-such-image:none")
    assert proc.returncode != 0 and "build it with 'docker/build_local.sh'" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(2400)  # a fresh machine: debootstrap (~2-3 min), wheelhouse (~1 min), image (~4-7 min)
def test_the_cpu_image_builds_trains_and_exports_a_model_transformers_loads(data_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    # 1. The image, from the current tree (the base and the wheelhouse are kept between runs).
    t0 = time.perf_counter()
    proc = _script("build_local.sh", [], timeout=1500, IMAGE=IMAGE)
    build_s = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    inspect = subprocess.run(
        ["buildah", "inspect", "--type", "image", IMAGE], capture_output=True, text=True, check=True
    )
    config = json.loads(inspect.stdout)["OCIv1"]["config"]
    assert config["Entrypoint"] == ["connito"]
    assert config["User"] not in ("", "0", "root", "0:0")
    assert {"/cache", "/work/runs"} <= set(config.get("Volumes") or {})
    assert config["WorkingDir"] == "/work"

    # 2. The data, prepared on the host (the container needs no network): the same data.* settings give the same
    # cache key inside. The container only reads the cache: it stays owned by root, readable by the image's user
    # (pytest makes its temporary directories 0700), so a container that tried to prepare again would fail.
    data = [o for o in small_overrides(data_cache) if o.startswith("data.")]
    proc = run_cli(["data", "prepare", *data], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data_cache.chmod(0o755)

    # 3. `connito train` for three steps inside the image, the run directory mounted from the host.
    runs = tmp_path / "runs"
    train = ["train", "train.steps=3", "train.eval_every=0", "run.name=docker", "model=qwen3_moe_tiny"]
    train += [o for o in small_overrides(Path("/cache")) if not o.startswith("data.cache_dir")]
    t0 = time.perf_counter()
    proc = _script("run_local.sh", train, timeout=900, IMAGE=IMAGE, RUN_DIR=str(runs), CACHE_DIR=str(data_cache))
    run_s = time.perf_counter() - t0
    print(f"docker image: build {build_s:.0f}s, train in the container {run_s:.0f}s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # 4. On the host: the run's summary and the exported model, read by plain transformers.
    run_dir = runs / "docker"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    assert model.config.model_type == "qwen3_moe"
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_experts) == (128, 4, 8)
    assert model.config.vocab_size == 512
    assert (run_dir / "hf").stat().st_uid != 0  # written by the image's non-root user
