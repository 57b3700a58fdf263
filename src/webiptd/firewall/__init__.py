"""The firewall: one worker thread (worker.py) that owns the state store and the backends.

Only this package imports iptc or nftables, or speaks netlink to the kernel.
"""
