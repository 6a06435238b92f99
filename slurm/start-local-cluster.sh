#!/usr/bin/env bash
# Start a real single-node Slurm (munge, MariaDB, slurmdbd, slurmctld, slurmd) without systemd,
# for development and CI. Idempotent: a second run while everything is up changes nothing; a run
# after a crash restarts only what is down. See slurm/README.md.
set -euo pipefail
#
# Needs: root; Debian 12 (or a Debian whose archive has the packages below) and, the first time,
# apt-get access to its archive (package lists are fetched only if the install fails without them);
# free ports (see local-cluster-settings.sh). Nothing else has to exist: the config dir, state dir,
# munge key, fake GPUs and /usr/sbin/policy-rc.d (for the install only) are created when missing.
# Every path and port can be overridden for a second cluster: see local-cluster-settings.sh.

SCRIPT_NAME=start-local-cluster
# shellcheck source=slurm/local-cluster-settings.sh
source "$(dirname "$0")/local-cluster-settings.sh"
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
NGPUS=8
NCPUS=8
START_NS=$(date +%s%N)

# wait_for SECONDS DESCRIPTION COMMAND...: poll every 0.1 s until COMMAND succeeds.
wait_for() {
	local limit=$1 what=$2 deadline
	shift 2
	deadline=$(($(date +%s%N) + limit * 1000000000))
	until "$@" >/dev/null 2>&1; do
		(($(date +%s%N) < deadline)) || die "timed out after ${limit}s waiting for $what (logs: $STATE/log)"
		sleep 0.1
	done
}

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"
check_settings

install_packages() {
	local missing guard=/usr/sbin/policy-rc.d added_guard=0 installed ok=1 apt_log=$STATE/log/apt.log
	installed=$(dpkg-query -W -f='${Package} ${Status}\n' "${PACKAGES[@]}" 2>/dev/null | awk '/ok installed/ {print $1}') || true
	mapfile -t missing < <(printf '%s\n' "${PACKAGES[@]}" | grep -vxF -f <(echo "$installed"))
	((${#missing[@]})) || return 0
	log "installing ${missing[*]}"
	# dpkg must not start the services itself: this script starts them (there is no systemd here).
	if [[ ! -e $guard ]]; then
		printf '#!/bin/sh\nexit 101\n' >"$guard"
		chmod 755 "$guard"
		added_guard=1
	fi
	export DEBIAN_FRONTEND=noninteractive
	if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >"$apt_log" 2>&1; then
		# Usually stale or absent package lists (a fresh machine has none): refresh once and retry.
		apt-get update -q >>"$apt_log" 2>&1 &&
			apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$apt_log" 2>&1 || ok=0
	fi
	((added_guard == 0)) || rm -f "$guard"
	((ok)) || die "apt-get could not install ${missing[*]} (is the Debian archive reachable?), see $apt_log"
}

# The munge and mysql users (they exist once the packages are installed) must reach their dirs.
make_dirs() {
	install -d -m 0755 "$STATE/etc" "$STATE/run" "$STATE/slurmctld" "$STATE/slurmd"
	install -d -o munge -g munge -m 0700 "$STATE/munge"
	install -d -o mysql -g mysql -m 0750 "$STATE/run/mysqld"
	runuser -u mysql -- test -w "$STATE/run/mysqld" ||
		die "the mysql user cannot enter $STATE (a parent directory is closed to others?): choose another HPCX_SLURM_STATE"
	install -d -o munge -g munge -m 0755 /run/munge
	install -d -m 0755 "$CONF_DIR" "$(dirname "$GPU_PREFIX")"
	# Fake GPUs: any character device works for gres (here /dev/null's numbers).
	local i
	for ((i = 0; i < NGPUS; i++)); do
		[[ -c $GPU_PREFIX$i ]] || mknod -m 0666 "$GPU_PREFIX$i" c 1 3
	done
	# slurmctld and slurmd look themselves up by name.
	getent hosts "$HOST" >/dev/null || echo "127.0.1.1 $HOST" >>/etc/hosts
}

port_taken() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Before anything starts: the port of every daemon that is not running yet must be free (a daemon
# that cannot bind its port dies with no more than a line in its log).
check_ports() {
	local name pidfile port var
	while read -r name pidfile port var; do
		pid_alive "$pidfile" "$name" && continue
		if port_taken "$port"; then
			die "port $port for $name is in use (another program, or another cluster); choose a free one with $var=PORT"
		fi
	done <<EOF
mariadbd $MARIADB_PID $DB_PORT HPCX_SLURM_DB_PORT
slurmdbd $(slurm_pid slurmdbd) $DBD_PORT HPCX_SLURM_DBD_PORT
slurmctld $(slurm_pid slurmctld) $CTLD_PORT HPCX_SLURM_CTLD_PORT
slurmd $(slurm_pid slurmd) $SLURMD_PORT HPCX_SLURM_SLURMD_PORT
EOF
}

write_configs() {
	local mem_total real_mem pw_file=$STATE/etc/db-password
	mem_total=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo) # free(1) is not on every image
	real_mem=$((mem_total * 95 / 100))
	if [[ ! -s $pw_file ]]; then
		(umask 077 && head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$pw_file")
	fi
	DB_PASSWORD=$(<"$pw_file")

	cat >"$STATE/etc/slurm.conf" <<EOF
$MARKER $STATE
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in these containers: track processes by parentage, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# Scheduling: per-core and per-GPU packing; schedule batch jobs at once, not after a delay, and
# look at pending jobs often (a requeued job becomes eligible cred_expire seconds later, with no event).
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=5,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
# Finished jobs leave squeue quickly; sacct keeps them.
MinJobAge=10
# Time limits: kill at the limit (no grace minutes), SIGKILL 5 s after SIGTERM.
OverTimeLimit=0
KillWait=5
# Requeue: batch jobs may be requeued (scontrol requeue, preemption, node failure). A requeued job
# waits cred_expire seconds (default 120) before it may start again.
JobRequeue=1
AuthInfo=cred_expire=10
# Preemption: a job in partition "urgent" requeues the debug jobs it needs room from.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# Accounting through slurmdbd: sacct is how submitit (and we) read final job states.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# The node advertises $NCPUS CPUs and $NGPUS fake GPUs whatever the machine has.
SlurmdParameters=config_overrides
NodeName=$NODE NodeHostname=$HOST CPUs=$NCPUS RealMemory=$real_mem Gres=gpu:$NGPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes=$NODE Default=NO MaxTime=INFINITE State=UP PriorityTier=10
EOF

	cat >"$STATE/etc/gres.conf" <<EOF
$MARKER $STATE
AutoDetect=off
Name=gpu File=$GPU_PREFIX[0-$((NGPUS - 1))]
EOF

	cat >"$STATE/etc/slurmdbd.conf" <<EOF
$MARKER $STATE
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
EOF
	chmod 0600 "$STATE/etc/slurmdbd.conf"
}

# Copy a generated config to CONF_DIR when it differs (and add its name to CHANGED); refuse to
# overwrite a file this script did not write (a real cluster's config).
install_config() {
	local name=$1 mode=$2 src=$STATE/etc/$1 dst=$CONF_DIR/$1
	if [[ -e $dst ]] && ! grep -q "^$MARKER" "$dst"; then
		die "$dst exists and was not written by this script; move it away first"
	fi
	if ! cmp -s "$src" "$dst"; then
		install -m "$mode" "$src" "$dst"
		CHANGED+=" $name"
	fi
}

# Stop one of our daemons (after a config change); used only on the restart path.
stop_daemon() {
	local file=$1 comm=$2 pid i
	pid_alive "$file" "$comm" || return 0
	pid=$(<"$file")
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < 100; i++)); do
		pid_alive "$file" "$comm" || break
		sleep 0.1
	done
	if pid_alive "$file" "$comm"; then kill -KILL "$pid" 2>/dev/null || true; fi
	rm -f "$file"
}

munge_works() { munge -n | unmunge; }

start_munge() {
	local pidfile=$MUNGED_PID
	pid_alive "$pidfile" munged && return 0
	if munge_works >/dev/null 2>&1; then
		log "a munged not started by this script is already running; using it"
		return 0
	fi
	if [[ ! -s /etc/munge/munge.key ]]; then
		mungekey --create --keyfile=/etc/munge/munge.key
		chown munge:munge /etc/munge/munge.key
		chmod 0600 /etc/munge/munge.key
	fi
	# munged refuses to run as root ("Logfile is insecure"); run it as its own user.
	runuser -u munge -- /usr/sbin/munged --pid-file="$pidfile" --log-file="$STATE/munge/munged.log" \
		--seed-file="$STATE/munge/munged.seed"
	wait_for 10 munged munge_works
	STARTED+=" munged"
}

start_mariadb() {
	local pidfile=$MARIADB_PID datadir=$STATE/mysql sock=$STATE/run/mysqld/mysqld.sock i
	pid_alive "$pidfile" mariadbd && return 0
	# A datadir without the marker is a half-finished initialisation: redo it.
	if [[ ! -e $STATE/mysql.initialized ]]; then
		rm -rf "$datadir"
		install -d -o mysql -g mysql -m 0750 "$datadir"
		mariadb-install-db --no-defaults --user=mysql --datadir="$datadir" --skip-test-db \
			--auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1 ||
			die "mariadb-install-db failed, see $STATE/log/mariadb-install.log"
		touch "$STATE/mysql.initialized"
	fi
	touch "$STATE/log/mariadb.log"
	chown mysql:mysql "$STATE/log/mariadb.log"
	rm -f "$sock"
	# --no-defaults: Debian's /etc/mysql settings (datadir, socket) are not ours.
	setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$datadir" --socket="$sock" \
		--pid-file="$pidfile" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
		--log-error="$STATE/log/mariadb.log" --innodb-buffer-pool-size=256M \
		--innodb-lock-wait-timeout=900 --innodb-flush-log-at-trx-commit=2 </dev/null >>"$STATE/log/mariadb.log" 2>&1 &
	# Without job control the background setsid execs mariadbd itself, so $! is the server: stop
	# waiting as soon as it dies (e.g. port $DB_PORT taken; set HPCX_SLURM_DB_PORT).
	local server=$!
	for ((i = 0; i < 600; i++)); do
		mariadb-admin --socket="$sock" ping >/dev/null 2>&1 && break
		pid_running "$server" || die "mariadbd exited, see $STATE/log/mariadb.log"
		sleep 0.1
	done
	mariadb-admin --socket="$sock" ping >/dev/null 2>&1 || die "timed out waiting for MariaDB"
	wait_for 10 "MariaDB pid file" pid_alive "$pidfile" mariadbd
	mariadb --socket="$sock" -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASSWORD';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
	STARTED+=" mariadb"
}

# start_slurm_daemon NAME [ARGS...]
start_slurm_daemon() {
	local name=$1 pidfile
	pidfile=$(slurm_pid "$1")
	shift
	pid_alive "$pidfile" "$name" && return 0
	rm -f "$pidfile"
	"/usr/sbin/$name" "$@" || die "$name failed to start, see $STATE/log/$name.log"
	wait_for 30 "$name pid file" pid_alive "$pidfile" "$name"
	STARTED+=" $name"
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null; }

node_ready() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }

# CONF_DIR holds one cluster's config: refuse to repoint it while a cluster with another state dir
# is still running. (A fresh machine has no slurm.conf yet: nothing else can be running.)
check_other_cluster() {
	local other
	other=$(conf_state_dir)
	[[ -z $other || $other == "$STATE" ]] && return 0
	if pid_alive "$other/run/slurmctld.pid" slurmctld || pid_alive "$other/run/slurmd.pid" slurmd; then
		die "a local cluster with state dir $other is running on $CONF_DIR; stop it first (HPCX_SLURM_STATE=$other slurm/stop-local-cluster.sh), or give this one another HPCX_SLURM_CONF_DIR"
	fi
}

# --- main -------------------------------------------------------------------------------------
check_other_cluster
install -d -m 0755 "$STATE" "$STATE/log"
install_packages
make_dirs
check_ports
write_configs
CHANGED=""
STARTED=""
install_config slurm.conf 0644
install_config gres.conf 0644
install_config slurmdbd.conf 0600

# A changed config only takes effect after a restart (slurmd also complains of a mismatch).
if [[ $CHANGED == *slurmdbd.conf* ]]; then
	stop_daemon "$(slurm_pid slurmdbd)" slurmdbd
fi
if [[ $CHANGED == *slurm.conf* || $CHANGED == *gres.conf* ]]; then
	stop_daemon "$(slurm_pid slurmd)" slurmd
	stop_daemon "$(slurm_pid slurmctld)" slurmctld
fi

start_munge
start_mariadb
start_slurm_daemon slurmdbd
wait_for 60 "slurmdbd to answer" sacctmgr -n -P show cluster
start_slurm_daemon slurmctld
start_slurm_daemon slurmd -N "$NODE"

# A node left down or drained by an earlier crash is put back into service.
if [[ $(node_state) =~ (down|drain|fail) ]]; then
	scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
fi
wait_for 60 "node $NODE to become idle" node_ready
wait_for 30 "sacct to answer" sacct -n -X -S now

elapsed_ms=$((($(date +%s%N) - START_NS) / 1000000))
printf 'hpcx-slurm: up on %s (%s, %s CPUs, %s GPUs, partitions debug*,urgent) state=%s started:[%s] in %d.%03ds\n' \
	"$NODE" "$(node_state)" "$NCPUS" "$NGPUS" "$STATE" "${STARTED# }" $((elapsed_ms / 1000)) $((elapsed_ms % 1000))
if [[ $CONF_DIR != /etc/slurm ]]; then
	echo "Slurm's commands read /etc/slurm/slurm.conf; for this cluster: export SLURM_CONF=$SLURM_CONF"
fi
