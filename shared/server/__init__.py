"""The skeleton every service stands on: the ``Service`` base (start, stop, decode,
validate, dispatch), its HTTP side, the admin API and admin tokens."""
