#!/usr/bin/env bash
# Stop the daemons that slurm/start-local-cluster.sh started, by their pid files, in reverse order.
# Idempotent: a daemon that is already gone (or a zombie) is skipped. Packages, configs and the
# state dir (job records, accounting database) stay; remove $HPCX_SLURM_STATE for a fresh start.
# Running jobs are left to their slurmstepd (as on a slurmd restart) unless --cancel-jobs is given.
set -euo pipefail

STATE=${HPCX_SLURM_STATE:-/var/lib/hpcx-slurm}
START_NS=$(date +%s%N)

log() { echo "stop-local-cluster: $*" >&2; }

[[ $(id -u) -eq 0 ]] || {
	log "error: must run as root"
	exit 1
}

# A daemon that exited can stay a zombie here, so `kill -0` is not enough: read its /proc state
# and check the command name too (a stale pid file may name a reused pid).
pid_alive() {
	local pid=$1 comm=$2 state
	state=$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || return 1
	[[ -n $state && $state != Z && $state != X ]] || return 1
	[[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]]
}

case ${1:-} in
"") CANCEL_JOBS=0 ;;
--cancel-jobs) CANCEL_JOBS=1 ;;
*)
	log "usage: $0 [--cancel-jobs]"
	exit 2
	;;
esac

# scancel needs slurmctld; wait for the jobs to end so that slurmd kills their processes first.
if ((CANCEL_JOBS)) && squeue -h >/dev/null 2>&1; then
	mapfile -t jobs < <(squeue -h -o %A | sort -u)
	if ((${#jobs[@]})); then
		scancel "${jobs[@]}" || true
		for ((i = 0; i < 300; i++)); do
			[[ -z $(squeue -h -o %A) ]] && break
			sleep 0.1
		done
		log "cancelled ${#jobs[@]} job(s)"
	fi
fi

STOPPED=""
stop() {
	local file=$1 comm=$2 pid i
	[[ -s $file ]] || return 0
	pid=$(<"$file")
	if [[ $pid =~ ^[0-9]+$ ]] && pid_alive "$pid" "$comm"; then
		kill -TERM "$pid" 2>/dev/null || true
		# slurmctld saves its state on SIGTERM; give every daemon up to 15 s before SIGKILL.
		for ((i = 0; i < 150; i++)); do
			pid_alive "$pid" "$comm" || break
			sleep 0.1
		done
		if pid_alive "$pid" "$comm"; then
			log "$comm ($pid) ignored SIGTERM; sending SIGKILL"
			kill -KILL "$pid" 2>/dev/null || true
		fi
		STOPPED+=" $comm"
	fi
	# mariadbd and munged remove their own pid files; the slurm daemons may not.
	rm -f "$file"
}

stop "$STATE/run/slurmd.pid" slurmd
stop "$STATE/run/slurmctld.pid" slurmctld
stop "$STATE/run/slurmdbd.pid" slurmdbd
stop "$STATE/run/mysqld/mariadbd.pid" mariadbd
stop "$STATE/munge/munged.pid" munged

elapsed_ms=$((($(date +%s%N) - START_NS) / 1000000))
printf 'hpcx-slurm: stopped [%s] in %d.%03ds (state kept in %s)\n' "${STOPPED# }" \
	$((elapsed_ms / 1000)) $((elapsed_ms % 1000)) "$STATE"
