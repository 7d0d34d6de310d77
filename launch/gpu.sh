#!/usr/bin/env bash
# One bort-jax run on a GPU host: all its GPUs (or --gpus) form the mesh. For several hosts,
# run this on each with the same --coordinator and --num-processes and its own --process-id;
# they become the BORT_JAX_* variables that sharding.maybe_initialize_distributed reads.
#
#   pip install -e . "jax[cuda12]==0.10.2"
#   launch/gpu.sh --gpus=0,1 -- distill --config=configs/pretrain_bort.py --workdir=runs/bort
set -euo pipefail
launch_dir="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=launch/lib.sh
source "$launch_dir/lib.sh"

USAGE="usage: launch/gpu.sh [options] [--] MODE [FLAGS...]

  --gpus=LIST              GPUs to use, e.g. 0,1 (CUDA_VISIBLE_DEVICES; default: all)
  --mem-fraction=F         share of each GPU's memory JAX may take, 0 < F <= 1 (default 0.9)
  --coordinator=HOST:PORT  several hosts: process 0's address, the same on every host
  --num-processes=N        several hosts: how many (with --coordinator)
  --process-id=I           several hosts: this host's index, 0 <= I < N (with --coordinator)
  --dry-run                print the command and run nothing
  -h, --help               this text
  MODE [FLAGS...]          the bort-jax mode and its flags"

DRY_RUN=0
gpus="" mem_fraction=0.9 coordinator="" num_processes="" process_id=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    --gpus=*) gpus="${1#*=}" ;;
    --mem-fraction=*) mem_fraction="${1#*=}" ;;
    --coordinator=*) coordinator="${1#*=}"; need_value --coordinator "$coordinator" ;;
    --num-processes=*) num_processes="${1#*=}"; need_int --num-processes "$num_processes" 1 ;;
    --process-id=*) process_id="${1#*=}"; need_int --process-id "$process_id" 0 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) printf '%s\n' "$USAGE"; exit 0 ;;
    --) shift; break ;;
    --gpus | --mem-fraction | --coordinator | --num-processes | --process-id)
      usage_error "write $1=VALUE (with '=')" ;;
    -*) usage_error "unknown option '$1' (the bort-jax mode comes before its own flags)" ;;
    *) break ;;
  esac
  shift
done
need_mode "$@"

[ -z "$gpus" ] || [[ "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]] ||
  usage_error "--gpus='$gpus' is not a list of GPU indices (e.g. 0 or 0,1,2,3)"
[[ "$mem_fraction" =~ ^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$ ]] ||
  usage_error "--mem-fraction='$mem_fraction' is not allowed (a number above 0 and at most 1, e.g. 0.9)"
env_vars=(XLA_PYTHON_CLIENT_MEM_FRACTION="$mem_fraction")
[ -z "$gpus" ] || env_vars=(CUDA_VISIBLE_DEVICES="$gpus" "${env_vars[@]}")
# Several hosts: all three settings or none, as jax.distributed needs all three.
if [ -n "$coordinator$num_processes$process_id" ]; then
  [ -n "$coordinator" ] && [ -n "$num_processes" ] && [ -n "$process_id" ] ||
    usage_error "several hosts need --coordinator, --num-processes and --process-id together (got '${coordinator}', '${num_processes}', '${process_id}')"
  [[ "$coordinator" =~ ^[A-Za-z0-9.-]+:[0-9]+$ ]] ||
    usage_error "--coordinator='$coordinator' is not HOST:PORT (e.g. 10.0.0.2:8476)"
  [ "$process_id" -lt "$num_processes" ] ||
    usage_error "--process-id=$process_id is out of range (allowed: 0 to $((num_processes - 1)))"
  env_vars+=(BORT_JAX_COORDINATOR="$coordinator" BORT_JAX_NUM_PROCESSES="$num_processes"
             BORT_JAX_PROCESS_ID="$process_id")
fi

bort_jax="$(find_bort_jax)"
if [ -z "$bort_jax" ]; then
  [ "$DRY_RUN" = 1 ] || missing_bort_jax "jax[cuda12]==0.10.2"
  bort_jax=bort-jax  # a dry run prints the plain name
fi
command=(env "${env_vars[@]}" "$bort_jax" "$@")
if [ "$DRY_RUN" = 1 ]; then
  step "${command[@]}"
  exit 0
fi
printf '+ %s\n' "$(quote_all "${command[@]}")" >&2
# exec: a SIGTERM (preemption) reaches bort-jax itself, which saves a checkpoint and exits.
exec "${command[@]}"
