"""The project's error hierarchy.

Every error paylab raises on purpose derives from :class:`PaylabError`, so a service
loop can tell "we decided this is bad input" from a bug. Business outcomes (a decline,
a wrong PIN) are never exceptions: they are ISO response codes.
"""

from __future__ import annotations


class PaylabError(Exception):
    """Base class of every error paylab raises deliberately."""


class FramingError(PaylabError):
    """The byte stream cannot be split into frames (oversize or malformed length header).

    After a framing error the stream position is unknown, so the connection must be closed.
    """


class DecodeError(PaylabError):
    """A frame arrived whole but is not a decodable ISO-8583 message."""


class ValidationError(PaylabError):
    """A decoded message breaks the rules for its MTI (missing field, bad format, Luhn).

    ``field`` names the first offending data element, when there is one.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ConfigError(PaylabError):
    """The configuration cannot work (a key file missing, a port clash)."""


class UpstreamError(PaylabError):
    """A call to an upstream service (billing, HSM, gateway) did not produce an answer."""


class UpstreamUnavailable(UpstreamError):
    """No connection could be used: refused, reset, or closed before the answer.

    The request was certainly not processed when this is raised before sending, and
    *may* have been processed when the link dropped after sending (see ``sent``).
    """

    def __init__(self, message: str, *, sent: bool = False) -> None:
        super().__init__(message)
        self.sent = sent


class UpstreamTimeout(UpstreamError):
    """The request was sent but no answer came within the deadline: outcome unknown."""
