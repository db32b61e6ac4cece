"""``python -m shared.cli``: the ``paylab`` command."""

from shared.cli.app import main

main()
