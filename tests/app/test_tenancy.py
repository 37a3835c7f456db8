"""API keys' scopes, limits and quotas (app/tenancy.py), in-process: the keys file's errors, exact counts
under concurrency (one process, and several sharing a real Redis), windows that end, reset formats.
The same through live gateways (headers, 403/429 bodies, SIGHUP, metrics): tests/e2e/test_keys.py."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import pytest

from genserve.app.errors import AuthenticationError, RateLimitError
from genserve.app.metrics import Metrics
from genserve.app.registry import ConfigError, ModelEntry
from genserve.app.tenancy import CURRENT, LocalCounters, Tenancy, Usage, _duration, _number, admit_model, read_keys


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    return path


def _tenancy(tmp_path: Path, text: str, redis_url: str | None = None) -> Tenancy:
    return Tenancy([], _file(tmp_path, text), Metrics(), redis_url)


@pytest.mark.parametrize(("text", "message"), [
    ("keys:\n  - name: a\n", "keys[0]: Value error, give exactly one of 'key' and 'key_sha256'"),
    ("keys:\n  - {name: a, key: k1, key_sha256: " + "ab" * 32 + "}\n", "give exactly one"),
    ("keys:\n  - {name: a, key_sha256: abc}\n", "keys[0]: Value error, 'key_sha256' must be 64 hex digits"),
    ("keys:\n  - {name: a, key: k1}\n  - {name: a, key: k2}\n", "two keys are named 'a'"),
    ("keys:\n  - {name: a, key: k1}\n  - {name: b, key: k1}\n", "the key of 'b' is listed twice"),
    ("keys:\n  - {name: a, key: k1, limits: {per_minute: {requests: -1}}}\n",
     "keys[0].limits.per_minute.requests: Input should be greater than or equal to 0"),
    ("keys:\n  - {name: a, key: k1, limits: {per_hour: {}}}\n", "keys[0].limits.per_hour: Extra inputs"),
    ("keys:\n  - {name: a, key: k1, modalities: [video]}\n", "keys[0].modalities[0]: Input should be"),
    ("keys:\n  - {name: 'a b', key: k1}\n", "keys[0].name: String should match pattern"),
    ("keys: [\n", "cannot read keys file"),
    ("keys: []\n", "keys: List should have at least 1 item"),
    ("- {name: a, key: k1}\n", "the top level must be a mapping with 'keys'"),
    ("team: {key: k1}\n", "keys: Field required"),
])
def test_a_bad_keys_file_is_refused_with_the_entry_and_field_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="keys file") as err:
        read_keys([], _file(tmp_path, text))
    assert message in str(err.value)


def test_keys_come_hashed_or_plain_and_plain_files_still_work(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"sk-team-b").hexdigest()
    t = _tenancy(tmp_path, "keys:\n  - {name: team-a, key: sk-team-a}\n"
                           f"  - {{name: team-b, key_sha256: {digest.upper()}}}\n")
    assert t.authenticate("sk-team-a").name == "team-a"
    assert t.authenticate("sk-team-b").name == "team-b"
    for bad in ("sk-team-c", digest, "sk-team-", "sk-team-aa"):
        with pytest.raises(AuthenticationError, match="Incorrect API key"):
            t.authenticate(bad)
    with pytest.raises(AuthenticationError, match="Missing API key"):
        t.authenticate(None)
    plain = read_keys(["env-key"], _file(tmp_path, "# comment\nk-1\n\n  k-2\n"))
    # named by their place, never by anything derived from the key (/metrics is open)
    assert [(k.name, k.key_sha256) for k in plain] == [
        ("key-1", hashlib.sha256(b"env-key").hexdigest()), ("key-2", hashlib.sha256(b"k-1").hexdigest()),
        ("key-3", hashlib.sha256(b"k-2").hexdigest())]
    assert all(k.key is None for k in plain)  # only digests are kept
    assert Tenancy([], None, Metrics()).authenticate(None) is None  # no keys: open


def test_scopes_by_model_pattern_and_modality(tmp_path: Path) -> None:
    t = _tenancy(tmp_path, "keys:\n  - {name: a, key: k1, models: ['genserve-*'], modalities: [text, image]}\n")
    key = t.authenticate("k1")
    entry = lambda mid, modality: ModelEntry(id=mid, modality=modality, backend="remote", url="http://x/v1")  # noqa: E731
    assert key.allows(entry("genserve-text-tiny", "text")) and key.allows(entry("genserve-gan", "image"))
    assert not key.allows(entry("genserve-speech", "audio"))  # pattern yes, modality no
    assert not key.allows(entry("other", "text"))  # modality yes, pattern no

    async def admit(mid: str, modality: str) -> None:
        reset = CURRENT.set(Usage(key, t))
        try:
            await admit_model(entry(mid, modality))
        finally:
            CURRENT.reset(reset)

    asyncio.run(admit("genserve-x", "text"))
    with pytest.raises(Exception, match=r"This API key \(a\) may not use the model 'other'") as err:
        asyncio.run(admit("other", "text"))
    assert (err.value.status, err.value.code, err.value.param) == (403, "model_not_allowed", "model")


async def _race(t: Tenancy, key_token: str, unit: str, n: int) -> list[bool]:
    key = t.authenticate(key_token)

    async def one() -> bool:
        try:
            await t.take(Usage(key, t), unit, 1)  # type: ignore[arg-type]
            return True
        except RateLimitError:
            return False

    return await asyncio.gather(*(one() for _ in range(n)))


def _fresh_minute(needed_s: float) -> None:
    """Waits, if need be, until the current minute window has ``needed_s`` left."""
    if (left := 60 - time.time() % 60) < needed_s:
        time.sleep(left + 0.05)


def test_exactly_the_limit_passes_under_concurrency_and_the_429_says_when(tmp_path: Path) -> None:
    _fresh_minute(3)
    t = _tenancy(tmp_path, "keys:\n  - {name: a, key: k1, limits: {per_minute: {requests: 20}}}\n")
    assert sum(asyncio.run(_race(t, "k1", "requests", 50))) == 20
    usage = Usage(t.authenticate("k1"), t)
    with pytest.raises(RateLimitError) as err:
        asyncio.run(t.take(usage, "requests", 1))
    e = err.value
    assert (e.status, e.code, e.type) == (429, "rate_limit_exceeded", "rate_limit_error")
    assert "Rate limit reached for this API key (a): 20 requests per minute" in e.message
    reset = 60 - time.time() % 60
    assert abs(int(e.headers["Retry-After"]) - reset) <= 1.01
    assert e.headers["x-ratelimit-limit-requests"] == "20" and e.headers["x-ratelimit-remaining-requests"] == "0"


def test_a_daily_quota_is_insufficient_quota_until_midnight_utc(tmp_path: Path) -> None:
    t = _tenancy(tmp_path, "keys:\n  - {name: q, key: k1, limits: {per_day: {tokens: 100}}}\n")
    usage = Usage(t.authenticate("k1"), t)
    asyncio.run(t.take(usage, "tokens", 0))  # something left: passes
    usage.note("tokens", 100)
    asyncio.run(t.charge(usage))
    asyncio.run(t.charge(usage))  # charged once only
    with pytest.raises(RateLimitError) as err:
        asyncio.run(t.take(Usage(usage.key, t), "tokens", 0))
    assert err.value.code == "insufficient_quota" and "daily quota of 100 tokens" in err.value.message
    assert abs(int(err.value.headers["Retry-After"]) - (86400 - time.time() % 86400)) <= 1.01
    assert t.metrics.key_usage.labels("q", "tokens")._value.get() == 100


def test_windows_end(monkeypatch: pytest.MonkeyPatch) -> None:
    counters, now = LocalCounters(), [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    assert asyncio.run(counters.take(["k"], [2.0], [10.0], 2.0)) == (True, [2.0])
    assert asyncio.run(counters.take(["k"], [2.0], [10.0], 1.0)) == (False, [2.0])
    now[0] += 10.5
    assert asyncio.run(counters.take(["k"], [2.0], [10.0], 1.0)) == (True, [1.0])


def test_reset_durations_read_as_openai_writes_them() -> None:
    assert [_duration(s) for s in (0.0201, 0.9999, 1, 1.5, 59.25, 59.9999, 60, 360, 3599.9999, 3723)] == [
        "21ms", "1s", "1s", "1.5s", "59.25s", "1m0s", "1m0s", "6m0s", "1h0m0s", "1h2m3s"]
    assert [_number(v) for v in (0, 20.0, 119.9996, 0.0004, 2.25)] == ["0", "20", "120", "0", "2.25"]


def test_sighup_reload_keeps_the_old_keys_when_the_new_file_is_bad(tmp_path: Path) -> None:
    t = _tenancy(tmp_path, "keys:\n  - {name: a, key: k1}\n")
    _file(tmp_path, "keys:\n  - {name: a, key: k1}\n  - {name: b, key: k2}\n")
    assert t.reload() and t.authenticate("k2").name == "b"
    for bad in ("keys:\n  - {name: a}\n", "", "# all keys removed\n", "- {name: b, key: k2}\n"):
        _file(tmp_path, bad)  # broken, or empty as an editor leaves it mid-write: never an open API
        assert not t.reload() and t.authenticate("k2").name == "b", bad
        with pytest.raises(AuthenticationError):
            t.authenticate(None)
    (tmp_path / "keys.yaml").write_bytes(b"keys:\n  - {name: \xff\xfe, key: k3}\n")  # not UTF-8
    assert not t.reload() and t.authenticate("k2").name == "b"


def test_a_keys_moderation_that_no_request_could_use_is_refused_at_load(tmp_path: Path) -> None:
    from genserve.app.moderation.service import ModerationService
    from genserve.app.registry import load_registry
    from genserve.app.settings import Settings

    moderation = ModerationService(Settings().moderation, load_registry(), Metrics())
    for patch, message in [
        ("{blocked_terms: ['" + "x" * 60 + "']}", "keys[0] (a).moderation: merged with the global policy's policy"),
        ("{guard_model: nope}", "keys[0] (a).moderation: guard_model 'nope' is not a moderation model"),
    ]:
        with pytest.raises(ConfigError) as err:
            Tenancy([], _file(tmp_path, f"keys:\n  - {{name: a, key: k1, moderation: {patch}}}\n"), Metrics(),
                    check_moderation=moderation.check_patch)
        assert message in str(err.value)
    ok = Tenancy([], _file(tmp_path, "keys:\n  - {name: a, key: k1, moderation: {blocked_terms: [pineapple]}}\n"),
                 Metrics(), check_moderation=moderation.check_patch)
    assert ok.authenticate("k1").moderation.blocked_terms == ["pineapple"]


def test_what_is_noted_after_the_response_ended_is_charged_too(tmp_path: Path) -> None:
    t = _tenancy(tmp_path, "keys:\n  - {name: a, key: k1, limits: {per_minute: {tokens: 10}}}\n")

    async def run() -> None:
        usage = Usage(t.authenticate("k1"), t)
        usage.note("tokens", 4)
        await t.charge(usage)
        await t.charge(usage)  # nothing new: nothing charged
        usage.closed = True
        usage.note("tokens", 6)  # a stream's generator closed late, after its client left
        await asyncio.sleep(0)
        await asyncio.gather(*t._charging)
        with pytest.raises(RateLimitError):
            await t.take(Usage(usage.key, t), "tokens", 0)

    asyncio.run(run())
    assert t.metrics.key_usage.labels("a", "tokens")._value.get() == 10


def test_the_429_waits_for_the_window_used_up_longest_and_a_quota_says_do_not_retry(tmp_path: Path) -> None:
    t = _tenancy(tmp_path, "keys:\n  - {name: a, key: k1, limits: {per_minute: {requests: 1}, "
                           "per_day: {requests: 1}}}\n")
    asyncio.run(t.take(Usage(t.authenticate("k1"), t), "requests", 1))
    with pytest.raises(RateLimitError) as err:
        asyncio.run(t.take(Usage(t.authenticate("k1"), t), "requests", 1))
    assert err.value.code == "insufficient_quota" and err.value.headers["x-should-retry"] == "false"
    assert int(err.value.headers["Retry-After"]) > 60 or time.time() % 86400 > 86400 - 61


def test_replicas_sharing_redis_count_exactly(tmp_path: Path, redis_url: str) -> None:
    """Three processes' worth of Tenancy objects on one Redis: 60 concurrent takes, exactly 25 pass,
    and what one charges the others see."""
    text = "keys:\n  - {name: shared, key: k1, limits: {per_minute: {requests: 25, images: 4}}}\n"
    replicas = [_tenancy(tmp_path, text, redis_url) for _ in range(3)]
    _fresh_minute(3)

    async def run() -> tuple[int, bool]:
        results = await asyncio.gather(*(_race(r, "k1", "requests", 20) for r in replicas))
        first = Usage(replicas[0].authenticate("k1"), replicas[0])
        first.note("images", 4)
        await replicas[0].charge(first)
        try:
            await replicas[1].take(Usage(replicas[1].authenticate("k1"), replicas[1]), "images", 0)
            refused = False
        except RateLimitError:
            refused = True
        for r in replicas:
            await r.close()
        return sum(sum(r) for r in results), refused

    assert asyncio.run(run()) == (25, True)


def test_an_unreachable_redis_fails_closed(tmp_path: Path) -> None:
    from tests.conftest import free_port

    t = _tenancy(tmp_path, "keys:\n  - {name: a, key: k1, limits: {per_minute: {requests: 5}}}\n",
                 f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(Exception, match="rate limiter is unavailable") as err:
        asyncio.run(t.take(Usage(t.authenticate("k1"), t), "requests", 1))
    assert err.value.status == 503 and err.value.code == "rate_limiter_unavailable"
