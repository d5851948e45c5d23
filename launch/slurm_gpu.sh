#!/usr/bin/env bash
# SLURM batch script: one vqgen process per GPU on every node of the allocation.
#
#   sbatch --nodes=4 launch/slurm_gpu.sh \
#       --config=configs/generators/llamagen.py:L --workdir=/shared/runs/llamagen_L \
#       --config.data.data_dir=/shared/tensorflow_datasets --mode=train_generator
#
# Everything after the script name goes to `python -m vqgen.main` unchanged. srun starts
# SLURM_NTASKS = nodes x 8 tasks; in each, VQGEN_DISTRIBUTED=1 makes vqgen.main call
# jax.distributed.initialize(), which reads SLURM_JOB_ID / SLURM_STEP_NODELIST / SLURM_NTASKS /
# SLURM_PROCID / SLURM_LOCALID: the coordinator is the first node of the step (port derived
# from the job id), the process id is SLURM_PROCID, and each process drives the GPU whose index
# is its SLURM_LOCALID. Every task must therefore see all GPUs of its node: do not add
# --gpus-per-task or a per-task CUDA_VISIBLE_DEVICES (that would hide GPU SLURM_LOCALID).
# The global batch of the config is split over all GPUs (it must be divisible by their count).
#
# `launch/slurm_gpu.sh --help` prints this text.
#
# Environment knobs: VQGEN_VENV (a virtualenv to activate on every node; default: none),
# VQGEN_DIR (the checkout, on a shared filesystem; default: the submit directory),
# VQGEN_DRY_RUN=1 (print the srun command instead of running it; works outside SLURM too).
#
#SBATCH --job-name=vqgen
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=vqgen-%j.out
#SBATCH --signal=TERM@300
#   SIGTERM 5 minutes before the time limit: vqgen writes a checkpoint and exits 0; submit the
#   same command again (or use --dependency=afterany:<jobid>) and it resumes.
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  # The header above is the usage text: print it without the #SBATCH lines.
  sed -n '2,/^set -euo pipefail/{/^#SBATCH/d;/^set -euo pipefail/d;s/^# \{0,1\}//;p;}' "$0"
  exit 0
fi

if [[ $# -eq 0 ]]; then
  echo "slurm_gpu.sh: no vqgen.main flags given; e.g. sbatch launch/slurm_gpu.sh --config=configs/quickstart.py --workdir=/shared/runs/q" >&2
  exit 2
fi

DIR="${VQGEN_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
PREAMBLE="cd $(printf '%q' "$DIR")"
if [[ -n "${VQGEN_VENV:-}" ]]; then
  PREAMBLE+=" && source $(printf '%q' "$VQGEN_VENV")/bin/activate"
fi
MAIN="python -m vqgen.main"
for a in "$@"; do MAIN+=" $(printf '%q' "$a")"; done

# Each process opens only its own GPU, so XLA's default memory preallocation is fine; the
# latency-hiding scheduler overlaps the NCCL collectives with compute.
export VQGEN_DISTRIBUTED=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

SRUN=(srun --kill-on-bad-exit=1 --cpu-bind=none bash -c "$PREAMBLE && exec $MAIN")
if [[ "${VQGEN_DRY_RUN:-0}" == "1" ]]; then
  printf '%s ' "${SRUN[@]:0:5}"
  printf "'%s'\n" "${SRUN[5]//\'/\'\\\'\'}"
  exit 0
fi
exec "${SRUN[@]}"
