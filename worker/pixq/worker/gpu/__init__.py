"""GPU code: load a PixArt-Σ pipeline once, render a request with it, encode the images.

Nothing here knows about Redis, Celery or S3: a render takes a validated request and a step
callback and returns images, so it can be benchmarked and tested in-process.
"""
