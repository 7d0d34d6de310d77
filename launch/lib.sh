# Helpers sourced by every launch script (not run on its own): one way to quote, print or run
# a command, and one way to stop on bad input, so that --dry-run prints exactly what a real
# run executes.
#
# A script sets USAGE (its usage text) and DRY_RUN (0 or 1) before calling these.

# quote ARG: ARG as the shell reads it back; plain words stay bare, anything else is put in
# single quotes (printf %q would work too, but its backslashes are hard to read).
quote() {
  case "$1" in
    '') printf "''" ;;
    *[!A-Za-z0-9_./:=@%+,-]*) printf "'%s'" "${1//\'/\'\\\'\'}" ;;
    *) printf '%s' "$1" ;;
  esac
}

# quote_all ARGS...: the arguments quoted and joined by single spaces.
quote_all() {
  local out="" arg
  for arg in "$@"; do out+="${out:+ }$(quote "$arg")"; done
  printf '%s' "$out"
}

# step ARGS...: prints the command (dry run) or prints it to stderr and runs it.
step() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '%s\n' "$(quote_all "$@")"
  else
    printf '+ %s\n' "$(quote_all "$@")" >&2
    "$@"
  fi
}

# usage_error MESSAGE: one paragraph naming what is wrong, the usage text, exit status 2.
usage_error() {
  printf '%s: %s\n\n%s\n' "$(basename "$0")" "$1" "$USAGE" >&2
  exit 2
}

# need_value OPTION VALUE: stops when an option that takes a value got an empty one.
need_value() {
  [ -n "$2" ] || usage_error "$1 needs a value (write $1=VALUE)"
}

# need_int OPTION VALUE MIN: stops unless VALUE is a whole number >= MIN.
need_int() {
  case "$2" in
    '' | *[!0-9]*) usage_error "$1=$2 is not a whole number (allowed: $3 or more)" ;;
  esac
  [ "$2" -ge "$3" ] || usage_error "$1=$2 is too small (allowed: $3 or more)"
}

# need_mode ARGS...: the bort-jax mode and its flags must start with a mode name.
need_mode() {
  [ "$#" -gt 0 ] || usage_error "no bort-jax mode given (e.g. '-- distill --config=... --workdir=...')"
  case "$1" in
    -*) usage_error "the bort-jax mode must come first after '--', got '$1'" ;;
  esac
}

# find_bort_jax: the bort-jax to run, printed: the one on PATH, else the one in the virtual
# environment README.md's quick start makes at the repository root (.venv/bin/bort-jax);
# nothing when neither exists.
find_bort_jax() {
  local venv
  venv="$(repo_root)/.venv/bin/bort-jax"
  if command -v bort-jax > /dev/null; then
    printf 'bort-jax'
  elif [ -x "$venv" ]; then
    printf '%s' "$venv"
  fi
}

# repo_root: the checkout holding these scripts (the parent of launch/).
repo_root() {
  (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
}

# missing_bort_jax [PIP_ARGS...]: stops, saying how to install bort-jax where find_bort_jax
# looks (PIP_ARGS: extra requirements, e.g. a CUDA jax) or how to put it on PATH.
missing_bort_jax() {
  local root install
  root="$(repo_root)"
  install="$(quote_all cd "$root") && python3 -m venv .venv && .venv/bin/pip install -e .${*:+ $(quote_all "$@")}"
  usage_error "bort-jax is not on PATH and $(quote "$root/.venv/bin/bort-jax") does not exist.
Install it where this script looks, as README.md's quick start does:
  $install
or activate the environment that has it, e.g.:
  source $(quote "$root/.venv/bin/activate")"
}
