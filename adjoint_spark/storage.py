"""File system access through Hadoop's FileSystem API, so one code path serves local
folders, ``file://``, ``hdfs://`` and ``s3a://`` URIs; plus staging and publishing.

Every output is written under ``<output>/_staging/<name>-<run id>/`` and published by
renaming it to ``<output>/<name>``; the previous version is moved aside first and
deleted only after the new one is in place.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass

from pyspark.sql import SparkSession

logger = logging.getLogger(__name__)

STAGING_DIR = "_staging"


class ArtifactError(ValueError):
    """An output of an earlier stage that is damaged or does not belong with the others."""


def to_uri(path: str) -> str:
    """A path as a URI; plain local paths become absolute ``file:`` URIs."""
    if "://" in path or path.startswith("file:"):
        return path
    return "file://" + os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def local_path(uri: str) -> str | None:
    """The local file system path of ``uri``, or None when it is on another file system."""
    if uri.startswith("file://"):
        return uri[len("file://") :]
    if uri.startswith("file:"):
        return uri[len("file:") :]
    return None if "://" in uri else os.path.abspath(uri)


def put_file(local: str, uri: str) -> None:
    """Copy a local file to ``uri`` without the JVM (for Python code on executors).

    Local and ``file:`` destinations get an atomic rename, so a retried or speculative
    task attempt never leaves a half-written file; other schemes go through pyarrow's
    file systems (``s3a://`` is read as ``s3://``).
    """
    target = local_path(uri)
    if target is not None:
        # The folder is made by the driver; a task still running after its job failed
        # (and the staging folder was removed) must not create it again.
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        shutil.copyfile(local, tmp)
        os.replace(tmp, target)
        return
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri.replace("s3a://", "s3://", 1))
    fs.copy_files(local, path, destination_filesystem=filesystem)


_SHIPPED: dict[tuple[str, str], str] = {}  # (application id, Spark file name) -> local path
_FILES_DIR: list[str] = []


def files_dir() -> str:
    """A driver-local folder that lives as long as the driver process: files shipped to
    executors stay there, since an executor fetches every shipped file when it runs its
    first task, possibly long after the stage that shipped them (an executor replaced
    after a failure, or added by dynamic allocation)."""
    if not _FILES_DIR:
        folder = tempfile.mkdtemp(prefix="adjoint-spark-files-")
        atexit.register(shutil.rmtree, folder, True)
        _FILES_DIR.append(folder)
    return _FILES_DIR[0]


def ship_file(spark: SparkSession, source: str, name: str) -> str:
    """Make the local file ``source`` a Spark file called ``name`` (``SparkFiles.get(name)``
    on executors), once per application; returns the path shipped.

    Spark keys its files by name and never replaces one, so ``name`` must be unique to the
    content (a checksum in it): shipping a name again is a no-op. The file is hard-linked
    into :func:`files_dir` (copied when it lies on another file system), so the caller may
    delete ``source`` and a later change of the file at ``source`` is not shipped.
    """
    sc = spark.sparkContext
    key = (sc.applicationId, name)
    if key in _SHIPPED and os.path.exists(_SHIPPED[key]):
        return _SHIPPED[key]
    path = os.path.join(files_dir(), name)
    if not os.path.exists(path):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, path)
    sc.addFile(path)
    _SHIPPED[key] = path
    logger.info("shipped %s to the executors as %s (%.1f MiB)",
                source, name, os.path.getsize(path) / 2**20)  # fmt: skip
    return path


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Storage:
    """Thin wrapper over ``org.apache.hadoop.fs.FileSystem`` for one Spark session."""

    spark: SparkSession

    def _fs(self, uri: str):
        jvm = self.spark._jvm
        path = jvm.org.apache.hadoop.fs.Path(to_uri(uri))
        conf = self.spark._jsc.hadoopConfiguration()
        fs = path.getFileSystem(conf)
        if fs.getScheme() == "file":
            # The raw local file system: no .crc side files next to published outputs,
            # and files written by faiss, torch or a user's editor read back as they are.
            fs = fs.getRawFileSystem()
        return fs, path

    def exists(self, uri: str) -> bool:
        fs, path = self._fs(uri)
        return bool(fs.exists(path))

    def delete(self, uri: str) -> None:
        fs, path = self._fs(uri)
        if fs.exists(path):
            fs.delete(path, True)

    def mkdirs(self, uri: str) -> None:
        fs, path = self._fs(uri)
        fs.mkdirs(path)

    def rename(self, src: str, dst: str) -> None:
        fs, src_path = self._fs(src)
        _, dst_path = self._fs(dst)
        if not fs.rename(src_path, dst_path):
            raise OSError(f"could not rename {src} to {dst}")

    def write_bytes(self, uri: str, data: bytes) -> None:
        fs, path = self._fs(uri)
        out = fs.create(path, True)
        try:
            out.write(bytearray(data))
        finally:
            out.close()

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self._fs(uri)
        length = int(fs.getFileStatus(path).getLen())
        stream = fs.open(path)
        try:
            buf = self.spark._jvm.java.io.ByteArrayOutputStream()
            self.spark._jvm.org.apache.hadoop.io.IOUtils.copyBytes(stream, buf, 1 << 20, False)
            data = bytes(buf.toByteArray())
        finally:
            stream.close()
        assert len(data) == length, f"short read of {uri}: {len(data)} of {length} bytes"
        return data

    def copy_to_local(self, uri: str, local: str) -> None:
        fs, path = self._fs(uri)
        fs.copyToLocalFile(False, path, self.spark._jvm.org.apache.hadoop.fs.Path(local), True)

    def copy_from_local(self, local: str, uri: str) -> None:
        fs, path = self._fs(uri)
        src = self.spark._jvm.org.apache.hadoop.fs.Path(to_uri(local))
        fs.copyFromLocalFile(False, True, src, path)

    def publish_json(self, uri: str, obj: object) -> None:
        """Replace the file ``uri`` with ``obj`` as JSON: written aside, then renamed."""
        tmp = f"{uri}.tmp-{uuid.uuid4().hex[:8]}"
        self.write_json(tmp, obj)
        old = f"{uri}.old-{uuid.uuid4().hex[:8]}"
        had_previous = self.exists(uri)
        if had_previous:
            self.rename(uri, old)
        self.rename(tmp, uri)
        if had_previous:
            self.delete(old)

    def write_json(self, uri: str, obj: object) -> None:
        self.write_bytes(uri, json.dumps(obj, indent=2, sort_keys=False).encode("utf-8"))

    def read_json(self, uri: str) -> object:
        try:
            return json.loads(self.read_bytes(uri).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{uri} is not valid JSON ({exc}): it is damaged") from None

    def list_dir(self, uri: str) -> list[str]:
        """Names of the entries directly under ``uri`` (none when it does not exist)."""
        fs, path = self._fs(uri)
        if not fs.exists(path):
            return []
        return sorted(str(status.getPath().getName()) for status in fs.listStatus(path))

    def list_files(self, uri: str) -> list[str]:
        """Data files under ``uri`` (a file, or a folder walked recursively), sorted;
        names starting with ``_`` or ``.`` are skipped as Hadoop does."""
        fs, path = self._fs(uri)
        if not fs.exists(path):
            return []
        status = fs.getFileStatus(path)
        if status.isFile():
            return [str(status.getPath().toString())]
        found = []
        files = fs.listFiles(path, True)
        while files.hasNext():
            item = files.next()
            name = item.getPath().getName()
            if not name.startswith(("_", ".")):
                found.append(str(item.getPath().toString()))
        return sorted(found)

    def fingerprint(self, uri: str, sample_bytes: int = 1 << 20) -> dict:
        """Size, modification time and a SHA-256 of the first and last ``sample_bytes``
        (the whole file when it is smaller than twice that)."""
        fs, path = self._fs(uri)
        status = fs.getFileStatus(path)
        size = int(status.getLen())
        digest = hashlib.sha256()
        stream = fs.open(path)
        try:
            digest.update(_read_range(self.spark, stream, 0, min(size, 2 * sample_bytes)))
            if size > 2 * sample_bytes:
                digest.update(_read_range(self.spark, stream, size - sample_bytes, sample_bytes))
        finally:
            stream.close()
        return {
            "path": str(status.getPath().toString()),
            "bytes": size,
            "modified_ms": int(status.getModificationTime()),
            "sha256_head_tail": digest.hexdigest(),
        }


def _read_range(spark: SparkSession, stream, offset: int, length: int) -> bytes:
    buf = spark._jvm.java.nio.ByteBuffer.allocate(length).array()
    stream.readFully(offset, buf)
    return bytes(buf)


class Staging:
    """A staging folder for one output, published whole by :meth:`publish`."""

    def __init__(self, storage: Storage, output: str, name: str):
        self.storage = storage
        self.output = output
        self.name = name
        self.run_id = uuid.uuid4().hex[:12]
        self.prefix = name.replace("/", "-")
        self.path = join(output, STAGING_DIR, f"{self.prefix}-{self.run_id}")
        self.final = join(output, name)

    def __enter__(self) -> Staging:
        self.recover()
        self.storage.mkdirs(self.path)
        return self

    def recover(self) -> None:
        """Clear what a killed run of this output left in ``_staging``.

        A run killed while writing leaves its staging folder: it is deleted. A run killed
        between the two renames of :meth:`publish` leaves the previous output aside as
        ``<name>-<id>-previous`` and nothing published: it is moved back first.
        """
        staging = join(self.output, STAGING_DIR)
        pattern = re.compile(rf"{re.escape(self.prefix)}-[0-9a-f]{{12}}(-previous)?")
        for entry in self.storage.list_dir(staging):
            match = pattern.fullmatch(entry)
            if match is None:
                continue
            path = join(staging, entry)
            if match.group(1) and not self.storage.exists(self.final):
                logger.warning("restoring %s from %s (a publish was interrupted)", self.final, path)
                self.storage.rename(path, self.final)
            else:
                logger.warning("removing %s, left by an interrupted run", path)
                self.storage.delete(path)

    def __exit__(self, exc_type, exc, tb) -> None:
        # A failed run drops its staging folder; the published output stays as it was.
        if exc_type is not None:
            try:
                self.storage.delete(self.path)
            except Exception:  # noqa: BLE001 - cleanup must not hide the original error
                logger.warning("could not remove staging folder %s", self.path)

    def publish(self) -> str:
        """Move the staging folder to its final name, replacing the previous output."""
        old = f"{self.path}-previous"
        had_previous = self.storage.exists(self.final)
        self.storage.mkdirs(self.final.rsplit("/", 1)[0])
        if had_previous:
            self.storage.rename(self.final, old)
        try:
            self.storage.rename(self.path, self.final)
        except Exception:
            if had_previous:
                self.storage.rename(old, self.final)
            raise
        if had_previous:
            self.storage.delete(old)
        logger.info("published %s", self.final)
        return self.final
