#!/usr/bin/env bash
# bench/run.sh: the storyboard_worker benchmark, `make bench`, as root on Debian 12.
#
# In one run: installs the packages, builds and installs the extension,
# starts a throw-away RabbitMQ and PostgreSQL 15 (test/services.sh; fsync,
# full_page_writes and synchronous_commit on), generates a StoryBoard dataset,
# and runs bench/bench.py: the AMQP and pgbench ceilings, storyboard_worker
# end to end, the StoryBoard-style baseline (bench/storyboard_baseline.py),
# latency at half the peak rate, idle CPU and memory.  Then bench/report.py
# writes BENCHMARKS.md and bench/throughput.png, and everything started is
# stopped by PID.  Raw numbers: bench/out/results.json (not kept in git).
#
# Environment (defaults: the full run, about 10 minutes on 2 cores):
#   BENCH_WORKERS="1 2 4 8"    worker_count values
#   BENCH_EVENTS=20000         events per no-op / AMQP run
#   BENCH_SUB_EVENTS=10000     events per subscription run (default BENCH_EVENTS/2)
#   BENCH_BASELINE_EVENTS=3000 BENCH_BASELINE_SECS=15   baseline runs (whichever ends first)
#   BENCH_PGBENCH_SECS=10      each pgbench run
#   BENCH_LATENCY_SECS=15      each latency run
#   BENCH_IDLE_SECS=10         idle CPU sample
#   BENCH_STORIES=5000 BENCH_USERS=2000 BENCH_PROJECTS=200 BENCH_GROUPS=20   dataset (bench/dataset.sql)
#   BENCH_DATASET=fixture BENCH_SCALE=1   use test/fixtures/storyboard_bench_data.sql instead
#                              (about 70 subscribers per story instead of about 12)
#   BENCH_WORKLOADS="noop subscription"
#   BENCH_QUIET_WAIT=8 BENCH_QUIET_CORES=0.25   before each run, wait up to 8 s for other processes
#                              on the machine to use less than 0.25 cores (their load is recorded anyway)
#   BENCH_BATCH_EXTRA=20       an extra run per workload with this storyboard_worker.batch_size (1: none)
#   BENCH_PROFILE=1            an extra, unscored run per workload with one consumer under perf
#   BENCH_QUICK=1              a smoke test under 2 minutes (small values for all of the above)
#   BENCH_REPORT=BENCHMARKS.md where the report goes (the plot is always bench/throughput.png)
#   SKIP_APT=1                 do not run apt-get
#   BENCH_SKIP_BUILD=1         use the installed extension as it is
#   BENCH_KEEP=1               keep the scratch directory (logs, scripts) even on success
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PY=/usr/bin/python3
T0=$(date +%s)
step() { printf '\n\033[1m== [bench %s] %s\033[0m\n' "$(date +%T)" "$*"; }

[ "$(id -u)" = 0 ] || { echo "bench/run.sh: run as root" >&2; exit 2; }

if [ "${BENCH_QUICK:-0}" = 1 ]; then
	: "${BENCH_WORKERS:=1 2}" "${BENCH_EVENTS:=2000}" "${BENCH_SUB_EVENTS:=1000}"
	: "${BENCH_BASELINE_EVENTS:=300}" "${BENCH_BASELINE_SECS:=4}" "${BENCH_PGBENCH_SECS:=2}"
	: "${BENCH_LATENCY_SECS:=2}" "${BENCH_IDLE_SECS:=2}" "${BENCH_STORIES:=1000}" "${BENCH_USERS:=500}"
	: "${BENCH_QUIET_WAIT:=1}" "${BENCH_PROFILE:=0}"
	export BENCH_WORKERS BENCH_EVENTS BENCH_SUB_EVENTS BENCH_BASELINE_EVENTS BENCH_BASELINE_SECS \
		BENCH_PGBENCH_SECS BENCH_LATENCY_SECS BENCH_IDLE_SECS BENCH_STORIES BENCH_USERS \
		BENCH_QUIET_WAIT BENCH_PROFILE
fi
FIRST_W=${BENCH_WORKERS:-1 2 4 8}
FIRST_W=${FIRST_W%% *}

if [ "${SKIP_APT:-0}" != 1 ]; then
	step "installing packages"
	export DEBIAN_FRONTEND=noninteractive
	pkgs="postgresql-15 postgresql-server-dev-15 librabbitmq-dev libjson-c-dev libcurl4-openssl-dev rabbitmq-server amqp-tools
		python3-pika python3-psycopg2 python3-matplotlib pkg-config gcc make iproute2 util-linux procps"
	# shellcheck disable=SC2086
	missing=$(dpkg-query -W -f '${Package} ${db:Status-Status}\n' $pkgs 2>&1 | grep -v ' installed$' || true)
	if [ -z "$missing" ]; then
		echo "all packages present"
	else
		apt-get update -q >/tmp/sbw-bench-apt.log 2>&1 || true
		# shellcheck disable=SC2086
		apt-get install -y -q --no-install-recommends $pkgs >>/tmp/sbw-bench-apt.log 2>&1 ||
			{ tail -30 /tmp/sbw-bench-apt.log >&2; exit 1; }
	fi
fi

# shellcheck source=test/services.sh
. "$ROOT/test/services.sh"
SVC_DIR=$(mktemp -d /tmp/sbw-bench.XXXXXX)
export SVC_DIR
on_exit() {
	local rc=$?
	set +e
	svc_load
	svc_stop_all
	if [ "$rc" = 0 ] && [ "${BENCH_KEEP:-0}" != 1 ]; then
		rm -rf "$SVC_DIR"
	else
		echo "bench: logs and scripts kept in $SVC_DIR" >&2
	fi
	exit $rc
}
trap on_exit EXIT
trap 'exit 143' TERM INT

svc_init
step "starting RabbitMQ (in the background)"
rmq_launch

if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
	step "building and installing storyboard_worker"
	make -s -j2 PG_CONFIG="$PG_CONFIG" >"$SVC_DIR/build.log" 2>&1 &&
		make -s install PG_CONFIG="$PG_CONFIG" >>"$SVC_DIR/build.log" 2>&1 ||
		{ tail -40 "$SVC_DIR/build.log" >&2; exit 1; }
fi
gcc -O2 -Wall -pthread -o "$SVC_DIR/amqp_ceiling" bench/amqp_ceiling.c \
	$(pkg-config --cflags --libs librabbitmq) || exit 1

step "starting PostgreSQL (fsync = on, synchronous_commit = on)"
sbw_pg_conf "$SVC_DIR/bench.conf"
cat >>"$SVC_DIR/bench.conf" <<EOF
# ---- benchmark settings (bench/run.sh): durable, consumers idle until a run
storyboard_worker.enable_notifications = off
storyboard_worker.worker_count = $FIRST_W
synchronous_commit = on
max_connections = 100
track_wal_io_timing = on
EOF
PG_FSYNC=on PG_PRELOAD=storyboard_worker PG_EXTRA_CONF="$SVC_DIR/bench.conf" pg_start
rmq_wait_ready
rmq_setup_user
echo "PostgreSQL pid $PG_PID port $PGPORT; RabbitMQ pid $RMQ_BEAM_PID port $AMQP_PORT"

step "measuring"
mkdir -p "$ROOT/bench/out"
export BENCH_OUT=$SVC_DIR BENCH_RESULTS=$ROOT/bench/out/results.json PGDATABASE=storyboard
"$PY" bench/bench.py

step "writing the report"
"$PY" bench/report.py "$ROOT/bench/out/results.json" "${BENCH_REPORT:-$ROOT/BENCHMARKS.md}" "$ROOT/bench/throughput.png"
echo "bench: finished in $(( $(date +%s) - T0 )) s; see ${BENCH_REPORT:-BENCHMARKS.md}"
