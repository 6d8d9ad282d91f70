"""Where Ray Train runs and Tune sweeps live, on one machine or many (issue 21).

``checkpoint.storage_path`` is a local folder, a folder every node mounts at the same path (NFS, a PVC), or a
URI of any filesystem ``pyarrow.fs`` opens (``s3://bucket/prefix``, ``gs://bucket/prefix``, ``hdfs://...``;
options such as ``?endpoint_override=http://host:9000&scheme=http`` pass through). The driver and the
workers reach it only through :class:`Storage` and Ray's checkpoint API: nothing reads a local path that a
process on another node wrote. Ray Train gets the same filesystem (``RunConfig(storage_filesystem=...)``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from metaprep.errors import ConfigError

# the driver's literal S3 credentials travel to the workers (which open the storage themselves). Nothing that names
# a file of the driver's machine (AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS): on other nodes use the nodes' own
# role / workload identity or a Secret in their environment (cluster/kuberay-rayjob.yaml)
STORAGE_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                       "AWS_ENDPOINT_URL")


def credentials_env() -> dict[str, str]:
    """The storage credentials of this process's environment, for the Ray workers it starts."""
    return {key: os.environ[key] for key in STORAGE_CREDENTIALS if os.environ.get(key)}


def is_uri(value: str) -> bool:
    return "://" in value


class Storage:
    """A folder of a ``pyarrow.fs`` filesystem, named by ``root`` (an absolute path or a URI)."""

    def __init__(self, root: str):
        import pyarrow
        import pyarrow.fs as pafs

        self.root = root
        try:
            self.fs, self.base = pafs.FileSystem.from_uri(root)
        except (pyarrow.ArrowException, ValueError, OSError) as exc:
            raise ConfigError(f"checkpoint.storage_path: cannot open {root!r} ({str(exc).splitlines()[0]}); "
                              f"give a folder or a URI of a filesystem pyarrow supports "
                              f"(s3://bucket/prefix, gs://bucket/prefix)") from None
        self.base = self.base.rstrip("/") or "/"

    @classmethod
    def of(cls, value: str | Path) -> Storage:
        """A storage root from a folder (made absolute on this machine) or a URI (kept as given)."""
        text = str(value)
        return cls(text if is_uri(text) else str(Path(text).expanduser().resolve()))

    @property
    def is_local(self) -> bool:
        """True when the root is a folder of this machine's filesystem (possibly a shared mount)."""
        return self.fs.type_name == "local"

    @property
    def ray_storage(self) -> tuple[str, object | None]:
        """(``storage_path``, ``storage_filesystem``) for Ray's ``RunConfig``: a local folder as is; any other
        filesystem as its own object, so that options in the URI (an endpoint) reach Ray too."""
        return (self.base, None) if self.is_local else (self.base, self.fs)

    def path(self, *parts: str) -> str:
        """The filesystem path (in ``self.fs``) of ``parts`` below the root."""
        return "/".join([self.base.rstrip("/"), *parts]) if parts else self.base

    def uri(self, *parts: str) -> str:
        """The root's URI (or folder) with ``parts`` appended; its query options kept."""
        if not parts:
            return self.root
        head, sep, query = self.root.partition("?")
        return "/".join([head.rstrip("/"), *parts]) + sep + query

    def child(self, *parts: str) -> Storage:
        return Storage(self.uri(*parts))

    def __str__(self) -> str:
        return self.root

    # -- files ---------------------------------------------------------------------------------------------

    def exists(self, *parts: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def names(self, *parts: str) -> list[str]:
        """The entries directly under ``parts`` ([] when it does not exist)."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))

    def write_json(self, obj: object, *parts: str) -> None:
        """Write ``obj`` as JSON; readers never see half a file (a temporary name, then a move; object stores
        write whole objects)."""
        target = self.path(*parts)
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        data = json.dumps(obj).encode()
        if self.is_local:
            tmp = f"{target}.tmp"
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)
            self.fs.move(tmp, target)
        else:
            with self.fs.open_output_stream(target) as out:
                out.write(data)

    def read_json(self, *parts: str) -> dict | None:
        """The JSON object at ``parts``; None when missing. Unreadable JSON raises ``ValueError``."""
        if not self.exists(*parts):
            return None
        with self.fs.open_input_stream(self.path(*parts)) as src:
            return json.loads(src.read().decode())

    def remove(self, *parts: str) -> None:
        """Delete the folder ``parts`` with everything under it (nothing when it does not exist)."""
        if self.exists(*parts):
            self.fs.delete_dir(self.path(*parts))

    @contextlib.contextmanager
    def local_dir(self, *parts: str, only: tuple[str, ...] = ()) -> Iterator[Path]:
        """The folder ``parts`` as a local directory: itself on a local filesystem, else a temporary copy
        (deleted on exit) of the whole folder or of its subfolders ``only`` (a checkpoint's ``base`` and
        ``controller``, not every rank's optimizer shards)."""
        if self.is_local:
            yield Path(self.path(*parts))
            return
        import pyarrow.fs as pafs

        tmp = Path(tempfile.mkdtemp(prefix="metaprep-export-"))
        try:
            for sub in only or ("",):
                source = self.path(*parts, sub) if sub else self.path(*parts)
                (tmp / sub).mkdir(parents=True, exist_ok=True)
                pafs.copy_files(source, str(tmp / sub), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def relative(self, path: str) -> str:
        """``path`` (a path in ``self.fs``, e.g. a Ray checkpoint's) relative to the root."""
        base = self.base.rstrip("/") + "/"
        if not path.startswith(base):
            raise ValueError(f"{path} is not under the storage root {self.root}")
        return path[len(base):]
