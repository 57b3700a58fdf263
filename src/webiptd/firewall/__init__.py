"""The firewall: one worker thread that owns the backend and the state store.

Only this package imports iptc, pyroute2 or nftables.
"""
