#!/usr/bin/env bash
# Runs one `python3 -m vqgen.main ...` on every worker of a Cloud TPU VM (single host or pod
# slice) through `gcloud compute tpus tpu-vm ssh --worker=all`. Every worker gets
# VQGEN_DISTRIBUTED=1, so vqgen.main calls jax.distributed.initialize(), which finds the
# coordinator and the process ids of a TPU pod by itself.
#
#   bash launch/tpu_vm.sh --tpu=NAME --zone=ZONE [options] -- <vqgen.main flags>
#
#   bash launch/tpu_vm.sh --tpu=my-v5e-32 --zone=us-west4-a --setup -- \
#       --config=configs/tokenizers/llamagen_vq16.py --workdir=gs://my-bucket/runs/vq16 \
#       --config.data.data_dir=gs://my-bucket/tensorflow_datasets --mode=train_tokenizer
#
# Options (each also read from the environment variable in brackets):
#   --tpu=NAME          TPU VM name [TPU_NAME]                                    (required)
#   --zone=ZONE         its zone [ZONE]                                           (required)
#   --project=PROJECT   Google Cloud project [PROJECT]; default: gcloud's configured one
#   --setup             first clone (or update) the repository and `pip install -e .` with
#                       jax[tpu] on all workers
#   --repo=URL          repository to clone with --setup [VQGEN_REPO]
#   --ref=REF           branch or tag to check out with --setup [VQGEN_REF] (default: main)
#   --dir=PATH          checkout on the workers [VQGEN_DIR] (default: ~/vqgen)
#   --python=BIN        python on the workers [VQGEN_PYTHON] (default: python3)
#   --env=K=V           extra environment variable for the run (repeatable)
#   --log=FILE          run in the background (nohup) with output to FILE on each worker,
#                       so the job survives a closed ssh session; without it output streams
#   --kill              stop vqgen.main on all workers (frees the TPU of a stuck run) and exit
#   --dry-run           print the gcloud commands instead of running them
#   -h, --help          this text
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
REPO="${VQGEN_REPO:-}"
REF="${VQGEN_REF:-main}"
DIR="${VQGEN_DIR:-~/vqgen}"
PYTHON="${VQGEN_PYTHON:-python3}"
SETUP=0
DRY_RUN=0
KILL=0
LOG=""
EXTRA_ENV=()
MAIN_ARGS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) TPU_NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --repo=*) REPO="${1#*=}" ;;
    --ref=*) REF="${1#*=}" ;;
    --dir=*) DIR="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --env=*) EXTRA_ENV+=("${1#*=}") ;;
    --log=*) LOG="${1#*=}" ;;
    --setup) SETUP=1 ;;
    --kill) KILL=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) echo "tpu_vm.sh: unknown option '$1'; put vqgen.main flags after '--' (see --help)." >&2; exit 2 ;;
  esac
  shift
done

if [[ -z "$TPU_NAME" || -z "$ZONE" ]]; then
  echo "tpu_vm.sh: the TPU name and zone are required; pass --tpu=NAME --zone=ZONE (or set TPU_NAME and ZONE)." >&2
  exit 2
fi
if [[ $KILL -eq 0 && ${#MAIN_ARGS[@]} -eq 0 ]]; then
  echo "tpu_vm.sh: no vqgen.main flags given; add them after '--', e.g. -- --config=configs/quickstart.py --workdir=gs://bucket/run." >&2
  exit 2
fi
if [[ $SETUP -eq 1 && -z "$REPO" ]]; then
  echo "tpu_vm.sh: --setup needs the repository to clone; pass --repo=https://... (or set VQGEN_REPO)." >&2
  exit 2
fi
for kv in "${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}"; do
  if [[ ! "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
    echo "tpu_vm.sh: --env=$kv is not NAME=VALUE; write e.g. --env=XLA_FLAGS=--xla_dump_to=/tmp/dump." >&2
    exit 2
  fi
done

# `~` must expand on the workers, not here: keep it outside the quoting.
remote_dir() { if [[ "$DIR" == "~/"* ]]; then printf '~/%q' "${DIR#\~/}"; else printf '%q' "$DIR"; fi; }
RDIR="$(remote_dir)"

GCLOUD=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--zone=$ZONE" --worker=all)
if [[ -n "$PROJECT" ]]; then GCLOUD+=("--project=$PROJECT"); fi

squote() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }  # single-quote a string for a shell

run_on_all_workers() {  # $1: the shell command each worker runs
  if [[ $DRY_RUN -eq 1 ]]; then
    local words=() w
    for w in "${GCLOUD[@]}"; do words+=("$(printf '%q' "$w")"); done
    echo "${words[*]} --command=$(squote "$1")"
  else
    "${GCLOUD[@]}" "--command=$1"
  fi
}

if [[ $KILL -eq 1 ]]; then
  # Only processes whose command line is exactly a vqgen.main run; the TPU is freed when they exit.
  run_on_all_workers "pkill -f -- '-m vqgen.main' || true"
  exit 0
fi

if [[ $SETUP -eq 1 ]]; then
  setup="set -e; if [ -d $RDIR/.git ]; then git -C $RDIR fetch --quiet origin $(printf '%q' "$REF") && git -C $RDIR checkout --quiet FETCH_HEAD; "
  setup+="else git clone --quiet --branch $(printf '%q' "$REF") $(printf '%q' "$REPO") $RDIR; fi; "
  setup+="$(printf '%q' "$PYTHON") -m pip install --quiet --upgrade pip && "
  setup+="$(printf '%q' "$PYTHON") -m pip install --quiet -e $RDIR'[gcs]' 'jax[tpu]'"
  run_on_all_workers "$setup"
fi

envs="VQGEN_DISTRIBUTED=1 TF_CPP_MIN_LOG_LEVEL=3"
for kv in "${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}"; do
  envs+=" ${kv%%=*}=$(printf '%q' "${kv#*=}")"
done
main="$(printf '%q' "$PYTHON") -m vqgen.main"
for a in "${MAIN_ARGS[@]}"; do main+=" $(printf '%q' "$a")"; done
if [[ -n "$LOG" ]]; then
  run_on_all_workers "cd $RDIR && nohup env $envs $main > $(printf '%q' "$LOG") 2>&1 < /dev/null &"
else
  run_on_all_workers "cd $RDIR && env $envs $main"
fi
