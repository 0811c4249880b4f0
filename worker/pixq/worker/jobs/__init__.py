"""Queue mechanics: the Celery task, the job runner (claim, lease, render, store, record), the
reaper, S3 storage and the worker's metrics. Uses ``pixq.worker.gpu`` to render, never ``ops``.
"""
