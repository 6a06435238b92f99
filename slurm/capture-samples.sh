#!/usr/bin/env bash
# The --wrap scripts are single-quoted on purpose: their variables expand inside the job.
# shellcheck disable=SC2016
# Run sample jobs that end in every state we parse (completed, failed, killed by a signal, cancelled
# running and pending, timeout, requeued, preempted, node failure, a 1-GPU array, an 8-GPU job) on the
# local cluster, then save Slurm's real output under tests/data/slurm/ for parser tests.
# Needs the cluster from slurm/start-local-cluster.sh and an otherwise idle node; takes about 2 min.
# It marks the node DOWN for a moment (node-failure sample), so run it on no cluster but this one.
# Needs: root (scontrol update), the cluster up and idle; for a cluster started with HPCX_SLURM_*
# settings (local-cluster-settings.sh), the same settings. Writes only OUT and a dir in /tmp.
set -euo pipefail

SCRIPT_NAME=capture-samples
# shellcheck source=slurm/local-cluster-settings.sh
source "$(dirname "$0")/local-cluster-settings.sh"
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$REPO/tests/data/slurm}
WORK=$(mktemp -d /tmp/hpcx-slurm-samples.XXXXXX)
FMT=JobID,JobIDRaw,State,ExitCode,NodeList,Elapsed,AllocTRES,Reason
HEADER="# $(sinfo -V), captured $(date -u +%F) by slurm/capture-samples.sh:"
declare -A ID
ORDER=()

state_of() { squeue -h -j "$1" -o %T 2>/dev/null | head -1; }

wait_running() {
	local i
	for ((i = 0; i < 300; i++)); do
		[[ $(state_of "$1") == RUNNING ]] && return 0
		sleep 0.2
	done
	echo "job $1 never ran" >&2
	return 1
}

wait_gone() {
	local i
	for ((i = 0; i < 5 * $2; i++)); do
		squeue -h -j "$1" 2>/dev/null | grep -q . || return 0
		sleep 0.2
	done
	echo "job $1 still queued after $2 s" >&2
	return 1
}

submit() {
	local name=$1
	shift
	ID[$name]=$(sbatch --parsable -J "$name" -o "$WORK/%x_%A_%a.out" "$@")
	ORDER+=("$name")
}

# save FILE COMMAND...: the command line as a header comment, then its output.
save() {
	local file=$1
	shift
	{
		echo "$HEADER $*"
		"$@"
	} >"$OUT/$file"
}

squeue_snapshot() { squeue -o '%A|%i|%j|%T|%r|%N'; }

[[ $(squeue -h | wc -l) -eq 0 ]] || {
	echo "the queue is not empty; run this on an idle cluster" >&2
	exit 1
}
mkdir -p "$OUT"

# 1. Ten 1-GPU tasks, at most 8 at once: each sees one distinct fake GPU; 8 and 9 wait for a free one.
submit array --array=0-9%8 --gpus=1 \
	--wrap='echo task=$SLURM_ARRAY_TASK_ID job=$SLURM_JOB_ID CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES; sleep 8'
sleep 2
{
	echo "$HEADER squeue -o '%A|%i|%j|%T|%r|%N', 2 s after submitting the array job ${ID[array]}"
	squeue_snapshot
} >"$OUT/squeue_array_running.txt"
save squeue_json_array_running.txt squeue --json
# sacct learns of a new array a few seconds after squeue does (seen: 4 s): wait for the running tasks.
for ((i = 0; i < 50; i++)); do
	sacct -n -X -P -o State -j "${ID[array]}" | grep -q RUNNING && break
	sleep 0.2
done
save sacct_array_running.txt sacct -X --parsable2 -o "$FMT" -j "${ID[array]}"
save sacct_array_running_submitit_format.txt sacct -o JobID,State,NodeList --parsable2 -j "${ID[array]}"
wait_gone "${ID[array]}" 60
submit gpu8 --gpus=8 --wrap='echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES'
wait_gone "${ID[gpu8]}" 30

# 2. Jobs that end on their own, or are cancelled.
submit timeout --time=1 --wrap='sleep 300'
submit completed --wrap='echo hello from $SLURM_JOB_ID'
submit failed --wrap='echo failing >&2; exit 1'
submit signaled --wrap='kill -9 $$'
# "Out of memory" as a job sees it without cgroups: an address-space limit makes Python raise
# MemoryError (Slurm's OUT_OF_MEMORY state needs cgroup memory enforcement, absent here).
submit oom_ish --wrap='ulimit -v 400000; /usr/bin/python3 -c "b = bytearray(1 << 30)"'
submit cancelled_running --wrap='sleep 300'
wait_running "${ID[cancelled_running]}"
sleep 1
scancel "${ID[cancelled_running]}"
submit cancelled_pending --hold --wrap='sleep 300'
sleep 1
scancel "${ID[cancelled_pending]}"

# 3. Requeue by hand, then preemption by a job in the higher-tier partition "urgent".
submit requeued --open-mode=append --wrap='echo run restart=${SLURM_RESTART_COUNT:-0}; sleep 10'
wait_running "${ID[requeued]}"
sleep 1
scontrol requeue "${ID[requeued]}"
submit preempted -p debug --gpus=8 --open-mode=append --wrap='echo run restart=${SLURM_RESTART_COUNT:-0}; sleep 15'
wait_running "${ID[preempted]}"
sleep 1
submit preemptor -p urgent --gpus=8 --wrap='echo urgent ran; sleep 2'
for name in timeout requeued preempted preemptor; do wait_gone "${ID[$name]}" 150; done

# 4. Node failure: the node is marked DOWN under a running job, which Slurm requeues (JobRequeue=1);
# ReturnToService=2 brings the node back at its next registration. The rerun is then cancelled.
submit node_fail --open-mode=append --wrap='echo run restart=${SLURM_RESTART_COUNT:-0}; sleep 300'
wait_running "${ID[node_fail]}"
sleep 1
if [[ $(squeue -h | wc -l) -ne 1 ]]; then
	echo "someone else's jobs are queued: not marking the node down under them; rerun later" >&2
	scancel "${ID[node_fail]}"
	exit 1
fi
scontrol update nodename="$NODE" state=down reason=capture-samples
sleep 2
scontrol update nodename="$NODE" state=resume 2>/dev/null || true
wait_running "${ID[node_fail]}"
sleep 1
scancel "${ID[node_fail]}"
wait_gone "${ID[node_fail]}" 30
sleep 2

# 5. What sacct says about all of them, once final.
ids=$(printf '%s\n' "${ID[@]}" | sort -n | paste -sd,)
submitit_args=()
for id in $(printf '%s\n' "${ID[@]}" | sort -n); do submitit_args+=(-j "$id"); done
save sacct_allocations.txt sacct -X --parsable2 -o "$FMT" -j "$ids"
save sacct_steps.txt sacct --parsable2 -o "$FMT" -j "$ids"
save sacct_duplicates.txt sacct -X -D --parsable2 -o "$FMT,Start,End" -j "$ids"
# The exact query submitit 1.5.4 makes (one -j per job, no -X).
save sacct_submitit_format.txt sacct -o JobID,State,NodeList --parsable2 "${submitit_args[@]}"
save sacct_json.txt sacct --json -j "$ids"
{
	echo "$HEADER job name = job id of each sample job"
	for name in "${ORDER[@]}"; do echo "$name=${ID[$name]}"; done
} >"$OUT/jobs.txt"
{
	echo "$HEADER stdout of the sample jobs (sbatch -o %x_%A_%a.out; %a is 4294967294 outside arrays)"
	for file in "$WORK"/*.out; do
		echo "==> $(basename "$file") <=="
		cat "$file"
	done
} >"$OUT/job_outputs.txt"
rm -rf "$WORK"
echo "samples written to $OUT"
