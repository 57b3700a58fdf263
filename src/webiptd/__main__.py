"""`python -m webiptd` is the `web-ipt-d` command."""

import sys

from webiptd.cli import main

sys.exit(main())
