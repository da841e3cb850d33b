"""Real services for the distributed-store tests: a PostgreSQL server and an S3-compatible server
(moto's), each started on a free loopback port in a temporary directory and stopped after.

PostgreSQL refuses to run as root, so as root (CI, these machines) it runs as the unprivileged
system user `softprompt-pg`, created here if missing. Only a missing binary skips a test.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

PG_USER = "softprompt-pg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_pg_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                       check=True, capture_output=True)
    return ["runuser", "-u", PG_USER, "--", *cmd]


class Postgres:
    """A throwaway PostgreSQL server: `dsn`, `stop()` (fast or immediate, as a crash), `start()`."""

    def __init__(self):
        for tool in ("initdb", "pg_ctl"):
            if shutil.which(tool) is None:
                pytest.skip(f"PostgreSQL's {tool} is not on PATH (install postgresql-15): skipping the PostgreSQL tests")
        self.dir = Path(tempfile.mkdtemp(prefix="softprompt-pg-"))
        self.data, self.log, self.port = self.dir / "data", self.dir / "log", free_port()
        if os.geteuid() == 0:
            _as_pg_user(["true"])  # creates the user
            pw = pwd.getpwnam(PG_USER)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.dir.chmod(0o700)
        subprocess.run(_as_pg_user(["initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                                    "--locale=C", "--no-sync"]), check=True, capture_output=True, timeout=120)
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.start()

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        subprocess.run(_as_pg_user(["pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60",
                                    "start"]), check=True, capture_output=True, timeout=90)

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(_as_pg_user(["pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop"]),
                       capture_output=True, timeout=60)

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class S3:
    """moto's S3-compatible server on a loopback port, with one bucket; sets the AWS_* environment
    (inherited by child processes, e.g. Ray workers) so s3fs reaches it."""

    ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")

    def __init__(self, bucket: str = "softprompt"):
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            pytest.skip("moto[server] is not installed (pip install -e '.[test]'): skipping the S3 tests")
        self.port = free_port()
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log line per request
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.saved = {k: os.environ.get(k) for k in self.ENV}
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_ENDPOINT_URL=f"http://127.0.0.1:{self.port}", AWS_DEFAULT_REGION="us-east-1")
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        for _ in range(50):
            try:
                fs.mkdir(bucket)
                break
            except OSError:
                time.sleep(0.1)
        self.url = f"s3://{bucket}"

    def close(self) -> None:
        self.server.stop()
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def new_database(admin_dsn: str) -> str:
    """A fresh, empty database on the server of `admin_dsn` (one per test: no state leaks between them)."""
    import uuid

    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(admin_dsn, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return admin_dsn.rsplit("/", 1)[0] + "/" + name
