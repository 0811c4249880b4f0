"""The HTTP API (``pixq api``): FastAPI routes over the Python ``Client``, API keys, SSE progress
and the webhook relay. Needs the ``api`` extra (``pip install 'pixart-queue[api]'``)."""
