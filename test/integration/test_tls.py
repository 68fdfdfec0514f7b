"""The TLS path to the broker, against a second RabbitMQ with a TLS listener.

A throw-away CA signs a server certificate (SAN IP:127.0.0.1, DNS:localhost)
and a client certificate; a second, unrelated CA plays the wrong one.  The
second broker is started with test/services.sh in its own state directory;
its TLS listener comes from an advanced.config (RABBITMQ_ADVANCED_CONFIG_FILE
in the environment rabbitmq-server inherits), with verify_peer and
fail_if_no_peer_cert = false.  Each test points the consumers at it through
the rabbit_* settings; the harness puts the session's settings back after
each test.
"""

import os
import subprocess
import tempfile
import time

import pytest

import guarantee_helpers
import sbw
from sbw import wait_for

OPENSSL = "openssl"
# test/services.sh's state variables (its _SVC_STATE_VARS)
_SVC_STATE_VARS = set("SVC_DIR PG_PORT AMQP_PORT AMQP_DIST_PORT EPMD_PORT RMQ_NODE PG_PID RMQ_PID RMQ_BEAM_PID "
                      "EPMD_PID PGHOST PGPORT PGUSER PG_DATA PG_LOG AMQP_URL SBW_RMQ_USER SBW_RMQ_PASS".split())


def _openssl(*args, cwd):
    r = subprocess.run([OPENSSL, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise RuntimeError("openssl %s failed:\n%s" % (" ".join(args), r.stdout))


def _make_ca(d, name, cn):
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", name + ".key", "-out", name + ".pem",
             "-days", "2", "-subj", "/CN=" + cn, "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _make_cert(d, name, cn, ca, ext):
    with open(os.path.join(d, name + ".ext"), "w") as f:
        f.write(ext)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", name + ".key", "-out", name + ".csr",
             "-subj", "/CN=" + cn, cwd=d)
    _openssl("x509", "-req", "-in", name + ".csr", "-CA", ca + ".pem", "-CAkey", ca + ".key", "-CAcreateserial",
             "-out", name + ".pem", "-days", "2", "-extfile", name + ".ext", cwd=d)




class TlsBroker:
    pass


@pytest.fixture(scope="module")
def tls_broker(services):
    """Certificates and a second RabbitMQ with a TLS listener; stopped at the end of the module."""
    tb = TlsBroker()
    tb.certs = tempfile.mkdtemp(prefix="sbw-g-tls-certs.", dir="/tmp")
    os.chmod(tb.certs, 0o755)
    d = tb.certs
    _make_ca(d, "ca", "storyboard_worker test CA")
    _make_ca(d, "other_ca", "some other CA")
    _make_cert(d, "server", "localhost", "ca",
               "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
               "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _make_cert(d, "client", "storyboard-worker", "ca",
               "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
               "extendedKeyUsage=clientAuth\n")
    for f in os.listdir(d):
        os.chmod(os.path.join(d, f), 0o644)
    # the workers run as postgres: their key is theirs alone
    os.chmod(os.path.join(d, "client.key"), 0o600)
    subprocess.run(["chown", "postgres:postgres", os.path.join(d, "client.key")], check=True)
    tb.ca, tb.other_ca = os.path.join(d, "ca.pem"), os.path.join(d, "other_ca.pem")
    tb.client_cert, tb.client_key = os.path.join(d, "client.pem"), os.path.join(d, "client.key")

    tb.dir = tempfile.mkdtemp(prefix="sbw-g-tls-broker.", dir="/tmp")
    # run_tests.sh exports some of its own broker's state (RMQ_PID, EPMD_PID,
    # RMQ_BEAM_PID, AMQP_URL ...): inherited by a second state directory they
    # would make services.sh adopt, and later stop, the first broker's epmd
    env = {k: v for k, v in os.environ.items() if k not in _SVC_STATE_VARS}
    env["SVC_DIR"] = tb.dir
    used = {services.pg_port, services.amqp_port}
    tb.tls_port = guarantee_helpers.free_port(used)
    adv = os.path.join(tb.dir, "advanced.config")
    with open(adv, "w") as f:
        f.write('[{rabbit, [{ssl_listeners, [{"127.0.0.1", %d}]},\n'
                '           {ssl_options, [{cacertfile, "%s"}, {certfile, "%s"}, {keyfile, "%s"},\n'
                '                          {verify, verify_peer}, {fail_if_no_peer_cert, false}]}]}].\n'
                % (tb.tls_port, tb.ca, os.path.join(d, "server.pem"), os.path.join(d, "server.key")))
    env["RABBITMQ_ADVANCED_CONFIG_FILE"] = adv
    t0 = time.monotonic()
    started = False
    try:
        for fn in ("svc_init", "rmq_start", "rmq_setup_user"):
            r = subprocess.run(["bash", sbw.SERVICES_SH, fn], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, timeout=180)
            started = started or fn == "rmq_start"
            if r.returncode != 0:
                raise RuntimeError("services.sh %s for the TLS broker failed:\n%s" % (fn, r.stdout))
        tb.svc = sbw.Services(tb.dir)
        tb.boot_secs = time.monotonic() - t0
        listeners = tb.svc.rmq_ctl("status")
        assert "amqp/ssl" in listeners and str(tb.tls_port) in listeners, listeners
        yield tb
    finally:
        if started or os.path.exists(os.path.join(tb.dir, "state.env")):
            subprocess.run(["bash", sbw.SERVICES_SH, "rmq_stop"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        subprocess.run(["rm", "-rf", tb.dir, tb.certs])


def _use_tls(cluster, tb, **extra):
    gucs = dict(rabbit_host="127.0.0.1", rabbit_port=tb.tls_port, rabbit_use_ssl="on",
                rabbit_ssl_ca_file=tb.ca)
    gucs.update(extra)
    cluster.set_gucs(**gucs)


def _consuming_on(cluster, broker, timeout=30):
    return wait_for(lambda: (s := cluster.all_consuming()) and all(x["broker"] == broker for x in s) and s,
                    timeout, "every consumer consuming from %s (stats %r)" % (broker, cluster.stats()))


def _events_through(cluster, tb, n=20):
    prefix = sbw.unique("tls")
    guarantee_helpers.publish_window(tb.svc.amqp_url, guarantee_helpers.bulk_messages(n, prefix)[0])
    assert cluster.wait_seen(prefix, n, timeout=30) == (n, n)


def _ssl_connections(tb, user):
    out = tb.svc.rmq_ctl("list_connections", "-q", "--no-table-headers", "user", "ssl", "ssl_protocol",
                         "peer_cert_subject")
    return [l.split("\t") for l in out.splitlines() if l.startswith(user + "\t")]


def test_tls_good_ca(cluster, tls_broker, services, metrics):
    tb = tls_broker
    n = cluster.worker_count()
    _use_tls(cluster, tb)
    t0 = time.monotonic()
    _consuming_on(cluster, "127.0.0.1:%d" % tb.tls_port)
    conns = _ssl_connections(tb, services.state["SBW_RMQ_USER"])
    assert len(conns) == n and all(c[1] == "true" for c in conns), conns
    _events_through(cluster, tb)
    metrics.add("TLS good CA", "consuming over %s %.1fs after the reload (second broker booted in %.1fs)"
                % (conns[0][2], time.monotonic() - t0, tb.boot_secs))


def test_tls_client_certificate(cluster, tls_broker, services, metrics):
    tb = tls_broker
    _use_tls(cluster, tb, rabbit_ssl_cert_file=tb.client_cert, rabbit_ssl_key_file=tb.client_key)
    _consuming_on(cluster, "127.0.0.1:%d" % tb.tls_port)
    conns = _ssl_connections(tb, services.state["SBW_RMQ_USER"])
    assert conns and all("CN=storyboard-worker" in c[3] for c in conns), conns
    _events_through(cluster, tb)
    metrics.add("TLS client certificate", "presented: %s" % conns[0][3])


def test_tls_host_name_checked_by_dns_name(cluster, tls_broker):
    tb = tls_broker
    _use_tls(cluster, tb, rabbit_host="localhost")
    _consuming_on(cluster, "localhost:%d" % tb.tls_port)
    _events_through(cluster, tb, 5)


def test_tls_wrong_ca_refused_without_crash_loop(cluster, tls_broker, pglog, metrics):
    tb = tls_broker
    pids = cluster.consumer_pids()
    mark = pglog.mark()
    _use_tls(cluster, tb, rabbit_ssl_ca_file=tb.other_ca)
    st = wait_for(lambda: (s := cluster.stats()) and all(
        x["state"] in ("connecting", "backing off") and x["last_error"] for x in s) and s, 30,
        "refused TLS connections (stats %r)" % cluster.stats())
    time.sleep(4)     # several attempts (rabbit_retry_delay = 1)
    st = cluster.stats()
    errors = sorted({s["last_error"] for s in st})
    assert all("certificate verify failed" in e for e in errors), errors
    assert all(s["state"] in ("connecting", "backing off") for s in st), st
    assert cluster.consumer_pids() == pids, "consumers restarted (crash loop?): %r -> %r" % (pids, cluster.consumer_pids())
    lines = pglog.grep(mark, r"certificate verify failed")
    assert 1 <= len(lines) <= len(pids) * 2, "log lines about the certificate:\n" + "\n".join(lines)
    assert tb.svc.connections(cluster.svc.state["SBW_RMQ_USER"]) == []
    metrics.add("TLS wrong CA", "state %s, pids stable, %d log line(s) in ~5 s; last_error: %s"
                % (sorted({s["state"] for s in st}), len(lines), errors[0]))


def test_tls_verify_peer_off_accepts_wrong_ca(cluster, tls_broker, metrics):
    tb = tls_broker
    _use_tls(cluster, tb, rabbit_ssl_ca_file=tb.other_ca, rabbit_ssl_verify_peer="off")
    _consuming_on(cluster, "127.0.0.1:%d" % tb.tls_port)
    _events_through(cluster, tb, 5)
    metrics.add("TLS verify_peer off + wrong CA", "connects and consumes")


def test_tls_misconfigurations_reported(cluster, tls_broker, services, metrics):
    tb = tls_broker
    pids = cluster.consumer_pids()
    out = {}
    cases = {
        "plain client to the TLS port": dict(rabbit_use_ssl="off"),
        "TLS client to the plain port": dict(rabbit_port=tb.svc.amqp_port),
        "missing CA file": dict(rabbit_ssl_ca_file="/nonexistent/ca.pem"),
        "certificate without key": dict(rabbit_ssl_cert_file=tb.client_cert),
        # 127.1 is 127.0.0.1 to the resolver, but not a name the certificate carries
        "host name not in the certificate": dict(rabbit_host="127.1"),
    }
    want = {"plain client to the TLS port": "does the port expect TLS?",
            "TLS client to the plain port": "TLS connection to 127.0.0.1:%d failed" % tb.svc.amqp_port,
            "missing CA file": 'could not load CA file "/nonexistent/ca.pem"',
            "certificate without key": "needs both a certificate and a key file",
            "host name not in the certificate": "mismatch"}
    for name, extra in cases.items():
        since = cluster.one("SELECT clock_timestamp()")
        _use_tls(cluster, tb, **extra)
        st = wait_for(lambda: (s := cluster.stats()) and all(
            x["state"] != "consuming" and x["last_error_at"] and x["last_error_at"] > since for x in s) and s,
            30, "%s: an error in the stats (%r)" % (name, cluster.stats()))
        out[name] = st[0]["last_error"]
        cluster.restore_gucs()
        cluster.wait_consuming(timeout=30)
    metrics.add("TLS misconfigurations", "; ".join("%s: %s" % kv for kv in out.items()))
    bad = {k: v for k, v in out.items() if want[k] not in v}
    assert not bad, "unexpected errors: %r" % bad
    assert cluster.consumer_pids() == pids
