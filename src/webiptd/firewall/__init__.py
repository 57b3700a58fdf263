"""The firewall: one worker thread that owns the backend and the state store.

Only this package imports iptc or nftables, or talks netlink to the kernel's ipset (ipset_netlink.py,
by hand with `struct`: pyroute2 cost about 220 µs of CPU a change and 9 MiB of RSS, this about 9 µs).
"""
