"""`python -m tfsearch.cli`: the `tfsearch` command without the installed script."""

import sys

from tfsearch.cli import main

sys.exit(main())
