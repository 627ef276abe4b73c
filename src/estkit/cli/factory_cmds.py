"""Factory commands: ``factory provision`` requests bootstrap certificates from the REST API.

The key is made where this runs and never leaves it: only the CSR goes to
``POST {api}/api/v1/cas/{label}/certificates``. The answer is checked (the
certificate is for the key, has CN = device id, and chains to the trust anchor)
before ``key.pem`` (0600), ``cert.pem`` and ``chain.pem`` are written
atomically. ``--batch devices.csv`` does a production line: one directory per
device, past individual failures, with a result CSV and a non-zero exit when
any device failed. A device whose ``cert.pem`` exists is skipped (``--force``
replaces it), so a line can simply be run again.

Errors of the API client (``ApiError``):

ApiError
├── ApiConnectionError   transport or TLS failure, after the retries
├── ApiHttpError         an error status (``status``, ``detail``)
└── ApiAnswerError       a 201 whose body or certificate is not usable
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import random
import re
import ssl
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, TextIO
from urllib.parse import quote

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from estkit import __version__
from estkit.cli.args import non_negative_int, positive_number
from estkit.cli.errors import CliError
from estkit.cli.files import OutputFile, write_files_atomically
from estkit.client import (
    IssuedCertificate,
    IssuedCertificateError,
    TrustAnchor,
    TrustAnchorError,
    check_issued,
    retry,
    tls,
)
from estkit.client.errors import one_line
from estkit.fileio import PRIVATE
from estkit.pki import certs, keys, names
from estkit.pki.csr import build_csr
from estkit.pki.errors import PkiError

TOKEN_ENV: Final = "ESTKIT_API_TOKEN"  # noqa: S105 - the name of a variable, not a secret
USER_AGENT: Final = f"estkit/{__version__}"
# The API's answer is a certificate and a short chain.
MAX_BODY: Final = 1 << 20
TRANSIENT_STATUSES: Final = frozenset({502, 503, 504})
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VALIDITY = re.compile(r"^(\d+)([smhdwy])$")
_DNS_NAME = re.compile(r"^(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_-]+)*\.?$")
RESULT_FIELDS: Final = ("device_id", "status", "serial", "not_after", "error")

Status = Literal["ok", "failed", "exists"]


# -- the API client ------------------------------------------------------------------


class ApiError(Exception):
    """Root of the provisioning API client's errors; ``str`` is one line."""


class ApiConnectionError(ApiError):
    """The API could not be reached, or TLS failed."""


class ApiHttpError(ApiError):
    """The API answered with an error status; ``detail`` is its one-line reason."""

    def __init__(self, status: int, detail: str) -> None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "error"
        super().__init__(f"HTTP {status} {phrase}" + (f": {detail}" if detail else ""))
        self.status = status
        self.detail = detail


class ApiAnswerError(ApiError):
    """A success answer that is not what the API promises, or a certificate that fails checks."""


@dataclass(frozen=True, slots=True)
class IssuedAnswer:
    """The API's 201 body, certificates decoded (not yet checked)."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    serial: str | None


class ProvisioningApi:
    """The factory call of the estkit REST API, with bearer auth and retries.

    Transient failures (connect errors, timeouts, 502/503/504) are retried
    ``retries`` times with exponential backoff and full jitter (or the
    server's ``Retry-After``, capped); a 4xx is never retried. A retry after a
    timeout may get a second certificate for the same device: harmless, the
    device only ever has the key of the one that was written.
    """

    def __init__(
        self,
        api: str,
        *,
        token: str,
        trust: TrustAnchor | None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.origin = api_origin(api)
        check_token(token)
        if timeout <= 0 or retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError("timeout must be positive, retries and backoff not negative")
        if trust is not None:
            context = tls.verified_context(trust.certificates)
        else:
            context = ssl.create_default_context()  # the system store
            context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._retries = retries
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._http = httpx.Client(
            verify=context,
            transport=transport,
            timeout=httpx.Timeout(timeout),
            trust_env=False,  # no proxies or .netrc picked up behind our back
            follow_redirects=False,  # a redirect must not carry the token elsewhere
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/json",
                "User-Agent": USER_AGENT,
            },
        )

    def __enter__(self) -> ProvisioningApi:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def certificates_url(self, label: str) -> str:
        return f"{self.origin}/api/v1/cas/{quote(label, safe='')}/certificates"

    def issue(
        self,
        label: str,
        *,
        device_id: str,
        csr: x509.CertificateSigningRequest,
        validity: str | None = None,
        sans: Sequence[str] = (),
    ) -> IssuedAnswer:
        """``POST /api/v1/cas/{label}/certificates``: the certificate the CA signed for ``csr``."""
        body: dict[str, Any] = {
            "device_id": device_id,
            "csr": csr.public_bytes(Encoding.PEM).decode("ascii"),
        }
        if validity is not None:
            body["validity"] = validity
        if sans:
            body["sans"] = list(sans)
        status, answer = self._post(self.certificates_url(label), body)
        if status != 201:
            raise ApiAnswerError(f"unexpected HTTP {status} (expected 201)")
        return _issued_answer(answer)

    def _post(self, url: str, body: Mapping[str, Any]) -> tuple[int, bytes]:
        content = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        failures = 0
        while True:
            try:
                status, headers_in, answer = self._attempt(url, content, headers)
            except httpx.TransportError as exc:
                if not retry.is_transient_error(exc) or failures >= self._retries:
                    raise _connection_error(url, exc, attempts=failures + 1) from exc
                self._sleep(self._delay(failures, None))
                failures += 1
                continue
            if 200 <= status < 300:
                return status, answer
            if status in TRANSIENT_STATUSES and failures < self._retries:
                after = retry.parse_retry_after(
                    headers_in.get("retry-after"), now=dt.datetime.now(dt.UTC)
                )
                self._sleep(self._delay(failures, after))
                failures += 1
                continue
            raise ApiHttpError(status, _detail(headers_in, answer))

    def _attempt(
        self, url: str, content: bytes, headers: Mapping[str, str]
    ) -> tuple[int, httpx.Headers, bytes]:
        with self._http.stream("POST", url, content=content, headers=headers) as response:
            body = bytearray()
            try:
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_BODY:
                        raise ApiAnswerError(f"answer larger than {MAX_BODY} bytes")
            except httpx.DecodingError as exc:
                raise ApiAnswerError(f"answer cannot be decoded: {exc}") from exc
            return response.status_code, response.headers, bytes(body)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self._max_backoff)
        return retry.backoff_delay(
            attempt, base=self._backoff, cap=self._max_backoff, rng=self._rng
        )


def api_origin(api: str) -> str:
    """``https://host[:port]`` from ``--api`` (a trailing slash allowed); ``ValueError`` else."""
    try:
        url = httpx.URL(api.strip())
    except httpx.InvalidURL as exc:
        raise ValueError(f"not a URL: {api!r}") from exc
    if url.scheme != "https" or not url.host:
        raise ValueError(f"expected the server origin https://host[:port], got {api!r}")
    if url.userinfo or url.query or url.fragment or url.path not in ("", "/"):
        raise ValueError(f"expected only the origin https://host[:port], got {api!r}")
    return str(url.copy_with(path="/")).rstrip("/")


def check_token(token: str) -> None:
    """A bearer token is one word of printable ASCII (it goes into a header)."""
    if not token:
        raise ValueError("the API token is empty")
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError("the API token must be one word of printable ASCII")


def _issued_answer(body: bytes) -> IssuedAnswer:
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ApiAnswerError("answer is not JSON") from exc
    if not isinstance(answer, dict):
        raise ApiAnswerError("answer is not a JSON object")
    pem, chain_pem, serial = (
        answer.get("certificate"),
        answer.get("chain", ""),
        answer.get("serial"),
    )
    if not isinstance(pem, str) or not pem.strip():
        raise ApiAnswerError("answer has no certificate")
    if not isinstance(chain_pem, str):
        raise ApiAnswerError("answer's chain is not a PEM string")
    if serial is not None and not isinstance(serial, str):
        raise ApiAnswerError("answer's serial is not a string")
    try:
        leaf, *extra = certs.load_pem_certificates(pem.encode())
        chain = certs.load_pem_certificates(chain_pem.encode()) if chain_pem.strip() else []
    except PkiError as exc:
        raise ApiAnswerError(f"answer: {exc}") from exc
    return IssuedAnswer(certificate=leaf, chain=(*extra, *chain), serial=serial)


def _detail(headers: httpx.Headers, body: bytes) -> str:
    """The one-line reason of an error answer: JSON ``detail`` (FastAPI's list too), or text."""
    text = body.decode("utf-8", "replace")
    if "json" in headers.get("content-type", ""):
        try:
            detail = json.loads(text).get("detail")
        except (ValueError, AttributeError, RecursionError):
            detail = None
        if isinstance(detail, str):
            return one_line(detail)
        if isinstance(detail, list):  # a validation error: [{"loc": [...], "msg": "..."}]
            parts = [
                f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg', '')}"
                if isinstance(d, dict)
                else str(d)
                for d in detail
            ]
            return one_line("; ".join(parts))
    return one_line(text) if headers.get("content-type", "").startswith("text/plain") else ""


def _connection_error(url: str, exc: httpx.TransportError, *, attempts: int) -> ApiConnectionError:
    failure = retry.tls_failure(exc)
    if isinstance(failure, ssl.SSLCertVerificationError):
        detail = f"TLS verification failed: {failure.verify_message or failure.reason}"
    elif failure is not None:
        detail = f"TLS failed: {failure.reason or failure}"
    else:
        detail = one_line(str(exc) or type(exc).__name__)
    tries = f" (after {attempts} attempts)" if attempts > 1 else ""
    return ApiConnectionError(f"{url}: {detail}{tries}")


# -- provisioning one device -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceRequest:
    """One device to provision: its id (the CN) and DNS names for the SAN."""

    device_id: str
    dns: tuple[str, ...] = ()
    line: int | None = None  # in the batch file


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one device, as a row of the result CSV."""

    device_id: str
    status: Status
    serial: str = ""
    not_after: str = ""
    error: str = ""


def check_device_id(device_id: str) -> None:
    """As the server checks it, and a plain directory name: ``ValueError`` otherwise."""
    names.check_device_id(device_id)
    if device_id in (".", ".."):
        raise ValueError(f"device id may not be {device_id!r}")


def check_dns_name(name: str) -> None:
    if len(name) > 253 or not name.isascii() or not _DNS_NAME.match(name):
        raise ValueError(f"not a DNS name: {name!r}")


def provision_device(
    api: ProvisioningApi,
    request: DeviceRequest,
    *,
    out: Path,
    label: str,
    key_type: str,
    validity: str | None,
    anchors: Sequence[x509.Certificate] | None,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> Outcome:
    """Make a key, have the API sign its CSR, check the answer, write the files into ``out``.

    Raises ``ApiError`` (the answer checks included) or ``OSError``; nothing is
    written unless the certificate passed every check.
    """
    key = keys.generate_key(key_type)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, request.device_id)])
    sans = None
    if request.dns:
        sans = x509.SubjectAlternativeName([x509.DNSName(n) for n in request.dns])
    csr = build_csr(key, subject=subject, sans=sans)
    answer = api.issue(
        label, device_id=request.device_id, csr=csr, validity=validity, sans=request.dns
    )
    issued = _checked(answer, key, device_id=request.device_id, anchors=anchors, now=now())
    cert = issued.certificate
    write_files_atomically(
        out,
        [
            OutputFile("key.pem", keys.key_to_pem(key), PRIVATE),
            OutputFile("cert.pem", certs.certs_to_pem([cert])),
            # What a TLS client sends after its certificate: up to, not including, the anchor.
            OutputFile("chain.pem", certs.certs_to_pem(issued.chain)),
        ],
    )
    return Outcome(
        device_id=request.device_id,
        status="ok",
        serial=certs.serial_hex(cert.serial_number),
        not_after=cert.not_valid_after_utc.isoformat(),
    )


def _checked(
    answer: IssuedAnswer,
    key: keys.PrivateKey,
    *,
    device_id: str,
    anchors: Sequence[x509.Certificate] | None,
    now: dt.datetime,
) -> IssuedCertificate:
    if anchors is None:
        # No trust anchor given: the chain's own root, so at least the chain is consistent.
        anchors = [c for c in answer.chain if _self_signed(c)]
        if not anchors:
            raise ApiAnswerError("answer's chain has no root certificate; give --trust-anchor")
    try:
        issued = check_issued(
            answer.certificate,
            public_key=key.public_key(),
            cas=answer.chain,
            anchors=anchors,
            now=now,
            common_name=device_id,
        )
    except IssuedCertificateError as exc:
        raise ApiAnswerError(str(exc)) from exc
    if answer.serial is not None:
        try:
            same = certs.parse_serial(answer.serial) == answer.certificate.serial_number
        except ValueError:
            same = False
        if not same:
            raise ApiAnswerError(
                f"answer's serial {one_line(answer.serial, 80)!r} is not the certificate's"
            )
    return issued


def _self_signed(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer and certs.is_issued_by(cert, cert)


def existing_outcome(request: DeviceRequest, directory: Path) -> Outcome | None:
    """An ``exists`` outcome when ``directory`` already holds ``cert.pem``."""
    path = directory / "cert.pem"
    if not path.exists():
        return None
    serial = not_after = ""
    try:
        cert = certs.load_pem_certificates(path.read_bytes())[0]
        serial = certs.serial_hex(cert.serial_number)
        not_after = cert.not_valid_after_utc.isoformat()
    except (OSError, PkiError):
        pass  # still there: a person should look, not this run overwrite it
    return Outcome(request.device_id, "exists", serial, not_after, "")


# -- the batch file and results --------------------------------------------------------


def read_batch(path: Path) -> list[DeviceRequest]:
    """The devices of a CSV file with a header row naming at least ``device_id``
    (optional ``dns``: names separated by ``;``). Other columns are ignored."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # spreadsheets like to add a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise CliError(f"{path}: empty, expected a header row with device_id") from None
    except csv.Error as exc:
        raise CliError(f"{path}: {exc}") from exc
    if "device_id" not in header:
        raise CliError(f"{path}: the header row has no device_id column")
    id_at = header.index("device_id")
    dns_at = header.index("dns") if "dns" in header else None
    devices: list[DeviceRequest] = []
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            cell = row[dns_at] if dns_at is not None and dns_at < len(row) else ""
            dns = tuple(n.strip() for n in cell.split(";") if n.strip())
            device_id = row[id_at].strip() if id_at < len(row) else ""
            devices.append(DeviceRequest(device_id, dns, reader.line_num))
    except csv.Error as exc:
        raise CliError(f"{path} line {reader.line_num}: {exc}") from exc
    if not devices:
        raise CliError(f"{path}: no devices")
    return devices


def results_csv(outcomes: Sequence[Outcome]) -> bytes:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(RESULT_FIELDS)
    for o in outcomes:
        writer.writerow([o.device_id, o.status, o.serial, o.not_after, o.error])
    return buffer.getvalue().encode("utf-8")


def write_results(path: Path, outcomes: Sequence[Outcome]) -> None:
    try:
        write_files_atomically(path.parent, [OutputFile(path.name, results_csv(outcomes))])
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from exc


class Progress:
    """Progress on stderr: a bar redrawn in place on a terminal, else one line per device."""

    WIDTH: Final = 30

    def __init__(self, total: int, stream: TextIO) -> None:
        self._total = total
        self._stream = stream
        self._tty = stream.isatty()
        self._counts = {"ok": 0, "failed": 0, "exists": 0}
        self._done = 0

    def update(self, outcome: Outcome) -> None:
        self._done += 1
        self._counts[outcome.status] += 1
        line = f"{outcome.device_id}: {outcome.status}"
        if outcome.status == "failed":
            line += f": {outcome.error}"
        elif outcome.serial:
            line += f" (serial {outcome.serial})"
        if not self._tty:
            self._stream.write(f"[{self._done}/{self._total}] {line}\n")
        else:
            if outcome.status == "failed":  # failures stay on screen above the bar
                self._stream.write(f"\r\x1b[K{line}\n")
            filled = self.WIDTH * self._done // self._total
            bar = "#" * filled + "." * (self.WIDTH - filled)
            c = self._counts
            self._stream.write(
                f"\r\x1b[K[{bar}] {self._done}/{self._total}  "
                f"ok {c['ok']}  failed {c['failed']}  exists {c['exists']}"
            )
        self._stream.flush()

    def close(self) -> None:
        if self._tty and self._done:
            self._stream.write("\n")
            self._stream.flush()


# -- the command -----------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    factory = subparsers.add_parser(
        "factory", help="factory station: bootstrap certificates from the REST API"
    ).add_subparsers(dest="factory_command", required=True, metavar="ACTION")
    p = factory.add_parser(
        "provision",
        help="make keys here, have the API sign their CSRs, write key/cert/chain.pem",
        description=(
            "Make each device's key here and send only its CSR to the API; check the "
            "certificate and write key.pem (0600), cert.pem and chain.pem. "
            f"The token comes from --token-file, ${TOKEN_ENV} or --token."
        ),
    )
    g = p.add_argument_group("API")
    g.add_argument("--api", required=True, metavar="URL", help="server origin, https://host:port")
    token = g.add_mutually_exclusive_group()
    token.add_argument(
        "--token", help=f"bearer token (visible to other users: prefer ${TOKEN_ENV} or a file)"
    )
    token.add_argument("--token-file", type=Path, metavar="FILE", help="file holding the token")
    g.add_argument(
        "--trust-anchor",
        type=Path,
        metavar="FILE",
        help="root CA (PEM) for TLS and the issued chain (default: the system store for TLS "
        "and the chain's own root)",
    )
    g.add_argument("--label", default="bootstrap", help="CA label (default: %(default)s)")
    g.add_argument("--timeout", type=positive_number, default=30.0, metavar="S", help="per attempt")
    g.add_argument(
        "--retries", type=non_negative_int, default=3, metavar="N", help="default: %(default)s"
    )

    d = p.add_argument_group("devices")
    which = d.add_mutually_exclusive_group(required=True)
    which.add_argument("--device-id", help="one device: its id, the CN of its certificate")
    which.add_argument(
        "--batch",
        type=Path,
        metavar="CSV",
        help="devices.csv with a header row: device_id[,dns] (dns: names separated by ';')",
    )
    d.add_argument(
        "--san-dns", action="append", default=[], metavar="NAME", help="DNS SAN (with --device-id)"
    )
    d.add_argument(
        "--key-type", choices=keys.KEY_TYPES, default="ec-p256", help="default: %(default)s"
    )
    d.add_argument(
        "--validity",
        type=_validity,
        metavar="DURATION",
        help="requested lifetime, e.g. 10y, 3650d (the server may shorten it)",
    )

    o = p.add_argument_group("output")
    o.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory for the files (--batch: DIR/<device id>/)",
    )
    o.add_argument(
        "--result",
        type=Path,
        metavar="FILE",
        help="result CSV (default with --batch: DIR/results.csv)",
    )
    o.add_argument("--force", action="store_true", help="replace an existing cert.pem")
    p.set_defaults(handler=_provision)


def _validity(text: str) -> str:
    """``10y``, ``3650d``, ``52w``, ... as the server's duration (years become days)."""
    match = _VALIDITY.match(text.strip().lower())
    if match is None or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(
            f"expected a positive duration like 10y, 3650d, 52w, 12h, got {text!r}"
        )
    amount, unit = int(match.group(1)), match.group(2)
    return f"{amount * 365}d" if unit == "y" else f"{amount}{unit}"


def _provision(args: argparse.Namespace) -> int:
    return provision_command(args)


def provision_command(
    args: argparse.Namespace,
    *,
    transport: httpx.BaseTransport | None = None,
    sleep: Callable[[float], None] = time.sleep,
    environ: Mapping[str, str] = os.environ,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run ``factory provision`` (tests inject the transport, sleep, environment, streams)."""
    out_stream = stdout if stdout is not None else sys.stdout
    err_stream = stderr if stderr is not None else sys.stderr
    token = _token(args, environ)
    if args.label is None or not _LABEL.match(args.label):
        raise CliError(f"--label: not a CA label: {args.label!r}")
    anchors: tuple[x509.Certificate, ...] | None = None
    trust: TrustAnchor | None = None
    if args.trust_anchor is not None:
        try:
            trust = TrustAnchor.from_file(args.trust_anchor)
        except TrustAnchorError as exc:
            raise CliError(str(exc)) from exc
        anchors = trust.certificates
    try:
        api = ProvisioningApi(
            args.api,
            token=token,
            trust=trust,
            timeout=args.timeout,
            retries=args.retries,
            transport=transport,
            sleep=sleep,
        )
    except ValueError as exc:
        raise CliError(f"--api: {exc}") from exc
    except TrustAnchorError as exc:  # the anchor file loaded, but TLS cannot use it
        raise CliError(str(exc)) from exc
    with api:
        if args.batch is None:
            return _single(args, api, anchors, out_stream)
        if args.san_dns:
            raise CliError("--san-dns goes with --device-id; give a dns column in the batch file")
        return _batch(args, api, anchors, out_stream, err_stream)


def _token(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    if args.token is not None:
        token: str = args.token
        source = "--token"
    elif args.token_file is not None:
        path: Path = args.token_file
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            detail = getattr(exc, "strerror", None) or exc
            raise CliError(f"cannot read token file {path}: {detail}") from exc
        source = str(path)
    elif environ.get(TOKEN_ENV):
        token = environ[TOKEN_ENV].strip()
        source = TOKEN_ENV
    else:
        raise CliError(f"no API token: give --token-file FILE, set {TOKEN_ENV}, or --token")
    try:
        check_token(token)
    except ValueError as exc:
        raise CliError(f"{source}: {exc}") from None
    return token


def _single(
    args: argparse.Namespace,
    api: ProvisioningApi,
    anchors: Sequence[x509.Certificate] | None,
    stdout: TextIO,
) -> int:
    device_id: str = args.device_id.strip()
    request = DeviceRequest(device_id, tuple(args.san_dns))
    try:
        check_device_id(device_id)
        for name in request.dns:
            check_dns_name(name)
    except ValueError as exc:
        raise CliError(f"--device-id {device_id!r}: {exc}") from None
    out: Path = args.out
    outcome = None if args.force else existing_outcome(request, out)
    if outcome is not None:
        print(
            f"{device_id}: {out / 'cert.pem'} exists (serial {outcome.serial or '?'}); "
            "nothing done (--force replaces it)",
            file=stdout,
        )
    else:
        try:
            outcome = _provision_one(api, request, out, args, anchors)
        except (ApiError, OSError) as exc:
            outcome = Outcome(device_id, "failed", error=_reason(exc))
            if args.result is not None:
                write_results(args.result, [outcome])
            raise CliError(f"{device_id}: {outcome.error}") from exc
        print(
            f"{device_id}: serial {outcome.serial}, not after {outcome.not_after}, "
            f"written to {out}",
            file=stdout,
        )
    if args.result is not None:
        write_results(args.result, [outcome])
    return 0


def _batch(
    args: argparse.Namespace,
    api: ProvisioningApi,
    anchors: Sequence[x509.Certificate] | None,
    stdout: TextIO,
    stderr: TextIO,
) -> int:
    devices = read_batch(args.batch)
    out: Path = args.out
    result: Path = args.result if args.result is not None else out / "results.csv"
    outcomes: list[Outcome] = []
    progress = Progress(len(devices), stderr)
    seen: set[str] = set()
    stopped: str | None = None
    try:
        for request in devices:
            outcome, stop = _batch_one(api, request, out, args, anchors, seen)
            seen.add(request.device_id)
            outcomes.append(outcome)
            progress.update(outcome)
            if stop:
                stopped = outcome.error
                break
    finally:
        progress.close()
        # Also on Ctrl-C: what was written is in the results, and a re-run skips it.
        write_results(result, outcomes)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "failed", "exists")}
    summary = f"{counts['ok']} ok, {counts['failed']} failed, {counts['exists']} exists"
    if stopped is not None:
        summary += f"; stopped after {len(outcomes)} of {len(devices)}"
    print(f"{summary}; results in {result}", file=stdout)
    if stopped is not None:
        raise CliError(f"stopped: {stopped}")
    return 1 if counts["failed"] else 0


def _batch_one(
    api: ProvisioningApi,
    request: DeviceRequest,
    out: Path,
    args: argparse.Namespace,
    anchors: Sequence[x509.Certificate] | None,
    seen: set[str],
) -> tuple[Outcome, bool]:
    """The outcome for one row, and whether the whole batch must stop (every later
    device would fail the same way: the token or the label is wrong)."""
    where = f"line {request.line}: " if request.line is not None else ""
    try:
        check_device_id(request.device_id)
        for name in request.dns:
            check_dns_name(name)
    except ValueError as exc:
        return Outcome(request.device_id, "failed", error=f"{where}{exc}"), False
    if request.device_id in seen:
        return Outcome(request.device_id, "failed", error=f"{where}duplicate device id"), False
    directory = out / request.device_id
    if not args.force and (existing := existing_outcome(request, directory)) is not None:
        return existing, False
    try:
        return _provision_one(api, request, directory, args, anchors), False
    except (ApiError, OSError) as exc:
        stop = isinstance(exc, ApiHttpError) and exc.status in (401, 404)
        return Outcome(request.device_id, "failed", error=_reason(exc)), stop


def _provision_one(
    api: ProvisioningApi,
    request: DeviceRequest,
    out: Path,
    args: argparse.Namespace,
    anchors: Sequence[x509.Certificate] | None,
) -> Outcome:
    return provision_device(
        api,
        request,
        out=out,
        label=args.label,
        key_type=args.key_type,
        validity=args.validity,
        anchors=anchors,
    )


def _reason(exc: ApiError | OSError) -> str:
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return one_line(f"cannot write{where}: {exc.strerror or exc}")
    return one_line(str(exc))
