"""What travels between producer and worker through Celery: task name, queues, serialization.

The producer enqueues by task *name* (``send_task``) and never imports the worker.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from producer.settings import Settings

RENDER_TASK = "pixq.render"
QUEUE_PREFIX = "pixq."

# Longer than the longest job a worker will run, so Redis does not hand a running job's
# message to a second worker (the reliability issue adds leases on top).
VISIBILITY_TIMEOUT_S = 2 * 3600


def queue_name(model_name: str) -> str:
    """The queue a model's jobs travel on: only workers serving that model consume it."""
    return QUEUE_PREFIX + model_name


def celery_config(settings: Settings) -> dict[str, Any]:
    url = settings.require_redis()
    return {
        "broker_url": url,
        "result_backend": url,  # only for task progress (update_state); the job record is the truth
        "result_expires": 24 * 3600,
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_track_started": True,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": VISIBILITY_TIMEOUT_S,
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
            "health_check_interval": 10,
        },
        "result_backend_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT_S},
        "redis_socket_connect_timeout": 5,
        "redis_socket_timeout": 30,
        # Publishing is one attempt with a short timeout: the caller gets a clear error.
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
    }


def make_celery(settings: Settings, name: str = "pixq") -> Celery:
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app

# A live worker keeps ``pixq:worker:{name}`` (JSON: model, device, pid, ...) with a short TTL.
WORKER_KEY_PREFIX = "pixq:worker:"
WORKER_KEY_TTL_S = 15
