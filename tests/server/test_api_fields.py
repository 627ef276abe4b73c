"""One field list per record: the API's certificate schema is the store's record without
its DER, so neither can grow a field the other lacks."""

from __future__ import annotations

import dataclasses

from estkit.server.api import CertificateOut
from estkit.store import CertificateRecord


def test_certificate_schema_is_the_record_without_der() -> None:
    record_fields = [f.name for f in dataclasses.fields(CertificateRecord)]
    assert set(CertificateOut.model_fields) == set(record_fields) - {"der"}
