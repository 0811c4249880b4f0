"""pixq.worker (distribution ``pixart-queue-worker``): PixArt-Σ GPU workers in three layers.

``gpu`` (pipeline loading, rendering, speed-ups, PNG, the tiny test model) knows nothing of queues;
``jobs`` (the Celery task, the job runner, leases, the reaper, S3 storage, metrics) runs jobs through
``gpu``; ``ops`` (the worker process, the per-GPU supervisor, the local stack, Flower, the CLI
commands) starts and wires both. Each layer imports only the ones below it and the light ``pixq``
package; ``.importlinter`` checks it.
"""
