#!/usr/bin/env bash
# Several JAX processes on this machine, joined over 127.0.0.1, each with its own fake CPU
# devices: the code path of a multi-host pod (collective checkpoints, per-process batch
# shares), for checking a run before paying for one. Each process gets the BORT_JAX_*
# variables that sharding.maybe_initialize_distributed reads.
#
#   launch/multiprocess_local.sh --processes=2 --devices=4 \
#       -- distill --config=configs/pretrain_demo.py:tiny --workdir=runs/mp
set -euo pipefail
launch_dir="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=launch/lib.sh
source "$launch_dir/lib.sh"

USAGE="usage: launch/multiprocess_local.sh [options] [--] MODE [FLAGS...]

  --processes=N   JAX processes to start (default 2)
  --devices=N     fake CPU devices per process (default 4)
  --port=PORT     coordinator port on 127.0.0.1, 1024-65535 (default 29731)
  --logs=DIR      where process_I.log goes (default runs/multiprocess)
  --dry-run       print the commands, one per line, and run nothing
  -h, --help      this text
  MODE [FLAGS...] the bort-jax mode and its flags, the same for every process"

DRY_RUN=0
processes=2 devices=4 port=29731 logs=runs/multiprocess
while [ "$#" -gt 0 ]; do
  case "$1" in
    --processes=*) processes="${1#*=}"; need_int --processes "$processes" 1 ;;
    --devices=*) devices="${1#*=}"; need_int --devices "$devices" 1 ;;
    --port=*) port="${1#*=}"; need_int --port "$port" 1024 ;;
    --logs=*) logs="${1#*=}"; need_value --logs "$logs" ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) printf '%s\n' "$USAGE"; exit 0 ;;
    --) shift; break ;;
    --processes | --devices | --port | --logs) usage_error "write $1=VALUE (with '=')" ;;
    -*) usage_error "unknown option '$1' (the bort-jax mode comes before its own flags)" ;;
    *) break ;;
  esac
  shift
done
need_mode "$@"
[ "$port" -le 65535 ] || usage_error "--port=$port is out of range (allowed: 1024 to 65535)"
bort_jax="$(find_bort_jax)"
if [ -z "$bort_jax" ]; then
  [ "$DRY_RUN" = 1 ] || missing_bort_jax
  bort_jax=bort-jax  # a dry run prints the plain name
fi

# The fake device count is appended to any XLA_FLAGS already set, as the test set-up does.
xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"
step mkdir -p "$logs"
pids=()
for ((i = 0; i < processes; i++)); do
  command=(env JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" BORT_JAX_COORDINATOR="127.0.0.1:$port"
           BORT_JAX_NUM_PROCESSES="$processes" BORT_JAX_PROCESS_ID="$i" "$bort_jax" "$@")
  log="$logs/process_$i.log"
  if [ "$DRY_RUN" = 1 ]; then
    printf '%s > %s 2>&1 &\n' "$(quote_all "${command[@]}")" "$(quote "$log")"
  else
    printf '+ %s > %s 2>&1 &\n' "$(quote_all "${command[@]}")" "$(quote "$log")" >&2
    "${command[@]}" > "$log" 2>&1 &
    pids+=("$!")
  fi
done
if [ "$DRY_RUN" = 1 ]; then
  echo wait
  exit 0
fi

# Ctrl-C or a SIGTERM reaches every process started here (by its own pid), so each saves a
# checkpoint and exits. The processes are polled rather than waited on in order: when one
# fails, the others would wait for it forever in their collectives, so they are stopped too.
stop_all() { kill -TERM "${pids[@]}" 2> /dev/null || true; }
trap stop_all INT TERM
status=0 left="$processes"
finished=()
while [ "$left" -gt 0 ]; do
  for ((i = 0; i < processes; i++)); do
    [ -z "${finished[$i]:-}" ] || continue
    ! kill -0 "${pids[$i]}" 2> /dev/null || continue
    rc=0
    wait "${pids[$i]}" || rc=$?
    finished[$i]=1 left=$((left - 1))
    if [ "$rc" != 0 ]; then
      [ "$status" != 0 ] || { status="$rc"; stop_all; }
      printf 'process %d failed with status %d; the end of %s:\n' "$i" "$rc" "$logs/process_$i.log" >&2
      tail -n 20 "$logs/process_$i.log" >&2
    fi
  done
  [ "$left" -eq 0 ] || sleep 1
done
tail -n 5 "$logs/process_0.log"
exit "$status"
