"""Users' files with one-line ``file:line`` errors: bounded reads, JSONL, safe YAML, writable outputs.

Every read is bounded: only regular files (a FIFO would block forever, ``/dev/zero`` never ends) of at
most a size limit (a file read whole costs several times its size once parsed).
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import yaml

from metaprep.errors import DataError, MetaprepError


def is_finite_number(value: object) -> bool:
    """True for a JSON number (not a bool) that is finite as a float; an int too large for a float is not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON at ``path``, whole or not at all (written next to it, then swapped in)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def machine_memory_bytes() -> int:
    """This machine's memory: physical RAM, or the container's cgroup limit when lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total


# A data file read whole and parsed into Python objects takes ~10x its size: at most 1/16 of the
# machine's memory, and never more than 1 GiB (the largest shipped data file is ~10 MB).
MAX_DATA_BYTES = min(1 << 30, machine_memory_bytes() // 16)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} bytes"


def read_limited(path: Path, what: str, limit: int, error: type[MetaprepError] = DataError) -> bytes:
    """The bytes of the regular file ``path`` if it holds at most ``limit`` bytes; else one-line ``error``."""
    path = Path(path)
    try:
        info = os.stat(path)  # before open(): opening a FIFO for reading blocks until a writer comes
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: {what} must be a regular file (got a {_kind(info.st_mode)})")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as f:
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between stat() and open()
                raise error(f"{path}: {what} must be a regular file")
            data = f.read(limit + 1)  # not st_size: /proc-like files report 0 and still stream
        except OSError as exc:
            raise error(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise error(f"{path}: {what} is larger than the limit of {_size(limit)}")
    return data


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def read_bytes(path: Path, what: str) -> bytes:
    """The file's bytes (at most :data:`MAX_DATA_BYTES`), or ``path: WHAT not found`` / ``cannot read``."""
    return read_limited(path, what, MAX_DATA_BYTES)


def decode_utf8(data: bytes, where: str, error: type[MetaprepError] = DataError) -> str:
    """``data`` as UTF-8 text, or one-line ``error`` ``WHERE:LINE: undecodable bytes at column C``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise error(f"{where}:{line}: undecodable bytes at column {column} (UTF-8 expected)") from None


def parse_json(text: str | bytes, where: str, error: type[MetaprepError] = DataError, *, inline: bool = False) -> Any:
    """The JSON document in ``text`` (bytes must be UTF-8), or one-line ``error`` starting with ``where``.

    ``where`` is a file (errors read ``file:line: ...``) or, with ``inline``, a command-line flag whose
    value is the JSON (errors read ``--flag: ... at line L column C``)."""
    if isinstance(text, bytes):
        text = decode_utf8(text, where, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = f"{where}: malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})" if inline else \
            f"{where}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})"
        raise error(at) from None
    except RecursionError:  # e.g. 100k nested '['
        raise error(f"{where}: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise error(f"{where}: invalid JSON value ({str(exc).split(';')[0]})") from None


def read_json(path: Path, what: str, error: type[MetaprepError] = DataError) -> Any:
    """The JSON document in the file ``path`` (bounded read), or one-line ``error`` naming ``path:line``."""
    return parse_json(read_limited(path, what, MAX_DATA_BYTES, error), str(path), error)


def read_jsonl(path: Path, what: str, expected: str = "") -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; ``expected`` describes the valid line shape."""
    hint = f"; {expected}" if expected else ""
    records = []
    for lineno, line in enumerate(read_bytes(path, what).split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{lineno}: undecodable bytes at column {exc.start + 1} (UTF-8 expected)") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:  # e.g. 100k nested '['
            raise DataError(f"{path}:{lineno}: JSON nested too deeply") from None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise DataError(f"{path}:{lineno}: invalid JSON value ({str(exc).split(';')[0]})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: each line must be a JSON object{hint}")
        records.append((lineno, obj))
    if not records:
        raise DataError(f"{path}: empty {what}{hint}")
    return records


MAX_YAML_DEPTH = 32  # recipes nest 3 levels; PyYAML composes recursively (deeper input: RecursionError)


class YAMLRefused(yaml.MarkedYAMLError):
    """YAML that is well-formed but not accepted in a recipe."""


class _SafeLoader(yaml.SafeLoader):
    """SafeLoader without anchors and aliases and with bounded nesting, both refused while composing, before
    anything is built: an alias bomb of under 1 KB expands to gigabytes, a self-referencing alias never ends."""

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise YAMLRefused(problem="anchors and aliases (&name, *name) are not allowed; write the values out",
                              problem_mark=event.start_mark)
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise YAMLRefused(problem=f"nested deeper than {MAX_YAML_DEPTH} levels", problem_mark=event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def safe_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """The document in ``text`` and its node tree (for key lines), through :class:`_SafeLoader`."""
    loader = _SafeLoader(text)
    try:
        node = loader.get_single_node()
        return (loader.construct_document(node) if node is not None else None), node
    finally:
        loader.dispose()


def nearest_folder(path: Path) -> Path:
    """``path`` or its closest existing ancestor (where ``path`` would be created)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, what: str, error: type[MetaprepError] = DataError, *, folder: bool = False) -> None:
    """Refuse, before any work, an output file (or with ``folder``, an output folder) ``path`` that could not be
    written: a file in the way, or a read-only folder (probed by creating a file: that also catches a read-only
    mount, where root passes every permission check)."""
    path = Path(path)
    where = nearest_folder(path if folder else path.parent)
    if not where.is_dir():
        raise error(f"{path}: cannot write {what}: {where} is a file, not a folder")
    if not folder and path.is_dir():
        raise error(f"{path}: cannot write {what}: it is a folder; expected a file path")
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
        if path.is_file() and not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise error(f"{path}: cannot write {what} in {where} ({exc.strerror or exc})") from None
