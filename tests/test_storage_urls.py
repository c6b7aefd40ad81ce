"""URLs: typos refused everywhere a URL enters, bucket URLs parsed once, SDKs as install extras."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import cloudckpt
from cloudckpt import open_storage
from cloudckpt.errors import InvalidURLError, MissingDependencyError
from cloudckpt.storage import check_url, join_url, split_url, url_scheme
from cloudckpt.storage.local import LocalStorage
from cloudckpt.storage.urls import BucketURL, parse_bucket_url

#: Each of these once wrote a directory called ``s3:`` (or ``gs:``...) into the working directory.
TYPOS = [
    "s3:/bucket/run",      # one slash
    "gs:/x",
    "s3:///ck",            # no bucket
    "gs:///ck",
    "s3://",               # f"s3://{bucket}" with an empty bucket
    "gs://",
    "s3:",                 # a bare scheme
    "s3:bucket/run",       # no slash at all
    "file:/tmp/run",       # file:// missing a slash
    "memory:/x",           # any fsspec protocol
    "S3:/Bucket/run",      # schemes are case-insensitive
    "://bucket/run",       # no scheme
    "newproto:/bucket/x",  # any word followed by ":/" looks like a URL missing a slash
]


@pytest.mark.parametrize("text", TYPOS)
def test_url_typos_are_refused_naming_the_text(text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for refuse in (check_url, url_scheme, open_storage, lambda t: split_url(f"{t}/ckpt-1")):
        with pytest.raises(InvalidURLError) as info:
            refuse(text)
        assert text in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing was written where the typo pointed


@pytest.mark.parametrize("text", ["s3:/bucket/run/ckpt", "s3:///ck/ckpt", "gs://"])
def test_the_public_api_refuses_typos_before_writing(text: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidURLError, match=r"URL|bucket"):
        cloudckpt.Checkpoint(w=np.zeros(3)).write(text)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", [
    "C:/runs/ckpt",        # a Windows drive letter is no scheme
    "C:\\runs\\ckpt",
    "runs/a:b/ckpt",       # a colon further in
    "run:v2/ckpt",         # a word that is no protocol, no slash after the colon
    "./s3:/bucket",        # the documented way to name a local directory called "s3:"
    "relative/dir",
])
def test_local_paths_with_colons_still_work(text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert check_url(text) == text
    assert url_scheme(text) == "file"
    store = open_storage(text)
    assert isinstance(store, LocalStorage)
    store.put("k", b"v")
    assert store.root == (tmp_path / text).absolute()  # on POSIX a backslash is part of a name
    assert (store.root / "k").read_bytes() == b"v"


def test_bucket_urls_are_parsed_in_one_place() -> None:
    assert parse_bucket_url("s3://bucket/a/b/") == BucketURL("s3", "bucket", "a/b/")
    assert parse_bucket_url("S3A://bucket") == BucketURL("s3a", "bucket", "")
    assert parse_bucket_url("gcs://b/p").root("gs") == "gs://b/p"
    assert parse_bucket_url("gs://b").root() == "gs://b"
    for bad in ("s3://b/a/../c", "gs://b/./c", "s3://b/a//c", "memory://b/x", "/local/path"):
        with pytest.raises(InvalidURLError, match=r"segment|not a bucket URL"):
            parse_bucket_url(bad)
    with pytest.raises(InvalidURLError, match="names no bucket"):
        parse_bucket_url("gs:///prefix")


def test_split_and_join() -> None:
    assert split_url("s3://b/run/ckpt-7") == ("s3://b/run", "ckpt-7")
    assert split_url("ckpt-7") == (".", "ckpt-7")
    assert split_url("runs/ckpt-7/") == ("runs", "ckpt-7")
    assert join_url("s3://b/run/", "ckpt-1") == "s3://b/run/ckpt-1"
    assert join_url("runs", "ckpt-1") == os.path.join("runs", "ckpt-1")
    with pytest.raises(InvalidURLError, match="names a bucket"):
        split_url("s3://bucket")


# ---------------------------------------------------------------------- SDKs as extras
@pytest.mark.parametrize(("url", "sdk", "extra"), [
    ("s3://bucket/run", "boto3", "s3"),
    ("s3a://bucket/run", "botocore", "s3"),
    ("gs://bucket/run", "google.cloud.storage", "gcs"),
])
def test_a_missing_sdk_names_its_extra(url: str, sdk: str, extra: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the SDK made unimportable, as on an install without the extra."""
    monkeypatch.setitem(sys.modules, sdk, None)  # ``import sdk`` now raises ImportError
    for module in ("cloudckpt.storage.s3", "cloudckpt.storage.gcs"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(MissingDependencyError) as info:
        open_storage(url)
    assert isinstance(info.value, ImportError)
    assert f"pip install 'cloudckpt[{extra}]'" in str(info.value)
    assert url in str(info.value) and info.value.url == url
    with pytest.raises(ImportError, match=rf"cloudckpt\[{extra}\]"):  # importing the backend directly, too
        __import__(f"cloudckpt.storage.{'s3' if extra == 's3' else 'gcs'}")


def test_local_and_fsspec_need_no_cloud_sdk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for sdk in ("boto3", "botocore", "google.cloud.storage"):
        monkeypatch.setitem(sys.modules, sdk, None)
    for module in ("cloudckpt.storage.s3", "cloudckpt.storage.gcs"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    open_storage(tmp_path).put("k", b"local")
    open_storage("memory://no-sdk/run").put("k", b"memory")
    assert open_storage(tmp_path).get("k") == b"local"
