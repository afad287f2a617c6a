"""`python -m scalpel.cli`: the same as the `scalpel` command."""

import sys

from scalpel.cli.main import main

sys.exit(main())
