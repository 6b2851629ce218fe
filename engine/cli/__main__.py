"""``python -m engine.cli``: the same as the ``sagactl`` console script."""

from engine.cli.app import main

main()
