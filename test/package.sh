#!/bin/bash
# test/package.sh: the Debian package, built and proven.
#
# Builds postgresql-15-storyboard-worker from a copy of the tree with
# dpkg-buildpackage (debian/, pg_buildext's pgxs_loop), removes what
# `make install` put in place, installs the .deb with apt-get, and runs the
# smoke tests (test/smoke_selection) through a real RabbitMQ against a
# PostgreSQL 15 that loads the packaged library.  Run as root after
# test/run_tests.sh; the third step of .ci/run.  The .deb is left in
# $PKG_OUT (default /tmp/sbw-deb).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${PKG_OUT:-/tmp/sbw-deb}
PY=/usr/bin/python3
note() { printf '\n\033[1m== [package %s] %s\033[0m\n' "$(date +%T)" "$*"; }

if [ "${SKIP_APT:-0}" != 1 ]; then
	note "build dependencies"
	# dpkg-buildpackage wants build-essential besides debian/control's Build-Depends
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		build-essential debhelper postgresql-server-dev-all dpkg-dev fakeroot \
		librabbitmq-dev libjson-c-dev libcurl4-openssl-dev libssl-dev pkg-config >/dev/null
fi

note "dpkg-buildpackage -us -uc -b"
rm -rf "$OUT" && mkdir -p "$OUT/src"
(cd "$ROOT" && tar --exclude=.git --exclude='*.o' --exclude='*.so' --exclude=results -cf - .) | tar -xf - -C "$OUT/src"
make -C "$OUT/src" -s clean >/dev/null 2>&1 || true
(cd "$OUT/src" && dpkg-buildpackage -us -uc -b >"$OUT/build.log" 2>&1) || { tail -40 "$OUT/build.log"; exit 1; }
deb=$(ls "$OUT"/postgresql-15-storyboard-worker_*.deb)
dpkg-deb -I "$deb" | grep -E 'Package|Version|Depends'

note "install the .deb in place of make install"
make -C "$ROOT" -s uninstall >/dev/null
[ ! -e /usr/lib/postgresql/15/lib/storyboard_worker.so ] || { echo "make uninstall left the library"; exit 1; }
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --reinstall "$deb" >/dev/null
dpkg -S /usr/lib/postgresql/15/lib/storyboard_worker.so
dpkg -S /usr/share/postgresql/15/extension/storyboard_worker.control

note "smoke through RabbitMQ with the packaged library"
svc=$(mktemp -d /tmp/sbw-pkg.XXXXXX)
rc=0
(
	export SVC_DIR=$svc
	# shellcheck source=test/services.sh
	. "$ROOT/test/services.sh"
	# the tests restart services through the state file: stop what it names now
	trap 'svc_load >/dev/null 2>&1; svc_stop_all >/dev/null 2>&1 || true' EXIT
	sbw_start_all >/dev/null || { tail -20 "$SVC_DIR/pg/postgres.log"; exit 1; }
	cd "$ROOT"
	sel=$(cat test/smoke_selection)
	n=$($PY -m pytest -p no:cacheprovider --collect-only -q test/integration -k "$sel" | grep -c '::')
	[ "$n" = 9 ] || { echo "test/smoke_selection selects $n tests, not 9" >&2; exit 1; }
	SBW_SVC_DIR=$svc $PY -m pytest -p no:cacheprovider -q -rfE test/integration -k "$sel"
) || rc=1
[ "${SVC_KEEP:-0}" = 1 ] || rm -rf "$svc"
[ $rc = 0 ] && echo "package: $(basename "$deb") built, installed and passed the smoke tests"
exit $rc
