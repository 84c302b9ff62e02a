"""Batch decisions for delivery: how a claimed batch splits into requests, how big the next
batch is, and which bulk PUTs find the rows PANDA refuses. Pure: no I/O, no clock.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Generic, TypeVar

from service.changes import Op
from service.store.outbox import Claim

A = TypeVar("A")
_EXTERNAL_ID = attrgetter("external_id")
_OP = attrgetter("op")


@dataclass(frozen=True)
class Plan:
    """The requests for one batch of claims, in claim order within each list.

    `bulk`: upserts for bulk PUTs. `single`: one request each (deletes, since PANDA has no
    bulk delete by id (panda-api.md §5.5), and every upsert in row-by-row mode). `later`:
    claims whose external_id already has a change in this batch; they wait for a later batch,
    so two changes to one row are never in flight at once.
    """

    bulk: list[Claim]
    single: list[Claim]
    later: list[Claim]


def plan(claims: Sequence[Claim], *, row_by_row: bool) -> Plan:
    """Split `claims` into bulk upserts, single requests and claims left for a later batch."""
    external_ids = list(map(_EXTERNAL_ID, claims))
    if not row_by_row and len(set(external_ids)) == len(claims):
        # Delivery's hot path (a catch-up of upserts, every row once): whole-list steps.
        ops = list(map(_OP, claims))
        if Op.DELETE not in ops:
            return Plan(bulk=list(claims), single=[], later=[])
    bulk: list[Claim] = []
    single: list[Claim] = []
    later: list[Claim] = []
    seen: set[str] = set()
    for claim, external_id in zip(claims, external_ids, strict=True):
        if external_id in seen:
            later.append(claim)
            continue
        seen.add(external_id)
        if claim.op is Op.UPSERT and not row_by_row:
            bulk.append(claim)
        else:
            single.append(claim)
    return Plan(bulk=bulk, single=single, later=later)


class BatchSizer:
    """How many entries the next batch claims: grows while PANDA answers fast, shrinks on
    errors and slow answers, always within [`minimum`, `maximum`].

    A full bulk PUT (as many rows as the batch was allowed) answered in under half of
    `slow_s` doubles the size, since a bulk PUT costs PANDA about as much as one row
    (panda-api.md §3.3.10); one slower than `slow_s`, or a failure, halves it. A PUT that was
    not full says nothing about a bigger one.
    """

    def __init__(self, *, start: int, minimum: int, maximum: int, slow_s: float) -> None:
        if not 1 <= minimum <= start <= maximum:
            raise ValueError(
                f"need 1 <= minimum <= start <= maximum, got {minimum}/{start}/{maximum}"
            )
        self.size = start
        self._minimum = minimum
        self._maximum = maximum
        self._slow_s = slow_s

    def took(self, seconds: float, *, full: bool) -> None:
        """A bulk PUT was answered (either way) after `seconds`; `full` if it held as many
        rows as its batch was allowed."""
        if seconds > self._slow_s:
            self.shrink()
        elif full and seconds < self._slow_s / 2:
            self.size = min(self._maximum, self.size * 2)

    def shrink(self) -> None:
        """Halve the size (not below the minimum): after an error or a slow answer."""
        self.size = max(self._minimum, self.size // 2)


@dataclass
class Bisection(Generic[A]):
    """Plans the bulk PUTs that find the rows PANDA refuses in a batch it refused as a whole.

    PANDA validates every object of a bulk PUT before writing any, and one bad object fails the
    whole request (panda-api.md §3.3.9). So the refused rows are halved: when one half goes
    through, the bad row is in the other, which needs no request to know; when it does not,
    the other half is set aside and sent later together with every other half set aside. One
    bad row among n costs at most ceil(log2 n) + 1 PUTs, and every good row is written on the
    way. Use: `while (rows := bisection.next()) is not None: send them, then record(answer)`
    with None when PANDA took them; then `refused` lists each bad row's index (into the batch
    of `size` rows) with PANDA's answer to the smallest request that held it.
    """

    size: int
    answer: A
    refused: list[tuple[int, A]] = field(default_factory=list)
    # Rows known to hold a refused row, with PANDA's answer, the smallest last.
    _suspects: list[tuple[list[int], A]] = field(default_factory=list)
    # Rows not known either way, set aside to go out together.
    _untried: list[int] = field(default_factory=list)
    _sending: list[int] | None = None
    _other_half: tuple[list[int], A] | None = None

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError("a bisection needs at least one row")
        self._suspects.append((list(range(self.size)), self.answer))

    def next(self) -> list[int] | None:
        """The rows (indexes into the batch) to send next; None when every row is settled."""
        if self._sending is not None:
            raise RuntimeError("record the answer to the rows sent before asking for more")
        while self._suspects:
            rows, answer = self._suspects.pop()
            if len(rows) == 1:
                self.refused.append((rows[0], answer))
                continue
            middle = len(rows) // 2
            self._sending, self._other_half = rows[:middle], (rows[middle:], answer)
            return self._sending
        if self._untried:
            self._sending, self._untried = self._untried, []
            return self._sending
        return None

    def record(self, answer: A | None) -> None:
        """PANDA's answer to the rows `next` gave: None when it took them, else its refusal."""
        sent, other_half = self._sending, self._other_half
        if sent is None:
            raise RuntimeError("nothing was sent")
        self._sending = self._other_half = None
        if other_half is not None:
            if answer is None:
                # This half went through, so the other half holds the refused row.
                self._suspects.append(other_half)
            else:
                self._untried.extend(other_half[0])
        if answer is not None:
            self._suspects.append((sent, answer))
