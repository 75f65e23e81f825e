"""Name -> factory registries (losses, pseudo-label rules, heads), in the spirit of timm/open_clip.

A user adds an entry with a decorator and never edits a switch::

    from vlpl.registry import LOSSES

    @LOSSES.register("my_loss")
    class MyLoss(...): ...
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Dict, Generic, List, Sequence, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown name, or arguments a registered entry does not accept."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    """``modules``: where the built-in entries are defined; imported on first lookup, so an entry is
    found whichever part of vlpl was imported first."""

    def __init__(self, kind: str, modules: Sequence[str] = ()) -> None:
        self.kind = kind
        self._entries: Dict[str, T] = {}
        self._modules = list(modules)

    def _load_builtins(self) -> None:
        while self._modules:
            importlib.import_module(self._modules.pop(0))

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries:
                raise RegistryError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        self._load_builtins()
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.kind} {name!r}; expected one of: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> List[str]:
        self._load_builtins()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load_builtins()
        return name in self._entries

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the entry, refusing keyword arguments it does not declare (names them)."""
        obj = self.get(name)
        check_kwargs(obj, kwargs, f"{self.kind} {name!r}")
        return obj(*args, **kwargs)


def check_kwargs(fn: Callable[..., Any], kwargs: Dict[str, Any], what: str) -> None:
    sig = inspect.signature(fn)
    params = sig.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise RegistryError(
            f"{what} got unknown option(s) {', '.join(map(repr, unknown))}; "
            f"it accepts: {', '.join(a for a in accepted if a != 'self')}"
        )


LOSSES: Registry[Any] = Registry("loss", ["vlpl.train.losses"])
RULES: Registry[Any] = Registry("pseudo-label rule", ["vlpl.pseudolabel.rules"])
HEADS: Registry[Any] = Registry("head", ["vlpl.train.model"])


def list_losses() -> List[str]:
    return LOSSES.names()


def list_rules() -> List[str]:
    return RULES.names()
