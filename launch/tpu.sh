#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice) launcher for deepeyes_jax: create / setup / train / eval / logs / status.
# Run `launch/tpu.sh --help`. Every subcommand takes --dry-run: it prints the commands (`+ ...`) and runs nothing.
set -euo pipefail

PROG=${0##*/}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
Usage: $PROG SUBCOMMAND --name NAME --zone ZONE [flags] [-- extra args for the python module]

Drives a Cloud TPU VM (single host or multi-worker pod slice) with gcloud. Commands that touch the
workers run on all of them at once (gcloud compute tpus tpu-vm ssh ... --worker=all).

Subcommands:
  create   gcloud compute tpus tpu-vm create NAME (needs --accelerator-type and --version)
  delete   gcloud compute tpus tpu-vm delete NAME
  setup    on every worker: get the code (--repo_url URL --ref REF: git clone/checkout; or --src DIR:
           upload a tarball of a local tree with gcloud compute tpus tpu-vm scp --worker=all), create a
           venv (uv, Python --python) in --remote_dir/.venv, install the project and jax[tpu]
  train    start python -m deepeyes_jax.train --config CONFIG --workdir WORKDIR [extra args] on every
           worker in the background (nohup; one log per worker: REMOTE_DIR/logs/train-<hostname>.log);
           the ssh returns at once. Re-running it with the same --workdir resumes from the last checkpoint.
  eval     the same for python -m deepeyes_jax.evaluate --config CONFIG [--config.out_dir=WORKDIR] [extra args]
  logs     tail the log of worker N (--worker N, --job train|eval, --lines K, --follow)
  status   gcloud compute tpus tpu-vm describe NAME, then on every worker: is train/eval running, last log line
  stop     stop the train/eval process started by this script on every worker (kill PID from its pid file)

Flags (all subcommands):
  --name NAME             TPU name: lowercase letters, digits, '-'; starts with a letter (required)
  --zone ZONE             e.g. us-central2-b, us-east5-a, europe-west4-a (required)
  --project PROJECT       GCP project (default: gcloud's configured project)
  --ssh_arg ARG           extra flag for gcloud ... ssh/scp, repeatable (e.g. --ssh_arg=--internal-ip)
  --remote_dir DIR        checkout on the workers, relative to the home directory (default: deepeyes_jax)
  --dry-run               print the commands (one per line, prefixed '+ ') and run nothing
  -h, --help              this help

create:
  --accelerator-type TYPE e.g. v5p-64, v6e-16, v4-8 (must match v[0-9][a-z]*-[0-9]+) (required)
  --version RUNTIME       TPU software version, e.g. v2-alpha-tpuv5, v2-alpha-tpuv6e, tpu-ubuntu2204-base (required)
  --spot | --preemptible  cheaper capacity that can be taken away at any time (see launch/README.md)

delete:
  --yes                   do not ask for confirmation (gcloud --quiet)

setup:
  --repo_url URL --ref REF  git clone URL (first time), then check out REF (branch, tag or commit)
  --src DIR                 instead: upload the local tree DIR (without .git, .venv, caches, ./logs)
  --exclude PATTERN         with --src: also leave out PATTERN (tar --exclude), repeatable
  --python PY               Python for the venv: a version (uv installs it) or an interpreter (default: 3.12)
  --jax_spec SPEC           the JAX requirement installed next to the project (default: 'jax[tpu]')

train / eval:
  --config FILE[:ARGS]    config file, relative to the repo root, e.g. configs/deepeyes_7b.py:size=32b (required)
  --workdir DIR           output dir; gs://BUCKET/PATH on multi-worker pods (required for train; eval: optional,
                          passed as --config.out_dir=DIR)
  --env KEY=VALUE         environment variable for the run, repeatable; --env KEY copies KEY from here
  -- ARGS...              everything after -- is appended to the python command line (e.g. --config.total_steps=10;
                          eval: --config.checkpoint=DIR --config.data_path=DIR). Model and data paths are read
                          locally on every worker (not gs://); relative ones from REMOTE_DIR

logs:
  --worker N              worker index (default 0)
  --job train|eval        which log (default train)
  --lines K               number of lines (default 100)
  --follow                keep following (tail -F; Ctrl-C to stop)

stop:
  --job train|eval|all    which process to stop (default all)

Flags may be written --flag VALUE or --flag=VALUE, with '-' or '_' inside the name (--repo-url = --repo_url).

Examples:
  $PROG create --name my-pod --zone us-central2-b --accelerator-type v5p-64 --version v2-alpha-tpuv5 --spot
  $PROG setup  --name my-pod --zone us-central2-b --repo_url https://github.com/ORG/deepeyes_jax.git --ref main  # ORG: your fork (a placeholder)
  $PROG train  --name my-pod --zone us-central2-b --config configs/deepeyes_7b.py --workdir gs://my-bucket/runs/7b \\
      --env DEEPEYES_JUDGE_URL=http://judge:8000/v1 \\
      -- --config.model.checkpoint=../ckpt/Qwen2.5-VL-7B-Instruct --config.data.train='../data/deepeyes47k/*.parquet'
  $PROG eval   --name my-pod --zone us-central2-b --config configs/eval_vstar.py --workdir gs://my-bucket/evals/vstar \\
      -- --config.checkpoint=../ckpt/Qwen2.5-VL-7B-Instruct --config.data_path=../data/vstar_bench
  $PROG logs   --name my-pod --zone us-central2-b --worker 0 --follow
EOF
}

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ---------------------------------------------------------------------------------------------------------------
# Argument parsing.

[[ $# -gt 0 ]] || { usage >&2; die "missing SUBCOMMAND (create, delete, setup, train, eval, logs, status, stop)"; }
case $1 in
  -h | --help | help) usage; exit 0 ;;
  create | delete | setup | train | eval | logs | status | stop) CMD=$1; shift ;;
  *) die "unknown subcommand '$1' (expected create, delete, setup, train, eval, logs, status, stop)" ;;
esac

NAME="" ZONE="" PROJECT="" REMOTE_DIR="deepeyes_jax"
ACCEL="" VERSION="" SPOT=0 PREEMPTIBLE=0 YES=0
REPO_URL="" REF="" SRC="" PYTHON="3.12" JAX_SPEC="jax[tpu]"
CONFIG="" WORKDIR="" WORKER=0 JOB="" LINES=100 FOLLOW=0
SSH_ARGS=() ENVS=() EXCLUDES=() EXTRA=() GIVEN=() GIVEN_AS=()

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
    dry_run | spot | preemptible | yes | follow)
      ((has_val == 0)) || die "$flag takes no value (got '$arg')"
      ;;
    name | zone | project | remote_dir | ssh_arg | accelerator_type | version | repo_url | ref | src | exclude | \
      python | jax_spec | config | workdir | env | worker | job | lines)
      if ((has_val == 0)); then
        [[ $# -gt 0 && $1 != --* ]] || die "$flag requires a value (use $flag=VALUE for values that start with --)"
        val=$1
        shift
      fi
      ;;
    *) die "unknown flag '$arg'" ;;
  esac
  GIVEN+=("$key") GIVEN_AS+=("$flag")
  case $key in
    dry_run) DRY_RUN=1 ;;
    spot) SPOT=1 ;;
    preemptible) PREEMPTIBLE=1 ;;
    yes) YES=1 ;;
    follow) FOLLOW=1 ;;
    name) NAME=$val ;;
    zone) ZONE=$val ;;
    project) PROJECT=$val ;;
    remote_dir) REMOTE_DIR=$val ;;
    ssh_arg) SSH_ARGS+=("$val") ;;
    accelerator_type) ACCEL=$val ;;
    version) VERSION=$val ;;
    repo_url) REPO_URL=$val ;;
    ref) REF=$val ;;
    src) SRC=$val ;;
    exclude) EXCLUDES+=("$val") ;;
    python) PYTHON=$val ;;
    jax_spec) JAX_SPEC=$val ;;
    config) CONFIG=$val ;;
    workdir) WORKDIR=$val ;;
    env) ENVS+=("$val") ;;
    worker) WORKER=$val ;;
    job) JOB=$val ;;
    lines) LINES=$val ;;
  esac
done

# Which flags each subcommand accepts (besides the common ones).
COMMON="dry_run name zone project"
case $CMD in
  create) ALLOWED="accelerator_type version spot preemptible" ;;
  delete) ALLOWED="yes" ;;
  setup) ALLOWED="ssh_arg remote_dir repo_url ref src exclude python jax_spec" ;;
  train | eval) ALLOWED="ssh_arg remote_dir config workdir env" ;;
  logs) ALLOWED="ssh_arg remote_dir worker job lines follow" ;;
  status) ALLOWED="ssh_arg remote_dir" ;;
  stop) ALLOWED="ssh_arg remote_dir job" ;;
esac
for i in "${!GIVEN[@]}"; do
  [[ " $COMMON $ALLOWED " == *" ${GIVEN[i]} "* ]] || die "${GIVEN_AS[i]} is not a flag of '$CMD' (see --help)"
done
if [[ ${#EXTRA[@]} -gt 0 && $CMD != train && $CMD != eval ]]; then
  die "arguments after -- are only for train and eval (got: ${EXTRA[*]})"
fi

# ---------------------------------------------------------------------------------------------------------------
# Validation.

[[ -n $NAME ]] || die "--name is required (the TPU name)"
[[ $NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
  die "--name '$NAME' is not a valid TPU name (lowercase letters, digits and '-', starting with a letter, not ending with '-', at most 63 characters)"
[[ -n $ZONE ]] || die "--zone is required (e.g. us-central2-b)"
[[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone '$ZONE' is not a zone (expected REGION-ZONE like us-central2-b)"
if [[ -n $PROJECT && ! $PROJECT =~ ^([a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$ ]]; then
  die "--project '$PROJECT' is not a GCP project id (6-30 lowercase letters, digits and '-', starting with a letter)"
fi
for a in ${SSH_ARGS[@]+"${SSH_ARGS[@]}"}; do
  [[ $a == -* ]] || die "--ssh_arg '$a' must be a flag for gcloud (e.g. --ssh_arg=--internal-ip)"
done
[[ -n $REMOTE_DIR ]] || die "--remote_dir must not be empty"
[[ $REMOTE_DIR =~ ^/?[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*/?$ ]] ||
  die "--remote_dir '$REMOTE_DIR' must be a plain path (letters, digits, '.', '_', '-', '/'), relative to the home directory or absolute"
REMOTE_DIR=${REMOTE_DIR%/}
case "/$REMOTE_DIR/" in
  */./* | */../* | //) die "--remote_dir '$REMOTE_DIR' must not contain '.' or '..' components" ;;
esac

GCLOUD_LOC=(--zone="$ZONE")
[[ -z $PROJECT ]] || GCLOUD_LOC+=(--project="$PROJECT")

check_config() {
  [[ -n $CONFIG ]] || die "--config is required (e.g. configs/deepeyes_7b.py)"
  local file=${CONFIG%%:*}
  [[ $file == *.py ]] || die "--config '$CONFIG' must be a .py config file (optionally followed by :ARGS)"
  [[ $file != /* ]] || die "--config '$CONFIG' must be relative to the repo root: it is read on the workers in $SHOW_DIR"
  [[ -f $REPO_ROOT/$file ]] || die "--config '$CONFIG': no such file $REPO_ROOT/$file (give a path relative to the repo root)"
}

check_workdir() {
  if [[ -z $WORKDIR ]]; then
    [[ $CMD == eval ]] || die "--workdir is required for $CMD (gs://BUCKET/PATH on multi-worker pods)"
    return 0
  fi
  if [[ $WORKDIR == gs://* ]]; then
    [[ $WORKDIR =~ ^gs://[a-z0-9][a-z0-9._-]{1,221}[a-z0-9](/.*)?$ ]] || die "--workdir '$WORKDIR' is not a valid gs://BUCKET/PATH"
  else
    warn "--workdir '$WORKDIR' is not a gs:// path: on a multi-worker pod every worker must see the same workdir" \
      "(checkpoints, resume); a local path is only right for a single-host TPU"
  fi
}

# Environment for the remote process: `KEY=VALUE` words (quoted), from --env. DEEPEYES_DISTRIBUTED=1 makes the
# trainer call jax.distributed.initialize() (JAX detects the TPU pod's workers itself).
ENV_WORDS=(DEEPEYES_DISTRIBUTED=1)
check_envs() {
  local e key
  for e in ${ENVS[@]+"${ENVS[@]}"}; do
    key=${e%%=*}
    [[ $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--env '$e' must be KEY=VALUE or KEY with KEY a variable name"
    if [[ $e != *=* ]]; then
      [[ -n ${!key+set} ]] || die "--env $key: $key is not set in this shell (give --env $key=VALUE)"
      e="$key=${!key}"
    fi
    ENV_WORDS+=("$e")
  done
}

check_uint() {  # check_uint FLAG VALUE MIN
  [[ $2 =~ ^[0-9]+$ ]] || die "$1 '$2' must be a non-negative integer"
  ((10#$2 >= $3)) || die "$1 '$2' must be >= $3"
}

# ---------------------------------------------------------------------------------------------------------------
# Remote command pieces (one line of bash each: the remote login shell on TPU VMs is bash).

RDIR=$(q "$REMOTE_DIR")
SHOW_DIR=$REMOTE_DIR  # for messages
# shellcheck disable=SC2088  # a literal ~ in messages printed on the workers
[[ $REMOTE_DIR == /* ]] || SHOW_DIR="~/$REMOTE_DIR"

ssh_workers() {  # ssh_workers WORKER SCRIPT
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_LOC[@]}" --worker="$1" ${SSH_ARGS[@]+"${SSH_ARGS[@]}"} --command "$2"
}

# Install uv (user site or its installer), create REMOTE_DIR/.venv, install the project + JAX. Runs in REMOTE_DIR.
install_script() {
  # shellcheck disable=SC2016  # $HOME, $PATH: expanded on the worker
  printf '%s' 'export PATH="$HOME/.local/bin:$HOME/.cargo/bin:$PATH"; ' \
    'command -v uv >/dev/null 2>&1 || PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user --quiet --upgrade uv ' \
    '|| curl -LsSf https://astral.sh/uv/install.sh | sh; ' \
    "[ -x .venv/bin/python ] || uv venv --python $(q "$PYTHON") .venv; " \
    "uv pip install --python .venv/bin/python -e . $(q "$JAX_SPEC"); " \
    'mkdir -p logs; ' \
    '.venv/bin/python -c "import jax, deepeyes_jax; print(\"$(hostname): jax\", jax.__version__, \"ready in\", __import__(\"os\").getcwd())"'
}

cmd_create() {
  [[ -n $ACCEL ]] || die "--accelerator-type is required (e.g. v5p-64, v6e-16)"
  [[ $ACCEL =~ ^v[0-9][a-z]*-[0-9]+$ ]] || die "--accelerator-type '$ACCEL' does not match v[0-9][a-z]*-[0-9]+ (e.g. v5p-64, v6e-16, v4-8)"
  [[ -n $VERSION ]] || die "--version is required (the TPU runtime, e.g. v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)"
  [[ $VERSION =~ ^[a-z0-9][a-z0-9._-]*$ ]] || die "--version '$VERSION' is not a TPU runtime version (e.g. v2-alpha-tpuv5)"
  ((SPOT + PREEMPTIBLE < 2)) || die "--spot and --preemptible are mutually exclusive"
  local cmd=(gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_LOC[@]}" --accelerator-type="$ACCEL" --version="$VERSION")
  ((SPOT == 0)) || cmd+=(--spot)
  ((PREEMPTIBLE == 0)) || cmd+=(--preemptible)
  run "${cmd[@]}"
}

cmd_delete() {
  local cmd=(gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_LOC[@]}")
  ((YES == 0)) || cmd+=(--quiet)
  run "${cmd[@]}"
}

cmd_setup() {
  [[ $PYTHON =~ ^[A-Za-z0-9._/+-]+$ ]] || die "--python '$PYTHON' must be a version (3.12) or an interpreter path"
  [[ -n $JAX_SPEC && $JAX_SPEC != *[[:space:]]* ]] || die "--jax_spec '$JAX_SPEC' must be one requirement, e.g. 'jax[tpu]'"
  if [[ -n $SRC ]]; then
    [[ -z $REPO_URL && -z $REF ]] || die "--src and --repo_url/--ref are mutually exclusive"
    [[ -d $SRC ]] || die "--src '$SRC' is not a directory"
    [[ -f $SRC/pyproject.toml && -d $SRC/deepeyes_jax ]] || die "--src '$SRC' is not a deepeyes_jax checkout (no pyproject.toml / deepeyes_jax/)"
    setup_from_src
  else
    ((${#EXCLUDES[@]} == 0)) || die "--exclude only applies to --src"
    [[ -n $REPO_URL ]] || die "setup needs either --repo_url URL --ref REF or --src DIR"
    [[ $REPO_URL =~ ^((https?|ssh|git|file)://[^[:space:]]+|[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^[:space:]]+)$ ]] ||
      die "--repo_url '$REPO_URL' is not a git URL (https://..., ssh://..., git@host:org/repo.git)"
    [[ -n $REF ]] || die "--repo_url needs --ref (a branch, tag or commit to check out)"
    [[ $REF =~ ^[A-Za-z0-9._/-]+$ && $REF != -* && $REF != *..* ]] || die "--ref '$REF' is not a valid git branch, tag or commit"
    setup_from_git
  fi
}

setup_from_git() {
  local url ref s=""
  url=$(q "$REPO_URL")
  ref=$(q "$REF")
  # shellcheck disable=SC2016  # single-quoted pieces ($(hostname), $commit) are expanded on the worker
  {
    s+="set -euo pipefail; "
    s+="if [ ! -d $RDIR/.git ]; then "
    s+="if [ -e $RDIR ]; then echo \"\$(hostname): $SHOW_DIR exists and is not a git checkout (remove it or use --src)\" >&2; exit 1; fi; "
    s+="git clone $url $RDIR; fi; "
    s+="cd $RDIR; "
    s+="git fetch --force --tags origin \"+refs/heads/*:refs/remotes/origin/*\"; "
    s+="commit=\$(git rev-parse --verify --quiet origin/$ref^{commit} || git rev-parse --verify --quiet $ref^{commit}) "
    s+="|| { echo \"\$(hostname): unknown --ref $REF\" >&2; exit 1; }; "
    s+='git checkout --force --detach "$commit"; '
    s+=$(install_script)
  }
  ssh_workers all "$s"
}

setup_from_src() {
  local src upload s="" e
  src=$(cd "$SRC" && pwd)
  TARBALL="${TMPDIR:-/tmp}/deepeyes_jax-src.$$.tgz"
  upload="deepeyes_jax-src.$$.tgz"  # in the workers' home directory
  local tar_cmd=(tar -czf "$TARBALL" --exclude=./.git --exclude=./.venv --exclude=./logs --exclude=__pycache__
    --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache --exclude=.mypy_cache --exclude=.hypothesis)
  for e in ${EXCLUDES[@]+"${EXCLUDES[@]}"}; do tar_cmd+=(--exclude="$e"); done
  tar_cmd+=(-C "$src" .)
  ((DRY_RUN)) || trap 'rm -f "$TARBALL"' EXIT
  run "${tar_cmd[@]}"
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:$upload" "${GCLOUD_LOC[@]}" --worker=all ${SSH_ARGS[@]+"${SSH_ARGS[@]}"}
  # Replace the code in REMOTE_DIR but keep its .venv (slow to rebuild) and logs/.
  # shellcheck disable=SC2016  # single-quoted pieces are expanded on the worker
  {
    s+="set -euo pipefail; "
    s+="if [ -d $RDIR ] && [ -n \"\$(ls -A $RDIR)\" ] && [ ! -f $RDIR/pyproject.toml ] && [ ! -d $RDIR/.venv ]; then "
    s+="echo \"\$(hostname): refusing to replace $SHOW_DIR: not a deepeyes_jax checkout\" >&2; exit 1; fi; "
    s+="mkdir -p $RDIR; "
    s+="find $RDIR -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs -exec rm -rf {} +; "
    s+="tar -xzf $upload -C $RDIR; rm -f $upload; "
    s+="cd $RDIR; "
    s+=$(install_script)
  }
  ssh_workers all "$s"
  run rm -f "$TARBALL"
}

# Shell snippet (for the worker): is the process of job $job (a worker variable) alive? Needs $pid set.
# shellcheck disable=SC2016
ALIVE='[ -f "$pid" ] && kill -0 "$(cat "$pid")" 2>/dev/null'

# train / eval: start `python -m deepeyes_jax.MODULE` in the background on every worker.
cmd_launch() {
  local job=$CMD module
  [[ $job == train ]] && module=deepeyes_jax.train || module=deepeyes_jax.evaluate
  check_config
  check_workdir
  check_envs
  python_args "$job" "$CONFIG" "$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"}
  local py=(.venv/bin/python -m "$module" "${PY_ARGS[@]}")
  local envpart=""
  ((${#ENV_WORDS[@]} == 0)) || envpart="env $(qargs "${ENV_WORDS[@]}") "
  local s=""
  # shellcheck disable=SC2016  # single-quoted pieces ($(hostname), $log, $pid, $!) are expanded on the worker
  {
    s+="set -euo pipefail; cd $RDIR; "
    s+="[ -x .venv/bin/python ] || { echo \"\$(hostname): no $SHOW_DIR/.venv: run $PROG setup first\" >&2; exit 1; }; "
    s+="mkdir -p logs; log=logs/$job-\$(hostname).log; pid=logs/$job-\$(hostname).pid; "
    s+="if $ALIVE; then "
    s+="echo \"\$(hostname): $job already running (pid \$(cat \"\$pid\")): run $PROG stop first\" >&2; exit 1; fi; "
    s+="echo \"=== \$(date -u +%FT%TZ) $PROG $job\" >> \"\$log\"; "
    s+="nohup $envpart$(qargs "${py[@]}") >> \"\$log\" 2>&1 < /dev/null & "
    s+='echo $! > "$pid"; '
    s+="echo \"\$(hostname): started $job (pid \$!), log $SHOW_DIR/\$log\""
  }
  ssh_workers all "$s"
}

cmd_logs() {
  check_uint --worker "$WORKER" 0
  check_uint --lines "$LINES" 1
  JOB=${JOB:-train}
  [[ $JOB == train || $JOB == eval ]] || die "--job '$JOB' must be train or eval"
  local follow=""
  ((FOLLOW == 0)) || follow="-F "
  # shellcheck disable=SC2016  # $(hostname): expanded on the worker
  ssh_workers "$((10#$WORKER))" "tail -n $((10#$LINES)) ${follow}$RDIR/logs/$JOB-\$(hostname).log"
}

cmd_status() {
  run gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_LOC[@]}" \
    --format='table(name.basename(),state,health,acceleratorType,runtimeVersion,schedulingConfig)'
  local s=""
  # shellcheck disable=SC2016  # single-quoted pieces are expanded on the worker
  {
    s+="cd $RDIR 2>/dev/null || { echo \"\$(hostname): no $SHOW_DIR (run setup)\"; exit 0; }; "
    s+='for job in train eval; do pid=logs/$job-$(hostname).pid; log=logs/$job-$(hostname).log; '
    s+="if $ALIVE; then "
    s+='s="running (pid $(cat "$pid"))"; else s="not running"; fi; echo "$(hostname) $job: $s"; '
    s+='if [ -f "$log" ]; then tail -n 1 "$log"; fi; done'
  }
  ssh_workers all "$s" || warn "could not reach the workers (is the TPU READY? see the state above)"
}

cmd_stop() {
  JOB=${JOB:-all}
  local jobs
  case $JOB in
    train | eval) jobs=$JOB ;;
    all) jobs="train eval" ;;
    *) die "--job '$JOB' must be train, eval or all" ;;
  esac
  local s=""
  # shellcheck disable=SC2016  # single-quoted pieces are expanded on the worker
  {
    s+="cd $RDIR 2>/dev/null || exit 0; "
    s+="for job in $jobs; do "
    s+='pid=logs/$job-$(hostname).pid; '
    s+="if $ALIVE; then "
    s+='kill "$(cat "$pid")"; echo "$(hostname): stopped $job (pid $(cat "$pid"))"; '
    s+='else echo "$(hostname): $job not running"; fi; rm -f "$pid"; done'
  }
  ssh_workers all "$s"
}

case $CMD in
  create) cmd_create ;;
  delete) cmd_delete ;;
  setup) cmd_setup ;;
  train | eval) cmd_launch ;;
  logs) cmd_logs ;;
  status) cmd_status ;;
  stop) cmd_stop ;;
esac
