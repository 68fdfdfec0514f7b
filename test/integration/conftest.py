"""Session fixtures: one PostgreSQL + one RabbitMQ for the whole pytest session.

With SBW_SVC_DIR set (test/run_tests.sh does), the services already running
there are used.  Otherwise the session starts its own with test/services.sh
(the extension must be built and installed) and stops them at the end;
SVC_KEEP=1 keeps them and their logs.

Run: /usr/bin/python3 -m pytest test/integration   (not pyenv's python3)
"""

import os
import signal
import subprocess
import tempfile

import pytest

import sbw

TEST_TIMEOUT = int(os.environ.get("SBW_TEST_TIMEOUT", "240"))
# storyboard_worker GUCs the session sets with ALTER SYSTEM on top of postgresql.conf
SESSION_GUCS = {"storyboard_worker.enable_notifications": "on"}


def _metrics_path(svc_dir):
    return os.environ.get("SBW_METRICS_FILE") or os.path.join(svc_dir, "metrics.txt")


@pytest.fixture(scope="session")
def services():
    svc_dir = os.environ.get("SBW_SVC_DIR")
    owned = not (svc_dir and os.path.exists(os.path.join(svc_dir, "state.env")))
    if owned:
        svc_dir = tempfile.mkdtemp(prefix="sbw-pytest.", dir="/tmp")
        env = dict(os.environ, SVC_DIR=svc_dir)
        r = subprocess.run(["bash", sbw.SERVICES_SH, "sbw_start_all"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        if r.returncode != 0:
            subprocess.run(["bash", sbw.SERVICES_SH, "svc_stop_all"], env=env)
            pytest.exit("could not start the services:\n" + r.stdout, returncode=3)
    svc = sbw.Services(svc_dir)
    yield svc
    if owned:
        svc.sh("svc_stop_all", check=False)
        if os.environ.get("SVC_KEEP") != "1":
            subprocess.run(["rm", "-rf", svc_dir])
        else:
            print("\nservices state and logs kept in %s" % svc_dir)


@pytest.fixture(scope="session")
def metrics(services):
    return sbw.Metrics(_metrics_path(services.dir))


@pytest.fixture(scope="session")
def pglog(services):
    return sbw.LogWatch(services.pg_log)


@pytest.fixture(scope="session")
def cluster(services):
    """PostgreSQL with database 'storyboard', the extension, the test plugins, workers consuming."""
    c = sbw.Cluster(services, SESSION_GUCS)
    if c.one("SELECT 1 FROM pg_database WHERE datname = %s", (sbw.DB,), db="postgres"):
        c.execute("DROP DATABASE %s WITH (FORCE)" % sbw.DB, db="postgres")   # a clean slate
    c.restore_gucs()
    sbw.setup_test_db(c, sbw.DB)
    c.execute("SELECT storyboard_worker.wake_workers()")
    c.wait_consuming(timeout=60)
    yield c
    c.reset_connections()


@pytest.fixture(autouse=True)
def healthy(request, services, pglog):
    """Each test: services up, session settings, workers consuming; a time limit;
    afterwards restore what the test changed and fail on crashes in the log."""
    if "cluster" not in request.fixturenames:
        yield
        return
    cluster = request.getfixturevalue("cluster")
    _restore(services, cluster)
    cluster.wait_consuming(timeout=60)
    mark = pglog.mark()

    def on_alarm(signum, frame):
        raise TimeoutError("test exceeded %ds (SBW_TEST_TIMEOUT)" % TEST_TIMEOUT)
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        _restore(services, cluster)
    crashes = pglog.crashes(mark)
    if request.node.get_closest_marker("crashes_expected") is None:
        assert not crashes, "crash lines in the PostgreSQL log during the test:\n" + "\n".join(crashes[:20])


def _restore(services, cluster):
    if not services.rmq_alive():
        services.rmq_start()
    if not services.pg_alive():
        services.pg_start()
        cluster.reset_connections()
    if cluster.dirty:
        cluster.restore_gucs()


@pytest.fixture
def publisher(services):
    p = services.publisher(mandatory=True)
    yield p
    p.close()


def pytest_configure(config):
    config.addinivalue_line("markers", "crashes_expected: the test crashes backends on purpose; "
                            "crash lines in the server log are its own assertions' business")


def pytest_terminal_summary(terminalreporter):
    if sbw.Metrics.ALL:
        terminalreporter.section("storyboard_worker measurements")
        for line in sbw.Metrics.ALL:
            terminalreporter.write_line(line)
