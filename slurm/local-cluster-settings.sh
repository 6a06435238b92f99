# Settings and helpers shared by start-local-cluster.sh and stop-local-cluster.sh (sourced, not run;
# the sourcing script sets SCRIPT_NAME first). Every system path and port the cluster uses comes from
# an environment variable, with today's value as the default, so that a second cluster (a test's, in
# a temporary root) can run beside the first: give start and stop the same values.
#   HPCX_SLURM_STATE       state dir: daemons' state, pid files, logs, MariaDB  [/var/lib/hpcx-slurm]
#   HPCX_SLURM_CONF_DIR    slurm.conf, gres.conf, slurmdbd.conf                 [/etc/slurm]
#   HPCX_SLURM_CLUSTER     ClusterName                                          [hpcx]
#   HPCX_SLURM_NODE        NodeName of the one node (slurmd -N)                 [hostname -s]
#   HPCX_SLURM_GPU_PREFIX  fake GPU devices PREFIX0..PREFIX7                    [/dev/fakegpu]
#   HPCX_SLURM_CTLD_PORT   slurmctld                                            [6817]
#   HPCX_SLURM_SLURMD_PORT slurmd                                               [6818]
#   HPCX_SLURM_DBD_PORT    slurmdbd                                             [6819]
#   HPCX_SLURM_DB_PORT     MariaDB, on 127.0.0.1                                [3306]
# munge is the machine's, shared by every cluster on it: key /etc/munge/munge.key, socket /run/munge.
# Debian's Slurm commands and daemons read /etc/slurm/slurm.conf unless SLURM_CONF names another file:
# these scripts export SLURM_CONF for what they run, and a user of a cluster with another config dir
# must export it too (start-local-cluster.sh prints the line).

log() { echo "$SCRIPT_NAME: $*" >&2; }
die() {
	log "error: $*"
	exit 1
}

# Any command that fails without its own message still says so: set -e alone would exit silently.
# (Only in the main shell: a failing subshell's caller fails too and reports the line that called it.)
on_error() {
	((BASH_SUBSHELL == 0)) || exit "$1"
	log "error: line $2: '$3' failed (exit $1)"
	exit "$1"
}
set -E
trap 'on_error $? $LINENO "$BASH_COMMAND"' ERR

STATE=${HPCX_SLURM_STATE:-/var/lib/hpcx-slurm}
CONF_DIR=${HPCX_SLURM_CONF_DIR:-/etc/slurm}
CLUSTER=${HPCX_SLURM_CLUSTER:-hpcx}
HOST=$(hostname -s)
NODE=${HPCX_SLURM_NODE:-$HOST}
GPU_PREFIX=${HPCX_SLURM_GPU_PREFIX:-/dev/fakegpu}
CTLD_PORT=${HPCX_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${HPCX_SLURM_SLURMD_PORT:-6818}
DBD_PORT=${HPCX_SLURM_DBD_PORT:-6819}
DB_PORT=${HPCX_SLURM_DB_PORT:-3306}
export SLURM_CONF=$CONF_DIR/slurm.conf
# The first line of every config file the start script writes; it names the state dir.
MARKER="# Written by hpc-executor slurm/start-local-cluster.sh; state in"

check_settings() {
	local var value
	for var in HPCX_SLURM_STATE HPCX_SLURM_CONF_DIR HPCX_SLURM_GPU_PREFIX; do
		value=${!var:-/}
		[[ $value == /* ]] || die "$var must be an absolute path, not '$value'"
	done
	for var in HPCX_SLURM_CTLD_PORT HPCX_SLURM_SLURMD_PORT HPCX_SLURM_DBD_PORT HPCX_SLURM_DB_PORT; do
		value=${!var:-1}
		[[ $value =~ ^[1-9][0-9]{0,4}$ ]] && ((value <= 65535)) || die "$var must be a port number, not '$value'"
	done
	[[ $(printf '%s\n' "$CTLD_PORT" "$SLURMD_PORT" "$DBD_PORT" "$DB_PORT" | sort -u | wc -l) == 4 ]] ||
		die "the four ports must differ (slurmctld $CTLD_PORT, slurmd $SLURMD_PORT, slurmdbd $DBD_PORT, MariaDB $DB_PORT)"
	[[ $CLUSTER =~ ^[a-z][a-z0-9_]{0,39}$ ]] || die "HPCX_SLURM_CLUSTER must be lower-case letters, digits and _, not '$CLUSTER'"
	# (The default, this host's own name, is taken as it is.)
	[[ -z ${HPCX_SLURM_NODE:-} || $NODE =~ ^[A-Za-z0-9][A-Za-z0-9-]*$ ]] ||
		die "HPCX_SLURM_NODE must be a plain host-like name, not '$NODE'"
}

# A daemon that exited can stay a zombie here (nothing reaps orphans), so `kill -0` is not enough:
# read the /proc state.
pid_running() {
	local state
	state=$(awk '/^State:/ {print $2}' "/proc/$1/status" 2>/dev/null) || return 1
	[[ -n $state && $state != Z && $state != X ]]
}

# pid_alive PIDFILE COMM: the pid file names a running process called COMM (a stale pid file may
# name a reused pid).
pid_alive() {
	local pid
	[[ -s $1 ]] || return 1
	pid=$(<"$1")
	[[ $pid =~ ^[0-9]+$ ]] && pid_running "$pid" && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]]
}

# pid files of the daemons, in start order.
MUNGED_PID=$STATE/munge/munged.pid
MARIADB_PID=$STATE/run/mysqld/mariadbd.pid
slurm_pid() { echo "$STATE/run/$1.pid"; }

# The state dir named in the marker line of CONF_DIR's slurm.conf (empty if none or not ours).
conf_state_dir() {
	[[ -f $SLURM_CONF ]] || return 0
	sed -n "s|^$MARKER ||p" "$SLURM_CONF" | head -1
}
