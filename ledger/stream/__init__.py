"""Live push: a per-replica hub tails ledger.changes / ledger.events by position and fans
out to websocket subscriptions (``/v1/stream``) and long polls (``/v1/tasks/{id}/wait``).
The wire protocol is documented in README.md ("Websocket protocol")."""
