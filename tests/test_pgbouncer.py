"""PostgreSQL through PgBouncer in transaction pooling mode (``?pgbouncer=true``).

A real ``pgbouncer`` process (skipped when the binary is not installed) listens on a
free port in front of the test server, ``pool_mode = transaction``, with a small server
pool, so that consecutive transactions of one client connection reach different server
sessions. Nothing of reliable may rely on session state there: server-side prepared
statements are off, and idle workers find new jobs by polling instead of ``LISTEN``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import truncate_postgres
from sqlalchemy.engine import make_url

from reliable import ConfigError, Reliable

PGBOUNCER = shutil.which("pgbouncer") or (
    "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None
)
WAIT = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def pooled_url(postgres_url: str, tmp_path: Path) -> Iterator[str]:
    """The test database's URL through a transaction-pooling PgBouncer of this test's own."""
    if PGBOUNCER is None:
        if os.environ.get("CI") == "true":  # .ci/run installs it: never skipped in CI
            pytest.fail("pgbouncer is not installed (apt-get install pgbouncer)")
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    truncate_postgres(postgres_url)
    server = make_url(postgres_url)
    user = server.username or "postgres"
    port = free_port()
    (tmp_path / "users.txt").write_text(f'"{user}" ""\n')
    config = tmp_path / "pgbouncer.ini"
    config.write_text(
        "[databases]\n"
        f"* = host={server.host or '127.0.0.1'} port={server.port or 5432}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {tmp_path / 'users.txt'}\n"
        "pool_mode = transaction\n"
        # Fewer server connections than the store's pool: sessions are shared for sure.
        "default_pool_size = 3\nmax_client_conn = 200\n"
        "ignore_startup_parameters = extra_float_digits,options\n"
    )
    command = [PGBOUNCER, str(config)]
    if os.geteuid() == 0:  # pgbouncer refuses to run as root
        command[1:1] = ["-u", "nobody"]
        tmp_path.chmod(0o755)
        for path in (config, tmp_path / "users.txt"):
            path.chmod(0o644)
    log = (tmp_path / "pgbouncer.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + WAIT
        while not accepting(port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"pgbouncer did not start: {(tmp_path / 'pgbouncer.log').read_text()}")
            time.sleep(0.05)
        yield (
            server.set(port=port, host="127.0.0.1")
            .update_query_dict({"pgbouncer": "true"})
            .render_as_string(hide_password=False)
        )
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_jobs_are_enqueued_claimed_and_run_through_transaction_pooling(pooled_url: str) -> None:
    producer = Reliable(pooled_url, embedded_worker=False)
    # Another store, as another process would have: no in-process wake-up reaches it.
    consumer = Reliable(pooled_url, embedded_worker=False, poll_interval=0.2)

    for app in (producer, consumer):

        @app.task(name="add")
        def add(a: int, b: int) -> int:
            return a + b

    task = producer.tasks["add"]
    try:
        # Many times the same statements: psycopg would prepare them after five uses.
        handles = [task.enqueue(i, 1) for i in range(30)]
        handles += [task.enqueue(i, 2, idempotency_key=f"key-{i}") for i in range(10)]
        handles += task.enqueue_many([(i, 3) for i in range(30)])
        again = task.enqueue(0, 2, idempotency_key="key-0")
        assert again.id == handles[30].id and again.replayed

        consumer.start_worker(threads=4)
        results = [handle.result(timeout=WAIT) for handle in handles]
        assert results == [i + 1 for i in range(30)] + [i + 2 for i in range(10)] + [
            i + 3 for i in range(30)
        ]
        # Idle now, the worker finds a new job by polling (no LISTEN behind the pooler).
        late = task.enqueue(20, 22)
        assert late.result(timeout=WAIT) == 42
    finally:
        consumer.stop_worker(timeout=10)
        consumer.close()
        producer.close()


def test_the_pooler_option_is_checked(postgres_url: str) -> None:
    url = make_url(postgres_url).update_query_dict({"pgbouncer": "yes"})
    with pytest.raises(ConfigError, match="pgbouncer= is true or false"):
        Reliable(url.render_as_string(hide_password=False), embedded_worker=False).store  # noqa: B018


def test_the_command_line_works_through_the_pooler(pooled_url: str) -> None:
    Reliable(pooled_url, embedded_worker=False).close()  # the schema, upgraded
    reliable = Path(sys.executable).with_name("reliable")
    for command in (["db", "current"], ["jobs", "list"]):
        completed = subprocess.run(
            [str(reliable), *command, "--database-url", pooled_url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert completed.returncode == 0, completed.stderr
