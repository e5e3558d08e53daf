"""``python -m dist_bnn`` runs the same command line as the ``dist-bnn`` script."""

import sys

from dist_bnn.cli import main

if __name__ == "__main__":
    sys.exit(main())
