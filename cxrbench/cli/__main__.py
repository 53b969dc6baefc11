"""``python -m cxrbench.cli`` (used by ``torchrun -m cxrbench.cli``)."""

import sys

from cxrbench.cli.main import main

sys.exit(main())
