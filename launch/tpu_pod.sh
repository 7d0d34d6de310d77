#!/usr/bin/env bash
# A Cloud TPU slice's whole life for one bort-jax run: create (spot, or through a queued
# resource), set up every worker, run the mode on every worker, collect each worker's log,
# delete. See launch/README.md for the TPU software version per generation.
#
#   launch/tpu_pod.sh --name=bort-v5p --zone=us-east5-a --type=v5p-32 --dry-run \
#       -- distill --config=configs/pretrain_bort.py --workdir=gs://BUCKET/bort
#
# Every worker runs the same command; JAX discovers the pod by itself (TPU_WORKER_HOSTNAMES,
# read by sharding.maybe_initialize_distributed), each process reads its share of every batch
# and only process 0 writes metrics. A multi-host slice needs a workdir every worker shares
# (gs://...), since checkpoints are written collectively.
set -euo pipefail
launch_dir="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=launch/lib.sh
source "$launch_dir/lib.sh"

USAGE="usage: launch/tpu_pod.sh --name=NAME --zone=ZONE [--type=TYPE] [options] -- MODE [FLAGS...]

  --name=NAME          TPU (and queued resource) name: lower-case letters, digits, '-'
  --zone=ZONE          e.g. us-east5-a
  --type=TYPE          accelerator type: v4-N, v5p-N, v5litepod-N, v6e-N (needed by create,
                       and by collect unless --workers is given)
  --runtime=VERSION    TPU software version (default: the one for TYPE's generation)
  --project=PROJECT    Google Cloud project (default: gcloud's configured one)
  --capacity=KIND      spot (default; preemptible, a rerun resumes from the checkpoint) or
                       on-demand
  --queued             request the slice through a queued resource and wait until ACTIVE
  --source=SRC         what every worker installs: a local checkout (default: this one) or
                       a git URL (https://, ssh://, git@, file://)
  --ref=REF            branch, tag or commit of a git --source
  --workers=N          hosts in the slice (default: from TYPE)
  --logs=DIR           where collect puts worker_I.log (default: runs/tpu_logs/NAME)
  --steps=LIST         comma list of create,setup,run,collect,delete (default: all, in
                       that order)
  --dry-run            print the commands, one per line, and run nothing; first, when the
                       slice is one bort-jax can plan for (PLANNED below) and the mode is
                       distill, teacher-adapt, extract or finetune, compile the mode for it
                       (bort-jax MODE ... --dry-run --target=T, the plan extra) and print its
                       verdict on stderr: a run that does not fit stops here, exit 2
  --no-plan            a dry run without that plan
  -h, --help           this text
  -- MODE [FLAGS...]   the bort-jax mode and its flags, run on every worker"

DRY_RUN=0 plan=1
# The slices bort-jax's planner knows (bort_jax/plan/targets.py), as --type names them.
PLANNED="v5litepod-4:v5e-4 v5litepod-8:v5e-8 v5litepod-64:v5e-64 v4-32:v4-32 v5p-128:v5p-128"
name="" zone="" type="" runtime="" project="" capacity=spot queued=0 ref="" workers="" logs=""
source_="$(cd "$launch_dir/.." && pwd)"
steps="create,setup,run,collect,delete"
while [ "$#" -gt 0 ]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --type=*) type="${1#*=}" ;;
    --runtime=*) runtime="${1#*=}"; need_value --runtime "$runtime" ;;
    --project=*) project="${1#*=}"; need_value --project "$project" ;;
    --capacity=*) capacity="${1#*=}" ;;
    --queued) queued=1 ;;
    --source=*) source_="${1#*=}"; need_value --source "$source_" ;;
    --ref=*) ref="${1#*=}"; need_value --ref "$ref" ;;
    --workers=*) workers="${1#*=}"; need_int --workers "$workers" 1 ;;
    --logs=*) logs="${1#*=}"; need_value --logs "$logs" ;;
    --steps=*) steps="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    --no-plan) plan=0 ;;
    -h | --help) printf '%s\n' "$USAGE"; exit 0 ;;
    --) shift; break ;;
    --name | --zone | --type | --runtime | --project | --capacity | --source | --ref | \
      --workers | --logs | --steps) usage_error "write $1=VALUE (with '=')" ;;
    *) usage_error "unknown option '$1' (the bort-jax mode and its flags go after '--')" ;;
  esac
  shift
done

# --- Validation: everything is checked before the first command runs. ---
[ -n "$name" ] || usage_error "--name is missing (the TPU's name, e.g. --name=bort-v5p)"
[ -n "$zone" ] || usage_error "--zone is missing (e.g. --zone=us-east5-a)"
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  usage_error "--name='$name' is not a TPU name (lower-case letters, digits and '-', starting with a letter)"
[[ "$zone" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
  usage_error "--zone='$zone' is not a zone (e.g. us-east5-a, europe-west4-b)"
case "$capacity" in spot | on-demand) ;; *)
  usage_error "--capacity='$capacity' is not allowed (allowed: spot, on-demand)" ;;
esac
want=()
IFS=',' read -r -a asked <<< "$steps"
[ "${#asked[@]}" -gt 0 ] || usage_error "--steps is empty (allowed: create,setup,run,collect,delete)"
for s in "${asked[@]}"; do
  case "$s" in create | setup | run | collect | delete) ;; *)
    usage_error "--steps: '$s' is not a step (allowed: create,setup,run,collect,delete)" ;;
  esac
done
has() { case ",$steps," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# The generation fixes the default TPU software version and how many chips one host holds.
generation="" size=0
if [ -n "$type" ]; then
  [[ "$type" =~ ^(v[0-9]+[a-z]*)-([0-9]+)$ ]] ||
    usage_error "--type='$type' is not an accelerator type (e.g. v4-32, v5p-16, v5litepod-16, v6e-8)"
  generation="${BASH_REMATCH[1]}" size="${BASH_REMATCH[2]}"
fi
if [ -z "$runtime" ]; then
  case "$generation" in
    v2 | v3 | v4) runtime=tpu-ubuntu2204-base ;;
    v5p) runtime=v2-alpha-tpuv5 ;;
    v5litepod) runtime=v2-alpha-tpuv5-lite ;;
    v6e) runtime=v2-alpha-tpuv6e ;;
  esac
fi
if has create; then
  [ -n "$type" ] || usage_error "the create step needs --type (e.g. --type=v5p-32)"
  [ -n "$runtime" ] ||
    usage_error "--type='$type': no default TPU software version for '$generation'; pass --runtime"
fi
if [ -z "$workers" ] && [ -n "$type" ]; then
  # v2, v3, v4 and v5p count TensorCores (8 per 4-chip host); v5e and v6e count chips (one host of up
  # to 8, then 4 per host).
  case "$generation" in
    v2 | v3 | v4 | v5p) workers=$(( size > 8 ? size / 8 : 1 )) ;;
    v5litepod | v6e) workers=$(( size > 8 ? size / 4 : 1 )) ;;
  esac
fi
if has collect && [ -z "$workers" ]; then
  usage_error "the collect step needs the number of hosts: pass --workers=N (or a --type of v2, v3, v4, v5p, v5litepod or v6e)"
fi
logs="${logs:-runs/tpu_logs/$name}"

if has setup; then
  case "$source_" in
    https://* | http://* | ssh://* | git@* | file://*) source_kind=git ;;
    *)
      [ -d "$source_" ] && { [ -f "$source_/setup.cfg" ] || [ -f "$source_/pyproject.toml" ]; } ||
        usage_error "--source='$source_' is neither a checkout of bort_jax (a directory with setup.cfg) nor a git URL (https://, ssh://, git@, file://)"
      source_kind=dir ;;
  esac
  [ -z "$ref" ] || [ "$source_kind" = git ] || usage_error "--ref='$ref' applies only to a git --source"
  # The jax pin of the package being installed (setup.cfg), so the TPU build matches it.
  jax_version=0.10.2
  if [ "$source_kind" = dir ]; then
    jax_version="$(sed -n 's/^ *jax==\([0-9.]*\) *$/\1/p' "$source_/setup.cfg" 2>/dev/null | head -n 1)"
    [ -n "$jax_version" ] || usage_error "--source='$source_': setup.cfg has no 'jax==VERSION' pin"
  fi
fi
if ! has run && [ "$#" -gt 0 ]; then
  usage_error "a bort-jax mode was given ('$1') but --steps='$steps' has no run step"
fi
if has run; then
  need_mode "$@"
  mode_args=("$@")
  for arg in "$@"; do
    case "$arg" in
      --workdir=gs://*) ;;
      --workdir=*)
        [ "${workers:-1}" -le 1 ] || printf 'tpu_pod.sh: warning: %s is local to each worker; %s\n' \
          "$arg" "a ${workers}-host slice needs a shared workdir (gs://...) for its checkpoints" >&2 ;;
    esac
  done
fi

# --- The plan: the mode compiled for this slice before anything is paid for. ---
if [ "$DRY_RUN" = 1 ] && [ "$plan" = 1 ] && has run && [ -n "$type" ]; then
  case "$1" in
    distill | teacher-adapt | extract | finetune)
      target=""
      for pair in $PLANNED; do [ "${pair%%:*}" = "$type" ] && target="${pair#*:}"; done
      if [ -z "$target" ]; then
        printf 'tpu_pod.sh: no plan for --type=%s (planned slices: %s); --no-plan hides this\n' \
          "$type" "$(for p in $PLANNED; do printf '%s ' "${p%%:*}"; done)" >&2
      else
        printf '+ bort-jax %s --dry-run --target=%s   (the plan, on stderr)\n' "$*" "$target" >&2
        if ! bort-jax "$@" --dry-run --target="$target" >&2; then
          echo "tpu_pod.sh: the plan says $1 does not fit $type (above); nothing created" >&2
          exit 2
        fi
      fi ;;
  esac
fi

# --- The steps. ---
gflags=(--zone="$zone")
[ -z "$project" ] || gflags+=(--project="$project")
spot=()
[ "$capacity" = on-demand ] || spot=(--spot)
tpu_vm=(gcloud compute tpus tpu-vm)
queued_res=(gcloud compute tpus queued-resources)

do_create() {
  if [ "$queued" = 1 ]; then
    step "${queued_res[@]}" create "$name" --node-id="$name" --accelerator-type="$type" \
      --runtime-version="$runtime" ${spot[@]+"${spot[@]}"} "${gflags[@]}"
    wait_active
  else
    step "${tpu_vm[@]}" create "$name" --accelerator-type="$type" --version="$runtime" \
      ${spot[@]+"${spot[@]}"} "${gflags[@]}"
  fi
}

# A queued resource is granted later; setup can start only once it is ACTIVE.
wait_active() {
  local describe=("${queued_res[@]}" describe "$name" "${gflags[@]}" --format='value(state.state)')
  if [ "$DRY_RUN" = 1 ]; then step "${describe[@]}"; return; fi
  printf '+ %s   (every 60 s until ACTIVE)\n' "$(quote_all "${describe[@]}")" >&2
  local state="" last=""
  while :; do
    state="$("${describe[@]}")"
    [ "$state" = "$last" ] || printf 'queued resource %s: %s\n' "$name" "$state" >&2
    last="$state"
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED) echo "tpu_pod.sh: queued resource $name is $state" >&2; return 1 ;;
    esac
    sleep 60
  done
}

do_setup() {
  # jax 0.10 needs Python >= 3.11 and the TPU images ship Ubuntu 22.04's 3.10, so uv brings a
  # Python of its own into ~/venv.
  local install="python3 -m pip install --quiet --user uv"
  install+=" && ~/.local/bin/uv venv --quiet --python 3.11 ~/venv"
  install+=" && ~/.local/bin/uv pip install --quiet --python ~/venv/bin/python ~/bort_jax"
  install+=" 'jax[tpu]==$jax_version'"
  local fetch
  if [ "$source_kind" = dir ]; then
    local tarball="${TMPDIR:-/tmp}/bort_jax_src_$name.tgz"
    step tar -C "$source_" --exclude=./.venv --exclude=./.git --exclude=./runs \
      --exclude=__pycache__ -czf "$tarball" .
    step "${tpu_vm[@]}" scp "$tarball" "$name:bort_jax_src.tgz" --worker=all "${gflags[@]}"
    fetch="mkdir -p ~/bort_jax && tar -C ~/bort_jax -xzf ~/bort_jax_src.tgz"
  else
    fetch="git clone --quiet $(quote "$source_") ~/bort_jax"
    [ -z "$ref" ] || fetch+=" && git -C ~/bort_jax checkout --quiet $(quote "$ref")"
  fi
  step "${tpu_vm[@]}" ssh "$name" --worker=all "${gflags[@]}" \
    --command="set -e; rm -rf ~/bort_jax; $fetch; $install"
}

do_run() {
  # nohup: a dropped ssh session does not stop the run; a preemption (SIGTERM) makes every
  # worker save a checkpoint and exit, and running the run step again resumes from it.
  step "${tpu_vm[@]}" ssh "$name" --worker=all "${gflags[@]}" \
    --command="cd ~/bort_jax && nohup ~/venv/bin/bort-jax $(quote_all "${mode_args[@]}") > ~/bort_jax.log 2>&1 < /dev/null & wait \$!"
}

do_collect() {
  local i failed=0
  step mkdir -p "$logs"
  for ((i = 0; i < workers; i++)); do
    step "${tpu_vm[@]}" scp "$name:bort_jax.log" "$logs/worker_$i.log" --worker="$i" \
      "${gflags[@]}" || failed=1
  done
  return "$failed"
}

do_delete() {
  if [ "$queued" = 1 ]; then
    step "${queued_res[@]}" delete "$name" --force --quiet "${gflags[@]}"
  else
    step "${tpu_vm[@]}" delete "$name" --quiet "${gflags[@]}"
  fi
}

# A failure before the delete step leaves the slice up (and billing): say so.
created=0
remind() {
  local rc=$?
  if [ "$rc" != 0 ] && [ "$created" = 1 ]; then
    printf 'tpu_pod.sh: stopped with status %s; TPU %s may still be up: delete it with\n  %s --name=%s --zone=%s%s --steps=delete\n' \
      "$rc" "$name" "$0" "$name" "$zone" "$([ "$queued" = 0 ] || echo ' --queued')" >&2
  fi
}
[ "$DRY_RUN" = 1 ] || trap remind EXIT

status=0
if has create; then created=1; do_create; fi
if has setup; then created=1; do_setup; fi
# The run's own failure still collects the logs and deletes the slice; its status is returned.
if has run; then created=1; do_run || status=$?; fi
if has collect; then
  do_collect || echo "tpu_pod.sh: some worker logs could not be copied to $logs" >&2
fi
if has delete; then do_delete; created=0; fi
exit "$status"
