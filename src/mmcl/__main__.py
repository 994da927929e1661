"""``python -m mmcl``: the command line (see :mod:`mmcl.cli`)."""

import sys

from mmcl.cli import main

sys.exit(main())
