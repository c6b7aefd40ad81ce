"""The benchmark's S3 throttle (bench/throttle_proxy.py) in front of SeaweedFS: it throttles per
partition and per request class, answers S3's own ``503 SlowDown``, and counts what it did.

The rates are tiny (one token per thousand seconds), so what passes is the burst alone and
every count is exact whatever the machine's speed - nothing here depends on timing.
"""

from __future__ import annotations

import http.client
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.exceptions as bce
import pytest
import servers
from botocore.config import Config

from bench.throttle_proxy import PartitionRule, ThrottleProxy, key_kind

SLOW = 0.001  # tokens per second: nothing refills during a test


@pytest.fixture(scope="module")
def bucket(seaweedfs: servers.Server) -> str:
    name = f"throttle-{uuid.uuid4().hex[:8]}"
    servers.create_bucket(seaweedfs.endpoint, name)
    return name


@pytest.fixture
def proxy(seaweedfs: servers.Server) -> Iterator[ThrottleProxy]:
    rule = PartitionRule(directories=("run/",), chars=len("ckpt-1.data-"))
    with ThrottleProxy(seaweedfs.endpoint, write_rate=SLOW, read_rate=SLOW, burst=3000, rule=rule) as p:
        yield p  # capacity = rate * burst = 3 requests per partition and class


def client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, config=Config(retries={"total_max_attempts": 1},
                                                                   s3={"addressing_style": "path"}))


def test_writes_above_the_partition_limit_get_slowdown_and_other_partitions_do_not(
        proxy: ThrottleProxy, bucket: str) -> None:
    s3 = client(proxy.endpoint)
    outcomes = []
    for i in range(8):  # today's layout: every data object of a checkpoint shares one partition
        try:
            s3.put_object(Bucket=bucket, Key=f"run/ckpt-1.data-{i:05d}-of-00008.abc", Body=b"x" * 10)
            outcomes.append("ok")
        except bce.ClientError as exc:
            assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 503
            outcomes.append(exc.response["Error"]["Code"])
    assert outcomes == ["ok"] * 3 + ["SlowDown"] * 5
    # Another checkpoint's data, and a hashed sub-prefix, are partitions of their own.
    s3.put_object(Bucket=bucket, Key="run/ckpt-2.data-00000-of-00001.abc", Body=b"y")
    s3.put_object(Bucket=bucket, Key="run/ab/ckpt-1.data-00000", Body=b"z")
    # Reads have their own buckets: the throttled writes did not use them up.
    assert s3.get_object(Bucket=bucket, Key="run/ckpt-1.data-00000-of-00008.abc")["Body"].read() == b"x" * 10

    summary = proxy.summary()
    data = summary.partitions[f"{bucket}/run/ckpt-1.data-"]
    assert (data.requests["write"], data.throttled["write"]) == (8, 5)
    assert (data.requests["read"], data.throttled["read"]) == (1, 0)
    assert summary.partitions[f"{bucket}/run/ckpt-2.data-"].throttled["write"] == 0
    assert f"{bucket}/run/ab/ckpt-1.da" in summary.partitions
    assert summary.throttled == 5 and summary.requests == 11
    assert summary.bytes_written == 3 * 10 + 1 + 1  # accepted bodies only
    busiest = summary.busiest("write")
    assert busiest[0] == f"{bucket}/run/ckpt-1.data-"
    assert 1 <= busiest[2] <= 3  # the busiest wall-clock second holds at most the 3 accepted writes


def test_the_slowdown_answer_is_s3s_and_never_reaches_the_server(proxy: ThrottleProxy, bucket: str) -> None:
    host = urlsplit(proxy.endpoint)
    key = f"run/ckpt-9.index-{uuid.uuid4().hex[:6]}"
    statuses = []
    for _ in range(4):  # unsigned requests: SeaweedFS would refuse them (403), the throttle answers first
        conn = http.client.HTTPConnection(host.hostname or "", host.port, timeout=10)
        conn.request("PUT", f"/{bucket}/{key}", body=b"data")
        response = conn.getresponse()
        body = response.read()
        statuses.append(response.status)
        conn.close()
    assert statuses[3] == 503 and 503 not in statuses[:3]
    error = ET.fromstring(body)
    assert error.tag == "Error" and error.findtext("Code") == "SlowDown"
    assert error.findtext("Message") == "Please reduce your request rate."
    assert error.findtext("RequestId")
    assert response.getheader("Content-Type") == "application/xml"

    s3 = client(proxy.endpoint)
    heads = []
    for _ in range(4):  # HEAD: S3 sends no body, so botocore sees only the status
        try:
            s3.head_object(Bucket=bucket, Key="run/ckpt-1.index")
            heads.append("found")
        except bce.ClientError as exc:
            heads.append(exc.response["Error"]["Code"])
    assert heads == ["404"] * 3 + ["503"]
    summary = proxy.summary()
    assert summary.index_gets == 3 and summary.index_gets_throttled == 1  # HEADs of an index object


def test_partition_rule_and_key_kinds() -> None:
    rule = PartitionRule(directories=("a/", "a/run/"), chars=4)
    assert rule.partition("b", "a/run/ckpt-7.data-1") == "b/a/run/ckpt"  # the longest directory wins
    assert rule.partition("b", "a/x/y") == "b/a/x/y"
    assert rule.partition("b", "elsewhere/z") == "b/else"
    assert [key_kind(k) for k in ("r/ckpt-1.index", "r/c/.metadata", "r/ckpt-1.data-00001-of-00002.s",
                                  "r/c/__3_0.distcp", "r/checkpoint")] == ["index", "index", "data", "data", "other"]
    with pytest.raises(ValueError):
        PartitionRule(directories=("no-slash",))
