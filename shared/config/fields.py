"""What every config model shares: a strict, frozen base that refuses unknown keys, named checks, and the
translation of a pydantic error into a ConfigError naming the field as a path (`sinks.hook.batch_max`)."""

from __future__ import annotations

import re
import types
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError

from shared.errors import ConfigError

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


class Section(BaseModel):
    """A mapping of the config file: typed without coercion, frozen, closed to keys it does not declare."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    # Keys taken out before validation by a parser of their own (a sink's rules: shared/transforms.py).
    also_accepts: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def keys(cls) -> frozenset[str]:
        """Every key this mapping accepts (what `config_keys()` and the unknown-field error list)."""
        return frozenset(cls.model_fields) | cls.also_accepts


def matching(pattern: str, problem: str) -> AfterValidator:
    """A string check whose failure reads as `problem` (pydantic's own would quote the regex)."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise config_problem(problem)
        return value

    return AfterValidator(check)


def config_problem(text: str) -> PydanticCustomError:
    """An error a validator raises, reported as written (the text is not a format template)."""
    return PydanticCustomError("config", "{problem}", {"problem": text})


Name = Annotated[
    str, matching(r"[a-z0-9][a-z0-9_-]{0,62}", "names are lowercase letters, digits, '-' and '_' (max 63)")
]


def _not_null(value: Any) -> Any:
    if value is None:
        raise config_problem("must not be null (leave the key out to leave it unset)")
    return value


# A key that may be left out (None then) but not written empty: `transactional:` meaning false, or an empty
# `auth:` meaning no auth, would be a silent change of behaviour, so null is refused (as the old parser did).
Omittable = Annotated[T | None, BeforeValidator(_not_null)]
ENV_NAME = r"[A-Z_][A-Z0-9_]*"
EnvName = Annotated[
    str, matching(ENV_NAME, "must be the NAME of an environment variable (the secret stays out of the file)")
]


def validated(model: type[M], data: Any, where: str = "", context: dict[str, Any] | None = None) -> M:
    """`model` from `data`, or a ConfigError naming the first bad field under `where` ("" for the file's root)."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # An unknown key first: often a misspelt one, which also makes the key it meant look missing.
        error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        path, owner = _locate(model, error["loc"])
        bounds = _bounds(owner, path[-1]) if path and error["type"] in BOUNDED else None
        given = shown(error.get("input"), error["type"])
        problem = _problem(error, owner) if bounds is None else f"must be {bounds}, got {given}"
        raise ConfigError(_path(where, path, error), problem) from None


# A number out of range, or not a number, is told the whole range (pydantic would name one bound).
BOUNDED = frozenset(
    {"int_type", "float_type", "greater_than_equal", "less_than_equal", "greater_than", "less_than", "int_from_float"}
)


# The value given is echoed only where it cannot be a secret: a number where a number belongs, a short
# lowercase name where a name from a list belongs. A string, list or mapping under auth, headers, api_keys or
# *_env may be a token pasted in the wrong place: only its kind is said.
NUMERIC = BOUNDED | {"bool_type"}
ENUM = frozenset({"literal_error", "union_tag_invalid"})
SHORT_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def shown(given: Any, kind: str) -> str:
    """`given` as a message may show it: repr for a number in a numeric field or a name in an enum field,
    else what kind of value it is ("a string")."""
    if kind in NUMERIC and isinstance(given, int | float):
        return repr(given)
    if kind in ENUM and isinstance(given, str) and SHORT_NAME.fullmatch(given):
        return repr(given)
    kinds = ((type(None), "null"), (bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"))
    kinds += ((list, "a list"), (dict, "a mapping"))
    return next((name for cls, name in kinds if isinstance(given, cls)), f"a {type(given).__name__}")


def _bounds(owner: type[BaseModel], key: int | str) -> str | None:
    """Say "an integer from 1 to 10000" for a field declared `Annotated[int, Field(ge=1, le=10000)]`."""
    found = owner.model_fields.get(str(key))
    if found is None:
        return None
    metadata, annotation = list(found.metadata), found.annotation
    for member in get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else ():
        if get_origin(member) is Annotated:
            annotation, *more = get_args(member)
            metadata += [m for info in more for m in (info.metadata if isinstance(info, FieldInfo) else [info])]
    low = next((m.ge for m in metadata if getattr(m, "ge", None) is not None), None)
    high = next((m.le for m in metadata if getattr(m, "le", None) is not None), None)
    if low is None or high is None:
        return None
    return f"{'an integer' if annotation is int else 'a number'} from {low} to {high}"


def _locate(model: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[list[int | str], type[BaseModel]]:
    """The loc as the file's path (without pydantic's union tags and key markers), and the model that holds
    its last key."""
    path: list[int | str] = []
    owner, current = model, model
    for item in loc:
        current = _unwrap(current)
        if item == "[key]":
            continue
        members = _tagged(current)
        if isinstance(item, str) and item in members:
            current = members[item]
            continue
        path.append(item)
        if isinstance(current, type) and issubclass(current, BaseModel):
            owner = current
            found = current.model_fields.get(str(item))
            current = found.annotation if found is not None else None
        elif get_origin(current) is dict:
            current = get_args(current)[1]
        elif get_origin(current) in (list, tuple):
            current = get_args(current)[0]
        else:
            current = None
    return path, owner


def _unwrap(annotation: Any) -> Any:
    """Annotated[X, ...] -> X; X | None -> X."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return annotation


def _tagged(annotation: Any) -> dict[str, type[BaseModel]]:
    """A union of models told apart by a Literal `type`: tag -> model (pydantic puts the tag in the loc)."""
    if get_origin(annotation) not in (Union, types.UnionType):
        return {}
    members: dict[str, type[BaseModel]] = {}
    for member in get_args(annotation):
        found = member.model_fields.get("type") if isinstance(member, type) and issubclass(member, BaseModel) else None
        if found is not None and get_origin(found.annotation) is Literal:
            members.update((tag, member) for tag in get_args(found.annotation))
    return members


def _path(where: str, path: list[int | str], error: ErrorDetails) -> str:
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        path = [*path, str(error.get("ctx", {}).get("discriminator", "type")).strip("'")]
    if not path:
        return where or "(root)"
    text = where or ("(root)" if error["type"] == "extra_forbidden" and len(path) == 1 else "")
    for item in path:
        text += f"[{item}]" if isinstance(item, int) else (f".{item}" if text else str(item))
    return text


def _problem(error: ErrorDetails, owner: type[BaseModel]) -> str:
    kind, ctx, given = error["type"], error.get("ctx", {}), error.get("input")
    if kind == "extra_forbidden":
        allowed = owner.keys() if issubclass(owner, Section) else frozenset(owner.model_fields)
        return f"unknown field (allowed: {', '.join(sorted(allowed))})"
    if kind == "missing":
        return "required"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return "must be a mapping" + (" (required)" if given is None else f", got {shown(given, kind)}")
    if kind == "union_tag_invalid":
        return f"must be one of {ctx.get('expected_tags')}, got {shown(ctx.get('tag'), kind)}"
    if kind == "union_tag_not_found":
        return "required"
    if kind == "config":
        return error["msg"]
    message = error["msg"].replace("Input should be ", "must be ", 1)
    return f"{message}, got {shown(given, kind)}"
