# Shared helpers of launch/*.sh (sourced, not run): errors, shell quoting, and `run` with --dry-run.
# The sourcing script defines PROG first.
# shellcheck shell=bash

die() {
  echo "$PROG: error: $*" >&2
  echo "Run '$PROG --help' for usage." >&2
  exit 2
}

warn() { echo "$PROG: warning: $*" >&2; }

# Quote one word for a POSIX shell (only when needed), so printed commands can be pasted back.
q() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//"'"/"'\\''"}"
  fi
}

# Quote every argument and join them with spaces.
qargs() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(q "$a")"; done
  printf '%s' "$out"
}

DRY_RUN=0

# Run a command, echoing it as `+ cmd` (stdout in --dry-run, where nothing runs; stderr otherwise).
run() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(qargs "$@")"
  else
    printf '+ %s\n' "$(qargs "$@")" >&2
    "$@"
  fi
}

# The python arguments of a train / eval job, into the array PY_ARGS: python_args JOB CONFIG WORKDIR [EXTRA...].
# train: --config CONFIG --workdir WORKDIR EXTRA. eval: evaluate has no --workdir (an evaluation config names its
# output directory, out_dir), so --workdir DIR becomes --config.out_dir=DIR, and the eval configs' field names are
# checked here for the mistakes a training command line would make (the run would only fail in the workers' logs).
python_args() {
  local job=$1 config=$2 workdir=$3 a
  shift 3
  PY_ARGS=(--config "$config")
  if [[ $job == train ]]; then
    [[ -z $workdir ]] || PY_ARGS+=(--workdir "$workdir")
  else
    for a in "$@"; do
      case $a in
        --workdir | --workdir=*)
          die "'$a' after --: evaluate has no --workdir flag (give $PROG's --workdir DIR before --: it becomes --config.out_dir=DIR)" ;;
        --config.model.*)
          die "'$a': evaluation configs have no model block (the checkpoint is --config.checkpoint=DIR, see configs/eval_*.py)" ;;
        --config.out_dir | --config.out_dir=*)
          [[ -z $workdir ]] || die "--workdir and '$a' both set the output directory: give one of them" ;;
      esac
    done
    [[ -z $workdir ]] || PY_ARGS+=("--config.out_dir=$workdir")
  fi
  PY_ARGS+=("$@")
}
