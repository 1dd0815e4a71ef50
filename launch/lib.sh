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
