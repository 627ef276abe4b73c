"""The operator portal in-process, for tests: a browser's cookie jar over the ASGI app,
sign-in, and the CSRF token of a page's forms."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class TestClient:
    """A browser's cookie jar over the ASGI app, in-process (no sockets, no TLS: the
    base URL is https so the Secure cookies come back)."""

    __test__ = False

    def __init__(self, app: Any) -> None:
        self.transport = httpx.ASGITransport(app=app)
        self.cookies = httpx.Cookies()

    def request(
        self, method: str, path: str, *, follow_redirects: bool = True, **kwargs: Any
    ) -> httpx.Response:
        async def call() -> httpx.Response:
            async with httpx.AsyncClient(
                transport=self.transport, base_url="https://est.test", cookies=self.cookies
            ) as client:
                answer = await client.request(
                    method, path, follow_redirects=follow_redirects, **kwargs
                )
                await answer.aread()
                self.cookies = client.cookies
                return answer

        return asyncio.run(call())

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)


def sign_in(client: TestClient, token: str, *, next_path: str = "/ui/") -> httpx.Response:
    form = client.get("/ui/login")
    csrf = _CSRF.search(form.text)
    assert csrf is not None, form.text
    return client.post(
        "/ui/login",
        data={"csrf": csrf[1], "token": token, "next": next_path},
        follow_redirects=False,
    )


def csrf_of(client: TestClient, path: str) -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    found = _CSRF.search(page.text)
    assert found is not None
    return found[1]
