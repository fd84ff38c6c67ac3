"""The validated configuration of each param group, re-validated only when edited.

Param groups stay plain dicts (torch.optim convention: schedulers and users edit
them, checkpoints hold them). :class:`GroupConfigs` validates each one once into a
frozen configuration (:mod:`singd.config`) and remembers the values it was built
from; a group whose dict was edited since (a value replaced, a key added) is
validated again at the next access, so edits take effect and are checked like
constructor arguments. ``lr`` and ``lr_cov`` (:data:`singd.config.LIVE_KEYS`) are
read live and never trigger it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from singd.config import LIVE_KEYS, GroupConfig

C = TypeVar("C", bound=GroupConfig)


class GroupConfigs(Generic[C]):
    """One configuration per param group, by index.

    Args:
        parse: Validates and normalises a group dict in place; returns its config.
    """

    def __init__(self, parse: Callable[[dict[str, Any]], C]) -> None:
        self._parse = parse
        self.configs: list[C] = []
        self._snapshots: list[dict[str, Any]] = []
        self._checked = True

    def parse(self, index: int, group: dict[str, Any]) -> C:
        """(Re-)validate group ``index`` (``index == len(self)`` appends)."""
        config = self._parse(group)
        snapshot = {k: v for k, v in group.items() if k not in LIVE_KEYS}
        if index == len(self.configs):
            self.configs.append(config)
            self._snapshots.append(snapshot)
        else:
            self.configs[index], self._snapshots[index] = config, snapshot
        return config

    def truncate(self, length: int) -> None:
        """Forget the configs of groups ``length`` and later (a failed ``add_param_group``)."""
        del self.configs[length:], self._snapshots[length:]

    def invalidate(self) -> None:
        """The user may edit the groups from now on: check them at the next access."""
        self._checked = False

    def edited(self, groups: list[dict[str, Any]]) -> list[int]:
        """Indices of the groups edited since they were parsed (checked once per
        :meth:`invalidate`)."""
        if self._checked:
            return []
        self._checked = True
        edited = []
        for index, (group, snapshot) in enumerate(zip(groups, self._snapshots, strict=True)):
            if len(group) != len(snapshot) + len(LIVE_KEYS & group.keys()) or any(
                group.get(k, snapshot) is not v for k, v in snapshot.items()
            ):
                edited.append(index)
        return edited
