"""Loading: YAML text or parsed data -> a validated model, or ConfigError with file:line.

Line numbers come from composing the YAML into nodes (which keep their position) and
following pydantic's error path back through those nodes. load_model_file does this for any
model (the router's config too), parse_config / load_config / config_from_data for Config.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from verge.config.model import Config
from verge.config.origins import OriginSpec


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem: where (source, 1-based line and column when known), which setting, why."""

    source: str
    line: int | None
    column: int | None
    path: str
    reason: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.reason}" if self.path else f"{where}: {self.reason}"


class ConfigError(Exception):
    """Rejected configuration. str() is the operator-facing message, one issue per line."""

    def __init__(self, message: str, issues: Sequence[ConfigIssue] = ()) -> None:
        super().__init__(message)
        self.issues = tuple(issues)

    @classmethod
    def from_issues(cls, issues: Sequence[ConfigIssue]) -> ConfigError:
        return cls("\n".join(str(issue) for issue in issues), issues)


Loc = tuple[str | int, ...]
_MERGE_TAG = "tag:yaml.org,2002:merge"


def format_path(loc: Loc) -> str:
    """A setting's location as errors spell it: ``services[0].origins[1].url``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part != "[key]":
            text += f".{part}" if text else str(part)
    return text


def _mapping_entry(node: yaml.MappingNode, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    """The (key node, value node) that supplied `key`: the last one, as YAML keeps the last.

    Constructing the data flattens `<<` merges into the mapping (merged entries first), so the
    last match is also right for merges; unflattened merges are searched after explicit keys.
    """
    merged: list[yaml.Node] = []
    for key_node, value_node in reversed(node.value):
        if key_node.tag == _MERGE_TAG:
            merged.extend(
                value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            )
        elif isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            return key_node, value_node
    for source in merged:
        if isinstance(source, yaml.MappingNode) and (entry := _mapping_entry(source, key)):
            return entry
    return None


def _node_at(root: yaml.Node, loc: Loc, at_key: bool) -> yaml.Node:
    """The deepest node along `loc`; the key node instead of its value when `at_key`."""
    node = root
    for depth, part in enumerate(loc):
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            entry = _mapping_entry(node, part)
            if entry is None:
                break
            wants_key = (at_key and depth == len(loc) - 1) or loc[depth + 1 : depth + 2] == (
                "[key]",
            )
            node = entry[0] if wants_key else entry[1]
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(node.value)
        ):
            node = node.value[part]
        else:
            break
    return node


def _strip_optional(annotation: Any) -> Any:
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            options = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(options) != 1:
                return annotation
            annotation = options[0]
        else:
            return annotation


def _model_at(loc: Loc, root: type[BaseModel]) -> type[BaseModel] | None:
    """The model class that the mapping at `loc` is validated as (for 'did you mean')."""
    annotation: Any = root
    for part in loc:
        annotation = _strip_optional(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model_field = annotation.model_fields.get(str(part))
            annotation = model_field.annotation if model_field else None
        elif get_origin(annotation) in (list, dict):
            annotation = get_args(annotation)[-1]
        else:
            return None
    annotation = _strip_optional(annotation)
    return (
        annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    )


def _unknown_key_reason(loc: Loc, root: type[BaseModel]) -> str:
    model = _model_at(loc[:-1], root)
    if model is None:
        return "unknown key"
    allowed = list(model.model_fields)
    close = get_close_matches(str(loc[-1]), allowed, n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return "unknown key; expected one of: " + ", ".join(allowed)


def _reason(error: Mapping[str, Any], loc: Loc, root: type[BaseModel] | None = None) -> str:
    kind = error["type"]
    if kind == "missing":
        return "required but missing"
    if kind == "extra_forbidden":
        return _unknown_key_reason(loc, root or Config)
    if kind == "model_type":
        return f"expected a mapping of settings, got {type(error.get('input')).__name__}"
    message = str(error["msg"]).removeprefix("Value error, ")
    value = error.get("input")
    if kind not in ("value_error", "config_conflict") and isinstance(
        value, str | int | float | bool
    ):
        shown = repr(value)
        if len(shown) <= 60 and shown not in message:
            message += f" (got {shown})"
    return message


def _issue_from_error(
    error: Mapping[str, Any], source: str, root: yaml.Node | None, model: type[BaseModel]
) -> ConfigIssue:
    loc: Loc = tuple(error["loc"]) + tuple((error.get("ctx") or {}).get("at", ()))
    line = column = None
    if root is not None:
        mark = _node_at(root, loc, at_key=error["type"] == "extra_forbidden").start_mark
        line, column = mark.line + 1, mark.column + 1
    return ConfigIssue(source, line, column, format_path(loc), _reason(error, loc, model))


def _duplicate_keys(root: yaml.Node, source: str) -> list[ConfigIssue]:
    """YAML silently keeps the last of two equal keys; a config file should say so instead."""
    issues: list[ConfigIssue] = []
    pending, visited = [root], set()
    while pending:
        node = pending.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                    if key_node.value in seen:
                        mark = key_node.start_mark
                        reason = f"duplicate key {key_node.value!r}"
                        issues.append(
                            ConfigIssue(source, mark.line + 1, mark.column + 1, "", reason)
                        )
                    seen.add(key_node.value)
                pending.append(value_node)
        elif isinstance(node, yaml.SequenceNode):
            pending.extend(node.value)
    return issues


def _sorted(issues: list[ConfigIssue]) -> list[ConfigIssue]:
    unique = dict.fromkeys(issues)
    return sorted(unique, key=lambda issue: (issue.line or 0, issue.column or 0))


def _validate(
    data: object,
    source: str,
    root: yaml.Node | None,
    issues: Sequence[ConfigIssue] = (),
    model: type[M] = Config,  # type: ignore[assignment]
) -> M:
    """Validate parsed data; every problem (with its position when `root` is known) is reported."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        position = 1 if root is not None else None
        reason = f"the top level must be a mapping of settings, not {type(data).__name__}"
        raise ConfigError.from_issues([ConfigIssue(source, position, position, "", reason)])
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        issues = [
            *issues,
            *(_issue_from_error(error, source, root, model) for error in exc.errors()),
        ]
    else:
        if not issues:
            return config
    raise ConfigError.from_issues(_sorted(list(issues)))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
M = TypeVar("M", bound=BaseModel)


def _yaml_error(exc: yaml.YAMLError, source: str) -> ConfigError:
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return ConfigError(f"{source}: invalid YAML: {exc}")
    mark = exc.problem_mark
    reason = f"invalid YAML: {exc.problem}"
    if exc.context and exc.context_mark is not None:
        reason += f" ({exc.context} at line {exc.context_mark.line + 1})"
    issue = ConfigIssue(source, mark.line + 1, mark.column + 1, "", reason)
    return ConfigError.from_issues([issue])


def _load_yaml(text: str, source: str) -> tuple[yaml.Node | None, object, list[ConfigIssue]]:
    """One parse: the node tree (for positions), its data, and any duplicate keys.

    Duplicates are looked for before constructing, which flattens `<<` merges into the nodes.
    """
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None, []
        duplicates = _duplicate_keys(root, source)
        return root, loader.construct_document(root), duplicates
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    finally:
        loader.dispose()


def parse_config(text: str, filename: str = "<config>") -> Config:
    """Validate YAML (or JSON) text; ConfigError names filename:line:column, setting and reason."""
    root, data, duplicates = _load_yaml(text, filename)
    return _validate(data, filename, root, duplicates)


def load_config(path: str | Path | None) -> Config:
    """Read and validate a config file; None gives the defaults."""
    if path is None:
        return Config()
    return load_model_file(path, Config)


def load_model_file(path: str | Path, model: type[M]) -> M:
    """Read a YAML file and validate it as `model`, with load_config's file:line errors."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: config file is not UTF-8 text ({exc.reason})") from None
    root, data, duplicates = _load_yaml(text, str(path))
    return _validate(data, str(path), root, duplicates, model)


def config_from_data(data: Mapping[str, Any], source: str = "<bundle>") -> Config:
    """Validate already-parsed data (a control-plane bundle); errors name the setting, no line."""
    return _validate(data, source, None)


def config_for_origin(origin_url: str, base: Config | None = None) -> Config:
    """`verge edge --origin URL`: add a default service named "default" for every host ("*")."""
    try:
        origin = OriginSpec.model_validate(origin_url)
    except ValidationError as exc:
        reason = _reason(exc.errors()[0], ("url",))
        raise ConfigError(f"--origin: {reason}") from None
    base = base if base is not None else Config()
    for service in base.services:
        if service.default:
            raise ConfigError(
                f"--origin: adds a default service, but service {service.name!r} is already "
                "the default in the config"
            )
    data = base.model_dump(mode="json")
    data["services"].append(
        {
            "name": "default",
            "hosts": ["*"],
            "default": True,
            "origins": [origin.model_dump(mode="json")],
        }
    )
    return _validate(data, "--origin", None)
