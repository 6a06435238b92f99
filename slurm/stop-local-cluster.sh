#!/usr/bin/env bash
# Stop the daemons that slurm/start-local-cluster.sh started, by their pid files, in reverse order.
# Idempotent: a daemon that is already gone (or a zombie) is skipped. Packages, configs and the
# state dir (job records, accounting database) stay; remove $HPCX_SLURM_STATE for a fresh start.
# Running jobs are left to their slurmstepd (as on a slurmd restart) unless --cancel-jobs is given.
set -euo pipefail
#
# Needs: root, and the same HPCX_SLURM_* settings the cluster was started with (see
# local-cluster-settings.sh). Where nothing was ever started (no state dir) it stops nothing.

SCRIPT_NAME=stop-local-cluster
# shellcheck source=slurm/local-cluster-settings.sh
source "$(dirname "$0")/local-cluster-settings.sh"
START_NS=$(date +%s%N)

[[ $(id -u) -eq 0 ]] || die "must run as root"
check_settings

case ${1:-} in
"") CANCEL_JOBS=0 ;;
--cancel-jobs) CANCEL_JOBS=1 ;;
*)
	log "usage: $0 [--cancel-jobs]"
	exit 2
	;;
esac

# Cancel only this cluster's jobs: SLURM_CONF must be the config that names this state dir.
if ((CANCEL_JOBS)) && [[ $(conf_state_dir) != "$STATE" ]]; then
	die "$SLURM_CONF does not belong to the cluster in $STATE; not cancelling anything (set HPCX_SLURM_CONF_DIR as for the start)"
fi
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
	if pid_alive "$file" "$comm"; then
		kill -TERM "$pid" 2>/dev/null || true
		# slurmctld saves its state on SIGTERM; give every daemon up to 15 s before SIGKILL.
		for ((i = 0; i < 150; i++)); do
			pid_alive "$file" "$comm" || break
			sleep 0.1
		done
		if pid_alive "$file" "$comm"; then
			log "$comm ($pid) ignored SIGTERM; sending SIGKILL"
			kill -KILL "$pid" 2>/dev/null || true
		fi
		STOPPED+=" $comm"
	fi
	# mariadbd and munged remove their own pid files; the slurm daemons may not.
	rm -f "$file"
}

stop "$(slurm_pid slurmd)" slurmd
stop "$(slurm_pid slurmctld)" slurmctld
stop "$(slurm_pid slurmdbd)" slurmdbd
stop "$MARIADB_PID" mariadbd
# A munged this cluster found running (another cluster's, or the machine's) has no pid file here.
stop "$MUNGED_PID" munged

elapsed_ms=$((($(date +%s%N) - START_NS) / 1000000))
printf 'hpcx-slurm: stopped [%s] in %d.%03ds (state kept in %s)\n' "${STOPPED# }" \
	$((elapsed_ms / 1000)) $((elapsed_ms % 1000)) "$STATE"
