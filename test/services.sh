# shellcheck shell=bash
# test/services.sh: throw-away PostgreSQL 15 and RabbitMQ for tests and the demo.
#
# Two ways to use it:
#   . test/services.sh              # sourced: functions below, state in shell variables
#   bash test/services.sh FUNC ...  # one function, state kept in $SVC_DIR/state.env
#
# Every process is started as a child we know the PID of (postmaster via setpriv,
# the rabbitmq-server wrapper, a foreground epmd) and stopped by that PID, never
# by name.  Ports are picked free at run time (outside the ephemeral range).
# State (ports, PIDs, paths) is saved to $SVC_DIR/state.env after every change so
# that another process (pytest, a later `bash test/services.sh svc_stop_all`, an
# EXIT trap) can find and stop what is running even after restarts.
#
# Functions:
#   svc_init                 create SVC_DIR, pick ports, write state
#   pg_start                 initdb (first time) + start; env PG_PRELOAD, PG_FSYNC, PG_EXTRA_CONF
#   pg_stop / pg_stop_immediate / pg_restart / pg_start_again
#   rmq_launch / rmq_wait_ready / rmq_start / rmq_stop / rmq_kill / rmq_start_again
#   rmq_ctl ARGS...          rabbitmqctl against our node
#   rmq_setup_user [U] [P]   add the broker user (default storyboard/storyboard), full rights on /
#   sbw_pg_conf FILE         write the storyboard_worker test settings to FILE
#   sbw_start_all            broker + PostgreSQL (preloading storyboard_worker) + broker user
#   svc_stop_all / svc_cleanup / svc_env (print exports for a shell)

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
# psql and pg_isready: PostgreSQL 15's when PGBIN has none (a 17 or 18 server, test/pg_majors.sh)
if [ -x "$PGBIN/psql" ]; then PGCLIENT=${PGCLIENT:-$PGBIN}; else PGCLIENT=${PGCLIENT:-/usr/lib/postgresql/15/bin}; fi
RMQ_BIN=${RMQ_BIN:-/usr/lib/rabbitmq/bin}
SBW_RMQ_USER=${SBW_RMQ_USER:-storyboard}
SBW_RMQ_PASS=${SBW_RMQ_PASS:-storyboard}

_SVC_STATE_VARS="SVC_DIR PG_PORT AMQP_PORT AMQP_DIST_PORT EPMD_PORT RMQ_NODE PG_PID RMQ_PID RMQ_BEAM_PID EPMD_PID PGHOST PGPORT PGUSER PG_DATA PG_LOG AMQP_URL SBW_RMQ_USER SBW_RMQ_PASS"

_alive() { [ -n "${1:-}" ] && [ -d "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
_wait_gone() {
	local i
	for i in $(seq 1 $(( ${2:-30} * 20 ))); do
		_alive "$1" || { wait "$1" 2>/dev/null || true; return 0; }
		sleep 0.05
	done
	return 1
}
_port_free() { ! ss -Htan "( sport = :$1 )" 2>/dev/null | grep . >/dev/null; }        # no socket at all
_port_unbound() { ! ss -Hltn "( sport = :$1 )" 2>/dev/null | grep . >/dev/null; }     # nobody listening
_pick_port() {   # a free TCP port in 20000-32767 (below Linux's ephemeral range), not in $*
	local p i
	for i in $(seq 1 200); do
		p=$(( 20000 + (RANDOM * 32768 + RANDOM) % 12768 ))
		case " $* " in *" $p "*) continue ;; esac
		_port_free "$p" && { echo "$p"; return 0; }
	done
	echo "no free port found" >&2
	return 1
}

svc_save() {
	[ -n "${SVC_DIR:-}" ] && [ -d "$SVC_DIR" ] || return 0
	local v tmp="$SVC_DIR/state.env.tmp"
	: >"$tmp"
	for v in $_SVC_STATE_VARS; do printf '%s=%q\n' "$v" "${!v:-}" >>"$tmp"; done
	mv -f "$tmp" "$SVC_DIR/state.env"
}
svc_load() {   # read $SVC_DIR/state.env (SVC_DIR from the environment)
	[ -n "${SVC_DIR:-}" ] && [ -f "$SVC_DIR/state.env" ] || return 0
	# shellcheck disable=SC1091
	. "$SVC_DIR/state.env"
	_rmq_env_init
}
svc_env() {   # exports for an interactive shell
	echo "export SVC_DIR=$SVC_DIR PGHOST=$PGHOST PGPORT=$PGPORT PGUSER=$PGUSER AMQP_URL=$AMQP_URL"
}

svc_init() {
	if [ -z "${SVC_DIR:-}" ]; then SVC_DIR=$(mktemp -d /tmp/sbw-svc.XXXXXX); fi
	mkdir -p "$SVC_DIR"
	chmod 755 "$SVC_DIR"        # mktemp -d gives 0700; the postgres user must traverse it
	[ -n "${PG_PORT:-}" ] || PG_PORT=$(_pick_port) || return 1
	[ -n "${AMQP_PORT:-}" ] || AMQP_PORT=$(_pick_port "$PG_PORT") || return 1
	[ -n "${AMQP_DIST_PORT:-}" ] || AMQP_DIST_PORT=$(_pick_port "$PG_PORT" "$AMQP_PORT") || return 1
	[ -n "${EPMD_PORT:-}" ] || EPMD_PORT=$(_pick_port "$PG_PORT" "$AMQP_PORT" "$AMQP_DIST_PORT") || return 1
	RMQ_NODE=${RMQ_NODE:-sbw$$@localhost}
	PG_DATA=$SVC_DIR/pg/data
	PG_LOG=$SVC_DIR/pg/postgres.log
	AMQP_URL="amqp://guest:guest@127.0.0.1:$AMQP_PORT"
	_rmq_env_init
	svc_save
}

# ---------------------------------------------------------------- PostgreSQL
pg_start() {   # env: PG_PRELOAD, PG_FSYNC (off|on, default off), PG_EXTRA_CONF (file), PG_MAX_WORKERS
	[ -n "${PG_PORT:-}" ] || svc_init || return 1
	local d=$SVC_DIR/pg
	if [ ! -f "$PG_DATA/PG_VERSION" ]; then
		mkdir -p "$d" && chown postgres:postgres "$d" && chmod 700 "$d"
		runuser -u postgres -- "$PGBIN/initdb" -D "$PG_DATA" -A trust -U postgres -E UTF8 --locale=C \
			--no-sync --no-instructions >"$d/initdb.log" 2>&1 || { cat "$d/initdb.log" >&2; return 1; }
		cat >>"$PG_DATA/postgresql.conf" <<EOF

# ---- test settings (test/services.sh)
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$d'
shared_preload_libraries = '${PG_PRELOAD:-}'
fsync = ${PG_FSYNC:-off}
full_page_writes = ${PG_FSYNC:-off}
max_worker_processes = ${PG_MAX_WORKERS:-32}
log_line_prefix = '%m [%p] %b: '
EOF
		if [ -n "${PG_EXTRA_CONF:-}" ]; then cat "$PG_EXTRA_CONF" >>"$PG_DATA/postgresql.conf"; fi
	fi
	pg_start_again
}
pg_start_again() {   # start the existing data directory
	local d=$SVC_DIR/pg i
	if _alive "${PG_PID:-}"; then echo "pg_start: already running ($PG_PID)" >&2; return 0; fi
	_port_unbound "$PG_PORT" || { echo "pg_start: port $PG_PORT busy" >&2; return 1; }
	echo "==== $(date '+%F %T') services.sh: starting postgres" >>"$PG_LOG"
	chown postgres:postgres "$PG_LOG"
	setpriv --reuid=postgres --regid=postgres --init-groups "$PGBIN/postgres" -D "$PG_DATA" >>"$PG_LOG" 2>&1 </dev/null &
	PG_PID=$!                   # setpriv execs: this is the postmaster
	PGHOST=$d PGPORT=$PG_PORT PGUSER=postgres
	export PGHOST PGPORT PGUSER PG_PID
	svc_save
	for i in $(seq 1 600); do
		"$PGCLIENT/pg_isready" -q -h "$d" -p "$PG_PORT" && break
		_alive "$PG_PID" || { echo "pg_start: postgres died" >&2; tail -30 "$PG_LOG" >&2; PG_PID=; svc_save; return 1; }
		sleep 0.05
	done
	"$PGCLIENT/pg_isready" -q -h "$d" -p "$PG_PORT" || { echo "pg_start: not ready" >&2; return 1; }
}
pg_stop() {   # fast shutdown (SIGINT), as pg_ctl -m fast
	[ -n "${PG_PID:-}" ] || return 0
	kill -INT "$PG_PID" 2>/dev/null || true
	_wait_gone "$PG_PID" 30 || { kill -QUIT "$PG_PID" 2>/dev/null || true; _wait_gone "$PG_PID" 10 || echo "pg_stop: $PG_PID still alive" >&2; }
	_pg_wait_children_gone
	PG_PID=
	svc_save
}
pg_stop_immediate() {   # SIGQUIT: immediate shutdown, crash recovery at next start
	[ -n "${PG_PID:-}" ] || return 0
	kill -QUIT "$PG_PID" 2>/dev/null || true
	_wait_gone "$PG_PID" 20 || { kill -KILL "$PG_PID" 2>/dev/null || true; _wait_gone "$PG_PID" 10 || echo "pg_stop_immediate: $PG_PID still alive" >&2; }
	_pg_wait_children_gone
	PG_PID=
	svc_save
}
_pg_wait_children_gone() {   # the postmaster.pid file goes last; wait for the port too
	local i
	for i in $(seq 1 200); do
		[ ! -f "$PG_DATA/postmaster.pid" ] && _port_unbound "$PG_PORT" && return 0
		sleep 0.05
	done
	return 0
}
pg_restart() { pg_stop && pg_start_again; }
pg_psql() { "$PGCLIENT/psql" -X -v ON_ERROR_STOP=1 -h "$PGHOST" -p "$PGPORT" -U postgres "$@"; }

# ---------------------------------------------------------------- RabbitMQ
_rmq_env_init() {
	local d=$SVC_DIR/rmq
	RMQ_ENV=(HOME="$d/home" ERL_EPMD_ADDRESS=127.0.0.1 ERL_EPMD_PORT="$EPMD_PORT"
		RABBITMQ_NODENAME="$RMQ_NODE" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$AMQP_PORT"
		RABBITMQ_DIST_PORT="$AMQP_DIST_PORT"
		RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf"
		RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins"
		RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log" RABBITMQ_PID_FILE="$d/beam.pid"
		RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
		RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}")
}
_epmd_start() {
	local d=$SVC_DIR/rmq i
	if _alive "${EPMD_PID:-}"; then return 0; fi
	_port_unbound "$EPMD_PORT" || { echo "epmd: port $EPMD_PORT busy" >&2; return 1; }
	env "${RMQ_ENV[@]}" epmd -address 127.0.0.1 -port "$EPMD_PORT" >>"$d/epmd.log" 2>&1 </dev/null &
	EPMD_PID=$!                  # foreground epmd: we own the PID
	svc_save
	for i in $(seq 1 100); do env "${RMQ_ENV[@]}" epmd -port "$EPMD_PORT" -names >/dev/null 2>&1 && return 0; sleep 0.05; done
	echo "epmd did not start" >&2
	return 1
}
rmq_launch() {   # first start: fresh node directory, cookie, config
	[ -n "${AMQP_PORT:-}" ] || svc_init || return 1
	local d=$SVC_DIR/rmq p
	for p in "$AMQP_PORT" "$AMQP_DIST_PORT" "$EPMD_PORT"; do _port_free "$p" || { echo "rmq_launch: port $p busy" >&2; return 1; }; done
	mkdir -p "$d/home" "$d/mnesia" "$d/log"
	_rmq_env_init
	if [ ! -f "$d/home/.erlang.cookie" ]; then
		(umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$d/home/.erlang.cookie")
		chmod 400 "$d/home/.erlang.cookie"
	fi
	: >"$d/rabbitmq-env.conf"                 # ignore /etc/rabbitmq/rabbitmq-env.conf
	echo '[].' >"$d/enabled_plugins"          # no plugins
	{
		printf 'listeners.tcp.1 = 127.0.0.1:%s\n' "$AMQP_PORT"
		printf 'disk_free_limit.absolute = 10MB\n'
	} >"$d/rabbitmq.conf"
	_rmq_spawn
}
_rmq_spawn() {
	local d=$SVC_DIR/rmq
	_epmd_start || return 1
	rm -f "$d/beam.pid"
	echo "==== $(date '+%F %T') services.sh: starting rabbitmq-server" >>"$d/server.log"
	env "${RMQ_ENV[@]}" "$RMQ_BIN/rabbitmq-server" >>"$d/server.log" 2>&1 </dev/null &
	RMQ_PID=$!                   # /bin/sh wrapper: on SIGTERM it TERMs beam.smp and waits for it
	RMQ_BEAM_PID=
	export RMQ_PID EPMD_PID
	svc_save
}
rmq_wait_ready() {
	local d=$SVC_DIR/rmq i
	for i in $(seq 1 1200); do
		amqp-delete-queue --url="$AMQP_URL" -q __sbw_probe >/dev/null 2>&1 && break
		_alive "$RMQ_PID" || { echo "rmq_wait_ready: broker died" >&2; tail -50 "$d/server.log" >&2; return 1; }
		sleep 0.05
	done
	amqp-delete-queue --url="$AMQP_URL" -q __sbw_probe >/dev/null 2>&1 || { echo "rmq_wait_ready: not ready" >&2; return 1; }
	RMQ_BEAM_PID=$(cat "$d/beam.pid" 2>/dev/null || true)
	export AMQP_URL RMQ_BEAM_PID
	svc_save
}
rmq_start() { rmq_launch && rmq_wait_ready; }
rmq_start_again() {   # same node name, mnesia dir, cookie: users, durable queues survive
	if _alive "${RMQ_PID:-}"; then echo "rmq_start_again: already running ($RMQ_PID)" >&2; return 0; fi
	local p
	for p in "$AMQP_PORT" "$AMQP_DIST_PORT"; do
		local i
		for i in $(seq 1 100); do _port_unbound "$p" && break; sleep 0.05; done
	done
	_rmq_spawn && rmq_wait_ready
}
rmq_ctl() { env "${RMQ_ENV[@]}" "$RMQ_BIN/rabbitmqctl" -n "$RMQ_NODE" "$@"; }   # ~0.4 s per call
rmq_setup_user() {   # as StoryBoard's docs: add_user + full permissions on /
	local u=${1:-$SBW_RMQ_USER} p=${2:-$SBW_RMQ_PASS}
	rmq_ctl -q add_user "$u" "$p" >/dev/null 2>&1 || rmq_ctl -q change_password "$u" "$p" >/dev/null || return 1
	rmq_ctl -q set_permissions -p / "$u" '.*' '.*' '.*' >/dev/null
}
_rmq_beam_pid() { echo "${RMQ_BEAM_PID:-$(cat "$SVC_DIR/rmq/beam.pid" 2>/dev/null)}"; }
rmq_stop_broker() {   # stop the broker but keep epmd
	[ -n "${RMQ_PID:-}" ] || return 0
	local b
	b=$(_rmq_beam_pid)
	kill -TERM "$RMQ_PID" 2>/dev/null || true
	if [ -n "$b" ]; then _wait_gone "$b" 60 || kill -KILL "$b" 2>/dev/null || true; fi
	_wait_gone "$RMQ_PID" 10 || echo "rmq wrapper $RMQ_PID still alive" >&2
	RMQ_PID='' RMQ_BEAM_PID=''
	svc_save
}
rmq_kill() {   # SIGKILL beam.smp: a crash; the wrapper exits after it
	[ -n "${RMQ_PID:-}" ] || return 0
	local b
	b=$(_rmq_beam_pid)
	if [ -n "$b" ]; then kill -KILL "$b" 2>/dev/null || true; _wait_gone "$b" 20 || true; fi
	_wait_gone "$RMQ_PID" 10 || { kill -TERM "$RMQ_PID" 2>/dev/null || true; _wait_gone "$RMQ_PID" 5 || true; }
	RMQ_PID='' RMQ_BEAM_PID=''
	svc_save
}
rmq_stop() {   # broker and epmd
	rmq_stop_broker
	if [ -n "${EPMD_PID:-}" ]; then
		kill -TERM "$EPMD_PID" 2>/dev/null || true
		_wait_gone "$EPMD_PID" 10 || echo "epmd $EPMD_PID still alive" >&2
		EPMD_PID=
		svc_save
	fi
}

# ---------------------------------------------------------------- storyboard_worker
sbw_pg_conf() {   # FILE: settings for the storyboard_worker test cluster
	cat >"$1" <<EOF
storyboard_worker.database = 'storyboard'
storyboard_worker.rabbit_host = '127.0.0.1'
storyboard_worker.rabbit_port = $AMQP_PORT
storyboard_worker.rabbit_userid = '$SBW_RMQ_USER'
storyboard_worker.rabbit_retry_delay = 1
storyboard_worker.worker_count = ${SBW_WORKER_COUNT:-2}
EOF
}
sbw_start_all() {   # broker + PostgreSQL preloading storyboard_worker + broker user
	[ -n "${PG_PORT:-}" ] || svc_init || return 1
	rmq_launch || return 1
	sbw_pg_conf "$SVC_DIR/sbw.conf"
	PG_PRELOAD=storyboard_worker PG_EXTRA_CONF="$SVC_DIR/sbw.conf" pg_start || return 1
	rmq_wait_ready && rmq_setup_user
}

svc_stop_all() { rmq_stop; pg_stop; }
svc_cleanup() {   # stop everything and remove SVC_DIR (kept if SVC_KEEP=1)
	svc_stop_all
	if [ "${SVC_KEEP:-0}" != 1 ] && [ -n "${SVC_DIR:-}" ] && [ -d "$SVC_DIR" ]; then rm -rf "$SVC_DIR"; fi
}

# ---------------------------------------------------------------- command line
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
	set -u
	if [ $# -lt 1 ]; then sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; fi
	[ -n "${SVC_DIR:-}" ] || { echo "services.sh: set SVC_DIR (a state directory)" >&2; exit 2; }
	# state comes from $SVC_DIR/state.env only, never from a caller's other instance
	for v in $_SVC_STATE_VARS; do
		case $v in SVC_DIR|SBW_RMQ_USER|SBW_RMQ_PASS) ;; *) unset "$v" ;; esac
	done
	svc_load
	fn=$1; shift
	case "$fn" in
	svc_init|svc_env|svc_stop_all|svc_cleanup|pg_start|pg_start_again|pg_stop|pg_stop_immediate|pg_restart|pg_psql|\
	rmq_launch|rmq_wait_ready|rmq_start|rmq_start_again|rmq_ctl|rmq_setup_user|rmq_stop|rmq_stop_broker|rmq_kill|\
	sbw_pg_conf|sbw_start_all) "$fn" "$@" ;;
	*) echo "services.sh: unknown function $fn" >&2; exit 2 ;;
	esac
fi
