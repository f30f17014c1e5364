"""Model families from outside ganforge: entry points in the group `ganforge.families`, and the
modules named in $GANFORGE_PLUGINS (what `ganforge --plugin MODULE` sets, so that every process
of a job sees them).

An entry point `mygan = "my_package:FAMILY"` names a trainer.families.Family for
`model.arch=mygan`; a module named in $GANFORGE_PLUGINS holds `FAMILIES = {"mygan": Family(...)}`.
docs/extending.md walks through one.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from typing import Any

GROUP = "ganforge.families"
ENV = "GANFORGE_PLUGINS"
_found: dict[str, Any] | None = None


class PluginError(Exception):
    """A plug-in that cannot be loaded, or that does not hold what it should."""


def discovered() -> dict[str, Any]:
    """arch -> Family of every installed or named plug-in (loaded once per process)."""
    global _found
    if _found is None:
        found: dict[str, Any] = {}
        for ep in importlib.metadata.entry_points(group=GROUP):
            try:
                found[ep.name] = ep.load()
            except Exception as e:  # noqa: BLE001 - a broken plug-in is named, not a traceback
                raise PluginError(f"plug-in {ep.name} ({ep.value}): cannot be loaded ({type(e).__name__}: {e})") from None
        for name in filter(None, (n.strip() for n in os.environ.get(ENV, "").split(","))):
            try:
                module = importlib.import_module(name)
            except ImportError as e:
                raise PluginError(f"plug-in module {name!r} (from ${ENV} or --plugin): {e}") from None
            families = getattr(module, "FAMILIES", None)
            if not isinstance(families, dict):
                raise PluginError(f"plug-in module {name!r} has no FAMILIES dict (arch -> trainer.families.Family)")
            found.update(families)
        _found = found
    return _found
