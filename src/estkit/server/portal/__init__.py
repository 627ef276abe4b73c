"""The operator portal under ``/ui`` (``views``), its sessions (``session``), OIDC
sign-in (``oidc_signin``) and the charts it draws (``charts``)."""

from estkit.server.portal.oidc_signin import oidc_sign_in
from estkit.server.portal.session import SessionSigner, load_or_create_key
from estkit.server.portal.views import Portal

PORTAL_PATH = "/ui"

__all__ = ["PORTAL_PATH", "Portal", "SessionSigner", "load_or_create_key", "oidc_sign_in"]
