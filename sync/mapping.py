"""Mapping files: the per-table rules (keys, window column, renames, defaults, ignores, policy) in TOML.

A mapping file is optional: without one every table gets the defaults the plan documents. The models
forbid unknown keys, so a typo is an error naming the file, the table and the key rather than a rule
silently not applied.
"""

from __future__ import annotations

import re
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from sync.errors import MappingError
from sync.modes import AuthMode, ConflictPolicy, KeyStrategy, TriggerMode

DEFAULT_PATH = Path("mappings") / "sync.toml"
"""Read when no ``--mapping`` is given and the file exists in the current directory."""

# Schemas whose tables the tool never copies as rows: auth is the auth stage's, storage goes through
# the Storage API.
RESERVED_SCHEMAS = ("auth", "storage")


def _one_of(choices: type[StrEnum]) -> BeforeValidator:
    """Reject values outside the enum ``choices`` with a message that lists them."""
    allowed = [choice.value for choice in choices]

    def check(value: object) -> object:
        if value not in allowed:
            raise PydanticCustomError(
                "choice",
                "{value} is not one of {allowed}",
                {"value": repr(value), "allowed": ", ".join(allowed)},
            )
        return value

    return BeforeValidator(check)


def _column_or_false(value: object) -> object:
    if value is False or isinstance(value, str):
        return value
    raise PydanticCustomError(
        "since", "expected a column name, or false to read the whole table every run", {}
    )


class _Strict(BaseModel):
    # Validators are built when a mapping is first read, as one for the whole file, not one per class as
    # the module is imported.
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class SyncSettings(_Strict):
    """The ``[sync]`` table: what is synced and how, for every table."""

    schemas: list[str] = Field(default_factory=lambda: ["public"])
    exclude: list[str] = Field(default_factory=list)
    auth: Annotated[AuthMode, _one_of(AuthMode)] = AuthMode.DIRECT
    batch_size: int = Field(default=5000, ge=1)
    jobs: int = Field(default=4, ge=1)
    triggers: Annotated[TriggerMode, _one_of(TriggerMode)] = TriggerMode.FIRE
    key_margin: int = Field(default=1_000_000, ge=0)
    """A colliding row's new key is taken this far past production's highest key, out of the way of
    the keys production issues next."""

    @field_validator("schemas")
    @classmethod
    def _no_reserved_schema(cls, schemas: list[str]) -> list[str]:
        for schema in schemas:
            if schema in RESERVED_SCHEMAS:
                raise PydanticCustomError(
                    "reserved",
                    "schema {schema} cannot be synced as rows: auth users are imported by the auth stage "
                    "and Storage objects go through the Storage API",
                    {"schema": repr(schema)},
                )
        return schemas


class StorageColumn(_Strict):
    """A table's ``storage = { column = …, bucket = … }``: the column holds paths of objects in a bucket.

    ``column`` names the target's column. With ``owner_prefix`` the path starts with the owner's user
    id (``<uid>/file.pdf``): objects of a user mapped to another target id move under that id, and the
    rows follow.
    """

    column: str
    bucket: str
    owner_prefix: bool = False


class StorageSettings(_Strict):
    """The ``[storage]`` table: whole buckets copied besides the objects rows reference."""

    buckets: list[str] = Field(default_factory=list)
    """Every object of these buckets (those updated since ``--since`` on a windowed run)."""
    concurrency: int = Field(default=4, ge=1)
    """Objects transferred at once (``--storage-concurrency`` overrides it)."""


class TableRule(_Strict):
    """One ``[tables."schema.table"]`` entry. Unset fields take the plan's defaults."""

    key: Annotated[KeyStrategy, _one_of(KeyStrategy)] | None = None
    match_on: list[str] | None = None
    natural: list[str] | None = None
    since: Annotated[str | Literal[False], BeforeValidator(_column_or_false)] | None = None
    """The source column of the window; ``false`` reads the whole table every run."""
    policy: Annotated[ConflictPolicy, _one_of(ConflictPolicy)] | None = None
    rename: dict[str, str] = Field(default_factory=dict)
    ignore: list[str] = Field(default_factory=list)
    defaults: dict[str, str] = Field(default_factory=dict)
    skip: bool = False
    triggers: Annotated[TriggerMode, _one_of(TriggerMode)] | None = None
    storage: StorageColumn | None = None
    """The column holding Storage object paths, whose objects travel with the rows."""

    @model_validator(mode="after")
    def _consistent(self) -> TableRule:
        if self.key is KeyStrategy.NATURAL and not self.natural:
            raise PydanticCustomError("natural", 'key = "natural" needs natural = ["column", ...]', {})
        both = sorted(set(self.ignore) & set(self.rename))
        if both:
            raise PydanticCustomError(
                "ignored_and_renamed",
                "column {column} is both ignored and renamed",
                {"column": repr(both[0])},
            )
        targets = list(self.rename.values())
        twice = sorted({t for t in targets if targets.count(t) > 1})
        if twice:
            raise PydanticCustomError(
                "rename_twice", "two columns are renamed to {column}", {"column": repr(twice[0])}
            )
        return self


class Mapping(_Strict):
    """A whole mapping file; ``path`` is where it was read from (None for the built-in defaults)."""

    sync: SyncSettings = Field(default_factory=SyncSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    tables: dict[str, TableRule] = Field(default_factory=dict)
    _path: Path | None = PrivateAttr(default=None)

    def rule(self, table: str) -> TableRule:
        """The rule of ``table`` (``schema.table``), or an empty one when the file has none."""
        return self.tables.get(table) or TableRule()

    @property
    def origin(self) -> str:
        """How messages name this mapping."""
        return str(self._path) if self._path else "the built-in defaults"

    @property
    def path(self) -> Path | None:
        """The file this mapping was read from; None for the built-in defaults."""
        return self._path


def load_mapping(path: Path | None = None) -> Mapping:
    """Read the mapping at ``path``; without one, ``mappings/sync.toml`` when present, else the defaults.

    Raises MappingError naming the file, the table and the key for anything malformed.
    """
    if path is None:
        if not DEFAULT_PATH.is_file():
            return Mapping()
        path = DEFAULT_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MappingError(f"{path}: cannot read the mapping file: {exc.strerror or exc}") from None
    return parse_mapping(text, path)


def parse_mapping(text: str, path: Path) -> Mapping:
    """Parse mapping ``text`` read from ``path`` (named in error messages)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MappingError(f"{path}: not valid TOML: {exc}") from None
    for name in data.get("tables", {}) if isinstance(data.get("tables"), dict) else ():
        if "." not in name:
            raise MappingError(
                f'{path}: tables."{name}": name the table as "schema.table", e.g. [tables."public.{name}"]'
            )
    try:
        mapping = Mapping.model_validate(data)
    except ValidationError as exc:
        lines = {_location(e["loc"]): _describe(path, e) for e in reversed(exc.errors())}
        raise MappingError("\n".join(reversed(lines.values()))) from None
    mapping._path = path
    return mapping


def _describe(path: Path, error: Any) -> str:
    """One line per validation error: ``file: tables."public.x".key: what is wrong``."""
    where = _location(error["loc"])
    if error["type"] == "extra_forbidden":
        owner = _owner(error["loc"])
        allowed = ", ".join(owner.model_fields) if owner else ""
        return f"{path}: {where}: unknown key" + (f" (expected one of {allowed})" if allowed else "")
    return f"{path}: {where}: {error['msg']}"


def _location(loc: tuple[Any, ...]) -> str:
    # Pydantic adds the branch it tried for unions (``str``, ``literal[...]``); the reader needs the key.
    parts = [str(p) for p in loc if not _is_branch(p)]
    if parts[:1] == ["tables"] and len(parts) > 1:
        parts[1] = f'"{parts[1]}"'
    return ".".join(toml_key(p) if not p.startswith('"') else p for p in parts) or "(top level)"


def _is_branch(part: Any) -> bool:
    return isinstance(part, str) and (
        part in ("str", "bool", "none") or part.startswith(("literal[", "function-"))
    )


def _owner(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    parts = [p for p in loc if not _is_branch(p)]
    if len(parts) == 1:
        return Mapping
    if parts[0] == "sync":
        return SyncSettings
    if parts[0] == "storage":
        return StorageSettings
    if parts[0] == "tables":
        return StorageColumn if parts[2:3] == ["storage"] and len(parts) > 3 else TableRule
    return None


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def toml_key(name: str) -> str:
    """``name`` as a TOML key: bare when it can be, quoted otherwise."""
    return name if _BARE_KEY.match(name) else toml_string(name)


def table_header(table: str) -> str:
    """The header of ``table``'s entry, e.g. ``[tables."public.profiles"]``."""
    return f"[tables.{toml_string(table)}]"
