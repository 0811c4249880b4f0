"""pixart-queue's GPU worker: the Celery app, PixArt-Σ loading and rendering, S3 storage."""
