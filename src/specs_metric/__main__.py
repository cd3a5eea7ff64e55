"""``python -m specs_metric`` (also what ``torchrun -m specs_metric`` runs)."""

import sys

from specs_metric.cli import main

sys.exit(main())
