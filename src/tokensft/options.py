"""Options declared once: `Option` carries a flag's type, default, range or choices and help, and validates a
value against them (one line naming the flag). `tokensft train`'s own options (`tokensft.trainer.arguments`), the
tracer's (`tokensft.tracing.config`) and every scheme's parameters (`SchemeParam`) are `Option`s; the dataclass fields
that TRL's parser reads are generated from them (`declare_fields`), and the CLI's precheck validates a command line
against the same objects before transformers is imported (`validate_options`). Imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Option", "declare_fields", "option_field", "validate_fields", "validate_options"]

TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


@dataclass(frozen=True)
class Option:
    """One tokensft option: a config field / `--flag` / YAML key, declared once with its type, range or choices and
    help, and validated by that declaration both in the CLI's precheck (before transformers is imported) and when the
    configuration is built. A scheme's parameter is one too (`SchemeParam`).

    Attributes:
        name: flag and YAML key (`topk_keep_ratio` -> `--topk_keep_ratio`); unique across all options (a parameter
            shared by several schemes, like `kl_weight`, is one object listed by each).
        type: float, int, str or bool (of each item when `nargs` is set).
        default: the value when not given.
        help: one line, shown in `tokensft train --help`.
        low / high: bounds of a numeric option (None = unbounded); `low_open` / `high_open` exclude the bound.
        choices: the allowed values of a str option.
        nullable: None (`none` / `null` on the command line) is allowed: "not set".
        nargs: "+" for a list option (`--lora_target_modules q_proj v_proj`).
    """

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    nullable: bool = False
    nargs: str | None = None

    def range_text(self) -> str:
        """The valid range as written in errors and help: `(0, 1]`, `> 0`, `>= 0`, `one of forward, reverse`."""
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        if self.low is not None and self.high is not None:
            return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return "any"

    def help_text(self, schemes: Iterable[str] = ()) -> str:
        who = "/".join(schemes)
        return f"{who + ': ' if who else ''}{self.help} Range {self.range_text()}; default {self.default}."

    def validate(self, value: Any) -> Any:
        """`value` converted to `type` and checked against the range.

        Raises:
            ValueError: one line naming `--name`, the range and the value, e.g.
                `--topk_keep_ratio must be in (0, 1], got 1.5`.
        """
        flag = f"--{self.name}"
        if value is None or (self.nullable and isinstance(value, str) and value.lower() in ("none", "null", "")):
            if self.nullable or self.default is None:
                return None
            raise ValueError(f"{flag} must be set ({self.range_text()}), got None")
        if self.nargs is not None:
            items = value if isinstance(value, (list, tuple)) else str(value).split()
            item = dataclasses.replace(self, default=None, nargs=None)
            return [item.validate(v) for v in items]
        try:
            if self.type is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                v = value.lower() in ("true", "1", "yes")
            elif self.type is int and isinstance(value, float) and value.is_integer():
                v = int(value)
            elif self.type is int and (isinstance(value, bool) or (isinstance(value, str) and "." in value)):
                raise ValueError
            else:
                v = self.type(value)
        except (TypeError, ValueError):
            raise ValueError(f"{flag} must be {TYPE_WORDS.get(self.type, self.type.__name__)}"
                             f"{' ' + self.range_text() if self.type in (int, float) and self.range_text() != 'any' else ''}"
                             f", got {value!r}") from None
        if self.choices is not None and v not in self.choices:
            raise ValueError(f"{flag} must be {self.range_text()}, got {v!r}")
        if self.type in (int, float):
            bad = not math.isfinite(v)
            if self.low is not None:
                bad |= v <= self.low if self.low_open else v < self.low
            if self.high is not None:
                bad |= v >= self.high if self.high_open else v > self.high
            if bad:
                where = self.range_text()
                kind = "an integer " if self.type is int else ""
                raise ValueError(f"{flag} must be {kind}{'in ' if where[0] in '[(' else ''}{where}, got {v:g}")
        return v


def option_field(opt: Option, help_text: str | None = None) -> dataclasses.Field:
    """The dataclass field of `opt` (TRL's parser reads `help`, `choices` and `nargs` from its metadata); `help_text`
    replaces the help built from the declaration."""
    bounded = opt.type in (int, float) and (opt.low is not None or opt.high is not None)
    if help_text is None:
        help_text = f"{opt.help} Range {opt.range_text()}; default {opt.default}." if bounded else opt.help
    meta: dict[str, Any] = {"help": help_text}
    if opt.choices is not None:
        meta["choices"] = list(opt.choices)
    if opt.nargs is not None:
        meta["nargs"] = opt.nargs
    return dataclasses.field(default=opt.default, metadata=meta)


def declare_fields(options: Iterable[Option], help_of: Callable[[Option], str] | None = None):
    """Class decorator (below `@dataclass`): one field per option, in order, unless the class body defines it; the
    annotation is the option's type (`list[T]` with nargs, `T | None` when nullable); `help_of(opt)`, when given,
    writes each field's help."""
    def add(cls):
        annotations = cls.__dict__.get("__annotations__", {})
        for opt in options:
            if opt.name in annotations:
                continue
            kind = f"list[{opt.type.__name__}]" if opt.nargs else opt.type.__name__
            annotations[opt.name] = f"{kind} | None" if opt.nullable or opt.default is None else kind
            setattr(cls, opt.name, option_field(opt, help_of(opt) if help_of else None))
        cls.__annotations__ = annotations
        return cls
    return add


def validate_fields(obj: Any, options: Iterable[Option]) -> None:
    """Validate the attributes of `obj` named by `options` and store the converted values (a dataclass's
    `__post_init__`).

    Raises:
        ValueError: the first value out of its declaration (one line naming the flag, the range and the value).
    """
    for opt in options:
        setattr(obj, opt.name, opt.validate(getattr(obj, opt.name)))


def validate_options(values: Mapping[str, Any], options: Mapping[str, Option]) -> dict[str, Any]:
    """Validate every value whose key is a declared option; other keys are left alone (the full parse names them).

    Returns:
        `{name: converted value}` of the declared ones.

    Raises:
        ValueError: the first value out of its declaration (one line naming the flag, the range and the value).
    """
    return {k: options[k].validate(v) for k, v in values.items() if k in options}
