"""The ``paylab`` command. Imports everything, and nothing imports it."""
