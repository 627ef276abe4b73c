"""When to renew: a pure function of the certificate's own dates."""

from __future__ import annotations

import datetime as dt
import random

from cryptography import x509


def renewal_time(
    cert: x509.Certificate, *, fraction: float, jitter: float, rng: random.Random
) -> dt.datetime:
    """``notBefore + lifetime * fraction``, moved earlier by up to ``jitter`` of the lifetime.

    Jitter only ever moves renewal earlier, so a fleet issued together spreads
    out without any device renewing late.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if not 0 <= jitter < fraction:
        raise ValueError(f"jitter must be in [0, fraction), got {jitter}")
    not_before = cert.not_valid_before_utc
    lifetime = cert.not_valid_after_utc - not_before
    return not_before + lifetime * (fraction - jitter * rng.random())
