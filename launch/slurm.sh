#!/usr/bin/env bash
# SLURM (multi-node GPU) launcher for deepeyes_jax: writes an sbatch script and submits it.
# Run `launch/slurm.sh --help`. --dry-run prints the script and the commands (`+ ...`) and runs nothing.
set -euo pipefail

PROG=${0##*/}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
Usage: $PROG train|eval --nodes N --gpus-per-node G --time T --partition P --config FILE [flags] [-- extra args]

Writes an sbatch script for a multi-node GPU job (one process per node driving all of its GPUs; process 0's
node is the JAX coordinator) and submits it with sbatch. The job runs, on every node:
    python -m deepeyes_jax.train --config FILE --workdir DIR [extra args]
    (eval: python -m deepeyes_jax.evaluate --config FILE [--config.out_dir=DIR] [extra args])
with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set for jax.distributed.initialize().

Job shape (required unless a default is shown):
  --nodes N               number of nodes (>= 1)
  --gpus-per-node G       GPUs per node (>= 1)
  --time T                time limit: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS
  --partition P           SLURM partition
  --cpus-per-task C       CPU cores per node's process (default: 16)
  --job-name J            job name (default: deepeyes-train / deepeyes-eval); output goes to logs/%x-%j.out
  --account A             #SBATCH --account
  --qos Q                 #SBATCH --qos
  --sbatch-arg ARG        any other sbatch option, repeatable (e.g. --sbatch-arg=--exclusive --sbatch-arg=--mem=0)

Run:
  --config FILE[:ARGS]    config file, relative to --repo-dir (or absolute), e.g. configs/deepeyes_7b.py:size=32b
  --workdir DIR           output dir on a filesystem every node sees, or gs://BUCKET/PATH (required for train;
                          eval: optional, passed as --config.out_dir=DIR)
  --repo-dir DIR          the checkout on the cluster, the job's working directory (default: $REPO_ROOT)
  --venv PATH             virtualenv to activate (default: REPO_DIR/.venv)
  --port PORT             coordinator port on the first node, 1024..65535 (default: 8476)
  --env KEY=VALUE         exported in the job, repeatable; --env KEY copies KEY from this shell
  -- ARGS...              everything after -- is appended to the python command line (e.g. --config.total_steps=10;
                          eval: --config.checkpoint=DIR --config.data_path=DIR)

Output:
  --out FILE              write the sbatch script to FILE (default: stdout with --write-only / --dry-run, else
                          REPO_DIR/logs/sbatch/JOB_NAME-YYYYmmdd-HHMMSS.sh), then submit it with sbatch
  --write-only            write the script, do not submit it
  --dry-run               print the script and the commands that would run (prefixed '+ '); run nothing
  -h, --help              this help

Flags may be written --flag VALUE or --flag=VALUE, with '-' or '_' inside the name (--gpus_per_node = --gpus-per-node).

Example:
  $PROG train --nodes 4 --gpus-per-node 8 --time 2-00:00:00 --partition gpu --config configs/deepeyes_7b.py:size=32b \\
      --workdir /shared/runs/deepeyes-32b --env DEEPEYES_JUDGE_URL=http://judge:8000/v1 \\
      -- --config.model.checkpoint=/shared/ckpt/Qwen2.5-VL-32B-Instruct --config.data.train='/shared/data/*.parquet'
EOF
}

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ---------------------------------------------------------------------------------------------------------------
# Argument parsing.

ORIG_ARGS=("$@")
[[ $# -gt 0 ]] || { usage >&2; die "missing SUBCOMMAND (train or eval)"; }
case $1 in
  -h | --help | help) usage; exit 0 ;;
  train | eval) JOB=$1; shift ;;
  *) die "unknown subcommand '$1' (expected train or eval)" ;;
esac

NODES="" GPUS="" TIME="" PARTITION="" CPUS=16 JOB_NAME="deepeyes-$JOB" ACCOUNT="" QOS=""
CONFIG="" WORKDIR="" REPO_DIR=$REPO_ROOT VENV="" PORT=8476 OUT="" WRITE_ONLY=0
SBATCH_ARGS=() ENVS=() EXTRA=()

while (($#)); do
  arg=$1
  shift
  case $arg in
    --) EXTRA=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --*=*) key=${arg%%=*} val=${arg#*=} has_val=1 ;;
    --?*) key=$arg val="" has_val=0 ;;
    *) die "unexpected argument '$arg' (flags start with --; arguments for python go after --)" ;;
  esac
  flag=$key  # as the user wrote it, for messages
  key=${key#--}
  key=${key//-/_}
  case $key in
    dry_run | write_only)
      ((has_val == 0)) || die "$flag takes no value (got '$arg')"
      ;;
    nodes | gpus_per_node | time | partition | cpus_per_task | job_name | account | qos | sbatch_arg | config | \
      workdir | repo_dir | venv | port | env | out)
      if ((has_val == 0)); then
        [[ $# -gt 0 && $1 != --* ]] || die "$flag requires a value (use $flag=VALUE for values that start with --)"
        val=$1
        shift
      fi
      ;;
    *) die "unknown flag '$arg'" ;;
  esac
  case $key in
    dry_run) DRY_RUN=1 ;;
    write_only) WRITE_ONLY=1 ;;
    nodes) NODES=$val ;;
    gpus_per_node) GPUS=$val ;;
    time) TIME=$val ;;
    partition) PARTITION=$val ;;
    cpus_per_task) CPUS=$val ;;
    job_name) JOB_NAME=$val ;;
    account) ACCOUNT=$val ;;
    qos) QOS=$val ;;
    sbatch_arg) SBATCH_ARGS+=("$val") ;;
    config) CONFIG=$val ;;
    workdir) WORKDIR=$val ;;
    repo_dir) REPO_DIR=$val ;;
    venv) VENV=$val ;;
    port) PORT=$val ;;
    env) ENVS+=("$val") ;;
    out) OUT=$val ;;
  esac
done

# ---------------------------------------------------------------------------------------------------------------
# Validation.

check_int() {  # check_int FLAG VALUE MIN [MAX]
  [[ -n $2 ]] || die "$1 is required"
  [[ $2 =~ ^[0-9]+$ ]] || die "$1 '$2' must be a positive integer"
  ((10#$2 >= $3)) || die "$1 '$2' must be >= $3"
  [[ -z ${4:-} ]] || ((10#$2 <= $4)) || die "$1 '$2' must be <= $4"
}

check_int --nodes "$NODES" 1
check_int --gpus-per-node "$GPUS" 1
check_int --cpus-per-task "$CPUS" 1
check_int --port "$PORT" 1024 65535
NODES=$((10#$NODES)) GPUS=$((10#$GPUS)) CPUS=$((10#$CPUS)) PORT=$((10#$PORT))
[[ -n $TIME ]] || die "--time is required (e.g. 24:00:00 or 2-00:00:00)"
[[ $TIME =~ ^(([0-9]+-)?[0-9]+(:[0-5]?[0-9]){0,2}|UNLIMITED|INFINITE|unlimited|infinite)$ ]] ||
  die "--time '$TIME' is not a SLURM time (MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)"
[[ -n $PARTITION ]] || die "--partition is required"
[[ $PARTITION =~ ^[A-Za-z0-9_.,-]+$ ]] || die "--partition '$PARTITION' is not a partition name"
[[ $JOB_NAME =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job-name '$JOB_NAME' must be letters, digits, '.', '_' or '-'"
[[ -z $ACCOUNT || $ACCOUNT =~ ^[A-Za-z0-9_.-]+$ ]] || die "--account '$ACCOUNT' is not an account name"
[[ -z $QOS || $QOS =~ ^[A-Za-z0-9_.-]+$ ]] || die "--qos '$QOS' is not a QOS name"
for a in ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}; do
  [[ $a == --?* && $a != *$'\n'* ]] || die "--sbatch-arg '$a' must be one long sbatch option (e.g. --sbatch-arg=--exclusive)"
done

[[ -n $REPO_DIR ]] || die "--repo-dir must not be empty"
[[ -d $REPO_DIR ]] || die "--repo-dir '$REPO_DIR' is not a directory (the checkout the job runs in)"
REPO_DIR=$(cd "$REPO_DIR" && pwd)
VENV=${VENV:-$REPO_DIR/.venv}
[[ $VENV == /* ]] || VENV=$REPO_DIR/$VENV
[[ -f $VENV/bin/activate ]] || warn "--venv '$VENV' has no bin/activate here (the job will fail unless it exists on the nodes)"

[[ -n $CONFIG ]] || die "--config is required (e.g. configs/deepeyes_7b.py)"
cfg_file=${CONFIG%%:*}
[[ $cfg_file == *.py ]] || die "--config '$CONFIG' must be a .py config file (optionally followed by :ARGS)"
[[ $cfg_file == /* ]] || cfg_file=$REPO_DIR/$cfg_file
[[ -f $cfg_file ]] || die "--config '$CONFIG': no such file $cfg_file (give a path relative to --repo-dir $REPO_DIR)"

if [[ -z $WORKDIR ]]; then
  [[ $JOB == eval ]] || die "--workdir is required for train (a directory every node sees, or gs://BUCKET/PATH)"
elif [[ $NODES -gt 1 && ( $WORKDIR == /tmp/* || $WORKDIR == /dev/shm/* ) ]]; then
  warn "--workdir '$WORKDIR' looks node-local: with $NODES nodes the workdir must be on a shared filesystem (or gs://)"
fi

ENV_WORDS=()
for e in ${ENVS[@]+"${ENVS[@]}"}; do
  key=${e%%=*}
  [[ $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--env '$e' must be KEY=VALUE or KEY with KEY a variable name"
  case $key in
    JAX_COORDINATOR_ADDRESS | JAX_NUM_PROCESSES | JAX_PROCESS_ID) die "--env $key: set by the job itself" ;;
  esac
  if [[ $e != *=* ]]; then
    [[ -n ${!key+set} ]] || die "--env $key: $key is not set in this shell (give --env $key=VALUE)"
    e="$key=${!key}"
  fi
  ENV_WORDS+=("$e")
done

# ---------------------------------------------------------------------------------------------------------------
# The sbatch script.

[[ $JOB == train ]] && MODULE=deepeyes_jax.train || MODULE=deepeyes_jax.evaluate
python_args "$JOB" "$CONFIG" "$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"}

sbatch_script() {
  local e
  echo '#!/bin/bash'
  echo "#SBATCH --job-name=$JOB_NAME"
  echo "#SBATCH --nodes=$NODES"
  echo '#SBATCH --ntasks-per-node=1'
  echo "#SBATCH --gpus-per-node=$GPUS"
  echo "#SBATCH --cpus-per-task=$CPUS"
  echo "#SBATCH --time=$TIME"
  echo "#SBATCH --partition=$PARTITION"
  echo '#SBATCH --output=logs/%x-%j.out'
  echo "#SBATCH --chdir=$REPO_DIR"
  [[ -z $ACCOUNT ]] || echo "#SBATCH --account=$ACCOUNT"
  [[ -z $QOS ]] || echo "#SBATCH --qos=$QOS"
  for e in ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}; do echo "#SBATCH $e"; done
  echo "# Written by launch/slurm.sh: $(qargs "launch/$PROG" "${ORIG_ARGS[@]}")"
  echo "# logs/ must exist in $REPO_DIR before the job starts (slurm.sh creates it)."
  echo 'set -euo pipefail'
  echo
  echo 'set +u  # venv activate scripts may read unset variables'
  echo '# shellcheck source=/dev/null'
  echo "source $(q "$VENV/bin/activate")"
  echo 'set -u'
  echo
  echo '# One process per node, driving all of its GPUs; the first node of the allocation hosts the coordinator.'
  echo '# (sed -n 1p rather than head -n1: head can close the pipe early, and pipefail would fail on the SIGPIPE.)'
  # shellcheck disable=SC2016  # evaluated in the job
  echo 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)'
  echo "export JAX_COORDINATOR_ADDRESS=\"\$head_node:$PORT\""
  # shellcheck disable=SC2016
  echo 'export JAX_NUM_PROCESSES="$SLURM_NTASKS"'
  for e in ${ENV_WORDS[@]+"${ENV_WORDS[@]}"}; do echo "export $(q "$e")"; done
  # shellcheck disable=SC2016
  echo 'echo "job $SLURM_JOB_ID on $SLURM_JOB_NODELIST: $JAX_NUM_PROCESSES processes, coordinator $JAX_COORDINATOR_ADDRESS"'
  echo
  echo '# JAX_PROCESS_ID differs per task: set it inside the srun step, not here.'
  echo '# shellcheck disable=SC2016'
  # shellcheck disable=SC2016
  echo "srun --kill-on-bad-exit=1 bash -c 'export JAX_PROCESS_ID=\"\$SLURM_PROCID\"; exec python -m $MODULE \"\$@\"' $MODULE \\"
  echo "  $(qargs "${PY_ARGS[@]}")"
}

if ((WRITE_ONLY)) && [[ -z $OUT ]]; then
  # Just the script, on stdout.
  sbatch_script
  exit 0
fi

if [[ -z $OUT ]]; then
  OUT="$REPO_DIR/logs/sbatch/$JOB_NAME-$(date +%Y%m%d-%H%M%S).sh"
fi
[[ $OUT != */ && ! -d $OUT ]] || die "--out '$OUT' is a directory (give a file name)"
OUT_DIR=$(dirname "$OUT")

# logs/ (the job's --output) must exist before the job starts.
if [[ $OUT_DIR == "$REPO_DIR/logs" || $OUT_DIR == "$REPO_DIR/logs/"* ]]; then
  run mkdir -p "$OUT_DIR"
else
  run mkdir -p "$REPO_DIR/logs" "$OUT_DIR"
fi
if ((DRY_RUN)); then
  echo "# sbatch script (would be written to $OUT):"
  sbatch_script
  echo "# end of sbatch script"
else
  sbatch_script >"$OUT"
  echo "$PROG: wrote $OUT" >&2
fi
if ((WRITE_ONLY)); then
  ((DRY_RUN)) || echo "$PROG: submit it with: sbatch $(q "$OUT")" >&2
else
  run sbatch "$OUT"
fi
