"""CA keys in a PKCS#11 token (an HSM; SoftHSM2 in tests): signed inside it, never exported.

A ``TokenPrivateKey`` is a ``cryptography`` EC or RSA private key whose ``sign`` hashes
in Python and signs the digest inside the token (``CKM_ECDSA``, ``CKM_RSA_PKCS`` over a
DigestInfo), so ``CertificateBuilder.sign``, ``CertificateRevocationListBuilder.sign`` and
the rest of estkit use it like a file key. It cannot be serialised: ``private_bytes`` and
``private_numbers`` raise ``TypeError``.

Sessions. PKCS#11 is initialised once per process and its login state is per token, so
each module (library path) is one ``_Module`` for the process, with one logged-in session
per token that all of this process's threads share, one call at a time (a lock; the
library drops the GIL inside each call). After a fork the child sees a new pid and
re-initialises the library before its first signature: the parent's sessions are never
used, nor closed, from the child.

Loss and recovery. Any PKCS#11 error while signing (``CKR_DEVICE_REMOVED``,
``CKR_TOKEN_NOT_PRESENT``, ``CKR_SESSION_HANDLE_INVALID``, ``CKR_DEVICE_ERROR``, an object
handle gone with its token, ...) forgets every session of the module and raises
``SignerUnavailable`` (code ``unavailable``: 503 + Retry-After). The next signature, at
most once per ``REOPEN_INTERVAL``, re-initialises the library (``C_Finalize`` +
``C_Initialize``: tokens are found again, as most libraries scan slots only there), logs
in and finds the key; until that works every signature is refused the same way.

A refused PIN (``CKR_PIN_INCORRECT``, ``CKR_PIN_LOCKED``, ``CKR_PIN_EXPIRED``, ...) is not
a loss: the token counts failed logins and locks the user PIN after a few, so a PIN it
refused once is never offered to it again by this process. Signing with it answers 503
until the server is restarted with the right PIN (one ERROR line says so).

Errors at start (``open_token_key``, ``generate_token_key``, and for ``server init``
``token_labels_in_use``, ``existing_token_key``): ``ValueError`` naming the CA and what is
wrong (no such module or token, PIN refused, no such key, key of another certificate).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Final, Generic, Self, TypeVar

import pkcs11
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import (
    NoDigestInfo,
    Prehashed,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    KeySerializationEncryption,
    PrivateFormat,
    load_der_public_key,
)
from cryptography.utils import Buffer
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import (
    MultipleObjectsReturned,
    MultipleTokensReturned,
    NoSuchKey,
    NoSuchToken,
    PinExpired,
    PinIncorrect,
    PinInvalid,
    PinLenRange,
    PinLocked,
    PKCS11Error,
    TokenWriteProtected,
    UserPinNotInitialized,
)
from pkcs11.types import SignMixin
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from estkit.ca.errors import SignerUnavailable

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Library

__all__ = [
    "REOPEN_INTERVAL",
    "TokenEcKey",
    "TokenKeySpec",
    "TokenPrivateKey",
    "TokenRsaKey",
    "existing_token_key",
    "generate_token_key",
    "open_token_key",
    "token_labels_in_use",
]

log = logging.getLogger("estkit.ca")

# After a lost token, how often a signature may try to reopen it; in between, refusals
# cost nothing (a network HSM's reconnect can take seconds).
REOPEN_INTERVAL: Final = 1.0

# Key types ``generate_token_key`` makes: estkit's names (``pki.keys.KEY_TYPES``).
TOKEN_KEY_TYPES: Final = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072")
_CURVES: Final = {"ec-p256": "secp256r1", "ec-p384": "secp384r1"}

# DER DigestInfo prefixes (RFC 8017 9.2 note 1): CKM_RSA_PKCS signs DigestInfo || digest.
_DIGEST_INFO: Final = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}

# What C_Login answers when it refuses the PIN itself, rather than the token being gone.
_LOGIN_REFUSALS: Final = (
    PinIncorrect,
    PinLocked,
    PinExpired,
    PinInvalid,
    PinLenRange,
    UserPinNotInitialized,
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TokenKeySpec:
    """Where a key is in a token: the module, the token's label, the key's label and/or
    CKA_ID, and the user PIN (read by the caller from a file or the environment)."""

    module: Path
    token_label: str
    pin: str = field(repr=False)
    key_label: str | None = None
    key_id: bytes | None = None

    def __post_init__(self) -> None:
        if self.key_label is None and self.key_id is None:
            raise ValueError("a token key needs a key label or a key id")

    def describe(self) -> str:
        which = [f"label {self.key_label!r}"] if self.key_label is not None else []
        which += [f"id {self.key_id.hex()}"] if self.key_id is not None else []
        return f"key {' '.join(which)} in token {self.token_label!r}"


class _Module:
    """One PKCS#11 library in this process, its sessions (one per token) and their lock.

    Process-wide by nature: a library is initialised once per process and a login holds
    for the whole application, so two estkit objects using one library must share this.
    """

    _all: ClassVar[dict[str, _Module]] = {}
    _all_lock = threading.Lock()

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self._lib: Library | None = None
        self._pid = os.getpid()
        # token label -> this process's session on it, and the PIN it logged in with
        self._sessions: dict[str, tuple[pkcs11.Session, str]] = {}
        # (token label, PIN) -> why the token refused that PIN: never offered to it again.
        self._refused: dict[tuple[str, str], str] = {}
        self._lost = False
        self._next_reopen = 0.0
        # Bumped whenever sessions are dropped: key handles from an older generation are dead.
        self.generation = 0

    @classmethod
    def of(cls, path: Path) -> _Module:
        # By the file, not its spelling: a library is loaded and initialised once per
        # process, whatever path (symlink, ``./``) each CA names it by.
        real = os.path.realpath(path)
        with cls._all_lock:
            module = cls._all.get(real)
            if module is None:
                module = cls._all[real] = cls(str(path))
            return module

    def _library(self) -> Library:
        if self._lib is None:
            if not os.path.exists(self.path):
                raise ValueError(f"PKCS#11 module {self.path}: no such file")
            try:
                self._lib = pkcs11.lib(self.path)
            except PKCS11Error as exc:
                raise ValueError(
                    f"PKCS#11 module {self.path}: cannot load ({_name(exc)})"
                ) from None
        return self._lib

    def _reinitialize(self) -> None:
        lib = self._library()
        self._sessions.clear()  # not closed: after a fork they are the parent's
        self.generation += 1
        # Fails harmlessly where there is nothing to finalise (a child of a library that
        # resets itself on fork, or one whose C_Initialize failed).
        with contextlib.suppress(PKCS11Error):
            lib.finalize()
        lib.initialize()

    def session(self, token_label: str, pin: str) -> pkcs11.Session:
        """This process's logged-in session on ``token_label``; the caller holds ``lock``.

        After a fork, or when sessions were lost, the library is re-initialised first (a lost
        one at most once per ``REOPEN_INTERVAL``: ``_Throttled`` in between). A PIN the
        token refused is ``_PinRefused``, then and ever after, without asking it again."""
        if (refused := self._refused.get((token_label, pin))) is not None:
            raise _PinRefused(refused, first=False)
        fresh = False
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._reinitialize()
            fresh = True
        elif self._lost:
            now = time.monotonic()
            if now < self._next_reopen:
                raise _Throttled()
            self._next_reopen = now + REOPEN_INTERVAL
            self._reinitialize()
            self._lost = False
            fresh = True
        if (open_ := self._sessions.get(token_label)) is not None:
            # One login per token and process: a second PIN for it is checked here, as the
            # token would have checked it.
            if not hmac.compare_digest(open_[1].encode(), pin.encode()):
                raise _PinRefused("another PIN than its session's", first=False)
            return open_[0]
        try:
            token = self._library().get_token(token_label=token_label)
        except NoSuchToken:
            if fresh:
                raise
            # Most libraries list tokens only in C_Initialize: one inserted or created
            # since is found after a re-initialisation (sessions of other tokens reopen).
            self._reinitialize()
            token = self._library().get_token(token_label=token_label)
        try:
            try:
                session = token.open(rw=True, user_pin=pin)  # rw: key generation
            except TokenWriteProtected:
                session = token.open(user_pin=pin)
        except _LOGIN_REFUSALS as exc:
            self._refused[(token_label, pin)] = _name(exc)
            raise _PinRefused(_name(exc), first=True) from None
        self._sessions[token_label] = (session, pin)
        return session

    def lose(self) -> None:
        """Forget every session: the next use re-initialises the library."""
        self._sessions.clear()
        self.generation += 1
        self._lost = True

    @classmethod
    def _after_fork_in_child(cls) -> None:
        # A lock another thread held at the fork would stay held in the child for ever.
        cls._all_lock = threading.Lock()
        for module in cls._all.values():
            module.lock = threading.Lock()


os.register_at_fork(after_in_child=_Module._after_fork_in_child)


class _Throttled(Exception):
    """A reopen was tried less than ``REOPEN_INTERVAL`` ago."""


class _PinRefused(Exception):
    """The token refused the PIN (``cause``: its error's name), now (``first``) or before."""

    def __init__(self, cause: str, *, first: bool) -> None:
        super().__init__(cause)
        self.cause = cause
        self.first = first


def _name(exc: BaseException) -> str:
    return type(exc).__name__


class _TokenKey:
    """The token side of a ``TokenPrivateKey``: finds its key object and signs with it."""

    def __init__(self, ca: str, spec: TokenKeySpec) -> None:
        self.ca = ca
        self.spec = spec
        self._module = _Module.of(spec.module)
        self._key: SignMixin | None = None
        self._generation = -1
        self._down = False  # since a failure, until a signature works again

    def _find(self, session: pkcs11.Session) -> SignMixin:
        key = session.get_key(
            object_class=ObjectClass.PRIVATE_KEY, label=self.spec.key_label, id=self.spec.key_id
        )
        if not isinstance(key, SignMixin):
            raise NoSuchKey("the private key may not sign (CKA_SIGN false)")
        return key

    def _locked_key(self) -> SignMixin:
        session = self._module.session(self.spec.token_label, self.spec.pin)
        if self._key is None or self._generation != self._module.generation:
            self._key = self._find(session)
            self._generation = self._module.generation
        return self._key

    def open(self) -> SignMixin:
        """The key object, at start: any trouble is a ``ValueError`` naming the CA."""
        where = f"CA {self.ca!r}: {self.spec.describe()}"
        with self._module.lock:
            try:
                return self._locked_key()
            except NoSuchToken:
                raise ValueError(
                    f"CA {self.ca!r}: no token labelled {self.spec.token_label!r} "
                    f"in {self.spec.module}"
                ) from None
            except MultipleTokensReturned:
                raise ValueError(
                    f"CA {self.ca!r}: several tokens labelled {self.spec.token_label!r}"
                ) from None
            except _PinRefused as exc:
                raise ValueError(
                    f"CA {self.ca!r}: token {self.spec.token_label!r} refused the PIN ({exc.cause})"
                ) from None
            except NoSuchKey:
                raise ValueError(f"{where}: no private key that may sign") from None
            except MultipleObjectsReturned:
                raise ValueError(f"{where}: several private keys match") from None
            except PKCS11Error as exc:
                self._module.lose()
                raise ValueError(f"{where}: {_name(exc)}") from None
            except _Throttled:
                raise ValueError(f"{where}: token lost a moment ago; try again") from None

    def run(self, operation: Callable[[SignMixin], T]) -> T:
        """``operation`` on the key object, one at a time per module; a token that fails
        is ``SignerUnavailable`` until it works again."""
        with self._module.lock:
            try:
                result = operation(self._locked_key())
            except _Throttled:
                raise SignerUnavailable(self.ca, "token lost; reopening shortly") from None
            except _PinRefused as exc:
                # Not a loss: logging in again with this PIN would only bring the token
                # nearer to locking it (CKR_PIN_LOCKED), for every node that shares it.
                cause = f"token {self.spec.token_label!r} refused the PIN ({exc.cause})"
                if exc.first:
                    self._down = True
                    log.error(
                        "CA %s cannot sign: %s; it is not tried again: answering 503 until "
                        "the server is restarted with the right PIN",
                        self.ca,
                        cause,
                    )
                raise SignerUnavailable(self.ca, cause) from None
            except PKCS11Error as exc:
                self._module.lose()
                cause = f"{_name(exc)} from {self.spec.describe()}"
                if not self._down:  # one line per outage, not one per refused request
                    self._down = True
                    log.warning(
                        "CA %s cannot sign (%s): answering 503 until the token works again",
                        self.ca,
                        cause,
                    )
                raise SignerUnavailable(self.ca, cause) from None
            if self._down:
                self._down = False
                log.warning("CA %s signs again: %s is back", self.ca, self.spec.describe())
            return result

    def sign(self, mechanism: Mechanism, data: bytes) -> bytes:
        return self.run(lambda key: key.sign(data, mechanism=mechanism))


_PREHASHED: Final = {32: "sha256", 48: "sha384", 64: "sha512"}


def _digest(data: Buffer, algorithm: hashes.HashAlgorithm | Prehashed) -> tuple[str, bytes]:
    if isinstance(algorithm, Prehashed):
        if len(data) != algorithm.digest_size or len(data) not in _PREHASHED:
            raise ValueError("prehashed data must be a SHA-256, SHA-384 or SHA-512 digest")
        return _PREHASHED[len(data)], bytes(data)
    if algorithm.name not in _DIGEST_INFO:
        raise ValueError(f"token keys sign with SHA-256, SHA-384 or SHA-512, not {algorithm.name}")
    return algorithm.name, hashlib.new(algorithm.name, data).digest()


def _not_extractable(ca: str) -> TypeError:
    return TypeError(f"the key of CA {ca} is in a PKCS#11 token and cannot be exported")


_Public = TypeVar("_Public", ec.EllipticCurvePublicKey, rsa.RSAPublicKey)


class _TokenHandle(Generic[_Public]):
    """What a key in a token is, whatever its type: a handle that signs through the token
    and knows its public key; nothing private can be exported, and copies would share the
    token anyway."""

    def __init__(self, token: _TokenKey, public: _Public) -> None:
        self._token = token
        self._public: _Public = public

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> _Public:
        return self._public

    def private_bytes(
        self,
        encoding: Encoding,
        format: PrivateFormat,
        encryption_algorithm: KeySerializationEncryption,
    ) -> bytes:
        raise _not_extractable(self._token.ca)

    def __copy__(self) -> Self:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Self:
        return self


class TokenEcKey(_TokenHandle[ec.EllipticCurvePublicKey], ec.EllipticCurvePrivateKey):
    """An EC key in a token (P-256, P-384)."""

    def __repr__(self) -> str:
        return f"<TokenEcKey {self._public.curve.name} CA {self._token.ca}>"

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise TypeError("token EC keys sign with ECDSA only")
        if signature_algorithm.deterministic_signing:
            raise ValueError("token EC keys do not sign deterministically (RFC 6979)")
        _, digest = _digest(data, signature_algorithm.algorithm)
        raw = self._token.sign(Mechanism.ECDSA, digest)  # r || s, each the order's length
        half = len(raw) // 2
        r, s = int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        return encode_dss_signature(r, s)

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise TypeError("token CA keys only sign")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise _not_extractable(self._token.ca)


class TokenRsaKey(_TokenHandle[rsa.RSAPublicKey], rsa.RSAPrivateKey):
    """An RSA key in a token (PKCS #1 v1.5 signatures, as estkit issues)."""

    def __repr__(self) -> str:
        return f"<TokenRsaKey {self._public.key_size} CA {self._token.ca}>"

    def sign(
        self,
        data: bytes,
        padding: padding.AsymmetricPadding,
        algorithm: hashes.HashAlgorithm | Prehashed | NoDigestInfo,
    ) -> bytes:
        if not isinstance(padding, _PKCS1v15):
            raise TypeError(f"token RSA keys sign with PKCS1v15 only, not {padding.name}")
        if isinstance(algorithm, NoDigestInfo):  # the caller's bytes as they are
            return self._token.sign(Mechanism.RSA_PKCS, bytes(data))
        name, digest = _digest(data, algorithm)
        return self._token.sign(Mechanism.RSA_PKCS, _DIGEST_INFO[name] + digest)

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        raise TypeError("token CA keys only sign")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        raise _not_extractable(self._token.ca)


_PKCS1v15 = padding.PKCS1v15
TokenPrivateKey = TokenEcKey | TokenRsaKey


def _token_public_key(key: pkcs11.PublicKey) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    if key.key_type is KeyType.EC:
        public = load_der_public_key(encode_ec_public_key(key))
    else:
        public = rsa.RSAPublicNumbers(
            int.from_bytes(key[Attribute.PUBLIC_EXPONENT], "big"),
            int.from_bytes(key[Attribute.MODULUS], "big"),
        ).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    return public


def open_token_key(
    ca: str, spec: TokenKeySpec, public: CertificatePublicKeyTypes
) -> TokenPrivateKey:
    """The key of CA ``ca`` in its token, checked by a probe signature to be the private
    half of ``public`` (the CA certificate's public key).

    ``ValueError`` when the token, the PIN or the key is not right; the token is kept open
    (one logged-in session per token and process, see the module's docstring).
    """
    token = _TokenKey(ca, spec)
    found = token.open()
    key: TokenPrivateKey
    if isinstance(public, ec.EllipticCurvePublicKey) and found.key_type is KeyType.EC:
        key = TokenEcKey(token, public)
    elif isinstance(public, rsa.RSAPublicKey) and found.key_type is KeyType.RSA:
        key = TokenRsaKey(token, public)
    else:
        raise ValueError(
            f"CA {ca!r}: {spec.describe()} is a {found.key_type.name} key, the CA "
            f"certificate's is {type(public).__name__}"
        )
    _check_belongs(ca, key, public, spec)
    return key


def _check_belongs(
    ca: str,
    key: TokenPrivateKey,
    public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    spec: TokenKeySpec,
) -> None:
    probe = b"estkit: does this token key belong to the CA certificate?"
    try:
        if isinstance(key, TokenEcKey):
            assert isinstance(public, ec.EllipticCurvePublicKey)
            public.verify(
                key.sign(probe, ec.ECDSA(hashes.SHA256())), probe, ec.ECDSA(hashes.SHA256())
            )
        else:
            assert isinstance(public, rsa.RSAPublicKey)
            signature = key.sign(probe, padding.PKCS1v15(), hashes.SHA256())
            public.verify(signature, probe, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise ValueError(f"CA {ca!r}: {spec.describe()} is not the CA certificate's key") from None
    except SignerUnavailable as exc:
        raise ValueError(f"CA {ca!r}: {spec.describe()} cannot sign ({exc.cause})") from None


def generate_token_key(ca: str, spec: TokenKeySpec, key_type: str) -> TokenPrivateKey:
    """Make the key pair of CA ``ca`` inside the token; return it, ready to sign (its CA
    certificate, self-signed for a root).

    The private key is a token object (CKA_TOKEN), sensitive and never extractable, for
    signing only; both objects get ``spec.key_label`` and a CKA_ID: ``spec.key_id``, or
    else the RFC 5280 key identifier (SHA-1 of the public key), the SubjectKeyIdentifier
    estkit puts in the CA's certificate. A key with the same label or id is refused, never
    replaced. ``key_type``: one of ``TOKEN_KEY_TYPES``.
    """
    if key_type not in TOKEN_KEY_TYPES:
        raise ValueError(
            f"unknown key type {key_type!r}, expected one of {', '.join(TOKEN_KEY_TYPES)}"
        )
    if spec.key_label is None:
        raise ValueError("a generated token key needs a label")
    module = _Module.of(spec.module)
    private_template = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
        Attribute.DECRYPT: False,
        Attribute.DERIVE: False,
        Attribute.UNWRAP: False,
    }
    public_template = {Attribute.TOKEN: True, Attribute.VERIFY: True, Attribute.ENCRYPT: False}
    where = spec.describe()
    with _setting_up(module, spec.token_label, spec.pin) as session:
        try:
            names: dict[Attribute, object] = {Attribute.LABEL: spec.key_label}
            if spec.key_id is not None:
                names[Attribute.ID] = spec.key_id
            for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                for attribute, value in names.items():
                    if any(
                        True for _ in session.get_objects({Attribute.CLASS: cls, attribute: value})
                    ):
                        what = attribute.name.lower()
                        raise ValueError(f"{where}: the token already holds a key with that {what}")
            pub: pkcs11.PublicKey
            priv: pkcs11.PrivateKey
            if key_type in _CURVES:
                params = session.create_domain_parameters(
                    KeyType.EC,
                    {Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVES[key_type])},
                    local=True,
                )
                pub, priv = params.generate_keypair(
                    store=True,
                    label=spec.key_label,
                    id=spec.key_id,
                    public_template=public_template,
                    private_template=private_template,
                )
            else:
                pub, priv = session.generate_keypair(
                    KeyType.RSA,
                    int(key_type.removeprefix("rsa-")),
                    store=True,
                    label=spec.key_label,
                    id=spec.key_id,
                    public_template={
                        **public_template,
                        Attribute.PUBLIC_EXPONENT: (65537).to_bytes(3, "big"),
                    },
                    private_template=private_template,
                )
            public = _token_public_key(pub)
            key_id = spec.key_id
            if key_id is None:  # known only now: set afterwards (CKA_ID may be modified)
                key_id = x509.SubjectKeyIdentifier.from_public_key(public).digest
                pub[Attribute.ID] = key_id
                priv[Attribute.ID] = key_id
        except PKCS11Error as exc:
            module.lose()
            raise ValueError(f"{where}: cannot generate a {key_type} key ({_name(exc)})") from None
    return open_token_key(ca, replace(spec, key_id=key_id), public)


@contextlib.contextmanager
def _setting_up(module: _Module, token_label: str, pin: str) -> Iterator[pkcs11.Session]:
    """The module's logged-in session on ``token_label``, under its lock, for setting up:
    a module, token or PIN that is not right is a ``ValueError`` saying which."""
    with module.lock:
        try:
            yield module.session(token_label, pin)
        except NoSuchToken:
            raise ValueError(f"no token labelled {token_label!r} in {module.path}") from None
        except MultipleTokensReturned:
            raise ValueError(f"several tokens labelled {token_label!r} in {module.path}") from None
        except _PinRefused as exc:
            raise ValueError(f"token {token_label!r} refused the PIN ({exc.cause})") from None
        except PKCS11Error as exc:
            module.lose()
            raise ValueError(f"token {token_label!r}: {_name(exc)}") from None
        except _Throttled:
            raise ValueError(f"token {token_label!r} lost a moment ago; try again") from None


def token_labels_in_use(
    *, module: Path, token_label: str, pin: str, labels: Iterable[str]
) -> list[str]:
    """Those of ``labels`` that a key object (private or public) in the token already has.

    Asked before any key is made, it is also the check that the module loads, the token
    is there and takes the PIN (``ValueError`` saying which is not), so that nothing is
    made, in the token or on disk, when one of them is wrong.
    """
    with _setting_up(_Module.of(module), token_label, pin) as session:
        return [
            label
            for label in labels
            if any(
                True
                for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY)
                for _ in session.get_objects({Attribute.CLASS: cls, Attribute.LABEL: label})
            )
        ]


def _check_kept_in(where: str, private: pkcs11.Object) -> None:
    """``ValueError`` unless the token says the private key can never leave it in clear
    (CKA_SENSITIVE true, CKA_EXTRACTABLE false), as a key estkit makes."""
    try:
        sensitive, extractable = private[Attribute.SENSITIVE], private[Attribute.EXTRACTABLE]
    except PKCS11Error as exc:
        raise ValueError(
            f"{where}: the token does not say whether the private key can be exported "
            f"({_name(exc)}); estkit uses only sensitive, non-extractable CA keys"
        ) from None
    if sensitive is not True or extractable is not False:
        raise ValueError(
            f"{where}: the private key can be exported (CKA_SENSITIVE {sensitive}, "
            f"CKA_EXTRACTABLE {extractable}); estkit uses only sensitive, non-extractable "
            "CA keys: make it so in the token, or use another key"
        )


def existing_token_key(ca: str, spec: TokenKeySpec) -> TokenPrivateKey | None:
    """The key pair of CA ``ca`` already in the token under ``spec``'s label and/or id,
    ready to sign; None when the token holds no private key so named.

    The private key must be sensitive and not extractable (``ValueError`` if the token
    lets it out: estkit's CA keys never leave their token). Its public key is read from
    the token's public key object of the same label and id (without one estkit cannot
    know what to certify: ``ValueError``), and a probe signature checks that the private
    key is its other half.
    """
    module = _Module.of(spec.module)
    where = f"CA {ca!r}: {spec.describe()}"
    with _setting_up(module, spec.token_label, spec.pin) as session:
        try:
            private = session.get_key(
                object_class=ObjectClass.PRIVATE_KEY, label=spec.key_label, id=spec.key_id
            )
        except NoSuchKey:
            return None
        except MultipleObjectsReturned:
            raise ValueError(f"{where}: several private keys match") from None
        _check_kept_in(where, private)
        # Keys are paired by CKA_ID (PKCS#11 convention); the label is the fallback.
        key_id = spec.key_id if spec.key_id is not None else private[Attribute.ID] or None
        try:
            public_object = session.get_key(
                object_class=ObjectClass.PUBLIC_KEY,
                label=spec.key_label if key_id is None else None,
                id=key_id,
            )
        except (NoSuchKey, MultipleObjectsReturned) as exc:
            found = "no" if isinstance(exc, NoSuchKey) else "more than one"
            raise ValueError(
                f"{where}: {found} public key object of the same "
                f"{'label' if key_id is None else 'id'}, so what to certify is not known"
            ) from None
        if public_object.key_type not in (KeyType.EC, KeyType.RSA):
            raise ValueError(f"{where}: a {public_object.key_type.name} key, not EC or RSA")
        assert isinstance(public_object, pkcs11.PublicKey)  # found by that class
        public = _token_public_key(public_object)
    return open_token_key(ca, replace(spec, key_id=key_id), public)
