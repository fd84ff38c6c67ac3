"""``python -m singd.cli`` runs the ``singd`` command."""

import sys

from singd.cli import main

if __name__ == "__main__":
    sys.exit(main())
