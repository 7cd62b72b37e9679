"""The HTTP API (Starlette on uvicorn): the native /v1 routes, django-celery-results' and
Flower's routes in their own shapes, bearer-token auth, and the operations routes.

- ``app``      create_app(settings): routes, error handlers, metrics, the pool's lifespan,
               and the hook that mounts ``ledger.stream.routes``;
- ``routing``  the ``endpoint`` decorator: scope, query model, response model per route;
- ``native``   /v1/... ; ``compat``: /celery/... and /api/... ; ``ops``: health, metrics, openapi;
- ``queries``  the SQL; ``timetravel``: "as of" views folded from the log;
- ``auth``     Principal, authenticate, scopes; ``tokens``: `ledger token ...`;
- ``server``   `ledger serve`, and ``serve(settings, stop)`` for running inside `ledger up`.
"""
