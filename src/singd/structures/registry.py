"""Registry of structures: names, readable strings and the published aliases.

A structure is chosen by a spec object (``BlockDiagonal(30)``) or by a string:

* ``"name"`` or ``"name(arg, key=value)"`` — the registered name with the spec's
  constructor arguments, e.g. ``"block_diagonal(30)"``, ``"hierarchical(15, 15)"``;
* an alias, e.g. the published names ``"block30diagonal"``, ``"hierarchical15_15"``.

Register your own with :func:`register_structure` (and optionally
:func:`register_alias`); the optimizer only ever calls :func:`parse_structure`.
"""

from __future__ import annotations

import ast
import contextlib
import re
from collections.abc import Callable, Iterator

from singd.structures.base import Structure

_STRUCTURES: dict[str, type[Structure]] = {}
_ALIASES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], Structure], str]] = []
_CALL = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.DOTALL)


def register_structure(cls: type[Structure]) -> type[Structure]:
    """Register a :class:`Structure` spec class under ``cls.name`` (usable as a decorator).

    Raises:
        ValueError: If the name is taken by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, Structure)):
        raise TypeError(f"Expected a subclass of singd.structures.Structure, got {cls!r}.")
    existing = _STRUCTURES.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"A structure named {cls.name!r} is already registered ({existing}).")
    _STRUCTURES[cls.name] = cls
    return cls


def register_alias(pattern: str, build: Callable[[re.Match[str]], Structure], example: str) -> None:
    """Register a string alias: a full-match regex and a builder of the spec from the match.

    Args:
        pattern: Regular expression the whole string must match.
        build: Builds the spec from the match object.
        example: An example string, shown in error messages.
    """
    _ALIASES.append((re.compile(pattern), build, example))


@contextlib.contextmanager
def scoped_registration() -> Iterator[None]:
    """Structures and aliases registered inside the ``with`` block are removed at its end.

    For tests and notebooks that register a structure without leaving it behind::

        with scoped_registration():
            register_structure(MyStructure)
            ...
    """
    structures, aliases = dict(_STRUCTURES), list(_ALIASES)
    try:
        yield
    finally:
        _STRUCTURES.clear()
        _STRUCTURES.update(structures)
        _ALIASES[:] = aliases


def available_structures() -> list[str]:
    """Registered names with their argument lists, plus alias examples, for error messages."""
    import inspect

    names = []
    for name, cls in sorted(_STRUCTURES.items()):
        params = list(inspect.signature(cls).parameters)
        names.append(f"{name}({', '.join(params)})" if params else name)
    return names + [example for _, _, example in _ALIASES]


def parse_structure(spec: str | Structure) -> Structure:
    """Turn a structure name or spec into a :class:`Structure`.

    Raises:
        ValueError: For an unknown name or invalid arguments; the message lists
            every valid choice.
    """
    if isinstance(spec, Structure):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"A structure must be a string or a Structure, got {type(spec).__name__}.")
    text = spec.strip()
    for pattern, build, _ in _ALIASES:
        match = pattern.fullmatch(text)
        if match:
            return build(match)
    match = _CALL.fullmatch(text)
    cls = _STRUCTURES.get(match.group(1)) if match else None
    if match is None or cls is None:
        raise ValueError(
            f"Unknown structure {spec!r}. Valid structures: {', '.join(available_structures())}."
        )
    args, kwargs = _parse_arguments(match.group(2) or "", spec)
    try:
        return cls(*args, **kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"Invalid arguments for structure {spec!r}: {error}") from error


def _parse_arguments(text: str, spec: str) -> tuple[list[object], dict[str, object]]:
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        assert isinstance(call, ast.Call)
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg is not None}
    except (SyntaxError, ValueError, AssertionError) as error:
        raise ValueError(
            f"Cannot read the arguments of structure {spec!r}; write e.g. 'block_diagonal(30)' "
            "or 'hierarchical(k1=15, k2=15)'."
        ) from error
    return args, kwargs
