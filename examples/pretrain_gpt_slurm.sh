#!/bin/bash
# Multi-node pretraining under Slurm: one torchrun launcher per node, c10d rendezvous
# on the first node. Submit with: sbatch examples/pretrain_gpt_slurm.sh configs/gpt2_8.3b.yaml
#SBATCH --job-name=gpt-pretrain
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --signal=TERM@300
#SBATCH --requeue
set -euo pipefail

CONFIG=${1:-configs/gpt2_345m.yaml}
shift || true
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-3}
mkdir -p logs

# --signal=TERM@300 sends SIGTERM 5 minutes before the time limit: the training
# saves a checkpoint and exits; resubmitting resumes from it (checkpoint.load).
# Failures (docs/reliability.md): a worker that dies is restarted with all the others
# by torchrun, up to MAX_RESTARTS times, one rendezvous round each, and resumes from the
# newest checkpoint (the configs set checkpoint.load = checkpoint.save); a node that
# dies ends the step, and --requeue lets Slurm queue the job again, which resumes the
# same way on the nodes it gets.
srun --kill-on-bad-exit=1 bash -c "
  .venv/bin/torchrun \
    --nnodes=$SLURM_NNODES --node_rank=\$SLURM_NODEID --nproc_per_node=$GPUS_PER_NODE \
    --max-restarts=$MAX_RESTARTS \
    --rdzv_id=$SLURM_JOB_ID --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT \
    pretrain_gpt.py --config $CONFIG $*"
