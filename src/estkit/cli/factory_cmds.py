"""Factory commands: ``factory provision`` requests bootstrap certificates from the REST API.

The key is made where this runs and never leaves it: only the CSR goes to
``POST {api}/api/v1/cas/{label}/certificates`` (``estkit.client.ProvisioningApi``).
The answer is checked (the certificate is for the key, has CN = device id, and
chains to the trust anchor) before ``key.pem`` (0600), ``cert.pem`` and
``chain.pem`` are written atomically into ``OUT/<device id>/``. ``--batch
devices.csv`` does a production line: past individual failures, with a result
CSV and a non-zero exit when any device failed. A device whose ``cert.pem``
exists is skipped (``--force`` replaces it), so a line can simply be run again.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, TextIO

import httpx
from cryptography import x509
from cryptography.x509.oid import NameOID

from estkit.cli.args import add_retry_options
from estkit.cli.errors import CliError
from estkit.cli.files import OutputFile, write_files_atomically
from estkit.client import (
    ApiAnswerError,
    ApiCircuitOpen,
    ApiError,
    ApiHttpError,
    IssuedAnswer,
    IssuedCertificate,
    IssuedCertificateError,
    ProvisioningApi,
    TrustAnchor,
    TrustAnchorError,
    check_issued,
)
from estkit.client.errors import one_line
from estkit.client.provisioning import check_token
from estkit.durations import format_duration, parse_duration
from estkit.fileio import PRIVATE
from estkit.pki import certs, keys, names
from estkit.pki.csr import build_csr
from estkit.pki.errors import PkiError
from estkit.pki.names import check_device_id

TOKEN_ENV: Final = "ESTKIT_API_TOKEN"  # noqa: S105 - the name of a variable, not a secret
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RESULT_FIELDS: Final = ("device_id", "status", "serial", "not_after", "error")

Status = Literal["ok", "failed", "exists"]


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


def check_dns_name(name: str) -> None:
    """The server's rule for a DNS SAN; whether a wildcard is allowed is the label's to say."""
    names.check_dns_name(name, wildcard=True)


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
        writer.writerow([_cell(v) for v in (o.device_id, o.status, o.serial, o.not_after, o.error)])
    return buffer.getvalue().encode("utf-8")


def _cell(value: str) -> str:
    """A CSV cell a spreadsheet shows as text: device ids may start with '=', '@', '-'
    or '+', which spreadsheets would otherwise run as a formula (CSV injection)."""
    return f"'{value}" if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


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
    add_retry_options(g, total="per device, across its retries")

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
        help="requested lifetime, e.g. 10y (365 days a year), 3650d, 52w "
        "(the server may shorten it)",
    )

    o = p.add_argument_group("output")
    o.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory for the devices' files: DIR/<device id>/",
    )
    o.add_argument(
        "--result",
        type=Path,
        metavar="FILE",
        help="result CSV (default with --batch: DIR/results.csv)",
    )
    o.add_argument(
        "--force", action="store_true", help="replace an existing DIR/<device id>/cert.pem"
    )
    p.set_defaults(handler=_provision)


def _validity(text: str) -> str:
    """``10y``, ``3650d``, ``52w``, ... in estkit's one duration grammar, sent to the
    server as ``format_duration`` spells it (a year is 365 days)."""
    try:
        return format_duration(parse_duration(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _provision(args: argparse.Namespace) -> int:
    return provision_command(args)


def provision_command(
    args: argparse.Namespace,
    *,
    transport: httpx.BaseTransport | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    environ: Mapping[str, str] = os.environ,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run ``factory provision`` (tests inject the transport, sleep, clock, environment,
    streams)."""
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
            total_timeout=args.total_timeout,
            retries=args.retries,
            transport=transport,
            sleep=sleep,
            clock=clock,
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
    out: Path = args.out / device_id
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
            outcome, stop = _batch_one(api, request, out, args, anchors, seen, result)
            seen.add(request.device_id.casefold())
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
    result: Path,
) -> tuple[Outcome, bool]:
    """The outcome for one row, and whether the whole batch must stop (every later
    device would fail the same way: the token or the label is wrong, or the API keeps
    failing and the circuit breaker is open)."""
    where = f"line {request.line}: " if request.line is not None else ""
    try:
        check_device_id(request.device_id)
        for name in request.dns:
            check_dns_name(name)
    except ValueError as exc:
        return Outcome(request.device_id, "failed", error=f"{where}{exc}"), False
    # Case-insensitively: on a case-insensitive file system Dev-1 and dev-1 share a directory.
    if request.device_id.casefold() in seen:
        return Outcome(request.device_id, "failed", error=f"{where}duplicate device id"), False
    directory = out / request.device_id
    if directory.resolve() == result.resolve():
        error = f"{where}its directory would be the results file {result}"
        return Outcome(request.device_id, "failed", error=error), False
    if not args.force and (existing := existing_outcome(request, directory)) is not None:
        return existing, False
    try:
        return _provision_one(api, request, directory, args, anchors), False
    except (ApiError, OSError) as exc:
        stop = isinstance(exc, ApiCircuitOpen) or (
            isinstance(exc, ApiHttpError) and exc.status in (401, 404)
        )
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
