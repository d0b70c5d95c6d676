"""Readable 400 messages for requests that fail validation: what is wrong, at the path the client wrote.

Pydantic names a union's branches inside its error paths (`content.str`,
`content.list[tagged-union[TextPart,AudioPart]].0.input_audio.input_audio.data`) and reports every
branch that failed, so one empty field in a list of parts also comes with "Input should be a valid
string" for the content. A client wants the problem in the shape it sent: `messages[0].content[0].input_audio.data`.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

MAX_PROBLEMS = 5


def client_path(loc: tuple[int | str, ...], data: Any) -> tuple[str, ...]:
    """The part of an error's path that exists in the request (a missing field's name kept at the end).

    Walking the request alongside the path drops the labels pydantic adds for union branches and
    discriminator tags, since they name no key or index of what the client sent.
    """
    path: list[str] = []
    node = data
    for position, item in enumerate(loc):
        if isinstance(item, int) and isinstance(node, list) and 0 <= item < len(node):
            path.append(f"[{item}]")
            node = node[item]
        elif isinstance(item, str) and isinstance(node, dict) and item in node:
            path.append(item)
            node = node[item]
        elif isinstance(item, str) and isinstance(node, dict) and position == len(loc) - 1:
            path.append(item)  # a required field the client left out
    return tuple(path)


def dotted(path: tuple[str, ...]) -> str:
    """The path as a client would write it in code, `messages[0].content`; "body" for the request itself."""
    return "".join(part if part.startswith("[") or not index else f".{part}" for index, part in enumerate(path)) or "body"


def validation_problems(exc: ValidationError, data: Any) -> list[tuple[str, str]]:
    """(path, message) for each problem, leaving out a union branch's complaint about a shape the client did not use.

    A branch the client chose fails deeper in the request than the branches it did not choose, so an
    error whose path leads to another error's path is that other error seen from a wrong branch.
    """
    found = [(client_path(tuple(error["loc"]), data), error["msg"]) for error in exc.errors()]
    paths = {path for path, _ in found}
    problems: list[tuple[str, str]] = []
    for path, message in found:
        shadowed = any(len(other) > len(path) and other[: len(path)] == path for other in paths)
        problem = (dotted(path), message)
        if not shadowed and problem not in problems:
            problems.append(problem)
    return problems[:MAX_PROBLEMS]


def validation_message(exc: ValidationError, data: Any) -> tuple[str, str | None]:
    """One line for a client ("invalid request: path: what is wrong; ..."), and the first problem's path."""
    problems = validation_problems(exc, data)
    text = "; ".join(f"{path}: {message}" for path, message in problems)
    return f"invalid request: {text}", problems[0][0] if problems else None
