"""Demo customers, cards and bills loaded by :meth:`billing.store.BillingStore.seed_demo_data`.

Everything here is test data: the PANs are Luhn-valid test numbers, the PINs are public. The
clear PANs and PINs live only in this module (for the CLI and the tests that play the card
holder); the database receives the PAN's keyed hash, its masked form and the PVV.

Customers and cards (PVKI ``"1"`` for every card):

==================  ==================  =====
PAN                 customer            PIN
==================  ==================  =====
4761739001010010    Budi Santoso        1234
5413330089010608    Siti Rahayu         4321
4111111111111111    Agus Wijaya         0000
5204730012345679    Dewi Lestari        2468
==================  ==================  =====

Bills (amounts in minor units, currency ``"360"``, IDR):

============  ============  ======  =========  ======
bill          customer      biller  amount     status
============  ============  ======  =========  ======
PLN-0001      Budi Santoso  PLN       150 000  open
PLN-0002      Siti Rahayu   PLN       275 050  open
PDAM-0001     Budi Santoso  PDAM       89 900  open
TELCO-0001    Agus Wijaya   TELCO     199 000  open
TELCO-0002    Dewi Lestari  TELCO     350 000  paid (before the simulation: no posting)
PLN-1001      Budi Santoso  PLN       125 000  open
PLN-1002      Siti Rahayu   PLN        98 500  open
PLN-1003      Agus Wijaya   PLN       212 750  open
PLN-1004      Dewi Lestari  PLN        64 300  open
PLN-1005      Budi Santoso  PLN       330 000  open
PLN-1006      Siti Rahayu   PLN        47 500  open
PLN-1007      Agus Wijaya   PLN       158 900  open
PLN-1008      Dewi Lestari  PLN       276 400  open
PLN-1009      Budi Santoso  PLN        89 000  open
PLN-1010      Siti Rahayu   PLN       412 350  open
PLN-1011      Agus Wijaya   PLN        55 250  open
PLN-1012      Dewi Lestari  PLN       143 000  open
PLN-1013      Budi Santoso  PLN       199 999  open
PLN-1014      Siti Rahayu   PLN        72 800  open
PLN-1015      Agus Wijaya   PLN       250 000  open
PLN-1016      Dewi Lestari  PLN       118 650  open
PLN-1017      Budi Santoso  PLN       305 500  open
PLN-1018      Siti Rahayu   PLN        93 100  open
PLN-1019      Agus Wijaya   PLN       167 200  open
PLN-1020      Dewi Lestari  PLN       500 000  open
============  ============  ======  =========  ======

``PLN-1001`` .. ``PLN-1020`` are there for repeated demo payments.
"""

from __future__ import annotations

from typing import Final, NamedTuple


class DemoCard(NamedTuple):
    """A demo card: its clear PAN and PIN and the name of the customer holding it."""

    pan: str
    pin: str
    name: str


class DemoBill(NamedTuple):
    """A demo bill; ``customer`` is a name from :data:`DEMO_CUSTOMERS`."""

    bill_number: str
    customer: str
    biller: str
    amount_due: int
    status: str


#: PIN verification key index of every demo card.
DEMO_PVKI: Final = "1"

#: Currency of every demo bill: ISO 4217 numeric code of the Indonesian rupiah.
DEMO_CURRENCY: Final = "360"

#: Demo customer names, in insertion order (names are unique within the demo data).
DEMO_CUSTOMERS: Final[tuple[str, ...]] = (
    "Budi Santoso",
    "Siti Rahayu",
    "Agus Wijaya",
    "Dewi Lestari",
)

#: ``(pan, pin, name)`` of every demo card.
DEMO_CARDS: Final[tuple[DemoCard, ...]] = (
    DemoCard("4761739001010010", "1234", "Budi Santoso"),
    DemoCard("5413330089010608", "4321", "Siti Rahayu"),
    DemoCard("4111111111111111", "0000", "Agus Wijaya"),
    DemoCard("5204730012345679", "2468", "Dewi Lestari"),
)

#: The card the CLI, the benchmarks and the scenarios pay with by default.
DEMO_CARD: Final[DemoCard] = DEMO_CARDS[0]

#: Amount (minor units) of every generated bill (``paylab bills add``, benchmarks, demo):
#: each belongs to :data:`DEMO_CARD`'s holder and is numbered ``<prefix>-<7 digits>``.
GENERATED_BILL_AMOUNT: Final = 10_000


def generated_bill_number(prefix: str, index: int) -> str:
    """The number of generated bill ``index`` of ``prefix`` (``LOAD-0000042``)."""
    return f"{prefix}-{index:07d}"


#: ``(bill_number, customer, biller, amount_due, status)`` of every demo bill.
DEMO_BILLS: Final[tuple[DemoBill, ...]] = (
    DemoBill("PLN-0001", "Budi Santoso", "PLN", 150_000, "open"),
    DemoBill("PLN-0002", "Siti Rahayu", "PLN", 275_050, "open"),
    DemoBill("PDAM-0001", "Budi Santoso", "PDAM", 89_900, "open"),
    DemoBill("TELCO-0001", "Agus Wijaya", "TELCO", 199_000, "open"),
    DemoBill("TELCO-0002", "Dewi Lestari", "TELCO", 350_000, "paid"),
    DemoBill("PLN-1001", "Budi Santoso", "PLN", 125_000, "open"),
    DemoBill("PLN-1002", "Siti Rahayu", "PLN", 98_500, "open"),
    DemoBill("PLN-1003", "Agus Wijaya", "PLN", 212_750, "open"),
    DemoBill("PLN-1004", "Dewi Lestari", "PLN", 64_300, "open"),
    DemoBill("PLN-1005", "Budi Santoso", "PLN", 330_000, "open"),
    DemoBill("PLN-1006", "Siti Rahayu", "PLN", 47_500, "open"),
    DemoBill("PLN-1007", "Agus Wijaya", "PLN", 158_900, "open"),
    DemoBill("PLN-1008", "Dewi Lestari", "PLN", 276_400, "open"),
    DemoBill("PLN-1009", "Budi Santoso", "PLN", 89_000, "open"),
    DemoBill("PLN-1010", "Siti Rahayu", "PLN", 412_350, "open"),
    DemoBill("PLN-1011", "Agus Wijaya", "PLN", 55_250, "open"),
    DemoBill("PLN-1012", "Dewi Lestari", "PLN", 143_000, "open"),
    DemoBill("PLN-1013", "Budi Santoso", "PLN", 199_999, "open"),
    DemoBill("PLN-1014", "Siti Rahayu", "PLN", 72_800, "open"),
    DemoBill("PLN-1015", "Agus Wijaya", "PLN", 250_000, "open"),
    DemoBill("PLN-1016", "Dewi Lestari", "PLN", 118_650, "open"),
    DemoBill("PLN-1017", "Budi Santoso", "PLN", 305_500, "open"),
    DemoBill("PLN-1018", "Siti Rahayu", "PLN", 93_100, "open"),
    DemoBill("PLN-1019", "Agus Wijaya", "PLN", 167_200, "open"),
    DemoBill("PLN-1020", "Dewi Lestari", "PLN", 500_000, "open"),
)
