"""How one fake PANDA is set up: its single user, whether it checks the key, its random seed,
and whether it takes as long as real PANDA."""

from dataclasses import dataclass

from service.sandbox.fake_panda.cost import Cost


@dataclass(frozen=True)
class FakePandaOptions:
    """Settings of one fake PANDA server.

    `email` is the one active user (matched case-insensitively, as PANDA lower-cases it).
    `api_key` is checked unless `accept_any_key` reproduces real PANDA's quirk of accepting
    any non-empty key (panda-api.md §1, checklist item 5). `seed` drives the injected 5xx.
    With a `cost` (such as `cost.PANDA_1_1`), every /api/ request takes that long and they
    are served one at a time; without one (the default) the fake answers as fast as it can.
    """

    email: str = "panda@example.com"
    api_key: str = "pandasync-demo-key"
    accept_any_key: bool = False
    seed: int = 0
    cost: Cost | None = None
