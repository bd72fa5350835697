"""``python -m diffshield``: the command line (what ``accelerate launch -m diffshield ...`` runs in each process)."""

import sys

from diffshield.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
