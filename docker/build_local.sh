#!/usr/bin/env bash
# Build the CPU image of docker/Dockerfile on this machine, without Docker and without a registry of images
# (Debian, as root): a debootstrap base, a wheelhouse filled by the host's pip, then buildah.
#
#   docker/build_local.sh            # all three steps below (base and wheels are kept once made; the image is rebuilt)
#   docker/build_local.sh base       # localhost/debian-min:bookworm: debootstrap --variant=minbase + podman import
#   docker/build_local.sh wheels     # docker/wheelhouse: torch 2.13.0 and every dependency, as wheels
#   docker/build_local.sh image      # localhost/connito:cpu: buildah bud --isolation chroot on that base
#
# Environment: BASE_IMAGE (localhost/debian-min:bookworm), IMAGE (localhost/connito:cpu), SUITE (bookworm),
# PYTHON (the interpreter whose pip fills the wheelhouse and whose installed versions it pins: .venv/bin/python when
# there is one, else python3), REBUILD=1 to redo a step whose result exists.
# Tools: apt-get install -y debootstrap podman buildah. Run docker/run_local.sh to use the image.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-min:bookworm}
IMAGE=${IMAGE:-localhost/connito:cpu}
SUITE=${SUITE:-bookworm}
# Python, and the C++ compiler and headers DeepSpeed uses to JIT-build its CPU shm comm op at the first run.
PACKAGES=python3,python3-venv,python3-pip,g++,python3-dev
WHEELHOUSE=$REPO/docker/wheelhouse
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi

die() { echo "build_local: $*" >&2; exit 1; }
need() {  # need TOOL...: every tool on PATH, or the apt-get line that installs them
  local missing=()
  for tool in "$@"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  [[ ${#missing[@]} -eq 0 ]] || die "missing ${missing[*]}: install with 'apt-get install -y debootstrap podman buildah' (as root)"
}
image_exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }
step() { echo "build_local: $*" >&2; }
quiet_pip() {  # pip, without the warnings the host's file:// index prints for every package it does not hold
  "$PYTHON" -m pip "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}

make_base() {
  need podman buildah debootstrap
  if image_exists "$BASE_IMAGE" && [[ -z "${REBUILD:-}" ]]; then
    step "base $BASE_IMAGE already there (REBUILD=1 to redo)"; return
  fi
  [[ $(id -u) = 0 ]] || die "debootstrap needs root"
  local rootfs t0=$SECONDS
  rootfs=$(mktemp -d /var/tmp/connito-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' RETURN
  step "debootstrap $SUITE into $rootfs"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" >"$rootfs.log" 2>&1 \
    || { tail -20 "$rootfs.log" >&2; die "debootstrap failed (log: $rootfs.log)"; }
  rm -f "$rootfs.log"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  step "base $BASE_IMAGE made in $((SECONDS - t0))s"
}

fill_wheels() {
  if [[ -f "$WHEELHOUSE/constraints.txt" && -z "${REBUILD:-}" ]]; then
    step "wheelhouse $WHEELHOUSE already filled (REBUILD=1 to redo)"; return
  fi
  "$PYTHON" -c 'import torch' 2>/dev/null \
    || die "$PYTHON has no torch: make the venv first (python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -e '.[test]'), or set PYTHON"
  local t0=$SECONDS tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  rm -rf "$WHEELHOUSE.tmp" && mkdir -p "$WHEELHOUSE.tmp"
  # Pin what the host runs (the versions the tests passed with); Connito itself is built in the image from source.
  "$PYTHON" -m pip freeze --exclude-editable | grep -v -i -E '^(connito|-e )' >"$WHEELHOUSE.tmp/constraints.txt"
  # Connito's own requirements, read from setup.py without installing anything.
  (cd "$REPO" && "$PYTHON" -c 'import ast, pathlib
tree = ast.parse(pathlib.Path("setup.py").read_text())
for node in ast.walk(tree):
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "INSTALL_REQUIRES":
        print("\n".join(ast.literal_eval(node.value)))') >"$tmp/requirements.txt"
  step "wheelhouse: pip wheel of $(wc -l <"$tmp/requirements.txt") requirements and their dependencies (host pip settings)"
  # The host's pip settings apply here (its index, find-links, the local torch wheel); sdists become wheels.
  quiet_pip wheel -q -w "$WHEELHOUSE.tmp" -c "$WHEELHOUSE.tmp/constraints.txt" torch==2.13.0 \
    || die "pip could not fetch torch==2.13.0 (see above)"
  quiet_pip wheel -q -w "$WHEELHOUSE.tmp" -c "$WHEELHOUSE.tmp/constraints.txt" \
    -r "$tmp/requirements.txt" setuptools wheel || die "pip wheel failed (see above)"
  rm -rf "$WHEELHOUSE" && mv "$WHEELHOUSE.tmp" "$WHEELHOUSE"
  step "wheelhouse filled in $((SECONDS - t0))s: $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
}

build_image() {
  need buildah
  local problems=()
  image_exists "$BASE_IMAGE" || problems+=("no base image $BASE_IMAGE: make it with 'docker/build_local.sh base'")
  [[ -f "$WHEELHOUSE/constraints.txt" ]] \
    || problems+=("no wheelhouse in $WHEELHOUSE: fill it with 'docker/build_local.sh wheels'")
  if [[ ${#problems[@]} -gt 0 ]]; then
    for line in "${problems[@]}"; do echo "build_local: $line" >&2; done
    exit 1
  fi
  local t0=$SECONDS old
  old=$(buildah inspect --type image --format '{{.FromImageID}}' "$IMAGE" 2>/dev/null || true)
  step "buildah bud $IMAGE on $BASE_IMAGE"
  (cd "$REPO" && buildah bud --isolation chroot --layers=false --build-arg BASE="$BASE_IMAGE" \
    --ignorefile docker/Dockerfile.dockerignore -f docker/Dockerfile -t "$IMAGE" .)
  # The image this build replaced, now without a name: removed (a base it was built on is kept).
  if [[ -n "$old" && "$old" != "$(buildah inspect --type image --format '{{.FromImageID}}' "$IMAGE")" ]]; then
    buildah rmi "$old" >/dev/null 2>&1 || true
  fi
  step "image $IMAGE built in $((SECONDS - t0))s"
}

case "${1:-all}" in
  base) make_base ;;
  wheels) fill_wheels ;;
  image) build_image ;;
  all) make_base; fill_wheels; build_image ;;
  *) die "unknown step '$1': use base, wheels, image or all" ;;
esac
