"""Name -> factory registries (losses, pseudo-label rules, heads), in the spirit of timm/open_clip.

A user adds an entry with a decorator and never edits a switch::

    from vlpl.registry import LOSSES

    @LOSSES.register("my_loss", params=MyLossParams)   # params: a vlpl.params.Params schema (optional)
    class MyLoss(...): ...

Every rule, loss and head has a **parameter schema** (:class:`vlpl.params.Params`: defaults, types, one-line
meanings, validation) kept in a companion registry (:data:`RULE_PARAMS`, :data:`LOSS_PARAMS`,
:data:`HEAD_PARAMS`). The built-in schemas live in torch-free modules, so that a configuration is checked
(:meth:`Registry.schema`) before torch is imported; an entry registered without a schema (a plugin's) gets
one derived from its signature. A module registering entries is loaded with ``vlpl --plugin MODULE`` or
an entry point in the ``vlpl.plugins`` group (:mod:`vlpl.plugins`), never from a config or a checkpoint.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Dict, Generic, List, Optional, Sequence, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown name, or arguments a registered entry does not accept."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    """``modules``: where the built-in entries are defined; imported on first lookup, so an entry is
    found whichever part of vlpl was imported first.

    ``schemas``: the companion registry of parameter schemas (built-in ones in torch-free modules);
    ``skip``: leading positional parameters of an entry that are not parameters (a rule's ``scores,
    observed``, a loss's ``observed``); ``fixed``: keyword arguments the caller passes that are not
    user parameters (a head's ``in_features``, ``context``).
    """

    def __init__(self, kind: str, modules: Sequence[str] = (), schemas: Optional["Registry[Any]"] = None,
                 skip: int = 0, fixed: Sequence[str] = ()) -> None:
        self.kind = kind
        self._entries: Dict[str, T] = {}
        self._modules = list(modules)
        self.builtin_modules = tuple(modules)
        self.schemas = schemas
        self.skip = skip
        self.fixed = tuple(fixed)

    def _load_builtins(self) -> None:
        while self._modules:
            importlib.import_module(self._modules.pop(0))

    def is_builtin(self, obj: Any) -> bool:
        mod = getattr(obj, "__module__", "") or ""
        return any(mod == m or mod.startswith(f"{m}.") for m in self.builtin_modules)

    def register(self, name: str, params: Any = None) -> Callable[[T], T]:
        """Decorator registering ``obj`` as ``name``; ``params`` is its parameter schema (see the module
        docstring). A name taken by a built-in entry (or its schema) cannot be registered again."""

        def deco(obj: T) -> T:
            if name in self._entries:
                raise RegistryError(f"{self.kind} {name!r} is already registered")
            if self.schemas is not None:
                self._attach_schema(name, obj, params)
            elif params is not None:
                raise RegistryError(f"the {self.kind} registry keeps no parameter schemas")
            self._entries[name] = obj
            return obj

        return deco

    def _attach_schema(self, name: str, obj: Any, params: Any) -> None:
        assert self.schemas is not None
        self.schemas._load_builtins()  # torch-free
        existing = self.schemas._entries.get(name)
        if existing is not None and not self.is_builtin(obj) and self.schemas.is_builtin(existing):
            raise RegistryError(f"{self.kind} {name!r} is a built-in {self.kind}; register yours under another name")
        if params is not None:
            if existing is not None and existing is not params:
                raise RegistryError(f"{self.kind} {name!r} already has a parameter schema ({existing.__name__})")
            self.schemas._entries[name] = params
        elif existing is None:
            from vlpl.params import schema_from_signature

            self.schemas._entries[name] = schema_from_signature(obj, name, skip=self.skip, exclude=self.fixed)

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

    # -- parameter schemas (torch-free) --------------------------------------------------------------------

    def schema_names(self) -> List[str]:
        """Every name with a known schema, without importing the entries themselves (torch-free)."""
        if self.schemas is None:
            return self.names()
        self.schemas._load_builtins()
        return sorted(set(self.schemas._entries) | set(self._entries))

    def schema(self, name: str) -> Any:
        """The parameter schema (a :class:`vlpl.params.Params` subclass) of entry ``name``, without
        importing a built-in entry's module. Unknown names raise :class:`vlpl.params.UnknownNameError`."""
        if self.schemas is None:
            raise RegistryError(f"the {self.kind} registry keeps no parameter schemas")
        self.schemas._load_builtins()
        found = self.schemas._entries.get(name)
        if found is None:
            from vlpl.params import UnknownNameError

            raise UnknownNameError(f"unknown {self.kind} {name!r}; expected one of: {', '.join(self.schema_names())}")
        return found

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the entry with its parameters validated through its schema (an unknown or bad parameter
        is named); without a schema registry, refuse keyword arguments the entry does not declare."""
        obj = self.get(name)
        if self.schemas is None:
            check_kwargs(obj, kwargs, f"{self.kind} {name!r}")
            return obj(*args, **kwargs)
        fixed = {k: kwargs.pop(k) for k in self.fixed if k in kwargs}
        params = self.schema(name).from_dict(kwargs, what=f"{self.kind} {name!r}")
        return obj(*args, **fixed, **params.kwargs(), **params.extras(kwargs))


def check_kwargs(fn: Callable[..., Any], kwargs: Dict[str, Any], what: str) -> None:
    """Refuse keyword arguments ``fn`` does not declare, naming them (RegistryError)."""
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


#: parameter schemas: built-in ones in torch-free modules
RULE_PARAMS: Registry[Any] = Registry("pseudo-label rule", ["vlpl.pseudolabel.params"])
LOSS_PARAMS: Registry[Any] = Registry("loss", ["vlpl.train.loss_params"])
HEAD_PARAMS: Registry[Any] = Registry("head", ["vlpl.train.head_params"])

LOSSES: Registry[Any] = Registry("loss", ["vlpl.train.losses"], schemas=LOSS_PARAMS, skip=1)
RULES: Registry[Any] = Registry("pseudo-label rule", ["vlpl.pseudolabel.rules", "vlpl.pseudolabel.calibrate",
                                                      "vlpl.pseudolabel.neighbours"], schemas=RULE_PARAMS, skip=2)
HEADS: Registry[Any] = Registry("head", ["vlpl.train.heads"], schemas=HEAD_PARAMS, fixed=("in_features", "context"))


def list_losses() -> List[str]:
    """Every loss name (torch-free: read from the schemas)."""
    return LOSSES.schema_names()


def list_rules() -> List[str]:
    """Every pseudo-label rule name (torch-free: read from the schemas)."""
    return RULES.schema_names()
