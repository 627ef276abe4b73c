"""The device state directory: certificate versions in ``archive/<n>/`` and a ``current`` link.

    state_dir/                  0700
    ├── archive/                0700
    │   ├── 1/                  key.pem (0600), cert.pem, chain.pem, fullchain.pem
    │   └── 2/
    ├── current -> archive/2    a relative symlink, only ever replaced by rename
    ├── status.json             what ``estkit agent status`` shows (written atomically)
    ├── lock                    held while a version is written and swapped in
    └── agent.pid               held by the running daemon

A version is written into ``archive/.new-<random>/``: each file, then the
directory, fsynced, and the directory renamed to ``archive/<n>``. That rename
is the commit: a numbered directory is always complete. ``current`` moves by
renaming a temporary link over it, so a reader (or a crash) sees the old
version or the new one, never a mix. A version is *valid* when its files
parse, its key is the certificate's key and ``fullchain.pem`` is the
certificate followed by ``chain.pem``.

``repair()`` undoes what an interruption left: temporary directories and
links are removed, invalid versions are removed, and a missing or broken
``current`` (or one behind a newer valid version, which a crash between
writing and swapping leaves) is pointed at the newest valid version.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from estkit.agent.errors import AlreadyRunning, StateError
from estkit.fileio import PRIVATE, PRIVATE_DIR, PUBLIC, fsync_directory, write_new
from estkit.pki import certs, keys
from estkit.pki.errors import PkiError

log = logging.getLogger(__name__)

FILES = ("key.pem", "cert.pem", "chain.pem", "fullchain.pem")
# Points in a swap where a test can stop the agent (ESTKIT_AGENT_PAUSE_AT) and kill it.
PAUSE_STEPS = ("archive-written", "link-created", "link-renamed", "before-prune")
_NEW_PREFIX = ".new-"
_LINK_TEMP_PREFIX = ".current."
LOCK_TIMEOUT = 120.0

Pause = Callable[[str], None]


def _no_pause(step: str) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Version:
    """One complete, valid version of the device's credentials."""

    number: int
    path: Path
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]

    @property
    def key_path(self) -> Path:
        return self.path / "key.pem"

    @property
    def cert_path(self) -> Path:
        return self.path / "cert.pem"

    @property
    def chain_path(self) -> Path:
        return self.path / "chain.pem"

    @property
    def fullchain_path(self) -> Path:
        return self.path / "fullchain.pem"

    @property
    def serial(self) -> str:
        return certs.serial_hex(self.certificate.serial_number)

    @property
    def not_before(self) -> dt.datetime:
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc

    def load_key(self) -> keys.PrivateKey:
        try:
            return keys.load_private_key_pem(self.key_path.read_bytes())
        except (OSError, PkiError) as exc:
            raise StateError(f"cannot load key of version {self.number}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class RepairReport:
    """What ``repair`` found and did."""

    current: Version | None
    removed: tuple[str, ...] = ()
    relinked: bool = False
    rolled_forward: bool = False


class StateDirectory:
    """The state directory of one device (see the module docstring)."""

    def __init__(self, root: Path, *, pause: Pause = _no_pause) -> None:
        self.root = root
        self.archive = root / "archive"
        self.current_link = root / "current"
        self.status_path = root / "status.json"
        self._pause = pause

    # -- reading -----------------------------------------------------------------

    def current_number(self) -> int | None:
        """The version ``current`` names (not checked), or None."""
        try:
            target = os.readlink(self.current_link)
        except OSError:
            return None
        return _version_number(target)

    def current(self) -> Version | None:
        """The valid version ``current`` points at, or None (missing, dangling or invalid)."""
        number = self.current_number()
        if number is None:
            return None
        try:
            return self.load(number)
        except StateError:
            return None

    def numbers(self) -> list[int]:
        """The numbered versions in the archive, valid or not, oldest first."""
        try:
            names = os.listdir(self.archive)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StateError(f"cannot list {self.archive}: {exc.strerror}") from exc
        return sorted(n for n in (_version_number(f"archive/{name}") for name in names) if n)

    def load(self, number: int) -> Version:
        """Version ``number``, checked; ``StateError`` says what is wrong with it."""
        path = self.archive / str(number)
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise StateError(f"{path} is not a directory")
            data = {name: (path / name).read_bytes() for name in FILES}
        except OSError as exc:
            raise StateError(f"version {number}: {exc.strerror or exc}") from exc
        try:
            key = keys.load_private_key_pem(data["key.pem"])
            leaf = certs.load_pem_certificates(data["cert.pem"])
            chain = _load_optional(data["chain.pem"])
            full = certs.load_pem_certificates(data["fullchain.pem"])
        except PkiError as exc:
            raise StateError(f"version {number}: {exc}") from exc
        if len(leaf) != 1:
            raise StateError(f"version {number}: cert.pem holds {len(leaf)} certificates")
        if not keys.public_keys_match(leaf[0].public_key(), key.public_key()):
            raise StateError(f"version {number}: key.pem is not the key of cert.pem")
        if full != [leaf[0], *chain]:
            raise StateError(f"version {number}: fullchain.pem is not cert.pem + chain.pem")
        return Version(number=number, path=path, certificate=leaf[0], chain=tuple(chain))

    # -- writing -----------------------------------------------------------------

    def prepare(self) -> None:
        """Create the directories (0700), or tighten their modes."""
        for directory in (self.root, self.archive):
            try:
                directory.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
                if stat.S_IMODE(directory.stat().st_mode) != PRIVATE_DIR:
                    directory.chmod(PRIVATE_DIR)
            except OSError as exc:
                raise StateError(f"cannot use state directory {directory}: {exc.strerror}") from exc

    def install(
        self,
        *,
        key_pem: bytes,
        certificate: x509.Certificate,
        chain: Sequence[x509.Certificate],
    ) -> Version:
        """Write a new complete version (not yet current) and return it."""
        self.prepare()
        existing = self.numbers()
        number = (existing[-1] if existing else 0) + 1
        temp = self.archive / f"{_NEW_PREFIX}{number}-{secrets.token_hex(4)}"
        try:
            temp.mkdir(mode=PRIVATE_DIR)
            write_new(temp / "key.pem", key_pem, mode=PRIVATE)
            write_new(temp / "cert.pem", certs.certs_to_pem([certificate]), mode=PUBLIC)
            write_new(temp / "chain.pem", certs.certs_to_pem(chain), mode=PUBLIC)
            write_new(
                temp / "fullchain.pem", certs.certs_to_pem([certificate, *chain]), mode=PUBLIC
            )
            fsync_directory(temp)
            os.rename(temp, self.archive / str(number))
        except OSError as exc:
            shutil.rmtree(temp, ignore_errors=True)
            raise StateError(f"cannot write version {number}: {exc.strerror or exc}") from exc
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        fsync_directory(self.archive)
        self._pause("archive-written")
        return self.load(number)

    def activate(self, version: Version) -> None:
        """Point ``current`` at ``version``: a temporary link renamed over the old one."""
        temp = self.root / f"{_LINK_TEMP_PREFIX}{secrets.token_hex(4)}.tmp"
        try:
            os.symlink(f"archive/{version.number}", temp)
            fsync_directory(self.root)
            self._pause("link-created")
            os.replace(temp, self.current_link)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise StateError(f"cannot switch current to version {version.number}: {exc}") from exc
        fsync_directory(self.root)
        self._pause("link-renamed")

    def prune(self, *, confirmed: int) -> list[int]:
        """Remove versions older than ``confirmed`` (a version used successfully), keeping
        the newest one before it and whatever ``current`` names; returns the removed ones."""
        self._pause("before-prune")
        older = [n for n in self.numbers() if n < confirmed]
        keep = {confirmed, self.current_number(), *older[-1:]}
        removed = [n for n in older if n not in keep]
        for number in removed:
            shutil.rmtree(self.archive / str(number), ignore_errors=True)
        if removed:
            fsync_directory(self.archive)
        return removed

    def repair(self) -> RepairReport:
        """Bring the directory back to a consistent state after an interruption."""
        self.prepare()
        removed: list[str] = []
        for entry in _listdir(self.archive):
            if entry.startswith(_NEW_PREFIX):
                shutil.rmtree(self.archive / entry, ignore_errors=True)
                removed.append(f"archive/{entry}")
        for entry in _listdir(self.root):
            if entry.startswith(_LINK_TEMP_PREFIX):
                with contextlib.suppress(OSError):
                    (self.root / entry).unlink()
                removed.append(entry)
        valid: dict[int, Version] = {}
        for number in self.numbers():
            try:
                valid[number] = self.load(number)
            except StateError as exc:
                log.warning("removing invalid version: %s", exc)
                shutil.rmtree(self.archive / str(number), ignore_errors=True)
                removed.append(f"archive/{number}")
        for version in valid.values():
            _tighten(version)
        if removed:
            log.warning("state directory repaired: removed %s", ", ".join(removed))
            fsync_directory(self.archive)
        relinked = rolled_forward = False
        if self.current_link.exists() and not self.current_link.is_symlink():
            aside = self.root / f"current.replaced-{int(time.time())}"
            log.warning("%s is not a link; moving it to %s", self.current_link, aside)
            os.rename(self.current_link, aside)
        linked = self.current_number()
        newest = max(valid) if valid else None
        if newest is None:
            if self.current_link.is_symlink():
                self.current_link.unlink()
                relinked = True
            return RepairReport(current=None, removed=tuple(removed), relinked=relinked)
        if linked is None or linked not in valid:
            log.warning("current link missing or broken: pointing it at version %d", newest)
            relinked = True
        elif linked < newest:
            log.warning("version %d was written but not swapped in: completing the swap", newest)
            rolled_forward = True
        if relinked or rolled_forward:
            self.activate(valid[newest])
        return RepairReport(
            current=valid[newest],
            removed=tuple(removed),
            relinked=relinked,
            rolled_forward=rolled_forward,
        )

    # -- locks -------------------------------------------------------------------

    @contextlib.contextmanager
    def swap_lock(self, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """Exclusive use of the archive and ``current`` (daemon and ``agent renew``)."""
        self.prepare()
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, PRIVATE)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StateError(
                            f"{self.root}: another process kept the state lock for {timeout:g} s"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    def hold_instance(self) -> int:
        """Take the daemon's lock for the life of the process; returns its descriptor."""
        self.prepare()
        path = self.root / "agent.pid"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            other = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise AlreadyRunning(
                    f"another agent (pid {other or '?'}) is using {self.root}"
                ) from None
            raise StateError(f"cannot lock {path}: {exc.strerror}") from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd


def _version_number(target: str) -> int | None:
    head, _, name = target.rstrip("/").rpartition("/")
    if head.rpartition("/")[2] != "archive" or not name.isdigit() or name.startswith("0"):
        return None
    return int(name)


def _load_optional(data: bytes) -> list[x509.Certificate]:
    return certs.load_pem_certificates(data) if data.strip() else []


def _listdir(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError as exc:
        raise StateError(f"cannot list {directory}: {exc.strerror}") from exc


def _tighten(version: Version) -> None:
    """Keys 0600 and version directories 0700, whatever a copy or umask did to them."""
    for path, mode in ((version.path, PRIVATE_DIR), (version.key_path, PRIVATE)):
        with contextlib.suppress(OSError):
            if stat.S_IMODE(path.stat().st_mode) != mode:
                path.chmod(mode)
