#!/usr/bin/env bash
# Submits a vqgen run to TPU slices of a GKE cluster with xpk (`pip install xpk`).
#
#   bash launch/gke_xpk.sh --cluster=my-cluster --tpu-type=v5p-64 [options] -- <vqgen.main flags>
#
#   bash launch/gke_xpk.sh --cluster=my-cluster --tpu-type=v5litepod-32 --workload=vq16-run1 -- \
#       --config=configs/tokenizers/llamagen_vq16.py --workdir=gs://my-bucket/runs/vq16 \
#       --config.data.data_dir=gs://my-bucket/tensorflow_datasets --mode=train_tokenizer
#
# xpk builds an image from --base-docker-image plus this checkout (--script-dir) unless
# --docker-image names a prebuilt one, and runs the command on every TPU VM of every slice.
# There VQGEN_DISTRIBUTED=1 makes vqgen.main call jax.distributed.initialize(), which reads
# the coordinator and process ids that GKE sets for TPU workloads. The workdir and the TFDS
# data dir must be on GCS (pods have no shared disk). Re-submitting with the same flags (a new
# --workload name) resumes from the workdir's last checkpoint.
#
# Options (environment variable in brackets):
#   --cluster=NAME           GKE cluster made with `xpk cluster create` [XPK_CLUSTER]     (required)
#   --tpu-type=TYPE          e.g. v5p-64, v5litepod-16, v4-32 [XPK_TPU_TYPE]                (required)
#   --workload=NAME          workload name (lowercase, <= 40 chars) [XPK_WORKLOAD]; default vqgen-<time>
#   --num-slices=N           slices; >1 runs multislice (data parallel across slices) [default 1]
#   --project=P --zone=Z     passed to xpk when given [PROJECT, ZONE]
#   --docker-image=IMG       prebuilt image with vqgen installed (skips the in-pod pip install)
#   --base-docker-image=IMG  base image for xpk's build [default: xpk's own default]
#   --env=K=V                extra environment variable (repeatable)
#   --dry-run                print the xpk command instead of running it
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

CLUSTER="${XPK_CLUSTER:-}"
TPU_TYPE="${XPK_TPU_TYPE:-}"
WORKLOAD="${XPK_WORKLOAD:-vqgen-$(date +%m%d-%H%M%S)}"
NUM_SLICES=1
PROJECT="${PROJECT:-}"
ZONE="${ZONE:-}"
IMAGE=""
BASE_IMAGE=""
DRY_RUN=0
EXTRA_ENV=()
MAIN_ARGS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --cluster=*) CLUSTER="${1#*=}" ;;
    --tpu-type=*) TPU_TYPE="${1#*=}" ;;
    --workload=*) WORKLOAD="${1#*=}" ;;
    --num-slices=*) NUM_SLICES="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --docker-image=*) IMAGE="${1#*=}" ;;
    --base-docker-image=*) BASE_IMAGE="${1#*=}" ;;
    --env=*) EXTRA_ENV+=("${1#*=}") ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) echo "gke_xpk.sh: unknown option '$1'; put vqgen.main flags after '--' (see --help)." >&2; exit 2 ;;
  esac
  shift
done

if [[ -z "$CLUSTER" || -z "$TPU_TYPE" ]]; then
  echo "gke_xpk.sh: the cluster and TPU type are required; pass --cluster=NAME --tpu-type=v5p-64 (or set XPK_CLUSTER, XPK_TPU_TYPE)." >&2
  exit 2
fi
if [[ ${#MAIN_ARGS[@]} -eq 0 ]]; then
  echo "gke_xpk.sh: no vqgen.main flags given; add them after '--', e.g. -- --config=configs/quickstart.py --workdir=gs://bucket/run." >&2
  exit 2
fi
if [[ ! "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]]; then
  echo "gke_xpk.sh: --num-slices=$NUM_SLICES is not a positive integer; pass e.g. --num-slices=2." >&2
  exit 2
fi

envs="VQGEN_DISTRIBUTED=1 TF_CPP_MIN_LOG_LEVEL=3"
for kv in "${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}"; do
  if [[ ! "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
    echo "gke_xpk.sh: --env=$kv is not NAME=VALUE." >&2
    exit 2
  fi
  envs+=" ${kv%%=*}=$(printf '%q' "${kv#*=}")"
done
main="python3 -m vqgen.main"
for a in "${MAIN_ARGS[@]}"; do main+=" $(printf '%q' "$a")"; done
if [[ -n "$IMAGE" ]]; then
  command="env $envs $main"
else
  # xpk copies this checkout into the image's working directory; install it with TPU JAX.
  command="python3 -m pip install --quiet -e '.[gcs]' 'jax[tpu]' && env $envs $main"
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
XPK=(xpk workload create "--cluster=$CLUSTER" "--workload=$WORKLOAD" "--tpu-type=$TPU_TYPE" "--num-slices=$NUM_SLICES")
if [[ -n "$PROJECT" ]]; then XPK+=("--project=$PROJECT"); fi
if [[ -n "$ZONE" ]]; then XPK+=("--zone=$ZONE"); fi
if [[ -n "$IMAGE" ]]; then
  XPK+=("--docker-image=$IMAGE")
else
  XPK+=("--script-dir=$ROOT")
  if [[ -n "$BASE_IMAGE" ]]; then XPK+=("--base-docker-image=$BASE_IMAGE"); fi
fi

if [[ $DRY_RUN -eq 1 ]]; then
  words=()
  for w in "${XPK[@]}"; do words+=("$(printf '%q' "$w")"); done
  echo "${words[*]} --command='${command//\'/\'\\\'\'}'"
else
  exec "${XPK[@]}" "--command=$command"
fi
