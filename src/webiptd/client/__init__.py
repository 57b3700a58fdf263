"""`web-ipt`, the command-line client of web-ipt-d's HTTPS API (docs/client.md). The daemon never imports this
package: its libraries (tabulate, tqdm) stay out of the daemon's start."""

from webiptd.client.main import main

__all__ = ["main"]
