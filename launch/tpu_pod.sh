#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM pod: one JAX process per worker, all started at once.
# klingjax-train then calls jax.distributed.initialize(), which auto-detects the pod (KLINGJAX_DISTRIBUTED=1).
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] [--repo_dir=~/klingjax] [--venv=.venv] [--dry_run] \
#       -- klingjax-train --config experiments/t2v_recipe.py:stage1 --workdir gs://BUCKET/t2v/stage1
#
# The repository (and its venv) must already be on every worker at --repo_dir; the work directory should be
# a bucket (gs://...) so every worker sees the same checkpoints. --dry_run prints the gcloud command.
set -euo pipefail

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

TPU="" ZONE="" PROJECT="" REPO_DIR="~/klingjax" VENV=".venv" DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) TPU="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --repo_dir=*) REPO_DIR="${1#*=}" ;;
    --venv=*) VENV="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "tpu_pod.sh: unknown option $1 (put the command after --)" >&2; usage ;;
  esac
  shift
done
[[ -n "$TPU" && -n "$ZONE" && $# -gt 0 ]] || usage

# The remote shell sees: cd REPO_DIR && . VENV/bin/activate && KLINGJAX_DISTRIBUTED=1 <command, quoted>.
remote="cd ${REPO_DIR}"
[[ -n "$VENV" ]] && remote+=" && . ${VENV}/bin/activate"
remote+=" && KLINGJAX_DISTRIBUTED=1 $(printf '%q ' "$@")"
remote="${remote% }"

cmd=(gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$remote")
[[ -n "$PROJECT" ]] && cmd+=(--project="$PROJECT")

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
else
  exec "${cmd[@]}"
fi
