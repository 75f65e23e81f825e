"""User plugins: a module that registers a loss, a pseudo-label rule or a head, used by name afterwards.

A plugin is an ordinary Python module that registers entries when imported::

    # my_pkg/losses.py
    from dataclasses import dataclass
    from vlpl.params import Params, param
    from vlpl.registry import LOSSES, RULES

    @dataclass(frozen=True)
    class MyRuleParams(Params):
        # Top-1 global class is positive.  (a one-line docstring here is what --list shows)
        temp: float = param(0.01, "softmax temperature", gt=0)

    @RULES.register("my_rule", params=MyRuleParams)
    def my_rule(scores, observed, *, temp=MyRuleParams.temp): ...

    @LOSSES.register("my_loss")          # no schema: one is derived from the keyword arguments
    class MyLoss(SPMLLoss): ...

It is loaded in two ways only: ``vlpl <command> --plugin my_pkg.losses`` (repeatable) or an installed entry
point in the ``vlpl.plugins`` group (``[project.entry-points."vlpl.plugins"] my = "my_pkg.losses"``; an
entry point naming a function is called with no arguments). **Never** from a config file, a saved run or a
checkpoint: a config with a ``plugins`` key is refused, and a checkpoint only names a head that must
already be registered. A plugin runs with the user's rights, like any module they import.
"""
from __future__ import annotations

import importlib
import logging
from importlib import metadata
from typing import List, Sequence

from vlpl.config import ConfigError

log = logging.getLogger(__name__)

#: the entry-point group scanned by :func:`load_plugins`
ENTRY_POINT_GROUP = "vlpl.plugins"

_loaded: List[str] = []


class PluginError(ConfigError):
    """A plugin module or entry point that cannot be imported (names it and the cause)."""


def load_plugin(module: str) -> None:
    """Import plugin ``module`` (a dotted module name on ``sys.path``); its import registers its entries."""
    if module in _loaded:
        return
    if not module or module.startswith(".") or any(not part.isidentifier() for part in module.split(".")):
        raise PluginError(f"--plugin {module!r}: expected a dotted module name such as my_pkg.losses")
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise PluginError(f"--plugin {module!r}: no module named {e.name!r} on the Python path "
                              f"(install it, or add its folder to PYTHONPATH)") from None
        raise PluginError(f"--plugin {module!r}: importing it failed: {e}") from e
    except Exception as e:  # the plugin's own code failed: say which plugin
        raise PluginError(f"--plugin {module!r}: importing it failed: {type(e).__name__}: {e}") from e
    _loaded.append(module)
    log.info("plugin %s loaded", module)


def load_entry_points(group: str = ENTRY_POINT_GROUP) -> List[str]:
    """Load every installed entry point of ``group``; returns their names."""
    names = []
    for ep in metadata.entry_points(group=group):
        key = f"{group}:{ep.name}={ep.value}"
        if key in _loaded:
            continue
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, type):
                obj()
        except Exception as e:
            raise PluginError(f"entry point {ep.name!r} ({ep.value}) of group {group!r} failed to load: "
                              f"{type(e).__name__}: {e}") from e
        _loaded.append(key)
        names.append(ep.name)
        log.info("plugin entry point %s (%s) loaded", ep.name, ep.value)
    return names


def load_plugins(modules: Sequence[str] = (), entry_points: bool = True) -> List[str]:
    """Load the ``--plugin`` modules (in order) and, with ``entry_points``, the installed ``vlpl.plugins``
    entry points. Returns what was loaded. Raises :class:`PluginError` naming a plugin that fails."""
    loaded: List[str] = []
    if entry_points:
        loaded += load_entry_points()
    for m in modules:
        load_plugin(m)
        loaded.append(m)
    return loaded


def loaded_plugins() -> List[str]:
    """Modules and entry points loaded so far in this process."""
    return list(_loaded)
