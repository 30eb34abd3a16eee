"""The Lua scripts, one file each under ``lua/`` (shipped as package data).

Each script touches the keys of one hash slot only, so that it runs on a
Redis Cluster as well; the comment at the top of each file says what its
KEYS and ARGV are and what it returns.
"""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def script(name: str) -> str:
    """The text of ``lua/<name>.lua``."""
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text("utf-8")
