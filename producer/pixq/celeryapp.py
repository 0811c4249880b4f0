"""The Celery app for ``celery -A pixq.celeryapp flower`` (compose's and Kubernetes' Flower, and ``pixq flower``).

Flower must talk to the broker with the workers' own transport options, not Celery's defaults:
kombu's Redis transport joins the routing entries of its binding tables with the ``sep`` option
(ours is ``pixq.wire.PRIORITY_SEP``, also the priority lists' separator). A plain ``celery flower``
writes its reply bindings with kombu's default separator, and every worker that answers one of its
remote-control commands then fails to parse them ("Control command error: ValueError: not enough
values to unpack"); its Broker tab also counts no priority list of ours. The settings come from
the ``PIXQ_*`` environment, as everywhere (``PIXQ_REDIS_URL``, plain or Sentinel).
"""

from __future__ import annotations

import os
from typing import Any


def __getattr__(name: str) -> Any:
    # ``celery -A pixq.celeryapp:app`` asks for this in Flower's process, its entry point: nothing is
    # built (and no setting read) when the module is imported.
    if name == "app":
        from pixq.settings import Settings
        from pixq.wire import make_celery

        return make_celery(Settings.from_env(os.environ), name="pixq-flower")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
