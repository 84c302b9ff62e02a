"""Everything one fake PANDA holds: options, store and controls, shared by its handlers."""

from dataclasses import dataclass

from service.sandbox.fake_panda.control import Control
from service.sandbox.fake_panda.options import FakePandaOptions
from service.sandbox.fake_panda.resources import dataset_json, user_json
from service.sandbox.fake_panda.store import Clock, Dataset, Store, utc_now


@dataclass(frozen=True)
class State:
    """The state of one fake PANDA; its parts are mutable, the grouping is not."""

    options: FakePandaOptions
    store: Store
    control: Control
    user: dict[str, object]

    def dataset_json(self, dataset: Dataset, *, simple: bool = False) -> dict[str, object]:
        """A dataset as PANDA renders it, `locked` while the `locked` fault names it."""
        locked = self.control.is_locked(dataset.slug)
        return dataset_json(dataset, user=self.user, locked=locked, simple=simple)

    def reset(self) -> None:
        """No datasets, no faults, zero statistics."""
        self.store.clear()
        self.control.reset()


def new_state(options: FakePandaOptions, clock: Clock = utc_now) -> State:
    """A fresh fake PANDA with no datasets."""
    control = Control(options.seed, options.cost)
    return State(options, Store(clock), control, user_json(email=options.email, joined=clock()))
