"""Operations: the worker process and its lifecycle, the per-GPU supervisor, the local stack
(``pixq up``), Flower, and the worker's CLI commands. The only layer that starts processes.
"""
