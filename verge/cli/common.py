"""What the ``verge`` commands share: failing with one line, HOST:PORT and --control syntax,
the control-plane session, and output (tables for people, ``--json`` for scripts).

Every control-plane command is a thin shell over `verge.control.client.ControlClient`: read
flags (and files), make one or a few API calls, print a table or `--json`. `with_api` gives
each the --control, --token and --json options and hands it an `Api` that takes those steps.
Any failure is one line on stderr (the control plane's own message, with the field it names)
and a non-zero exit, never a traceback. Heavy imports (httpx, rich, yaml) happen inside the
functions so that `verge edge` does not pay for them at start.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar, get_type_hints

import typer

from verge.cli.secrets import secret_option

if TYPE_CHECKING:
    from rich.console import Console

    from verge.control.client import ControlClient, ControlError, Page

T = TypeVar("T")

DEFAULT_CONTROL = "http://127.0.0.1:7000"

EXIT_FAILED = 1
"""The control plane refused or could not be reached."""
EXIT_USAGE = 2
"""The operator's input (flags, files) is wrong before anything was sent."""

ControlUrl = Annotated[
    str,
    typer.Option(
        "--control",
        envvar="VERGE_CONTROL",
        help="Base URL of the control plane (`verge control`).",
    ),
]
Token = Annotated[
    str | None,
    secret_option("VERGE_TOKEN", "API token (vrg_...) sent as Authorization: Bearer.", "--token"),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ServiceName = Annotated[str, typer.Argument(help="Service name.")]
Columns = Sequence[tuple[str, str]]
"""A table's (key, heading) columns."""


# ---------------------------------------------------------------------------------------------
# Failing, and the syntax of addresses
# ---------------------------------------------------------------------------------------------


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """``error: MESSAGE`` in red on stderr and exit ``code``."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def fail_line(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """`fail` with the message on one line (the control plane's may span several)."""
    fail(" ".join(message.split()), code)


def split_hostport(value: str, option: str) -> tuple[str, int]:
    """HOST:PORT (``[::1]:80``; an empty host is 0.0.0.0), or a usage error naming ``option``."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise typer.BadParameter(f"expected HOST:PORT, got {value!r}", param_hint=option)
    return (host.strip("[]") or "0.0.0.0"), int(port)


def control_urls(values: list[str] | None) -> list[str]:
    """--control (repeated, or comma-separated; VERGE_CONTROL too): the replicas' URLs."""
    if not values:
        return []
    from verge.control.client import control_urls as parse_control_urls

    try:
        return parse_control_urls(values)
    except ValueError as exc:
        fail(f"--control: {exc}")


# ---------------------------------------------------------------------------------------------
# The control-plane session
# ---------------------------------------------------------------------------------------------


@contextmanager
def session(control: str, token: str | None) -> Iterator[ControlClient]:
    """A ControlClient whose errors end the command with the server's message."""
    from verge.control.client import ControlClient, ControlError

    if not token:
        fail_line("a control-plane token is required (--token or VERGE_TOKEN)", EXIT_USAGE)
    try:
        client = ControlClient(control, token)
    except ValueError as exc:  # --control / VERGE_CONTROL: one URL or several, comma-separated
        fail_line(f"--control: {exc}", EXIT_USAGE)
    try:
        yield client
    except ControlError as exc:
        fail_line(explain(exc))
    finally:
        client.close()


def explain(exc: ControlError) -> str:
    """The server's message, with the field and a hint for the statuses operators meet."""
    text = str(exc)
    if exc.status == 401:
        return f"the control plane refused the token: {text}"
    if exc.status == 403:
        return f"this token may not do that: {text}"
    return text


def every(fetch: Callable[[int, int], Page]) -> list[dict[str, Any]]:
    """Every item of a paged listing."""
    from verge.control.client import iter_all

    return list(iter_all(fetch))


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def console(stderr: bool = False) -> Console:
    """A rich console; wide when piped so that tables are not wrapped at 80 columns."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    rich_console = Console(file=stream, stderr=stderr)
    if not rich_console.is_terminal:
        rich_console = Console(file=stream, stderr=stderr, width=200)
    return rich_console


def cell(value: Any) -> str:
    """A value as table text: '-' for nothing, yes/no, lists joined, mappings as JSON."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(cell(item) for item in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def table(title: str, items: Sequence[dict[str, Any]], columns: Columns) -> None:
    """Print `items` as a table with (key, heading) columns; missing values show as '-'."""
    from rich.table import Table
    from rich.text import Text

    if not items:
        typer.echo(f"(no {title[0].lower()}{title[1:]})")
        return
    rich_table = Table(title=title, title_justify="left")
    for _key, heading in columns:
        rich_table.add_column(heading, overflow="fold")
    for item in items:
        values = (item.get(key) for key, _heading in columns)
        rich_table.add_row(*(v if isinstance(v, Text) else Text(cell(v)) for v in values))
    console().print(rich_table)


# ---------------------------------------------------------------------------------------------
# Control-plane commands: --control, --token and --json given once
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Api:
    """What a control-plane command's --control, --token and --json say, and the steps every
    such command is made of: one or a few API calls in a `session`, then the result as JSON
    (--json) or for people (a line, a table)."""

    control: str = DEFAULT_CONTROL
    token: str | None = None
    as_json: bool = False

    def session(self) -> AbstractContextManager[ControlClient]:
        return session(self.control, self.token)

    def call(self, request: Callable[[ControlClient], T]) -> T:
        """One API call in its own `session`: ``request(client)``'s result."""
        with self.session() as client:
            return request(client)

    def printed_json(self, value: Any) -> bool:
        """With --json, print ``value`` and say so (the command is done)."""
        if self.as_json:
            print_json(value)
        return self.as_json

    def report(self, result: Any, message: str) -> None:
        """A command's outcome: the raw result with --json, else one line for people."""
        if not self.printed_json(result):
            done(message)

    def listing(
        self,
        items: list[dict[str, Any]],
        title: str,
        columns: Columns,
        row: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        """Items as the API returned them with --json, else a table of ``row(item)`` each."""
        if not self.printed_json(items):
            table(title, [row(item) for item in items] if row else items, columns)

    def list_all(
        self,
        pages: Callable[[ControlClient], Callable[[int, int], Page]],
        title: str,
        columns: Columns,
        row: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        """A `list` command: every page of ``pages(client)``, shown by `listing`."""
        self.listing(self.call(lambda client: every(pages(client))), title, columns, row)


_API_OPTIONS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=default)
    for name, kind, default in (
        ("control", ControlUrl, DEFAULT_CONTROL),
        ("token", Token, None),
        ("as_json", AsJson, False),
    )
]


def with_api(command: Callable[..., None] | None = None, *, json_option: bool = True) -> Any:
    """A command ``f(api: Api, ...)`` as typer sees it: ``f(..., control, token, as_json)``.

    Every control-plane command takes --control, --token and --json, last and alike; they
    are written here once. ``@with_api`` (``@with_api(json_option=False)`` for a command with
    no --json) goes below the group's ``.command(...)``.
    """
    if command is None:
        return functools.partial(with_api, json_option=json_option)
    hints = get_type_hints(command, localns={"Api": Api}, include_extras=True)
    own = list(inspect.signature(command).parameters.values())[1:]  # after `api`
    options = _API_OPTIONS if json_option else _API_OPTIONS[:2]
    parameters = [p.replace(annotation=hints[p.name]) for p in own] + options

    @functools.wraps(command)
    def run(*args: Any, control: str, token: str | None, as_json: bool = False, **kw: Any) -> None:
        command(Api(control, token, as_json), *args, **kw)

    run.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": None}
    return run


def done(message: str) -> None:
    """A success line (plain text: names and URLs such as http://[::1]/ are not markup)."""
    typer.echo(message)


def warn(message: str) -> None:
    """A yellow line on stderr."""
    typer.secho(message, fg=typer.colors.YELLOW, err=True)


def timestamp(value: Any) -> datetime | None:
    """An ISO 8601 string or epoch seconds as an aware datetime (naive ones are UTC)."""
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str) and value:
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return None
