"""``python -m pixq``: the same CLI as the ``pixq`` command."""

from pixq.cli import main

main()
