"""Label and field selectors of lists and watches, parsed and matched as the real API does; a field
selector accepts only `metadata.name`, `metadata.namespace` and the labels its kind declares
(`Kind.fields`).

Where it sits: below `store` (each watch keeps its `Filter`) and `server` (lists); it imports only
`common`. It must never read the store: a `Filter` only says whether an object it is given matches.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from simulation.apiserver.common import ApiError, JsonObject, Kind

_LABEL_KEY: Final = re.compile(r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_VALUE: Final = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_SET_TERM: Final = re.compile(r"(?P<key>[^\s=!()]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)")
_EQUALITY_TERM: Final = re.compile(r"(?P<key>[^\s=!()]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s=!()]*)")
_EXISTENCE_TERM: Final = re.compile(r"(?P<absent>!?)\s*(?P<key>[^\s=!()]+)")
_FIELD_TERM: Final = re.compile(r"(?P<label>[^\s=!]+)\s*(?P<op>==|=|!=)\s*(?P<value>.*)")
_FIELD_PATHS: Final = {"source": "source.component"}  # where a label is not the object's own path
_UNSET_FIELD_TEXT: Final = {"spec.unschedulable": "false"}  # how an unset field compares, "" otherwise


@dataclass(frozen=True)
class _LabelRequirement:
    key: str
    operator: str  # "in", "notin", "exists" or "absent"; "=" is "in" and "!=" is "notin" of one value
    values: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "exists":
            return self.key in labels
        if self.operator == "absent":
            return self.key not in labels
        return (labels.get(self.key) in self.values) == (self.operator == "in")


@dataclass(frozen=True)
class _FieldRequirement:
    path: tuple[str, ...]
    unset: str
    value: str
    equal: bool

    def matches(self, obj: JsonObject) -> bool:
        actual: Any = obj
        for part in self.path:
            actual = actual.get(part) if isinstance(actual, dict) else None
        if isinstance(actual, bool):
            actual = "true" if actual else "false"
        text = self.unset if actual is None else str(actual)
        return (text == self.value) == self.equal


def _split_top_level(text: str) -> list[str]:
    """Splits a label selector at the commas outside parentheses."""
    terms, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(text[start:index])
            start = index + 1
    terms.append(text[start:])
    return [term.strip() for term in terms if term.strip()]


def _parse_label_selector(text: str) -> tuple[_LabelRequirement, ...]:
    requirements = []
    for term in _split_top_level(text):
        if match := _SET_TERM.fullmatch(term):
            values = [value.strip() for value in match["values"].split(",")]
            requirement = _LabelRequirement(match["key"], match["op"], frozenset(values))
        elif match := _EQUALITY_TERM.fullmatch(term):
            operator = "notin" if match["op"] == "!=" else "in"
            requirement = _LabelRequirement(match["key"], operator, frozenset({match["value"]}))
        elif match := _EXISTENCE_TERM.fullmatch(term):
            requirement = _LabelRequirement(
                match["key"], "absent" if match["absent"] else "exists", frozenset()
            )
        else:
            raise ApiError(400, f"unable to parse requirement {term!r} of label selector {text!r}")
        invalid = not _LABEL_KEY.fullmatch(requirement.key) or not all(
            _LABEL_VALUE.fullmatch(value) for value in requirement.values
        )
        if invalid:
            raise ApiError(400, f"invalid label key or value in requirement {term!r}")
        requirements.append(requirement)
    return tuple(requirements)


def _parse_field_selector(text: str, kind: Kind) -> tuple[_FieldRequirement, ...]:
    requirements = []
    for term in (term.strip() for term in text.split(",")):
        if not term:
            continue
        match = _FIELD_TERM.fullmatch(term)
        if match is None:
            raise ApiError(400, f"invalid field selector requirement {term!r}")
        label = match["label"]
        if label not in kind.fields and label not in ("metadata.name", "metadata.namespace"):
            raise ApiError(400, f"field label not supported: {label}")
        path = tuple(_FIELD_PATHS.get(label, label).split("."))
        unset = _UNSET_FIELD_TEXT.get(label, "")
        requirements.append(_FieldRequirement(path, unset, match["value"], match["op"] != "!="))
    return tuple(requirements)


@dataclass(frozen=True)
class Filter:
    """What a list or watch asked for: a namespace (None for all) and label and field selectors."""

    namespace: str | None
    labels: tuple[_LabelRequirement, ...]
    fields: tuple[_FieldRequirement, ...]

    @classmethod
    def from_query(cls, namespace: str | None, kind: Kind, query: Mapping[str, str]) -> Filter:
        return cls(
            namespace,
            _parse_label_selector(query.get("labelSelector", "")),
            _parse_field_selector(query.get("fieldSelector", ""), kind),
        )

    def matches(self, obj: JsonObject) -> bool:
        metadata = obj["metadata"]
        if self.namespace is not None and metadata.get("namespace") != self.namespace:
            return False
        labels = metadata.get("labels") or {}
        return all(r.matches(labels) for r in self.labels) and all(r.matches(obj) for r in self.fields)
