"""The acquirer's HTTP API: request bodies and their validation.

Bodies are pydantic models validated strictly: JSON types are not coerced (an amount is a
JSON integer, not a string, a float or a boolean), and digits are ASCII digits. Anything
that does not fit (bad JSON, a missing or unknown field, a wrong type, a PAN failing the
Luhn check) is answered 422 with ``{"error": ..., "fields": [...], "details": [...]}``, the
message naming the offending fields.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request

from shared.pan import luhn_ok

M = TypeVar("M", bound=BaseModel)

BillNumber = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9\-]{0,31}$")]


class _Body(BaseModel):
    # strict: no coercion ("10000" or 10000.0 or true is not an amount).
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, strict=True)


class InquiryBody(_Body):
    bill: BillNumber


class PaymentBody(_Body):
    bill: BillNumber
    amount: int = Field(
        gt=0, le=999_999_999_999, description="Minor units (e.g. cents), a JSON integer."
    )
    pan: str = Field(min_length=12, max_length=19)
    # [0-9], not \d: the pattern engine's \d also matches other scripts' digits ("١٢٣٤").
    pin: str = Field(pattern=r"^[0-9]{4,12}$", description="4-12 ASCII digits.")

    @field_validator("pan")
    @classmethod
    def _luhn(cls, v: str) -> str:
        if not luhn_ok(v):
            raise ValueError("PAN must be 12-19 digits and pass the Luhn check")
        return v


class BodyError(Exception):
    """A request body that cannot be used; carries the 422 payload."""

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.details = details or []

    @property
    def fields(self) -> list[str]:
        """The offending fields, in order, each once."""
        return list(dict.fromkeys(d["field"] for d in self.details))


async def parse_body(request: Request, model: type[M]) -> M:
    """Read and validate a JSON body, raising :class:`BodyError` with a clear message."""
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"")
    except ValidationError as exc:
        details = [
            {"field": ".".join(str(p) for p in e["loc"]) or "body", "problem": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise BodyError("request body is not valid JSON", details) from None
        if any(e["type"] == "model_type" for e in exc.errors()):
            raise BodyError("request body must be a JSON object", details) from None
        named = ", ".join(dict.fromkeys(d["field"] for d in details))
        raise BodyError(f"invalid field: {named}", details) from None
