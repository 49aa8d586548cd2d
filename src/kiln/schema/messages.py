"""pydantic's validation errors as one line a user can act on: the manifest file, the dotted key
(`targets.onnx_fp32.opset`), the bad value, and what is allowed.

Generic over the schema: it walks the raw data and the root model's annotations along pydantic's
error location, so it never imports the Spec it describes.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ValidationError

from kiln.errors import ManifestError
from kiln.schema.fields import CrossError
from kiln.schema.manifest import RawManifest


def manifest_error(raw: RawManifest, err: ValidationError, root: type[BaseModel]) -> ManifestError:
    """pydantic's errors as one ManifestError line (the first error, and how many more there are)."""
    errors = err.errors(include_url=False)
    first = errors[0]
    cross = (first.get("ctx") or {}).get("error")
    if isinstance(cross, CrossError):
        problem = f"{cross.value!r} is not allowed; expected {cross.allowed}"
        where = _locate(raw.data, first["loc"], root)[0]  # a nested model's check names its key relative to it
        return ManifestError(raw.path, f"{where}.{cross.key}" if where else cross.key, problem + _more(errors))
    key, value, annotation = _locate(raw.data, first["loc"], root)
    if first["type"].startswith("union_tag_"):  # blame the tag key itself: targets.x.format
        key = f"{key}.{first['ctx']['discriminator'].strip(chr(39))}"
    return ManifestError(raw.path, key, _describe(first, value, annotation, root) + _more(errors))


def _more(errors: list) -> str:
    extra = len(errors) - 1
    return f" (and {extra} more problem{'s' if extra > 1 else ''})" if extra else ""


def _locate(data: Any, loc: tuple, root: type[BaseModel]) -> tuple[str, Any, Any]:
    """Walk the raw data and the type annotations along pydantic's loc.

    Returns the user's dotted key, the raw value found there and the annotation that validates it.
    Union tags and pydantic's "[key]" marker in loc are not part of the user's key and are skipped.
    """
    key = ""
    node: Any = data
    annotation: Any = root
    for item in loc:
        annotation = _unwrap(annotation)
        origin = typing.get_origin(annotation)
        if item == "[key]":
            node = None  # the error is about the dict key itself, already named in `key`
            continue
        if origin is Union:  # a discriminated union: continue with the member the data selects
            annotation = _union_member(annotation, node)
            origin = None
        if isinstance(node, dict) and item in (node.get("format"), node.get("kind")) and item not in node:
            continue  # a union tag in loc (one-member unions collapse, so check the data, not the type)
        if _is_model(annotation):
            field = annotation.model_fields.get(str(item))
            key = f"{key}.{_quote(str(item))}" if key else _quote(str(item))
            node = node.get(item, _MISSING) if isinstance(node, dict) else _MISSING
            annotation = field.annotation if field is not None else None
        elif origin is dict:
            key = f"{key}.{_quote(str(item))}"
            node = node.get(item, _MISSING) if isinstance(node, dict) else _MISSING
            annotation = typing.get_args(annotation)[1]
        elif origin in (list, tuple) and isinstance(item, int):
            key = f"{key}[{item}]"
            node = node[item] if isinstance(node, list) and item < len(node) else _MISSING
            args = typing.get_args(annotation)
            annotation = args[0] if args else None
        else:
            break  # inside a scalar union (int | str): the key is already precise
    return key, node, annotation


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] and Optional[...] so the walk sees the container or model."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
        if all(_is_model(m) for m in members):
            return Union[tuple(members)]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _tag_values(annotation: Any) -> dict[str, type[BaseModel]]:
    """For a discriminated union of models: {tag value: model}."""
    found = {}
    for member in typing.get_args(_unwrap(annotation)):
        for field_name in ("format", "kind"):
            field = member.model_fields.get(field_name) if _is_model(member) else None
            if field is not None and typing.get_origin(field.annotation) is Literal:
                found[typing.get_args(field.annotation)[0]] = member
    return found


def _union_member(annotation: Any, node: Any) -> Any:
    if isinstance(node, dict):
        tags = _tag_values(annotation)
        for tag_key in ("format", "kind"):
            if node.get(tag_key) in tags:
                return tags[node[tag_key]]
    return None


def _quote(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else f'"{key}"'


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _describe(error: dict, value: Any, annotation: Any, root: type[BaseModel]) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return f"unknown key; allowed keys here: {', '.join(_allowed_keys(error['loc'], root))}"
    if kind == "union_tag_invalid":
        return f"{ctx['tag']!r} is not allowed; expected one of {ctx['expected_tags']}"
    if kind == "union_tag_not_found":
        return "required key is missing"
    if kind == "literal_error":
        return f"{value!r} is not allowed; expected {ctx['expected']}"
    shown = error.get("input") if value is _MISSING or value is None else value
    msg = error["msg"].replace("Value error, ", "").replace("Input should be", "expected")
    return f"{shown!r} is not allowed; {msg[:1].lower()}{msg[1:]}"


def _allowed_keys(loc: tuple, root: type[BaseModel]) -> list[str]:
    """Field names of the model that holds the unknown key (walks the schema, not the data)."""
    annotation: Any = root
    for item in loc[:-1]:
        annotation = _unwrap(annotation)
        if _is_model(annotation):
            field = annotation.model_fields.get(str(item))
            annotation = field.annotation if field else annotation  # else: a union tag
        elif typing.get_origin(annotation) is Union:
            annotation = _tag_values(annotation).get(item)
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
        elif typing.get_origin(annotation) in (list, tuple):
            annotation = typing.get_args(annotation)[0]
    annotation = _unwrap(annotation)
    return sorted(annotation.model_fields) if _is_model(annotation) else []
