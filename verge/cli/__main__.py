"""``python -m verge.cli``: the ``verge`` command without its console script."""

from verge.cli import main

main()
