"""`python -m tilevlm`: the `tilevlm` command."""

import sys

from tilevlm.cli import main

sys.exit(main())
