"""The authority: enroll, re-enroll, revoke; policies; signer backends. Knows nothing of HTTP."""
