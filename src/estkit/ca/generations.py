"""CA rollover: the generations of an issuing CA, and which one issues at a given time.

``estkit ca rotate devices`` adds a CA ``devices-2`` that *replaces* ``devices`` *from*
a moment (``replaces``, ``issues_from`` in its config table). Both stay loaded: before
that moment ``devices`` issues, from it ``devices-2`` does, and the certificates of
either authenticate their devices until they expire. Each keeps its own key, records
(``certificates.ca`` is the generation's name) and CRL.

A *family* is the generations of one CA, named after its first: labels name a family
(``ca = "devices"``) and so do refusal checks ("an operational certificate of this
label's CA"). ``replaces`` may name a generation that is no longer configured: an
expired one an operator removed; the family keeps its first name.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["FIRST", "Generation", "Lineage", "family_names", "generation_name", "lineages"]

# The separator of a generation's number: devices, devices-2, devices-3.
_SEP = "-"


@dataclass(frozen=True, slots=True)
class Generation:
    """What a CA's config says of its place in a family."""

    replaces: str | None = None
    issues_from: dt.datetime | None = None


# A CA that replaces none: the first of its family.
FIRST = Generation()


def family_names(replaces: Mapping[str, str | None]) -> dict[str, str]:
    """Each CA's family name: follow ``replaces`` back to the first generation (which
    may be absent from ``replaces``: a removed CA). ``ValueError`` for a loop, or two
    CAs that replace the same one."""
    replaced_by: dict[str, str] = {}
    for name, old in replaces.items():
        if old is None:
            continue
        if old == name:
            raise ValueError(f"cas.{name}.replaces: a CA cannot replace itself")
        if old in replaced_by:
            raise ValueError(
                f"cas.{name}.replaces: cas.{replaced_by[old]} replaces {old!r} already"
            )
        replaced_by[old] = name
    families: dict[str, str] = {}
    for name in replaces:
        seen = [name]
        current = name
        while (old := replaces.get(current)) is not None:
            if old in seen:
                raise ValueError(f"cas.{name}.replaces: the CAs replace each other in a loop")
            seen.append(old)
            current = old
        families[name] = current
    return families


def generation_name(family: str, taken: set[str]) -> str:
    """The name of a family's next generation: ``devices-2``, ``devices-3``, … the first
    not in ``taken``."""
    n = 2
    while f"{family}{_SEP}{n}" in taken:
        n += 1
    return f"{family}{_SEP}{n}"


CaT = TypeVar("CaT")


@dataclass(frozen=True, slots=True)
class Lineage(Generic[CaT]):
    """A family's generations that are loaded, oldest first, each with the moment it
    starts issuing (None for the first: always)."""

    family: str
    members: tuple[tuple[str, dt.datetime | None, CaT], ...]

    def issuing(self, now: dt.datetime) -> tuple[str, CaT]:
        """The generation that issues at ``now``: the newest whose moment has come."""
        chosen = self.members[0]
        for member in self.members[1:]:
            start = member[1]
            if start is None or start <= now:
                chosen = member
        return chosen[0], chosen[2]

    @property
    def names(self) -> frozenset[str]:
        return frozenset(name for name, _, _ in self.members)


def lineages(
    cas: Mapping[str, CaT], generations: Mapping[str, Generation]
) -> dict[str, Lineage[CaT]]:
    """Each family of ``cas`` by name, its loaded generations ordered by ``replaces``.
    ``generations`` gives each CA's place (a CA without one is a first generation)."""
    replaces = {name: generations.get(name, FIRST).replaces for name in cas}
    families = family_names(replaces)
    grouped: dict[str, list[str]] = {}
    for name in cas:
        grouped.setdefault(families[name], []).append(name)

    def depth(name: str) -> int:
        count = 0
        while (old := replaces.get(name)) is not None:
            count += 1
            name = old
        return count

    result: dict[str, Lineage[CaT]] = {}
    for family, names in grouped.items():
        ordered = sorted(names, key=depth)
        result[family] = Lineage(
            family=family,
            members=tuple(
                (name, generations.get(name, FIRST).issues_from, cas[name]) for name in ordered
            ),
        )
    return result
