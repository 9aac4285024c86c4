"""pipeline.storage: URI parsing, S3 settings from the AWS environment, local operations."""

import os
import pickle
import stat

import pyarrow.fs as pafs
import pytest

from pipeline import storage


@pytest.fixture
def clean_aws_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("AWS_") or name.startswith("MASKRAY_S3_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    return monkeypatch


def test_resolve_local_and_s3(clean_aws_env, tmp_path):
    fs, path = storage.resolve(str(tmp_path / "a" / "b.parquet"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a" / "b.parquet")
    fs, path = storage.resolve("s3://bucket/some/key.parquet")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/some/key.parquet"
    assert storage.resolve("s3://bucket")[1] == "bucket"
    with pytest.raises(storage.StorageError, match=r"^gs://b/x: unsupported URI scheme"):
        storage.resolve("gs://b/x")
    with pytest.raises(storage.StorageError, match="no bucket name"):
        storage.resolve("s3:///key")


def test_join_and_relative(tmp_path):
    assert storage.join("s3://b/p/", "q", "/r.txt") == "s3://b/p/q/r.txt"
    assert storage.join(str(tmp_path), "x", "y") == os.path.join(str(tmp_path), "x", "y")
    assert storage.relative("s3://b/p/q/r.png", "s3://b/p/") == "q/r.png"
    assert storage.relative(str(tmp_path / "a" / "b.png"), str(tmp_path)) == "a/b.png"


def test_s3_settings_from_standard_env(clean_aws_env):
    clean_aws_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    clean_aws_env.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    clean_aws_env.setenv("AWS_ACCESS_KEY_ID", "k")
    clean_aws_env.setenv("AWS_SECRET_ACCESS_KEY", "s")
    s = storage.s3_settings()
    assert s["endpoint_override"] == "127.0.0.1:9000" and s["scheme"] == "http"
    assert s["region"] == "eu-west-3"
    # keys are resolved by each process through the AWS chain, never carried by the filesystem
    assert not {"access_key", "secret_key", "session_token"} & set(s)
    assert s["connect_timeout"] <= 5
    # the S3-specific variable wins over the generic one
    clean_aws_env.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.com")
    s = storage.s3_settings()
    assert s["endpoint_override"] == "s3.example.com" and s["scheme"] == "https"


def test_s3_settings_defaults_and_profile(clean_aws_env, tmp_path):
    s = storage.s3_settings()
    assert "endpoint_override" not in s and "access_key" not in s and s["region"] == "us-east-1"
    (tmp_path / "aws-config").write_text(
        "[profile lab]\nendpoint_url = http://10.0.0.5:8333\nregion = ap-south-1\n")
    clean_aws_env.setenv("AWS_PROFILE", "lab")
    s = storage.s3_settings()
    assert s["endpoint_override"] == "10.0.0.5:8333" and s["region"] == "ap-south-1"
    clean_aws_env.setenv("AWS_ENDPOINT_URL", "ftp://nope")
    with pytest.raises(storage.StorageError, match="AWS_ENDPOINT_URL"):
        storage.s3_settings()


def test_local_operations(tmp_path):
    root = str(tmp_path / "data")
    a = storage.join(root, "sub", "a.PNG")
    storage.write_bytes(a, b"one")
    storage.write_bytes(storage.join(root, "b.txt"), b"two")
    storage.write_bytes(storage.join(root, "sub", "deeper", "c.jpg"), b"three")
    assert storage.read_bytes(a) == b"one" and storage.size(a) == 3
    assert storage.exists(a) and storage.exists(root) and not storage.exists(a + ".x")
    assert storage.list_files(root) == sorted([a, storage.join(root, "b.txt"),
                                               storage.join(root, "sub", "deeper", "c.jpg")])
    assert storage.list_files(root, suffixes=[".png", ".jpg"]) == sorted(
        [a, storage.join(root, "sub", "deeper", "c.jpg")])
    assert storage.list_files(str(tmp_path / "missing")) == []
    storage.write_bytes(a, b"replaced")
    assert storage.read_bytes(a) == b"replaced"
    # no temporary files left next to the target
    assert sorted(os.listdir(os.path.dirname(a))) == ["a.PNG", "deeper"]
    storage.delete(a)
    assert not storage.exists(a)
    storage.delete(a)  # missing_ok
    with pytest.raises(storage.StorageError, match="not found"):
        storage.delete(a, missing_ok=False)


def test_local_errors_name_the_uri(tmp_path):
    missing = str(tmp_path / "nope.bin")
    with pytest.raises(storage.StorageError) as info:
        storage.read_bytes(missing)
    assert str(info.value) == f"{missing}: not found"
    with pytest.raises(storage.StorageError, match="is a directory"):
        storage.read_bytes(str(tmp_path))


def test_failed_local_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = str(tmp_path / "x.bin")
    storage.write_bytes(target, b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "replace", boom)
    with pytest.raises(storage.StorageError, match=r"x\.bin: disk full"):
        storage.write_bytes(target, b"new")
    assert open(target, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["x.bin"]


def test_pickled_s3_filesystem_holds_no_key_values(clean_aws_env):
    key, secret, token = "AKIAMASKRAYKEY00001", "maskray-secret-value-xyz", "maskray-session-tok"
    clean_aws_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    clean_aws_env.setenv("AWS_ACCESS_KEY_ID", key)
    clean_aws_env.setenv("AWS_SECRET_ACCESS_KEY", secret)
    clean_aws_env.setenv("AWS_SESSION_TOKEN", token)
    fs, _ = storage.resolve("s3://bucket/prefix")
    blob = pickle.dumps(fs)  # what Ray ships to tasks and to RunConfig(storage_filesystem)
    assert b"127.0.0.1:9" in blob  # the endpoint travels
    for value in (key, secret, token):
        assert value.encode() not in blob
    # new credentials in this process -> a new filesystem (the cache never reuses stale keys)
    clean_aws_env.setenv("AWS_SECRET_ACCESS_KEY", "rotated")
    assert storage.resolve("s3://bucket/prefix")[0] is not fs


def test_written_files_get_ordinary_permissions(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "_umask", None)
    old = os.umask(0o022)
    try:
        target = str(tmp_path / "out" / "part-00000.parquet")
        storage.write_bytes(target, b"x")
        storage.write_bytes(str(tmp_path / "manifest.json"), b"{}", fsync=False)
    finally:
        os.umask(old)
        storage._umask = None
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "manifest.json").st_mode) == 0o644
    monkeypatch.setattr(storage, "_umask", 0o077)  # a private umask is honoured too
    storage.write_bytes(target, b"y")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
