"""`python -m webiptd.client` is the `web-ipt` command."""

import sys

from webiptd.client import main

sys.exit(main())
