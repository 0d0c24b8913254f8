"""`python -m trajflow ...` (and `accelerate launch -m trajflow train ...`)."""

import sys

from trajflow.cli import main

if __name__ == "__main__":  # not when a spawned loader worker re-imports the main module
    sys.exit(main())
