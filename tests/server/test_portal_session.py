"""Portal sessions and charts, pure: the signed cookie, its CSRF tokens, the key file,
and the SVG charts."""

from __future__ import annotations

import datetime as dt
import re
import stat
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from estkit.server.portal import charts
from estkit.server.portal.session import (
    KEY_FILE,
    SESSION_LIFETIME,
    SessionSigner,
    load_or_create_key,
)
from estkit.server.portal.web import local_path
from estkit.store import ApiToken

NOW = dt.datetime(2026, 12, 10, 12, 0, tzinfo=dt.UTC)
TOKEN = ApiToken(
    id=7,
    name="ops",
    token_hash="ab" * 32,
    scopes=frozenset({"admin"}),
    created_at=NOW,
    created_by="test",
    expires_at=None,
    revoked_at=None,
    last_used_at=None,
)


@pytest.fixture
def signer() -> SessionSigner:
    return SessionSigner(b"k" * 32)


def test_a_session_cookie_names_its_token_and_verifies_until_it_expires(
    signer: SessionSigner,
) -> None:
    cookie, session = signer.issue(TOKEN, now=NOW)
    parsed = signer.parse(cookie, now=NOW + SESSION_LIFETIME - dt.timedelta(seconds=1))
    assert parsed == session and parsed.token_id == TOKEN.id
    assert signer.verify(cookie, TOKEN)
    assert signer.parse(cookie, now=NOW + SESSION_LIFETIME) is None


@pytest.mark.parametrize(
    "forge",
    [
        lambda c: c.replace("v1.7.", "v1.8.", 1),
        lambda c: re.sub(r"^(v1\.7\.)(\d+)", lambda m: m[1] + str(int(m[2]) + 3600), c),
        lambda c: c[:-2] + ("AA" if not c.endswith("AA") else "BB"),
    ],
    ids=["fail/other-token-id", "fail/longer-expiry", "fail/other-mac"],
)
def test_a_changed_cookie_does_not_verify(signer: SessionSigner, forge: object) -> None:
    cookie, _ = signer.issue(TOKEN, now=NOW)
    assert callable(forge)
    assert not signer.verify(forge(cookie), TOKEN)


def test_a_cookie_is_bound_to_the_token_digest_and_the_key(signer: SessionSigner) -> None:
    cookie, _ = signer.issue(TOKEN, now=NOW)
    assert not signer.verify(cookie, replace(TOKEN, token_hash="cd" * 32))
    assert not SessionSigner(b"x" * 32).verify(cookie, TOKEN)


@pytest.mark.parametrize(
    "value", ["", "v1", "v2.7.1.n.m", "v1.x.1.n.m", "v1.7.x.n.m", "v1." + "9" * 30 + ".1.n.m"]
)
def test_a_malformed_cookie_is_no_session(signer: SessionSigner, value: str) -> None:
    assert signer.parse(value, now=NOW) is None


def test_csrf_tokens_differ_per_session_and_from_sign_in_tokens(signer: SessionSigner) -> None:
    _, one = signer.issue(TOKEN, now=NOW)
    _, two = signer.issue(TOKEN, now=NOW)
    assert signer.csrf(one) != signer.csrf(two)
    assert signer.csrf(one) == signer.csrf(one)
    assert signer.login_csrf(one.nonce) != signer.csrf(one)
    assert signer.same(signer.csrf(one), signer.csrf(one))
    assert not signer.same(None, signer.csrf(one))


def test_the_key_file_is_made_once_0600_and_shared_by_processes_starting_together(
    tmp_path: Path,
) -> None:
    keys: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: keys.append(load_or_create_key(tmp_path))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(keys) == 8 and len(set(keys)) == 1 and len(keys[0]) == 32
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILE]
    assert load_or_create_key(tmp_path) == keys[0]


def test_a_truncated_key_file_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_text("abcd\n")
    with pytest.raises(ValueError, match=KEY_FILE):
        load_or_create_key(tmp_path)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/ui/devices?status=active", "/ui/devices?status=active"),
        ("//evil.example/ui/", "/ui/"),
        ("https://evil.example/ui/", "/ui/"),
        ("/ui//evil.example", "/ui/"),
        ("/ui/\\evil", "/ui/"),
        ("/api/v1/cas", "/ui/"),
        (None, "/ui/"),
    ],
    ids=["ok/portal", "fail/scheme-relative", "fail/absolute", "fail/double-slash",
         "fail/backslash", "fail/outside-portal", "ok/none"],
)  # fmt: skip
def test_after_sign_in_only_portal_paths_are_followed(target: str | None, expected: str) -> None:
    assert local_path(target) == expected


def test_a_daily_chart_has_a_bar_per_day_with_its_number() -> None:
    start = dt.date(2026, 12, 1)
    span = charts.days(start, 30)
    bars = charts.daily_bars({start: 3, start + dt.timedelta(days=29): 7}, span)
    assert [b.value for b in bars] == [3] + [0] * 28 + [7]
    svg = charts.bar_chart(bars, title="Issued <per> day")
    assert svg.count("<rect ") == 30
    assert "<title>2026-12-30: 7</title>" in svg
    assert "Issued &lt;per&gt; day" in svg and "<per>" not in svg
    assert ">10</text>" in svg  # the axis top: the next 1-2-5 step above 7


@pytest.mark.parametrize(("top", "axis"), [(0, 1), (1, 1), (3, 5), (20, 20), (21, 50), (999, 1000)])
def test_the_axis_top_is_a_round_number_at_least_the_largest_bar(top: int, axis: int) -> None:
    bars = [charts.Bar(label="x", title="x", value=top)]
    assert f">{axis}</text>" in charts.bar_chart(bars, title="t")


def test_stacked_series_rank_codes_by_count_and_fold_the_rest_into_other() -> None:
    start = dt.date(2026, 12, 1)
    span = charts.days(start, 3)
    counts = {(start, f"code-{n}"): n + 1 for n in range(9)} | {
        (start + dt.timedelta(days=1), "other"): 4,
        (start + dt.timedelta(days=2), "code-8"): 1,
    }
    series, columns = charts.stack_series(counts, span)
    assert len(series) == charts.SERIES_COLOURS and series[-1] == "other"
    assert series[:3] == ["code-8", "code-7", "code-6"]
    # code-0 and code-1 (1 and 2 on day one) fold into "other", beside its own 4 on day two.
    assert [c.total for c in columns] == [sum(range(1, 10)), 4, 1]
    assert dict(columns[0].segments)[series.index("other")] == 3
    assert columns[1].segments == ((series.index("other"), 4),)
    assert columns[1].title == "2026-12-02: 4 (other 4)"


def test_a_stacked_chart_draws_a_segment_per_nonzero_count_and_escapes_titles() -> None:
    day = dt.date(2026, 12, 1)
    series, columns = charts.stack_series(
        {(day, "revoked"): 2, (day, "<x>"): 1}, charts.days(day, 2)
    )
    svg = charts.stacked_chart(columns, title="Refusals")
    assert svg.count('<rect class="bar s') == 2
    assert svg.count('<rect class="bar"') == 1  # the empty day: a bar of height 0
    assert "<x>" not in svg and "&lt;x&gt;" in svg
    assert series == ["revoked", "<x>"]
