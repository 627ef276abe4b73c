"""Errors of the pure PKI layer.

    PkiError
    ├── DecodeError      bytes that are not what they claim to be (base64, DER, CMS, CSR)
    └── PolicyError      a well-formed value that estkit refuses (extensions, signature)
        └── KeyPolicyError   a key type or size outside policy

Both are ``ValueError`` too, as pyca/cryptography raises for bad values.
"""


class PkiError(ValueError):
    """Root of the pki package's errors."""


class DecodeError(PkiError):
    """Input could not be decoded as the expected wire format."""


class PolicyError(PkiError):
    """A decodable value that estkit's policy refuses."""


class KeyPolicyError(PolicyError):
    """A public key whose type or size estkit does not accept."""
