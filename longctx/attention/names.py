"""`Name`: the base of attention's typed registries (Layout, Strategy, Kernel, AttentionImpl).

A Name is a str enum: a member equals, hashes, formats and reprs as its value, so a config's
string and the typed member are interchangeable at the boundary, and messages (and a spec's
repr) print the plain name.
"""
from __future__ import annotations

import enum


class Name(str, enum.Enum):
  def __str__(self) -> str:
    return self.value

  def __format__(self, spec: str) -> str:
    return format(self.value, spec)

  def __repr__(self) -> str:
    return repr(self.value)
