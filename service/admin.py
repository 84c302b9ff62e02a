"""The admin API: act on the running service without reading its store by hand.

Every route needs `Authorization: Bearer <server.admin_token>` (compared in constant time);
without a configured token the admin API is off (404 on every route). Pause and resume a
source, take a snapshot now or confirm a held one, and list, show, replay and discard dead
letters, as the CLI's commands do.
"""

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from pydantic import BaseModel, Field

from service import access
from service.clock import utcnow
from service.container import Service
from service.delivery import panda, reconcile
from service.ingress.api_bodies import MAX_API_BODY_BYTES
from service.ingress.poller import Poller
from service.ingress.snapshots import Snapshotter
from service.ingress.webhooks import WebhookRefusal
from service.sources import couchdb
from service.store import dead_letters

# Every admin route answers 401 without the token, and 404 with the API off or for a source or
# dead letter that does not exist; each route's own refusals are listed on it: the OpenAPI
# document names every status a route answers (tests/test_api_schema.py holds it to that).
REFUSED = access.refusals(
    {
        401: "No admin token, or a wrong one.",
        404: "The admin API is off, or no such source or dead letter.",
    }
)
# A route that reads a body: refused before it is read when it is not declared within the
# bound (`ingress.api_bodies`), cut off when it comes too slowly (the HTTP protocol's 408,
# whose body is the webhook refusal's shape).
BODY_REFUSALS = access.refusals(
    {
        411: "The body has no Content-Length (chunked): send it with one.",
        413: f"The body is declared over {MAX_API_BODY_BYTES} bytes.",
    }
) | {
    408: {
        "model": WebhookRefusal,
        "description": "The body did not arrive within server.body_timeout_s.",
    }
}
# Dead letters a listing holds (each carries its row and every answer PANDA gave): by
# default, and at most. A catch-up that goes wrong can leave a million of them.
LETTERS_LISTED = 100
MAX_LETTERS_LISTED = 10_000
FEED_NOT_CLOSED = "The source's feed did not close in time: try again."
router = APIRouter(prefix="/admin", tags=["admin"], responses=REFUSED)


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def _admin(request: Request) -> Service:
    service = _service(request)
    token = service.settings.server.admin_token
    if token is None:
        raise HTTPException(404, "the admin API is off: set server.admin_token to turn it on")
    access.require(request, token)
    return service


AdminDep = Annotated[Service, Depends(_admin)]


class SourceAction(BaseModel):
    """What a pause or resume did."""

    source: str
    paused: bool = Field(description="Whether the source's reading and delivery are paused.")


class LetterView(BaseModel):
    """One dead letter, as `pandasync dead-letters show` shows it."""

    id: int
    source: str
    doc_id: str
    op: str
    external_id: str | None
    row: list[str] | None
    version: int
    attempts: int
    created_at: datetime
    answers: list[dict[str, Any]]


# Dead letter ids and limits go to the database as 64-bit integers: a number out of range is
# refused with 422, not passed to the driver (which fails on it with a 500). The bound is the
# largest integer a JSON number holds exactly in double precision, far above any id handed out.
INTEGER_MAX = 2**53 - 1
LetterId = Annotated[int, Field(ge=1, le=INTEGER_MAX)]


class LetterIds(BaseModel):
    """Dead letters to act on."""

    ids: list[LetterId] = Field(min_length=1, max_length=10_000)


class ReplayAnswer(BaseModel):
    """What a replay did, by dead letter id."""

    replayed: list[int]
    superseded: list[int]
    missing: list[int]
    unmapped: list[int] = Field(
        description="Documents that could not become rows: replay them with"
        " `pandasync dead-letters replay`, which reads them again from CouchDB."
    )


class DiscardAnswer(BaseModel):
    """What a discard did."""

    discarded: list[int]
    missing: list[int]


def _known(service: Service, name: str) -> None:
    if all(source.name != name for source in service.settings.sources):
        raise HTTPException(404, f"no source named {name!r}")


@router.post("/sources/{name}/pause")
async def pause_source(name: str, service: AdminDep) -> SourceAction:
    """Pause a source: a CouchDB source stops reading its feed, and the source's changes are
    not delivered (a webhook source still takes changes in and queues them)."""
    _known(service, name)
    service.delivery.hold(name)
    if name in service.pollers:
        service.pollers[name].hold()
    return SourceAction(source=name, paused=True)


@router.post("/sources/{name}/resume")
async def resume_source(name: str, service: AdminDep) -> SourceAction:
    """Resume a paused source: reading (from its checkpoint) and delivery go on."""
    _known(service, name)
    service.delivery.release(name)
    if name in service.pollers:
        service.pollers[name].release()
    return SourceAction(source=name, paused=False)


class CheckpointSet(BaseModel):
    """Where a CouchDB source reads on from."""

    to: Any = Field(
        description='"0" (every change again), "now" (CouchDB\'s current seq: changes from now'
        " on) or a seq CouchDB gave, verbatim (any JSON value)."
    )


class CheckpointAnswer(BaseModel):
    """What a checkpoint change did (seqs as their JSON text)."""

    source: str
    was: str | None
    now: str


@router.post(
    "/sources/{name}/checkpoint",
    responses=BODY_REFUSALS
    | access.refusals(
        {
            409: "The source is not a CouchDB source: it has no checkpoint.",
            502: 'CouchDB could not be read (to "now"), or it refused the source.',
            503: FEED_NOT_CLOSED,
        }
    ),
)
async def set_checkpoint(name: str, body: CheckpointSet, service: AdminDep) -> CheckpointAnswer:
    """Set a CouchDB source's checkpoint: its feed is closed, the checkpoint written, and the
    feed read on from there (a paused source stays paused; a stopped one, which CouchDB
    refused, reads from it once the service restarts)."""
    _known(service, name)
    poller = service.pollers.get(name)
    if poller is None:
        raise HTTPException(409, f"source {name!r} is not a CouchDB source: it has no checkpoint")
    try:
        loop = service.runner.health().get(f"couchdb:{name}")
        running = loop is not None and loop.running
        was, now = await poller.set_checkpoint(body.to, running=running)
    except TimeoutError:
        raise HTTPException(503, "the source's feed did not close in time: try again") from None
    except (couchdb.FeedBrokenError, couchdb.SourceStoppedError) as error:
        raise HTTPException(502, f"CouchDB could not be read: {error}") from None
    return CheckpointAnswer(
        source=name, was=None if was is None else was.json_text, now=now.json_text
    )


class ResyncAsk(BaseModel):
    """What a resync is to do (as `pandasync resync` does)."""

    dry_run: bool = Field(default=False, description="Only compare; change nothing.")
    delete_orphans: bool = Field(
        default=False, description="Delete the dataset's rows the source does not have."
    )
    confirm: bool = Field(
        default=False,
        description="Delete even when that is more than 20% of the dataset's rows.",
    )


class ResyncAnswer(BaseModel):
    """What a resync found (the dataset compared with what was delivered) and did."""

    source: str
    dataset: str
    panda_rows: int
    in_step: int
    missing: int = Field(description="Rows delivered that PANDA no longer has.")
    changed: int = Field(description="Rows PANDA holds otherwise than delivered (by hand).")
    unknown: int = Field(description="Rows PANDA holds that the source does not have.")
    waiting: int = Field(description="Rows whose change waits for delivery.")
    examples: dict[str, list[str]] = Field(description="A few external_ids of each kind.")
    written: bool = Field(description="False for a dry run.")
    to_send: int = Field(description="Rows the source's next reading sends again.")
    deletes_queued: int
    read_again: bool = Field(description="Whether the source is read again from its start.")


@router.post(
    "/sources/{name}/resync",
    responses=BODY_REFUSALS
    | access.refusals(
        {
            409: "It would delete more than 20% of the dataset's rows: send confirm=true.",
            502: "PANDA could not be read, or answered what it should not.",
            503: FEED_NOT_CLOSED,
        }
    ),
)
async def resync_source(name: str, body: ResyncAsk, service: AdminDep) -> ResyncAnswer:
    """Compare the source's PANDA dataset with what was delivered, forget what differs and
    read a CouchDB source again from 0 (a snapshot source: take a snapshot now), so PANDA ends
    equal to the source; deletes of rows
    the source does not have with `delete_orphans`. 409 when that would delete more than 20%
    of the rows without `confirm`."""
    _known(service, name)
    spec = next(source for source in service.settings.sources if source.name == name)
    try:
        done = await reconcile.resync(
            service.db,
            service.panda,
            name,
            spec.dataset.slug,
            dry_run=body.dry_run,
            delete_unknown=body.delete_orphans,
            confirm=body.confirm,
            now=utcnow(),
        )
    except reconcile.TooManyDeletesError as error:
        raise HTTPException(409, f"{error} with confirm=true") from None
    except (
        panda.RetryableError,
        panda.TargetError,
        panda.PermanentError,
        panda.DatasetMismatchError,
    ) as error:
        raise HTTPException(502, f"PANDA could not be read: {error}") from None
    poller, snapshotter = service.pollers.get(name), service.snapshotters.get(name)
    if done.written and poller is not None:
        await _read_again(service, name, poller)
    if done.written and snapshotter is not None:
        snapshotter.snapshot_now()
    comparison = done.comparison
    return ResyncAnswer(
        source=name,
        dataset=comparison.slug,
        panda_rows=comparison.panda_rows,
        in_step=comparison.in_step,
        missing=comparison.missing.count,
        changed=comparison.changed.count,
        unknown=comparison.unknown.count,
        waiting=comparison.not_known.count,
        examples={kind: found.examples for kind, found in comparison.kinds() if found.count},
        written=done.written,
        to_send=done.to_send,
        deletes_queued=done.deletes_queued,
        read_again=done.written and (poller is not None or snapshotter is not None),
    )


async def _read_again(service: Service, name: str, poller: Poller) -> None:
    loop = service.runner.health().get(f"couchdb:{name}")
    try:
        await poller.set_checkpoint("0", running=loop is not None and loop.running)
    except TimeoutError:
        raise HTTPException(503, "the source's feed did not close in time: try again") from None


class SnapshotAction(BaseModel):
    """What a snapshot request or a confirmation did."""

    source: str
    generation: int | None = Field(
        default=None, description="The confirmed snapshot's generation (confirmations only)."
    )
    counts: dict[str, int] | None = Field(
        default=None,
        description="What the confirmed snapshot found (rows_read, new, changed, deleted, ...).",
    )
    detail: str


def _snapshotter(service: Service, name: str) -> Snapshotter:
    _known(service, name)
    snapshotter = service.snapshotters.get(name)
    if snapshotter is None:
        raise HTTPException(409, f"source {name!r} is not a snapshot source")
    return snapshotter


@router.post(
    "/sources/{name}/snapshot",
    status_code=202,
    responses=access.refusals({409: "The source is not a snapshot source."}),
)
async def snapshot_now(name: str, service: AdminDep) -> SnapshotAction:
    """Take a snapshot source's next snapshot now (after the one under way, if any); its
    progress shows in /status."""
    _snapshotter(service, name).snapshot_now()
    return SnapshotAction(source=name, detail="a snapshot is being taken: see /status")


@router.post(
    "/sources/{name}/confirm-deletes",
    responses=access.refusals(
        {409: "The source is not a snapshot source, or holds no snapshot waiting for confirmation."}
    ),
)
async def confirm_deletes(name: str, service: AdminDep) -> SnapshotAction:
    """Confirm a snapshot source's held snapshot (empty, or deleting more than
    max_delete_fraction of the rows): it is applied as it was read, deletes included."""
    confirmed = await _snapshotter(service, name).confirm()
    if confirmed is None:
        raise HTTPException(
            409, f"source {name!r} holds no snapshot waiting for confirmation: see /status"
        )
    return SnapshotAction(
        source=name,
        generation=confirmed.generation,
        counts=confirmed.counts,
        detail="the held snapshot is being applied: see /status",
    )


def _view(letter: dead_letters.Letter) -> LetterView:
    change = letter.change
    return LetterView(
        id=letter.id,
        source=letter.source,
        doc_id=letter.doc_id,
        op=letter.op,
        external_id=None if change is None else change.external_id,
        row=None if change is None or change.row is None else list(change.row),
        version=letter.version,
        attempts=letter.attempts,
        created_at=letter.created_at,
        answers=[
            {"at": at.isoformat(), "status": answer.status, "detail": answer.detail}
            for at, answer in letter.answers
        ],
    )


@router.get("/dead-letters")
async def list_dead_letters(
    service: AdminDep,
    source: str | None = None,
    limit: Annotated[
        int, Query(ge=1, le=MAX_LETTERS_LISTED, description="At most this many, the oldest.")
    ] = LETTERS_LISTED,
    after: Annotated[
        int | None,
        Query(
            ge=0,
            le=INTEGER_MAX,
            description="Only those whose id is above it: the last id of the page before.",
        ),
    ] = None,
) -> list[LetterView]:
    """The dead letters, oldest first, of one source or all: a page of `limit`; the next page
    is asked for with `after` set to the last id of this one (an empty page: none left)."""
    if source is not None:
        _known(service, source)
    letters = await service.db.run(dead_letters.find, source, limit=limit, after=after)
    return [_view(letter) for letter in letters]


@router.get("/dead-letters/{letter_id}")
async def show_dead_letter(
    letter_id: Annotated[int, Path(ge=1, le=INTEGER_MAX)], service: AdminDep
) -> LetterView:
    """One dead letter with every answer PANDA gave to it."""
    letter = await service.db.run(dead_letters.show, letter_id)
    if letter is None:
        raise HTTPException(404, f"no dead letter {letter_id}")
    return _view(letter)


@router.post("/dead-letters/replay", responses=BODY_REFUSALS)
async def replay_dead_letters(ids: LetterIds, service: AdminDep) -> ReplayAnswer:
    """Put dead letters back into the outbox while each is its document's newest change."""
    done = await service.db.run(dead_letters.replay, ids.ids, now=utcnow())
    if done.replayed:
        service.delivery.notify()
    return ReplayAnswer(
        replayed=done.replayed,
        superseded=done.superseded,
        missing=done.missing,
        unmapped=done.unmapped,
    )


@router.post("/dead-letters/discard", responses=BODY_REFUSALS)
async def discard_dead_letters(ids: LetterIds, service: AdminDep) -> DiscardAnswer:
    """Delete dead letters for good; their changes are not sent."""
    discarded = await service.db.run(dead_letters.discard, ids.ids)
    return DiscardAnswer(discarded=discarded, missing=sorted(set(ids.ids) - set(discarded)))
