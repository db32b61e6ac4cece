"""paylab's pyiso8583 spec: ISO 8583:1987, every data element in ASCII.

It starts as a deep copy of pyiso8583's ``default_ascii`` spec (so the library's module
level spec is never mutated) and adapts the elements paylab uses. ``docs/message-spec.md``
documents each element; :mod:`shared.iso.validation` enforces content rules (numeric, Luhn,
hex) that the spec's length rules cannot express.
"""

from __future__ import annotations

import copy
from typing import Any

import iso8583.specs

SPEC: dict[str, dict[str, Any]] = copy.deepcopy(dict(iso8583.specs.default_ascii))

# Field 48 carries the bill number (customer reference). Bill numbers are short; capping
# the length here makes an absurd value a decode error rather than a database problem.
SPEC["48"] = {**SPEC["48"], "max_len": 32, "desc": "Bill number (customer reference)"}
# Field 62 carries bill details in responses: "<biller>|<customer name>".
SPEC["62"] = {**SPEC["62"], "max_len": 99, "desc": "Bill details: biller|customer name"}
SPEC["64"] = {**SPEC["64"], "desc": "MAC (16 hex digits), messages without a secondary bitmap"}
SPEC["128"] = {**SPEC["128"], "desc": "MAC (16 hex digits), messages with a secondary bitmap"}
SPEC["52"] = {**SPEC["52"], "desc": "PIN block, ISO 9564 format 0, 16 hex digits"}
