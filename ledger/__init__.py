"""Celery Ledger: an event-sourced ledger for Celery.

Data flow, one direction: ``capture`` -> ``log`` (append-only PostgreSQL) ->
``projections`` -> ``api`` / ``stream``.
"""

__version__ = "0.1.0"
