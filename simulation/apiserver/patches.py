"""The patch formats of the verb patch: RFC 7386 merge patch (which also stands in for strategic
merge patch) and RFC 6902 JSON patch, and the content types that choose them.

Where it sits: below `server` (the verb patch) and `admission` (a webhook's JSONPatch answer); it
imports only `common`. Both functions return a new document and must never modify the one they are
given, which may be a stored object. JSON patch is the `jsonpatch` library's, its errors answered as
`Status`: 400 for a patch it finds malformed (not a list of objects, no known `op`, a `path` that is
not a JSON pointer, no `value` or `from` where one is needed), 422 for one that cannot be applied
(a location that does not exist, a failed `test`). As RFC 6902 says, `test` compares JSON values
(`true` is not `1`) and a `move` into its own child is refused.
"""

from __future__ import annotations

import copy
from typing import Any, Final

import jsonpatch

from simulation.apiserver.common import ApiError

MERGE_PATCH: Final = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH: Final = "application/strategic-merge-patch+json"
JSON_PATCH: Final = "application/json-patch+json"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; `null` deletes a key and lists are replaced whole."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def json_patch(document: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy and test), applied to a copy of `document`."""
    try:
        patch = jsonpatch.JsonPatch(operations)  # checks the structure and every `path`
    except (jsonpatch.InvalidJsonPatch, jsonpatch.JsonPointerException) as error:
        raise ApiError(400, f"the JSON patch is malformed: {error}") from None
    try:
        return patch.apply(document)
    except jsonpatch.InvalidJsonPatch as error:  # `value` and `from` are only read when applied
        raise ApiError(400, f"the JSON patch is malformed: {error}") from None
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
        raise ApiError(422, f"the JSON patch cannot be applied: {error}") from None
