"""`ledger up` on embedded defaults: no LEDGER_DATABASE_URL, no LEDGER_BROKER_URL.

It must start an embedded PostgreSQL and Redis, print where everything is with a token, and
carry a real Celery worker's task from the embedded broker to the HTTP API; SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx

from tests.support.api import free_socket
from tests.support.worker import make_app, running_worker, workload_config


class LedgerUp:
    def __init__(self, data_dir: str, port: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ledger", "up", "--data-dir", data_dir, "--port", str(port),
             "--enable-events-interval", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def read_until(self, predicate, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("ledger up did not print the expected line:\n" + "\n".join(self.output[-40:]))
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.output.append(line)
            if predicate(line):
                return line


async def test_ledger_up_runs_everything_on_embedded_defaults():
    data_dir = tempfile.mkdtemp(prefix="lup-")  # short: Unix socket paths are limited to ~107 bytes
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    up = LedgerUp(data_dir, port)
    try:
        up.read_until(lambda line: line.startswith("Celery Ledger is up"), timeout=120)
        broker_line = up.read_until(lambda line: line.startswith("broker "), timeout=10)
        database_line = next(line for line in up.output if line.startswith("database "))
        assert "(embedded)" in broker_line and "(embedded)" in database_line
        assert "redis+socket://" in broker_line and data_dir in database_line
        broker_url = broker_line.split()[1]
        up.read_until(lambda line: line.startswith("Local admin token"), timeout=10)
        token = up.read_until(lambda line: bool(line.strip()), timeout=10).strip()
        assert open(os.path.join(data_dir, "local-token")).read().strip() == token

        # A real worker on the embedded broker; ledger's default event exchange.
        config = workload_config(broker_url, "celeryev", broker_url, witness=False)
        app = make_app(config)
        with running_worker(config):
            result = await asyncio.to_thread(lambda: app.tasks["workload.add"].delay(20, 22))
            assert await asyncio.to_thread(result.get, timeout=30) == 42

        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers) as client:
            deadline = time.monotonic() + 30
            while True:
                response = await client.get(f"/v1/tasks/{result.id}")
                if response.status_code == 200 and response.json()["state"] == "SUCCESS":
                    break
                assert time.monotonic() < deadline, f"task never reached SUCCESS in the API: {response.text}"
                await asyncio.sleep(0.1)  # polling another process's progress
            task = response.json()
            assert task["name"] == "workload.add" and task["result"] == "42"
            assert (await client.get("/v1/tasks")).status_code == 200
            assert (await client.get("/v1/tasks", headers={"Authorization": "Bearer wrong"})).status_code == 401
        app.close()

        up.process.send_signal(signal.SIGTERM)
        assert up.process.wait(timeout=60) == 0
    finally:
        if up.process.poll() is None:
            up.process.kill()
            up.process.wait(10)
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_ledger_up_stops_everything_and_fails_when_its_port_is_taken():
    data_dir = tempfile.mkdtemp(prefix="lup-")
    taken = free_socket()  # held open and listening: the web server cannot bind it
    up = LedgerUp(data_dir, taken.getsockname()[1])
    try:
        line = up.read_until(lambda line: "could not start" in line, timeout=120)
        assert f"127.0.0.1:{taken.getsockname()[1]}" in line
        assert await asyncio.to_thread(up.process.wait, 60) == 1  # capture and projector stopped too
    finally:
        taken.close()
        if up.process.poll() is None:
            up.process.kill()
            up.process.wait(10)
        shutil.rmtree(data_dir, ignore_errors=True)
