"""The PKCS#11 token options that ``server init`` and ``root init`` share: ``--signer
pkcs11 --pkcs11-module LIB --token-label T (--pin-file F | --pin-env VAR)``.

Each command adds its own key-label and use-existing options and its own refusal when
the token already holds a key under a label; what they share is checked here, with the
same one-line refusals and exit codes.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from estkit.cli.errors import EXIT_CONFIG, EXIT_NEEDS_SERVER, CliError

if TYPE_CHECKING:
    from estkit.ca.keyrefs import TokenKeyRef

EXIT_USAGE = 2  # as argparse's own refusals
_PIN_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def pin_env(value: str) -> str:
    """``--pin-env``'s type: the name of an environment variable."""
    if not _PIN_ENV_NAME.fullmatch(value):
        raise argparse.ArgumentTypeError(f"an environment variable's name, got {value!r}")
    return value


def pkcs11_chosen(args: argparse.Namespace, *, own: Iterable[tuple[str, object]]) -> bool:
    """Whether ``--signer pkcs11`` is given, with the module, the token label and one PIN
    source; ``own`` are the command's other token options (flag, value; None when not
    given). A token option without ``--signer pkcs11``, or one missing or doubled with
    it, is one line (exit 2)."""
    given = [
        flag
        for flag, value in (
            ("--pkcs11-module", args.pkcs11_module),
            ("--token-label", args.token_label),
            ("--pin-file", args.pin_file),
            ("--pin-env", args.pin_env),
            *own,
        )
        if value is not None
    ]
    if args.signer != "pkcs11":
        if given:
            raise CliError(f"{given[0]}: only with --signer pkcs11", exit_code=EXIT_USAGE)
        return False
    missing = [flag for flag in ("--pkcs11-module", "--token-label") if flag not in given]
    if args.pin_file is None and args.pin_env is None:
        missing.append("--pin-file or --pin-env")
    if missing:
        raise CliError(f"--signer pkcs11 needs {' and '.join(missing)}", exit_code=EXIT_USAGE)
    if args.pin_file is not None and args.pin_env is not None:
        raise CliError("--pin-file or --pin-env, not both", exit_code=EXIT_USAGE)
    return True


def labels_in_use(ref: TokenKeyRef, labels: Iterable[str]) -> list[str]:
    """Those of ``labels`` that a key in ``ref``'s token already has, asked before anything
    is written or made: python-pkcs11 must be installed (else exit 69), the PIN readable
    (else exit 78, naming the option it came from, not the config field it becomes), and
    the module must load and the token be there and take the PIN (else exit 78)."""
    from estkit.ca.keyrefs import read_pin

    try:
        from estkit.ca import hsm
    except ImportError:
        raise CliError(
            "--signer pkcs11 needs python-pkcs11: pip install 'estkit[hsm]'",
            exit_code=EXIT_NEEDS_SERVER,
        ) from None
    try:
        pin = read_pin(ref, os.environ)
    except ValueError as exc:
        message = str(exc).replace(f"{ref.field}.pin_file", "--pin-file")
        raise CliError(
            message.replace(f"{ref.field}.pin_env", "--pin-env"), exit_code=EXIT_CONFIG
        ) from None
    try:
        return hsm.token_labels_in_use(
            module=ref.module, token_label=ref.token_label, pin=pin, labels=labels
        )
    except ValueError as exc:
        raise CliError(str(exc), exit_code=EXIT_CONFIG) from None
