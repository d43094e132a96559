#!/bin/bash
# longctx on a Cloud TPU pod slice (TPU VM): copy this checkout to every worker, install, train.
#
#   TPU_NAME=my-v5p-256 ZONE=us-east5-a WORKDIR=gs://my-bucket/xverse-256k \
#     CONFIG=configs/xverse_13b_abf_ntk_256k.py \
#     bash launch/tpu_pod.sh --config.init.path=/models/XVERSE-13B
#   DRY_RUN=1 bash launch/tpu_pod.sh           # print the gcloud commands, run nothing
#
# Arguments are passed on to `python -m longctx.launch` (--config.* overrides). Every worker runs
# one process; jax.distributed.initialize() finds the others from the TPU metadata. WORKDIR must
# be a location every worker sees (a gs:// bucket the TPU's service account can write).
# Paths in overrides (init.path, data paths) are read on the workers: put models and data on
# every worker (or a mounted bucket) first. Run this script inside tmux / screen: the job lives
# as long as the ssh sessions.
set -euo pipefail

# ---- edit or set in the environment --------------------------------------------------------------
TPU_NAME=${TPU_NAME:-longctx-v5p}
ZONE=${ZONE:-us-east5-a}
PROJECT=${PROJECT:-}                        # empty: gcloud's default project
CONFIG=${CONFIG:-configs/xverse_13b_abf_ntk_256k.py}
WORKDIR=${WORKDIR:-gs://YOUR_BUCKET/longctx/$(basename "$CONFIG" .py)}
REMOTE_DIR=${REMOTE_DIR:-longctx}           # the checkout on each worker, relative to ~
JAX_VERSION=${JAX_VERSION:-0.10.2}          # the jax pinned in requirements.txt, plus libtpu
# XLA TPU flags go in LIBTPU_INIT_ARGS; libtpu aborts on unknown ones, so check them against
# your libtpu version before adding any.
LIBTPU_INIT_ARGS=${LIBTPU_INIT_ARGS:-}

tpu_vm=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE" --worker=all)
if [[ -n "$PROJECT" ]]; then where+=(--project="$PROJECT"); fi

run() {  # print under DRY_RUN, else execute
  if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# 1. ship this checkout (tracked and untracked-but-not-ignored files) to every worker
root=$(cd "$(dirname "$0")/.." && pwd)
tarball=$(mktemp "${TMPDIR:-/tmp}/longctx.XXXXXX")
trap 'rm -f "$tarball"' EXIT
if [[ -z "${DRY_RUN:-}" ]]; then
  (cd "$root" && git ls-files -z --cached --others --exclude-standard \
    | tar --null -czf "$tarball" -T -)
fi
run "${tpu_vm[@]}" scp "$tarball" "$TPU_NAME:longctx.tgz" "${where[@]}"

# 2. install (jax with libtpu), 3. train: every worker runs the same command
install="mkdir -p ~/$REMOTE_DIR && tar -xzf ~/longctx.tgz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR"
install+=" && pip install -q -r requirements.txt -e . 'jax[tpu]==$JAX_VERSION'"
train="cd ~/$REMOTE_DIR && LIBTPU_INIT_ARGS=$(printf '%q' "$LIBTPU_INIT_ARGS")"
train+=" python -m longctx.launch"
train+=" --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")"
if (($#)); then train+=" $(printf '%q ' "$@")"; fi
run "${tpu_vm[@]}" ssh "$TPU_NAME" "${where[@]}" --command="$install"
run "${tpu_vm[@]}" ssh "$TPU_NAME" "${where[@]}" --command="$train"
