"""Messages by hand: ``paylab decode`` and ``paylab send`` (:mod:`shared.lab.wire.tool`,
pure) and their shipped templates (``templates/*.json``, package data)."""
