"""Verified webhooks into the store, a group at a time: their ids remembered, their changes
enqueued, in the group's one transaction (`store.group_commit`).

Runs inside the caller's transaction and never commits; reads no HTTP.
"""

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import Session

from service.clock import Clock, utcnow
from service.sources import webhook
from service.store import outbox, seen_webhooks

log = logging.getLogger(__name__)

# How stale the outbox's count may be while it is well under the high-water mark.
COUNT_EVERY = timedelta(seconds=1)
# How often each source's expired webhook ids are forgotten (they count as new once expired
# anyway: forgetting them only keeps the table small).
PRUNE_EVERY = timedelta(minutes=1)


@dataclass(frozen=True)
class Webhook:
    """A verified webhook: its source, changes, delivery id (if any) and how long ids count."""

    source: str
    parsed: webhook.Parsed
    webhook_id: str | None
    retention_s: float


@dataclass(frozen=True)
class Taken:
    """What a webhook came to once committed (the counts of `WebhookAnswer`)."""

    accepted: int
    duplicates: int
    stale: int
    ignored: int


class WebhookCommits:
    """The group function of webhooks for `GroupCommit`: one `Taken` per webhook, in order, or
    None for a webhook refused because the outbox is full (nothing of it written).

    A webhook whose id its source sent within its retention (before, or earlier in the group)
    enqueues nothing. The outbox is full at `high_water` entries or more; its size is counted
    when the group's upper bound of it (the last count plus what was enqueued since) reaches the
    mark, and at least every `COUNT_EVERY` otherwise, so what other writers enqueue meanwhile is
    seen late by up to that. Called for one group at a time, as `GroupCommit` does.
    """

    def __init__(self, *, high_water: int, clock: Clock = utcnow) -> None:
        self._high_water = high_water
        self._clock = clock
        self._pending = 0
        self._counted_at: datetime | None = None
        self._pruned_at: dict[str, datetime] = {}

    def __call__(self, session: Session, webhooks: Sequence[Webhook]) -> list[Taken | None]:
        now = self._clock()
        full = self._full(session, now)
        new = self._new(session, webhooks, now=now, remember=not full)
        if full:
            return [
                None if is_new else _duplicate(hook)
                for hook, is_new in zip(webhooks, new, strict=True)
            ]
        taken = [hook for hook, is_new in zip(webhooks, new, strict=True) if is_new]
        enqueued = outbox.enqueue(
            session, [change for hook in taken for change in hook.parsed.changes], now=now
        )
        self._pending += enqueued.accepted
        return _answers(webhooks, new, enqueued.stale_at)

    def _full(self, session: Session, now: datetime) -> bool:
        """Whether the outbox holds `high_water` entries or more (see the class)."""
        stale = self._counted_at is None or now - self._counted_at >= COUNT_EVERY
        if stale or self._pending >= self._high_water:
            self._pending = outbox.pending(session)
            self._counted_at = now
        return self._pending >= self._high_water

    def _new(
        self, session: Session, webhooks: Sequence[Webhook], *, now: datetime, remember: bool
    ) -> list[bool]:
        """Whether each webhook is new: it has no id, or one its source has not sent within its
        retention nor earlier in `webhooks`. With `remember`, new ids are recorded at `now`;
        without, nothing is written."""
        sent: dict[str, list[str]] = {}
        retention_s: dict[str, float] = {}
        for hook in webhooks:
            if hook.webhook_id is not None:
                sent.setdefault(hook.source, []).append(hook.webhook_id)
                retention_s[hook.source] = hook.retention_s
        unseen: dict[str, set[str]] = {}
        for source, ids in sent.items():
            keep_s = retention_s[source]
            if remember:
                unseen[source] = seen_webhooks.remember_many(
                    session, source, ids, now=now, retention_s=keep_s
                )
                self._prune(session, source, now=now, retention_s=keep_s)
            else:
                seen = seen_webhooks.seen(session, source, ids, now=now, retention_s=keep_s)
                unseen[source] = set(ids) - seen
        new = []
        for hook in webhooks:
            if hook.webhook_id is None:
                new.append(True)
                continue
            new.append(hook.webhook_id in unseen[hook.source])
            # A second webhook of one id in the same group is a duplicate of the first.
            unseen[hook.source].discard(hook.webhook_id)
        return new

    def _prune(self, session: Session, source: str, *, now: datetime, retention_s: float) -> None:
        pruned_at = self._pruned_at.get(source)
        if pruned_at is not None and now - pruned_at < PRUNE_EVERY:
            return
        seen_webhooks.prune(session, source, before=now - timedelta(seconds=retention_s))
        self._pruned_at[source] = now


def _answers(
    webhooks: Sequence[Webhook], new: Sequence[bool], stale_at: Sequence[int]
) -> list[Taken | None]:
    """Each webhook's counts: the changes of the new ones were enqueued one after the other,
    those at `stale_at` (places in all of them, ascending) skipped as stale."""
    answers: list[Taken | None] = []
    start = 0
    for hook, is_new in zip(webhooks, new, strict=True):
        if not is_new:
            answers.append(_duplicate(hook))
            continue
        end = start + len(hook.parsed.changes)
        stale = bisect.bisect_left(stale_at, end) - bisect.bisect_left(stale_at, start)
        answers.append(Taken(end - start - stale, 0, stale, hook.parsed.ignored))
        start = end
    return answers


def _duplicate(hook: Webhook) -> Taken:
    log.info("webhook already taken in, not applied again: source=%s", hook.source)
    return Taken(0, len(hook.parsed.changes), 0, hook.parsed.ignored)
