"""URIs to filesystems: a local path or ``s3://bucket/key``, and the few operations we need.

This is the one module that parses URIs. Everything else passes URIs around and calls
:func:`resolve` (for a ``pyarrow.fs`` filesystem and path, e.g. for Ray Data) or the helpers
below.

S3 settings come only from the standard AWS environment and files, never from our own flags:
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (``http://host:port`` for a private endpoint,
e.g. SeaweedFS or MinIO), ``AWS_DEFAULT_REGION`` / ``AWS_REGION``; ``endpoint_url`` and
``region`` of the active profile in ``~/.aws/config`` are honoured too.

Credentials are resolved where they are used: the filesystem carries the endpoint and region
only, and every process (driver, Ray Data task, Ray Train worker) resolves keys through the
AWS SDK's standard chain in its own environment: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and the shared credentials
file, web identity (EKS IRSA: ``AWS_WEB_IDENTITY_TOKEN_FILE`` + ``AWS_ROLE_ARN``), container
and instance roles. So a pickled filesystem (a Ray Data read task, Ray Train's
``RunConfig(storage_filesystem)``) holds no key value, a node uses its own role, and temporary
credentials are refreshed by the SDK instead of being frozen into a long run. Timeouts are short
(``MASKRAY_S3_CONNECT_TIMEOUT``, default 3 s) so an unreachable endpoint fails in seconds.

Every failure is a :class:`StorageError` whose one-line message names the URI, e.g.
``s3://b/x: access denied (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)``.
"""

from __future__ import annotations

import configparser
import hashlib
import logging
import os
import posixpath
import tempfile
import threading
from collections.abc import Iterable
from urllib.parse import urlparse

import pyarrow.fs as pafs

from model.errors import MaskrayError

log = logging.getLogger(__name__)

S3_PREFIX = "s3://"


class StorageError(MaskrayError, OSError):
    """A URI could not be read, written or listed; the message names the URI and the cause."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_PREFIX)


def _split_s3(uri: str) -> tuple[str, str]:
    rest = str(uri)[len(S3_PREFIX):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name in S3 URI (expected s3://bucket/key)")
    return bucket, key.strip("/")


# ---------------------------------------------------------------------------------------------
# S3 configuration from the standard AWS environment


def _profile_setting(name: str) -> str | None:
    """``name`` from the active profile in ``AWS_CONFIG_FILE`` (default ``~/.aws/config``)."""
    path = os.environ.get("AWS_CONFIG_FILE") or os.path.expanduser("~/.aws/config")
    if not os.path.isfile(path):
        return None
    profile = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"
    parser = configparser.RawConfigParser()
    try:
        parser.read(path)
    except configparser.Error:
        return None
    for section in (f"profile {profile}", profile):
        if parser.has_option(section, name):
            return parser.get(section, name).strip() or None
    return None


def s3_settings() -> dict:
    """Keyword arguments for ``pyarrow.fs.S3FileSystem`` derived from the AWS environment."""
    env = os.environ
    kwargs: dict = {}
    endpoint = (env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
                or _profile_setting("endpoint_url"))
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StorageError(f"AWS_ENDPOINT_URL={endpoint!r}: expected http(s)://host[:port]")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or _profile_setting("region")
    # Without a region the SDK probes the bucket's region (slow, and wrong for private endpoints).
    kwargs["region"] = region or "us-east-1"
    # invariant: no credential here. pyarrow pickles explicit keys with the filesystem (checked:
    # access_key/secret_key/session_token appear verbatim in pickle.dumps), so they would ride
    # along into every Ray task and override the nodes' own roles; without them each process
    # resolves credentials through the SDK's default chain when it connects.
    kwargs["connect_timeout"] = float(env.get("MASKRAY_S3_CONNECT_TIMEOUT", "3"))
    kwargs["request_timeout"] = float(env.get("MASKRAY_S3_REQUEST_TIMEOUT", "60"))
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(
        max_attempts=int(env.get("MASKRAY_S3_MAX_ATTEMPTS", "3")))
    return kwargs


_fs_cache: dict[tuple, pafs.FileSystem] = {}
_fs_lock = threading.Lock()


_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                    "AWS_SHARED_CREDENTIALS_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN")


def _credential_fingerprint() -> str:
    """A digest of the credential variables: a new filesystem when they change in-process
    (the values themselves are never stored)."""
    h = hashlib.sha256()
    for name in _CREDENTIAL_VARS:
        h.update(f"{name}={os.environ.get(name, '')}\0".encode())
    return h.hexdigest()


def s3_filesystem() -> pafs.S3FileSystem:
    """The S3 filesystem for the current environment (cached per distinct settings and
    credential environment). It carries endpoint and region, never keys (module docstring)."""
    kwargs = s3_settings()
    cache_key = tuple(sorted((k, repr(v)) for k, v in kwargs.items() if k != "retry_strategy"))
    cache_key += (("credentials", _credential_fingerprint()),)
    with _fs_lock:
        fs = _fs_cache.get(cache_key)
        if fs is None:
            fs = pafs.S3FileSystem(**kwargs)
            _fs_cache[cache_key] = fs
        return fs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a URI: ``s3://b/k`` -> (S3FileSystem, ``"b/k"``); a local
    path -> (LocalFileSystem, absolute path)."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        return s3_filesystem(), f"{bucket}/{key}" if key else bucket
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported URI scheme (use a local path or s3://bucket/key)")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Append path parts to a URI (``/`` separated on S3, ``os.path.join`` locally)."""
    uri = str(uri)
    if is_s3(uri):
        out = uri.rstrip("/")
        for part in parts:
            part = str(part).strip("/")
            if part:
                out = f"{out}/{part}"
        return out
    return os.path.join(uri, *[str(p) for p in parts])


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """The URI for a ``(filesystem, path)`` pair from :func:`resolve`."""
    return f"{S3_PREFIX}{path}" if isinstance(fs, pafs.S3FileSystem) else path


def relative(uri: str, prefix_uri: str) -> str:
    """``uri`` relative to ``prefix_uri`` (``/`` separated)."""
    uri, prefix = str(uri), str(prefix_uri)
    if is_s3(uri):
        return posixpath.relpath(uri[len(S3_PREFIX):], prefix.rstrip("/")[len(S3_PREFIX):])
    return os.path.relpath(uri, prefix).replace(os.sep, "/")


# ---------------------------------------------------------------------------------------------
# Error translation


def _bucket_exists(fs: pafs.FileSystem, bucket: str) -> bool | None:
    try:
        return fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError:
        return None


def storage_error(uri: str, exc: BaseException) -> StorageError:
    """Translate an exception from pyarrow/the OS into a one-line :class:`StorageError`."""
    if isinstance(exc, StorageError):
        return exc
    text = " ".join(str(exc).split())
    low = text.lower()
    if is_s3(uri):
        endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                    or "the default AWS endpoint")
        if any(s in low for s in ("access_denied", "access denied", "accessdenied",
                                  "invalidaccesskeyid", "invalid_access_key_id",
                                  "signature_does_not_match", "signaturedoesnotmatch",
                                  "forbidden", "http response code: 403", "code: 403")):
            reason = "access denied (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
        elif any(s in low for s in ("no_such_bucket", "nosuchbucket", "bucket does not exist",
                                    "bucket not found")):
            reason = f"bucket '{_split_s3(uri)[0]}' does not exist"
        elif any(s in low for s in ("network_connection", "couldn't connect", "could not connect",
                                    "connection refused", "timeout was reached", "timed out",
                                    "resolve host", "curlcode: 6", "curlcode: 7",
                                    "curlcode: 28", "unable to connect")):
            reason = f"cannot reach the S3 endpoint {endpoint} (check AWS_ENDPOINT_URL)"
        elif "no response body" in low and "404" in low or "not found" in low \
                or "does not exist" in low or isinstance(exc, FileNotFoundError):
            reason = "not found"
            try:
                fs = s3_filesystem()
                if _bucket_exists(fs, _split_s3(uri)[0]) is False:
                    reason = f"bucket '{_split_s3(uri)[0]}' does not exist"
            except Exception:  # noqa: BLE001 - best effort refinement of the message
                pass
        else:
            reason = text or type(exc).__name__
        return StorageError(f"{uri}: {reason}")
    if isinstance(exc, FileNotFoundError) or "does not exist" in low or "no such file" in low:
        return StorageError(f"{uri}: not found")
    if isinstance(exc, PermissionError) or "permission denied" in low:
        return StorageError(f"{uri}: permission denied")
    if isinstance(exc, IsADirectoryError) or "is a directory" in low:
        return StorageError(f"{uri}: is a directory, expected a file")
    return StorageError(f"{uri}: {text or type(exc).__name__}")


# ---------------------------------------------------------------------------------------------
# Operations


def read_bytes(uri: str) -> bytes:
    """The whole object/file at ``uri``."""
    fs, path = resolve(uri)
    try:
        if isinstance(fs, pafs.S3FileSystem):
            # open_input_stream skips the HEAD request; a missing key fails on the first read.
            with fs.open_input_stream(path) as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except Exception as exc:  # noqa: BLE001 - translated to one line naming the URI
        raise storage_error(uri, exc) from exc


def write_bytes(uri: str, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``uri`` atomically: a reader sees the old object or the whole new one.

    Locally: a temporary file in the same folder, fsync (unless ``fsync=False``, for bulk
    writes of small files that may be redone), then ``os.replace``. The file gets ordinary
    permissions (``0o666`` minus the umask, typically 0644), not ``mkstemp``'s 0600, so shards,
    manifests and results on shared storage are readable by the group/others the umask allows. On S3 a PUT (or a multipart
    upload) only becomes visible when complete, so one upload of the finished bytes.
    """
    fs, path = resolve(uri)
    try:
        if isinstance(fs, pafs.S3FileSystem):
            with fs.open_output_stream(path) as f:
                f.write(data)
            return
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        try:
            os.fchmod(fd, 0o666 & ~process_umask())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except Exception as exc:  # noqa: BLE001
        raise storage_error(uri, exc) from exc


_umask: int | None = None


def process_umask() -> int:
    """This process's umask (read once: ``os.umask`` can only be read by setting it, so the
    brief set-and-restore happens under a lock, once, instead of on every write)."""
    global _umask
    if _umask is None:
        with _fs_lock:
            if _umask is None:
                current = os.umask(0o022)
                os.umask(current)
                _umask = current
    return _umask


def exists(uri: str) -> bool:
    """Whether a file/object (or a folder/prefix) exists at ``uri``."""
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except Exception as exc:  # noqa: BLE001
        raise storage_error(uri, exc) from exc


def size(uri: str) -> int:
    """Size in bytes of the file/object at ``uri``."""
    fs, path = resolve(uri)
    try:
        info = fs.get_file_info(path)
    except Exception as exc:  # noqa: BLE001
        raise storage_error(uri, exc) from exc
    if info.type != pafs.FileType.File:
        raise storage_error(uri, FileNotFoundError(path))
    return int(info.size)


def list_files(prefix_uri: str, suffixes: Iterable[str] | None = None) -> list[str]:
    """Sorted URIs of all files under ``prefix_uri`` (recursive; paginates past 1,000 keys).

    ``suffixes`` (e.g. ``(".jpg", ".png")``, case-insensitive) keeps only matching names. A
    missing local folder or an empty prefix gives ``[]``; a missing bucket is an error.
    """
    return [uri for uri, _ in list_file_sizes(prefix_uri, suffixes)]


def list_file_sizes(prefix_uri: str,
                    suffixes: Iterable[str] | None = None) -> list[tuple[str, int]]:
    """Sorted ``(uri, size in bytes)`` of all files under ``prefix_uri`` (as :func:`list_files`;
    the sizes come with the listing, no extra request)."""
    fs, path = resolve(prefix_uri)
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    try:
        if isinstance(fs, pafs.S3FileSystem):
            bucket = path.split("/", 1)[0]
            if _bucket_exists(fs, bucket) is False:
                raise StorageError(f"{prefix_uri}: bucket '{bucket}' does not exist")
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            infos = [info]
        else:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except Exception as exc:  # noqa: BLE001
        raise storage_error(prefix_uri, exc) from exc
    out = []
    for item in infos:
        if item.type != pafs.FileType.File:
            continue
        if wanted and not item.path.lower().endswith(wanted):
            continue
        out.append((to_uri(fs, item.path), int(item.size or 0)))
    return sorted(out)


def delete(uri: str, *, missing_ok: bool = True) -> None:
    """Delete the file/object at ``uri``."""
    fs, path = resolve(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        if not missing_ok:
            raise StorageError(f"{uri}: not found") from None
    except Exception as exc:  # noqa: BLE001
        err = storage_error(uri, exc)
        if missing_ok and str(err).endswith(": not found"):
            return
        raise err from exc


def makedirs(uri: str) -> None:
    """Create a local folder (no-op on S3, where prefixes need no creation)."""
    if not is_s3(uri):
        fs, path = resolve(uri)
        os.makedirs(path, exist_ok=True)


def check_access(uri: str) -> None:
    """Fail early with a clear :class:`StorageError` if ``uri``'s bucket is unusable.

    On S3 this lists one key under the URI (checks endpoint, credentials and bucket). Locally
    it is a no-op.
    """
    if not is_s3(uri):
        return
    fs, path = resolve(uri)
    bucket = path.split("/", 1)[0]
    try:
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise StorageError(f"{uri}: bucket '{bucket}' does not exist")
        fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except Exception as exc:  # noqa: BLE001
        raise storage_error(uri, exc) from exc
