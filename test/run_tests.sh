#!/usr/bin/env bash
# test/run_tests.sh: the whole test suite (`make test`), as root on Debian 12.
#
#   1. apt-get update + install the build and test packages (SKIP_APT=1 skips)
#   2. make && make install (and examples/my_worker_plugin, test/plugins)
#   3. start RabbitMQ and a throw-away PostgreSQL 15 preloading storyboard_worker
#   4. make installcheck (pg_regress, as root over the temp socket)
#   5. make -C test/unit check (if test/unit exists)
#   6. the pytest integration suite (test/integration) on the same services
#   7. stop everything (by PID, also on failure), print "N passed, M failed"
#
# Environment: SKIP_APT=1, PYTEST_ARGS="-k broker -x", SVC_KEEP=1 (keep $SVC_DIR
# with the logs), PG_CONFIG.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PY=/usr/bin/python3     # not bare python3: pyenv's cannot see Debian's pika/psycopg2
T0=$(date +%s)

PASSED=0 FAILED=0 SKIPPED=0
declare -a REPORT=()
note() { printf '\n=== %s (%ds)\n' "$*" $(( $(date +%s) - T0 )); }
record() {   # suite passed failed [skipped]
	PASSED=$((PASSED + $2)); FAILED=$((FAILED + $3)); SKIPPED=$((SKIPPED + ${4:-0}))
	REPORT+=("$(printf '%-22s %4d passed, %d failed%s' "$1" "$2" "$3" "$([ "${4:-0}" -gt 0 ] && echo ", $4 skipped")")")
}
summary() {
	echo
	echo "=== summary ($(( $(date +%s) - T0 ))s)"
	local r
	for r in "${REPORT[@]}"; do echo "  $r"; done
	if [ -n "${SVC_DIR:-}" ] && [ -f "$SVC_DIR/metrics.txt" ]; then
		echo "  measurements:"
		sed 's/^/    /' "$SVC_DIR/metrics.txt"
	fi
	echo "$PASSED passed, $FAILED failed"
}

[ "$(id -u)" = 0 ] || { echo "run_tests.sh: run as root (initdb runs as postgres via runuser)" >&2; exit 2; }

# ------------------------------------------------------------------ packages
PKGS=(postgresql-15 postgresql-server-dev-15 librabbitmq-dev libjson-c-dev libcurl4-openssl-dev rabbitmq-server
	amqp-tools python3-pika python3-psycopg2 python3-pytest python3-aiosmtpd pkg-config clang-14 libclang-rt-14-dev
	make gcc iproute2 util-linux procps openssl)
if [ "${SKIP_APT:-0}" != 1 ]; then
	note "apt-get install"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q >/dev/null
	apt-get install -y -q --no-install-recommends "${PKGS[@]}" >/tmp/sbw-apt.log 2>&1 || { tail -30 /tmp/sbw-apt.log >&2; exit 1; }
fi

# ------------------------------------------------------------------ services
# shellcheck source=test/services.sh
. "$ROOT/test/services.sh"
SVC_DIR=$(mktemp -d /tmp/sbw-test.XXXXXX)
export SVC_DIR
on_exit() {
	local rc=$?
	set +e
	svc_load                    # pytest may have restarted services: fresh PIDs
	svc_stop_all
	if [ "${SVC_KEEP:-0}" = 1 ]; then echo "logs kept in $SVC_DIR"; else rm -rf "$SVC_DIR"; fi
	exit $rc
}
trap on_exit EXIT
trap 'exit 143' TERM INT
svc_init
export SBW_METRICS_FILE=$SVC_DIR/metrics.txt
rmq_launch                      # boots in the background (~5 s CPU) while we build

# ------------------------------------------------------------------ build
note "build"
if ! { make -j2 PG_CONFIG="$PG_CONFIG" && make install PG_CONFIG="$PG_CONFIG"; } >"$SVC_DIR/build.log" 2>&1; then
	tail -40 "$SVC_DIR/build.log"
	record build 0 1
	summary
	exit 1
fi
tail -3 "$SVC_DIR/build.log"
if [ -f examples/my_worker_plugin/Makefile ]; then
	if ! { make -C examples/my_worker_plugin PG_CONFIG="$PG_CONFIG" &&
		make -C examples/my_worker_plugin install PG_CONFIG="$PG_CONFIG"; } >"$SVC_DIR/build-example.log" 2>&1; then
		tail -40 "$SVC_DIR/build-example.log"
		record "build my_worker_plugin" 0 1
	fi
fi

# the misbehaving C plugins of the poison-message tests (test/plugins)
if ! { make -C test/plugins PG_CONFIG="$PG_CONFIG" &&
	make -C test/plugins install PG_CONFIG="$PG_CONFIG"; } >"$SVC_DIR/build-test-plugins.log" 2>&1; then
	tail -40 "$SVC_DIR/build-test-plugins.log"
	record "build test plugins" 0 1
fi

note "start PostgreSQL + RabbitMQ"
sbw_pg_conf "$SVC_DIR/sbw.conf"
PG_PRELOAD=storyboard_worker PG_EXTRA_CONF="$SVC_DIR/sbw.conf" pg_start
rmq_wait_ready
rmq_setup_user
echo "PostgreSQL $PGHOST:$PGPORT (pid $PG_PID), RabbitMQ 127.0.0.1:$AMQP_PORT (pid $RMQ_BEAM_PID), state in $SVC_DIR"

# ------------------------------------------------------------------ installcheck
count_regress() {   # dir logfile rc -> record
	local out=$2 rc=$3 n m
	if grep -q 'All [0-9]* tests passed' "$out"; then
		n=$(grep -o 'All [0-9]* tests passed' "$out" | grep -o '[0-9]*' | tail -1); m=0
	elif grep -q '[0-9]* of [0-9]* tests failed' "$out"; then
		m=$(grep -o '[0-9]* of [0-9]* tests failed' "$out" | awk '{print $1}' | tail -1)
		n=$(( $(grep -o '[0-9]* of [0-9]* tests failed' "$out" | awk '{print $3}' | tail -1) - m ))
	else   # pg_regress bailed out (e.g. a missing expected file): count its per-test lines
		n=$(grep -Ec '^(test | +)[a-z0-9_]+ +\.\.\. ok ' "$out" || true)
		m=$(grep -Ec '^(test | +)[a-z0-9_]+ +\.\.\. (FAILED|[^o])' "$out" || true)
	fi
	[ "$rc" = 0 ] || [ "$m" -gt 0 ] || m=1
	record "$1" "$n" "$m"
}
if make -n installcheck PG_CONFIG="$PG_CONFIG" 2>/dev/null | grep pg_regress >/dev/null; then
	note "make installcheck"
	rm -f regression.diffs regression.out
	set +e
	make installcheck PG_CONFIG="$PG_CONFIG" PGHOST="$PGHOST" PGPORT="$PGPORT" PGUSER=postgres 2>&1 | tee "$SVC_DIR/installcheck.log"
	rc=${PIPESTATUS[0]}
	set -e
	if [ "$rc" != 0 ] && [ -f regression.diffs ]; then
		echo "--- regression.diffs"
		head -300 regression.diffs
	fi
	count_regress installcheck "$SVC_DIR/installcheck.log" "$rc"
else
	echo "(no pg_regress suites yet: skipping installcheck)"
fi

EX=examples/my_worker_plugin
# (grep without -q: an early exit would SIGPIPE make and, under pipefail, skip the suite)
if [ -f "$EX/Makefile" ] && make -C "$EX" -n installcheck PG_CONFIG="$PG_CONFIG" 2>/dev/null | grep pg_regress >/dev/null; then
	note "make -C $EX installcheck"
	rm -f "$EX/regression.diffs"
	set +e
	make -C "$EX" installcheck PG_CONFIG="$PG_CONFIG" PGHOST="$PGHOST" PGPORT="$PGPORT" PGUSER=postgres 2>&1 | tee "$SVC_DIR/installcheck-example.log"
	rc=${PIPESTATUS[0]}
	set -e
	if [ "$rc" != 0 ] && [ -f "$EX/regression.diffs" ]; then
		echo "--- $EX/regression.diffs"
		head -300 "$EX/regression.diffs"
	fi
	count_regress "installcheck (example)" "$SVC_DIR/installcheck-example.log" "$rc"
fi

# ------------------------------------------------------------------ unit tests
if [ -d test/unit ] && [ -f test/unit/Makefile ]; then
	note "unit tests (make -C test/unit check)"
	set +e
	make -C test/unit check PG_CONFIG="$PG_CONFIG" 2>&1 | tee "$SVC_DIR/unit.log"
	rc=${PIPESTATUS[0]}
	set -e
	# "N passed, M failed" lines (test_decode), else TAP "ok"/"not ok" lines, else the exit status
	ok=0 nok=0
	while read -r a b; do ok=$((ok + a)); nok=$((nok + b)); done < <(
		sed -n 's/^[[:space:]]*\([0-9][0-9]*\) passed, \([0-9][0-9]*\) failed[[:space:]]*$/\1 \2/p' "$SVC_DIR/unit.log")
	if [ "$ok" = 0 ] && [ "$nok" = 0 ]; then
		ok=$(grep -c '^ok ' "$SVC_DIR/unit.log" || true)
		nok=$(grep -c '^not ok ' "$SVC_DIR/unit.log" || true)
	fi
	if [ "$ok" = 0 ] && [ "$nok" = 0 ]; then
		if [ "$rc" = 0 ]; then record "unit" 1 0; else record "unit" 0 1; fi
	else
		[ "$rc" = 0 ] || [ "$nok" -gt 0 ] || nok=1
		record "unit" "$ok" "$nok"
	fi
fi

# ------------------------------------------------------------------ fuzz regressions
# The decoder under ASan/UBSan on every seed and every input that once
# crashed (libFuzzer, one pass); FUZZ_SECONDS=N also fuzzes for N seconds.
if [ -f fuzz/Makefile ] && command -v clang-14 >/dev/null; then
	note "fuzz regressions (make -C fuzz regress)"
	if make -C fuzz regress >"$SVC_DIR/fuzz.log" 2>&1 &&
		{ [ "${FUZZ_SECONDS:-0}" = 0 ] || make -C fuzz run FUZZ_SECONDS="$FUZZ_SECONDS" >>"$SVC_DIR/fuzz.log" 2>&1; }; then
		record "fuzz regressions" 1 0
	else
		tail -30 "$SVC_DIR/fuzz.log"
		record "fuzz regressions" 0 1
	fi
fi

# ------------------------------------------------------------------ integration
note "integration tests (pytest)"
eval "extra=(${PYTEST_ARGS:-})"      # shell words: PYTEST_ARGS="-k 'broker or password'"
set +e
SBW_SVC_DIR=$SVC_DIR timeout --foreground -k 15 "${PYTEST_TIMEOUT:-720}" "$PY" -m pytest -p no:cacheprovider -rfEs -v \
	--junitxml="$SVC_DIR/pytest.xml" "${extra[@]}" test/integration
rc=$?
set -e
if [ -f "$SVC_DIR/pytest.xml" ]; then
	read -r t f e s < <("$PY" - "$SVC_DIR/pytest.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot()
suites = [r] if r.tag == "testsuite" else list(r.iter("testsuite"))
tot = [sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")]
print(*tot)
EOF
	)
	m=$((f + e))
	[ "$rc" = 0 ] || [ "$rc" = 5 ] || [ "$m" -gt 0 ] || m=1
	record integration $((t - f - e - s)) "$m" "$s"
else
	record integration 0 1
fi

if [ -s "$SVC_DIR/pg/postgres.log" ] && [ "$FAILED" -gt 0 ]; then
	echo "--- last 60 lines of the PostgreSQL log ($SVC_DIR/pg/postgres.log)"
	tail -60 "$SVC_DIR/pg/postgres.log"
fi

note "stop services"
svc_load
svc_stop_all
summary
[ "$FAILED" = 0 ]
