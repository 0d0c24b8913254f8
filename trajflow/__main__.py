"""`python -m trajflow ...` (and `accelerate launch -m trajflow train ...`)."""

import sys

from trajflow.cli import main

sys.exit(main())
