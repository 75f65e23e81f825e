"""Parameter schemas: the one home of a rule's, a loss's or a head's parameters (torch-free).

A schema is a frozen dataclass derived from :class:`Params`. Each field carries its default, its type and,
in its metadata (see :func:`param`), a one-line meaning and the constraints that :meth:`Params.validate`
checks (``gt``/``ge``/``lt``/``le`` bounds, ``choices``, a tuple ``length``); a schema adds cross-field
checks by overriding :meth:`Params.check`. Constructing a schema coerces and validates it, so a
``DampParams(temp=-1)`` never exists::

    from vlpl.pseudolabel.params import rule_params

    p = rule_params("damp", {"eta": 0.0})        # -> DampParams(temp=0.01, eta=0.0, ...)
    rule_params("damp", {"tmep": 1})              # UnknownParamError naming 'tmep' and what is accepted

This module imports neither torch nor anything heavy: the command line validates a whole configuration
with it before the training or scoring code (and torch) is imported.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Type

from vlpl.config import ConfigError, _coerce, _type_name
from vlpl.registry import RegistryError

log = logging.getLogger(__name__)

__all__ = [
    "Params",
    "ParamInfo",
    "ParamValueError",
    "UnknownParamError",
    "UnknownNameError",
    "param",
    "schema_from_signature",
]


class ParamValueError(ConfigError):
    """A parameter value outside what its schema allows; ``field`` names the parameter (None: several)."""

    def __init__(self, field_name: Optional[str], message: str) -> None:
        super().__init__(f"{field_name}: {message}" if field_name else message)
        self.field = field_name
        self.reason = message


class UnknownParamError(ConfigError, RegistryError):
    """A parameter name the schema does not declare (both a :class:`ConfigError` and a
    :class:`vlpl.registry.RegistryError`, so callers catching either see it)."""


class UnknownNameError(ConfigError, RegistryError):
    """An unknown rule / loss / head name found while validating a configuration."""


def param(default: Any, help: str, *, gt: Optional[float] = None, ge: Optional[float] = None,
          lt: Optional[float] = None, le: Optional[float] = None, choices: Optional[Tuple[Any, ...]] = None,
          length: Optional[int] = None) -> Any:
    """A schema field: its default, a one-line meaning (``help``) and the constraints checked on it.

    ``gt``/``ge``/``lt``/``le`` bound a number; ``choices`` lists the allowed values; ``length`` fixes the
    number of items of a tuple. Defaults must be immutable (use tuples, not lists).
    """
    if isinstance(default, (list, dict, set)):
        raise TypeError(f"param default {default!r} must be immutable (a tuple, not a {type(default).__name__})")
    meta = {"help": help, "gt": gt, "ge": ge, "lt": lt, "le": le, "choices": choices, "length": length}
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


class ParamInfo(NamedTuple):
    """One row of a schema's description (for ``--list`` and docs/METHODS.md)."""

    name: str
    type: str
    default: Any
    help: str
    constraint: str


def _bounds_text(meta: Mapping[str, Any]) -> str:
    parts = []
    lo = ("> ", meta["gt"]) if "gt" in meta else (">= ", meta["ge"]) if "ge" in meta else None
    hi = ("< ", meta["lt"]) if "lt" in meta else ("<= ", meta["le"]) if "le" in meta else None
    if lo and hi:
        parts.append(f"in {'(' if lo[0] == '> ' else '['}{lo[1]:g}, {hi[1]:g}{')' if hi[0] == '< ' else ']'}")
    elif lo:
        parts.append(f"{lo[0]}{lo[1]:g}")
    elif hi:
        parts.append(f"{hi[0]}{hi[1]:g}")
    if "choices" in meta:
        parts.append("one of " + ", ".join(map(str, meta["choices"])))
    if "length" in meta:
        parts.append(f"{meta['length']} values")
    return "; ".join(parts)


def _plain(value: Any) -> Any:
    """Tuples as lists (YAML / JSON friendly), recursively."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


_HINTS: Dict[type, Dict[str, Any]] = {}


def _hints(cls: type) -> Dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


@dataclass(frozen=True)
class Params:
    """Base of every parameter schema (see the module docstring).

    Class attributes a registry entry may read: ``summary`` (one line shown by ``--list``; default the
    first docstring line) and ``see`` (where the method is described).
    """

    summary: ClassVar[str] = ""
    see: ClassVar[str] = ""
    #: accept options the schema does not declare (passed through untouched; only derived schemas of
    #: entries taking ``**kwargs``)
    open: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.validate()

    # -- validation --------------------------------------------------------------------------------------

    def validate(self) -> "Params":
        """Coerce every field to its declared type and check its constraints, then :meth:`check`.

        Raises :class:`ParamValueError` naming the parameter. Returns ``self``.
        """
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            tp = hints.get(f.name, Any)
            try:
                coerced = _coerce(value, tp, f.name, "the parameters")
            except ConfigError:
                raise ParamValueError(f.name, f"expected {_type_name(tp)}, got {value!r} "
                                              f"({type(value).__name__})") from None
            if typing.get_origin(tp) in (tuple, Tuple) and isinstance(coerced, list):
                coerced = tuple(coerced)
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
            self._check_field(f, coerced)
        self.check()
        return self

    @staticmethod
    def _check_field(f: dataclasses.Field, value: Any) -> None:
        meta = f.metadata
        if value is None:
            return
        if "choices" in meta and value not in meta["choices"]:
            raise ParamValueError(f.name, f"must be one of {', '.join(map(repr, meta['choices']))}; got {value!r}")
        if "length" in meta and len(value) != meta["length"]:
            raise ParamValueError(f.name, f"needs {meta['length']} values; got {len(value)}: {list(value)!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            ok = (("gt" not in meta or value > meta["gt"]) and ("ge" not in meta or value >= meta["ge"])
                  and ("lt" not in meta or value < meta["lt"]) and ("le" not in meta or value <= meta["le"]))
            if not ok:
                raise ParamValueError(f.name, f"must be {_bounds_text(meta)}; got {value!r}")

    def check(self) -> None:
        """Cross-field checks (override; raise :class:`ParamValueError`)."""

    # -- construction --------------------------------------------------------------------------------------

    @classmethod
    def names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Optional[Mapping[str, Any]] = None, *, where: Optional[str] = None,
                  source: Optional[str] = None, sources: Optional[Mapping[str, str]] = None,
                  what: Optional[str] = None) -> "Params":
        """Build and validate from plain data (a config's ``params`` mapping).

        ``where`` is the dotted config key holding the mapping (``loss.params``; None: not from a config),
        ``what`` the entry it configures (``loss 'gpr'``); the source of a key is looked up in ``sources``
        (dotted key -> file / override) or else ``source``. Errors name the key, the entry, the source and
        what is accepted.
        """
        values = dict(values or {})
        what = what or cls.__name__

        def src(key: Optional[str]) -> str:
            s = None
            if sources is not None and where:
                s = sources.get(f"{where}.{key}") if key else None
                s = s or sources.get(where)
            s = s or source
            return f"from {s}" if s else ""

        def ctx(key: Optional[str]) -> str:  # "(loss 'gpr', from the override ...)" or "(from ...)"
            parts = [p for p in (what if where else "", src(key)) if p]
            return f" ({', '.join(parts)})" if parts else ""

        head = f"{where}" if where else what
        accepted = cls.names()
        unknown = [k for k in values if k not in accepted]
        if unknown and not cls.open:
            raise UnknownParamError(
                f"{head}: unknown option(s) {', '.join(map(repr, unknown))}{ctx(unknown[0])}; "
                f"it accepts: {', '.join(accepted) or 'no options'}")
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in values]
        if missing:
            raise ParamValueError(None, f"{head}: missing required option(s) {', '.join(map(repr, missing))}"
                                        f"{ctx(None)}")
        try:
            return cls(**{k: v for k, v in values.items() if k in accepted})
        except ParamValueError as e:
            if where:
                key = f"{where}.{e.field}" if e.field else where
                raise ParamValueError(None, f"{key}: {e.reason}{ctx(e.field)}") from None
            raise ParamValueError(None, f"{what}: {e}{ctx(e.field)}") from None

    def to_dict(self) -> Dict[str, Any]:
        """Every parameter as plain data (tuples as lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def extras(self, values: Mapping[str, Any]) -> Dict[str, Any]:
        """The options in ``values`` the schema does not declare (only an ``open`` schema lets them in)."""
        names = set(self.names())
        return {k: v for k, v in values.items() if k not in names} if self.open else {}

    def kwargs(self) -> Dict[str, Any]:
        """Every parameter, as keyword arguments for the registered entry."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        """The defaults as plain data."""
        return {f.name: _plain(f.default) for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

    @classmethod
    def describe(cls) -> List[ParamInfo]:
        """Name, type, default, one-line meaning and constraint of every parameter."""
        hints = _hints(cls)
        return [ParamInfo(f.name, _type_name(hints.get(f.name, Any)),
                          "(required)" if f.default is dataclasses.MISSING else _plain(f.default),
                          f.metadata.get("help", ""), _bounds_text(f.metadata)) for f in dataclasses.fields(cls)]

    @classmethod
    def one_line(cls) -> str:
        """The schema's one-line summary."""
        if cls.summary:
            return cls.summary
        doc = inspect.getdoc(cls) or ""
        if not doc or cls.__doc__ is Params.__doc__ or doc.startswith(f"{cls.__name__}("):  # dataclass's own
            return ""
        return doc.splitlines()[0]


def schema_from_signature(fn: Callable[..., Any], name: str, skip: int = 0,
                          exclude: Sequence[str] = ()) -> Type[Params]:
    """A :class:`Params` schema from the keyword parameters of ``fn``, for an entry registered without one
    (a plugin's rule, loss or head). ``skip`` leading positional parameters (``observed``, ``scores``...;
    a class's ``self`` is always left out) and the ``exclude`` names are not parameters; a parameter
    without a default becomes a required one; ``**kwargs`` makes the schema accept any other option.
    """
    target = fn.__init__ if inspect.isclass(fn) else fn  # type: ignore[misc]
    sig = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: the schema then accepts any value
        hints = {}
    required: List[Tuple[str, Any]] = []
    optional: List[Tuple[str, Any, Any]] = []
    params = list(sig.parameters.values())
    if inspect.isclass(fn):
        params = params[1:]  # self
    open_ = any(p.kind is p.VAR_KEYWORD for p in params)
    for p in params[skip:]:
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in exclude:
            continue
        if p.default is p.empty:
            required.append((p.name, hints.get(p.name, Any)))
        else:
            default = tuple(p.default) if isinstance(p.default, list) else p.default
            optional.append((p.name, hints.get(p.name, Any), field(default=default, metadata={"help": ""})))
    doc = inspect.getdoc(fn) or ""
    cls = dataclasses.make_dataclass(f"{name.title().replace('_', '')}Params", [*required, *optional],
                                     bases=(Params,), frozen=True)
    cls.summary = doc.splitlines()[0] if doc else ""  # type: ignore[attr-defined]
    cls.open = open_  # type: ignore[attr-defined]
    cls.__module__ = getattr(fn, "__module__", __name__)
    return cls
