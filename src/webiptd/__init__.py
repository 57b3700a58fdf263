"""web-ipt-d: a small, safe HTTPS API that blocks source addresses in the host firewall."""

__version__ = "0.1.0"
