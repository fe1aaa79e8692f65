#!/usr/bin/env bash
# Run `connito <args>` in the image docker/build_local.sh made, on this machine, where `podman run` cannot start
# containers (crun cannot set rlimits here): a buildah working container run with --isolation chroot, as the
# image's non-root user, in its working directory /work, with the image's environment and two host directories
# mounted on the image's volumes. Removed again afterwards.
#
#   docker/run_local.sh train train.steps=3                     # = docker run -v RUN_DIR:/work/runs -v CACHE_DIR:/cache IMAGE train ...
#   RUN_DIR=/tmp/runs CACHE_DIR=/tmp/cache docker/run_local.sh data prepare
#
# Environment: IMAGE (localhost/connito:cpu); RUN_DIR (./runs) on /work/runs; CACHE_DIR (the host's cache:
# $CONNITO_CACHE, else ~/.cache/connito) on /cache; OMP_NUM_THREADS and WANDB_MODE pass through when set.
# The container has no network of its own to rely on: prepare the data on the host first (`connito data prepare`
# with the same data.* settings, into CACHE_DIR), so the container finds it ready. The image's user must be able to
# write RUN_DIR (this script gives it RUN_DIR when it creates it) and, unless the data is already prepared, CACHE_DIR.
set -euo pipefail
IMAGE=${IMAGE:-localhost/connito:cpu}
RUN_DIR=${RUN_DIR:-$PWD/runs}
CACHE_DIR=${CACHE_DIR:-${CONNITO_CACHE:-$HOME/.cache/connito}}

die() { echo "run_local: $*" >&2; exit 1; }
command -v buildah >/dev/null || die "missing buildah: install with 'apt-get install -y debootstrap podman buildah' (as root)"
buildah inspect --type image "$IMAGE" >/dev/null 2>&1 || die "no image $IMAGE: build it with 'docker/build_local.sh'"
[[ -d "$CACHE_DIR" ]] || die "no data cache $CACHE_DIR: prepare it on the host with 'CONNITO_CACHE=$CACHE_DIR connito data prepare'"

user=$(buildah inspect --type image --format '{{.OCIv1.Config.User}}' "$IMAGE")
if [[ ! -d "$RUN_DIR" ]]; then
  mkdir -p "$RUN_DIR"
  [[ -n "$user" ]] && chown "$user" "$RUN_DIR"
fi

ctr=$(buildah from --quiet --pull=never "$IMAGE")
trap 'buildah rm "$ctr" >/dev/null' EXIT
# buildah run would put a fresh anonymous volume over each of the image's VOLUMEs, hiding the -v mounts below:
# drop them from this working container (the image keeps them).
buildah config --volume /work/runs- --volume /cache- "$ctr"
envs=()
for name in OMP_NUM_THREADS WANDB_MODE; do
  [[ -n "${!name:-}" ]] && envs+=(-e "$name=${!name}")
done
# buildah run does not apply the image's ENTRYPOINT: name connito explicitly.
buildah run --isolation chroot ${user:+--user "$user"} "${envs[@]}" \
  -v "$(realpath "$RUN_DIR"):/work/runs" -v "$(realpath "$CACHE_DIR"):/cache" \
  "$ctr" -- connito "$@"
