"""Fault injection (``paylab up --chaos``, ``paylab chaos``): fault specs, the proxies that
apply them, connection floods, and the controller over them. See ``docs/chaos.md``."""
