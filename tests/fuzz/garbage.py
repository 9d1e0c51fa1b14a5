"""Strategies that turn valid input into hostile input, shared by the fuzz properties.

Three levels of damage, from the coarsest:

- `json_values`: any JSON value at all (valid JSON of the wrong shape, nested garbage);
- `mutated_json`: a valid document with a few of its values replaced, deleted, duplicated or
  retyped (wrong field types, negative, zero and huge numbers, odd unicode, unknown fields,
  duplicate entries, another event's kind), mostly still well-formed, so that validation deep
  inside is reached;
- `damaged_bytes`: the serialised document cut short, with bytes flipped, inserted or deleted,
  a number spelt with thousands of digits, nested thousands deep, or replaced by arbitrary bytes.

`hostile_ints` and `hostile_texts` are the values the first two draw from: the edges where parsers
and arithmetic break (2**31, 2**63, 10**30, the int-to-string digit limit of Python, empty and
huge strings, control characters, lone surrogates, right-to-left marks).
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from hypothesis import strategies as st

JsonPath = tuple[str | int, ...]

EDGE_INTS = (
    -1,
    0,
    1,
    2,
    47,
    48,
    49,
    1023,
    1024,
    81920,
    2**31 - 1,
    2**31,
    -(2**31) - 1,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**30,
    -(10**30),
)
EDGE_TEXTS = (
    "",
    " ",
    "\n",
    "\t",
    "\x00",
    "\x7f",
    "-",
    "_",
    ".",
    "..",
    "*",
    ">",
    "a.b",
    "a b",
    "a/b",
    "/",
    "default/p",
    "ü",
    "🙂",
    "\u202e",
    "\ufeff",
    "\u2028",
    "null",
    "true",
    "1",
    "-1",
    "1e3",
    "0x10",
    "1Ki",
    "NaN",
    "Infinity",
    "nvidia.com/gpu-10gb",
    "mps",
)
EDGE_TIMES = (
    "9999-12-31T23:59:59.999999Z",
    "9999-12-31T23:59:59.999Z",
    "9999-12-31T23:59:59-01:00",
    "9999-12-31T23:00:00+23:59",
    "0001-01-01T00:00:00Z",
    "0001-01-01T00:00:00+01:00",
    "0001-01-01T00:00:00-23:59",
    "1970-01-01T00:00:00Z",
    "2026-11-22T10:00:00+14:00",
    "2026-02-30T00:00:00Z",
    "2026-11-22T24:00:00Z",
    "2026-11-22T10:00:00",
    "2026-11-22",
    "1700000000",
)
"""Times at the edges of what a datetime holds (and what time zones push beyond them), and near misses."""
LONG_TEXT_LENGTHS = (63, 64, 253, 254, 65_536, 1_048_576)
LONGEST = LONG_TEXT_LENGTHS[-1]


def hostile_ints() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(EDGE_INTS), st.integers(-5, 100), st.integers())


def hostile_texts(
    max_size: int = 24, *, surrogates: bool = True, longest: int = LONGEST
) -> st.SearchStrategy[str]:
    """Edge strings, any unicode text, long runs up to `longest` characters, and (unless the input
    cannot carry them) lone surrogates."""
    choices = [
        st.sampled_from(EDGE_TEXTS),
        st.text(max_size=max_size),
        st.sampled_from([n for n in LONG_TEXT_LENGTHS if n <= longest]).map(lambda length: "x" * length),
    ]
    if surrogates:
        choices.append(st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2))
    return st.one_of(*choices)


def json_values(
    *, max_leaves: int = 12, surrogates: bool = True, longest: int = LONGEST
) -> st.SearchStrategy[Any]:
    """Any JSON value: scalars of every type, and lists and objects of them, nested."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        hostile_ints(),
        st.floats(allow_nan=False, allow_infinity=False),
        hostile_texts(surrogates=surrogates, longest=longest),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(hostile_texts(8, surrogates=surrogates, longest=longest), inner, max_size=4),
        ),
        max_leaves=max_leaves,
    )


# --- mutating a valid document -------------------------------------------------------------------


def json_paths(document: Any, prefix: JsonPath = ()) -> list[JsonPath]:
    """Every position in `document`, the root (`()`) first."""
    found = [prefix]
    if isinstance(document, dict):
        for key, value in document.items():
            found.extend(json_paths(value, (*prefix, key)))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            found.extend(json_paths(value, (*prefix, index)))
    return found


def _at(document: Any, path: JsonPath) -> Any:
    for step in path:
        document = document[step]
    return document


def _replaced(document: Any, path: JsonPath, value: Any) -> Any:
    if not path:
        return value
    _at(document, path[:-1])[path[-1]] = value
    return document


def _like(current: Any, words: tuple[str, ...], surrogates: bool, longest: int) -> st.SearchStrategy[Any]:
    """A hostile value of the same JSON type as `current` (or a near miss of it)."""
    if isinstance(current, bool):
        return st.sampled_from([not current, 0, 1, "true", None])
    if isinstance(current, int):
        return st.one_of(
            hostile_ints(), st.sampled_from([current + 0.5, float(current), str(current), -current])
        )
    if isinstance(current, str):
        texts = hostile_texts(surrogates=surrogates, longest=longest)
        return st.one_of(texts, st.sampled_from(words)) if words else texts
    if isinstance(current, list):
        return st.one_of(
            st.just([]),
            st.just(current * 2),
            st.just(current[::-1]),
            st.just(current * 50),
            st.lists(json_values(max_leaves=4, surrogates=surrogates, longest=longest), max_size=3).map(
                lambda more: current + more
            ),
        )
    if isinstance(current, dict):
        return st.one_of(
            st.just({}),
            st.dictionaries(
                hostile_texts(8, surrogates=surrogates, longest=longest),
                json_values(max_leaves=4, surrogates=surrogates, longest=longest),
                max_size=2,
            ).map(lambda more: {**current, **more}),
        )
    return json_values(surrogates=surrogates, longest=longest)


MUTATIONS = ("like", "retype", "word", "delete", "duplicate", "add_key", "wrap")


@st.composite
def mutated_json(
    draw: st.DrawFn,
    document: Any,
    *,
    words: tuple[str, ...] = (),
    max_mutations: int = 3,
    surrogates: bool = True,
    longest: int = LONGEST,
) -> Any:
    """`document` with 1 to `max_mutations` changes at random positions. `words` are the input's own
    vocabulary (field names, kinds, enum values), so that a value is often swapped for one that is
    valid somewhere else: another event's kind, another field's name. Strings are at most `longest`
    characters long (a YAML parser in pure Python takes a while over a megabyte)."""
    mutated = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, max_mutations))):
        path = draw(st.sampled_from(json_paths(mutated)))
        current = _at(mutated, path)
        mutation = draw(st.sampled_from(MUTATIONS))
        if mutation == "like":
            mutated = _replaced(mutated, path, draw(_like(current, words, surrogates, longest)))
        elif mutation == "retype":
            mutated = _replaced(mutated, path, draw(json_values(surrogates=surrogates, longest=longest)))
        elif mutation == "word" and words:
            mutated = _replaced(mutated, path, draw(st.sampled_from(words)))
        elif mutation == "delete" and path:
            del _at(mutated, path[:-1])[path[-1]]
        elif mutation == "duplicate" and path and isinstance(path[-1], int):
            parent = _at(mutated, path[:-1])
            parent.insert(path[-1], copy.deepcopy(current))
        elif mutation == "add_key" and isinstance(current, dict):
            key = draw(
                st.one_of(
                    st.sampled_from(words or ("extra",)),
                    hostile_texts(8, surrogates=surrogates, longest=longest),
                )
            )
            current[key] = draw(json_values(max_leaves=4, surrogates=surrogates, longest=longest))
        elif mutation == "wrap":
            mutated = _replaced(mutated, path, draw(st.sampled_from([[current], {"value": current}])))
    return mutated


def to_json(document: Any, *, ascii_only: bool = True) -> str:
    """`document` as JSON text. A lone surrogate survives: escaped (`\\ud800`) when `ascii_only`,
    else as itself, which only `surrogatepass` encodes (into bytes that are not UTF-8)."""
    return json.dumps(document, ensure_ascii=ascii_only)


# --- damaging the bytes ----------------------------------------------------------------------------

_NUMBER = re.compile(rb"-?\d+(\.\d+)?([eE][-+]?\d+)?")
DAMAGES = ("truncate", "flip", "insert", "delete", "long_number", "nest", "arbitrary", "invalid_utf8")


@st.composite
def damaged_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` damaged in one way, as a network, a disk or a hostile writer would damage it."""
    damage = draw(st.sampled_from(DAMAGES))
    at = draw(st.integers(0, len(data)))
    if damage == "truncate":
        return data[:at]
    if damage == "flip" and data:
        at = min(at, len(data) - 1)
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    if damage == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    if damage == "delete":
        return data[:at] + data[at + draw(st.integers(1, 16)) :]
    if damage == "long_number":
        numbers = list(_NUMBER.finditer(data))
        if numbers:
            number = draw(st.sampled_from(numbers))
            digits = b"9" * draw(st.sampled_from([400, 4300, 4301, 5000, 20_000]))
            return data[: number.start()] + digits + data[number.end() :]
    if damage == "nest":
        depth = draw(st.sampled_from([64, 255, 1000, 5000, 100_000]))
        nested = b"[" * depth + b"]" * depth
        numbers = list(_NUMBER.finditer(data))
        if numbers:  # in place of a value, so that the rest still parses
            number = draw(st.sampled_from(numbers))
            return data[: number.start()] + nested + data[number.end() :]
        return data[:at] + nested + data[at:]
    if damage == "invalid_utf8":
        return (
            data[:at]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]))
            + data[at:]
        )
    return draw(st.binary(max_size=64))
