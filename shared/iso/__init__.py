"""The wire, sans-IO: length-prefix framing, the ISO-8583 spec and codec, messages,
validation rules and response codes. No sockets, no event loop, no settings."""
