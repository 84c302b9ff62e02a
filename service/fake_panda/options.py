"""How one fake PANDA is set up: its single user, whether it checks the key, its random seed."""

from dataclasses import dataclass


@dataclass(frozen=True)
class FakePandaOptions:
    """Settings of one fake PANDA server.

    `email` is the one active user (matched case-insensitively, as PANDA lower-cases it).
    `api_key` is checked unless `accept_any_key` reproduces real PANDA's quirk of accepting
    any non-empty key (panda-api.md §1, checklist item 5). `seed` drives the injected 5xx.
    """

    email: str = "panda@example.com"
    api_key: str = "pandasync-demo-key"
    accept_any_key: bool = False
    seed: int = 0
