"""API keys and what each may do: which models, how much per minute and per day, which moderation.

The keys file (``GENSERVE_API_KEYS_FILE``) is either one key per line (each may use everything without
limits) or YAML, one entry per key::

    keys:
      - name: team-a                      # what logs and metrics show; never the key
        key_sha256: 9f86d08...            # `genserve keys hash` prints it; `key: ...` takes the key itself
        models: ["genserve-*"]            # fnmatch patterns (default: every model)
        modalities: [text, embedding]     # default: every modality
        limits:
          per_minute: {requests: 60, tokens: 20000, images: 10, audio_seconds: 120, molecules: 500}
          per_day: {requests: 5000, tokens: 1000000}
        moderation: {action: block, input: true}   # merged with the model's policy: the stricter wins

A model the key may not use is a 403 ``model_not_allowed`` (and ``/v1/models`` does not list it).
Requests count when they arrive, before their body is read, so a client over its request rate costs the
server nothing; tokens (text and embeddings), images, audio seconds and molecules count when they are
made, and a request is refused while its model's unit is used up (as OpenAI charges tokens). Windows
are fixed: the minute and the UTC day the clock is in; the 429 (``rate_limit_exceeded`` per minute,
``insufficient_quota`` per day) carries ``Retry-After`` until the window ends, and every response of a
limited key carries OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers (and
``-images``, ``-audio_seconds``, ``-molecules`` for the other units) for the per-minute windows.

Counts are exact within one process; with ``GENSERVE_REDIS_URL`` every gateway replica shares them
(one Lua script checks and counts all of a request's windows atomically). If Redis cannot be reached a
limited key's requests get 503 ``rate_limiter_unavailable``: limits fail closed. ``SIGHUP`` rereads
the keys file; a file that does not parse keeps the old keys and logs why.
"""

from __future__ import annotations

import asyncio
import contextvars
import fnmatch
import hashlib
import hmac
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from genserve.app.errors import AuthenticationError, GenserveError, RateLimitError, UnavailableError
from genserve.app.metrics import Metrics
from genserve.app.moderation.policy import PolicyPatch
from genserve.app.registry import ConfigError, Modality, ModelEntry, field_path
from genserve.app.settings import Settings

log = logging.getLogger(__name__)

Unit = Literal["requests", "tokens", "images", "audio_seconds", "molecules"]
UNIT_OF: dict[str, Unit | None] = {"text": "tokens", "embedding": "tokens", "image": "images",
                                   "audio": "audio_seconds", "molecule": "molecules", "moderation": None}
PERIODS: dict[str, float] = {"per_minute": 60.0, "per_day": 86400.0}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class Allowance(BaseModel):
    """How much of each unit a key may use in one window; unset: unlimited."""

    model_config = ConfigDict(extra="forbid")
    requests: int | None = Field(None, ge=0)
    tokens: int | None = Field(None, ge=0, description="text and embedding tokens, prompt and completion")
    images: int | None = Field(None, ge=0)
    audio_seconds: float | None = Field(None, ge=0)
    molecules: int | None = Field(None, ge=0)

    def of(self, unit: Unit) -> float | None:
        value: float | None = getattr(self, unit)
        return value


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    per_minute: Allowance = Field(default_factory=Allowance)
    per_day: Allowance = Field(default_factory=Allowance, description="quotas, per UTC day")


class KeyPolicy(BaseModel):
    """One key and its rights, as the keys file states them."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    key: str | None = Field(None, min_length=1, description="the key itself (prefer key_sha256)")
    key_sha256: str | None = Field(None, description="hex SHA-256 of the key")
    models: list[str] | None = Field(None, description="fnmatch patterns of model ids; default all")
    modalities: list[Modality] | None = None
    limits: Limits = Field(default_factory=Limits)
    moderation: PolicyPatch | None = None

    @model_validator(mode="after")
    def _one_key(self) -> KeyPolicy:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of 'key' and 'key_sha256'")
        if self.key_sha256 is not None:
            self.key_sha256 = self.key_sha256.lower()
            if not _HEX64.match(self.key_sha256):
                raise ValueError("'key_sha256' must be 64 hex digits (genserve keys hash prints it)")
        else:  # only the digest is kept, in memory too
            self.key_sha256, self.key = hash_key(self.key or "").hex(), None
        return self

    def digest(self) -> bytes:
        return bytes.fromhex(self.key_sha256 or "")

    def allows(self, entry: ModelEntry) -> bool:
        return ((self.models is None or any(fnmatch.fnmatchcase(entry.id, p) for p in self.models))
                and (self.modalities is None or entry.modality in self.modalities))


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[KeyPolicy] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> KeysFile:
        names, digests = set(), set()
        for k in self.keys:
            if k.name in names:
                raise ValueError(f"two keys are named {k.name!r}")
            if k.digest() in digests:
                raise ValueError(f"the key of {k.name!r} is listed twice")
            names.add(k.name)
            digests.add(k.digest())
        return self


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def serving_keys(settings: Settings, public: bool = False) -> list[KeyPolicy]:
    """The keys a server starts with (:func:`read_keys`); ConfigError when there are none and the server
    would answer anyone beyond this machine without being told to (``public``: it may, whatever
    ``settings.host`` says, as Ray's proxies bind what the cluster's Serve config says)."""
    keys = read_keys(settings.api_keys, settings.api_keys_file)
    exposed = public or not settings.binds_loopback_only()
    if not keys and exposed and not settings.allow_unauthenticated:
        where = "a Ray cluster's proxies" if public else settings.host
        raise ConfigError(f"refusing to serve on {where} without API keys: set GENSERVE_API_KEYS "
                          "or GENSERVE_API_KEYS_FILE, or pass --allow-unauthenticated")
    return keys


def read_keys(plain: Iterable[str], path: Path | None) -> list[KeyPolicy]:
    """Every key: ``plain`` ones (unlimited) and the file's, YAML (a mapping with ``keys``) or one key per
    line (blank lines and ``#`` comments skipped). A file that cannot be used raises ConfigError naming
    the entry and field."""
    keys = list(plain)
    if path is None:
        return _unlimited(keys)
    try:
        text = path.read_text()
        raw = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read keys file {path}: {exc}") from exc
    if raw is None or isinstance(raw, str):  # a key a line (YAML reads that as one string)
        lines = (line.strip() for line in text.splitlines())
        return _unlimited(keys + [line for line in lines if line and not line.startswith("#")])
    if not isinstance(raw, dict):
        raise ConfigError(f"keys file {path}: the top level must be a mapping with 'keys' (a list of keys), or "
                          "the file one key a line; see docs/keys.md")
    try:
        return _unlimited(keys) + KeysFile.model_validate(raw).keys
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"keys file {path}: {field_path(tuple(err['loc']))}: {err['msg']}") from exc


def _unlimited(keys: list[str]) -> list[KeyPolicy]:
    """Keys given alone: every model, no limits; named by their place (``key-1``, ...), never by anything
    derived from the key (``/metrics`` is open, and a short hash would let anyone test guesses)."""
    return [KeyPolicy(name=f"key-{i}", key=key) for i, key in enumerate(keys, 1)]


# ------------------------------------------------------------------------------------------------ counters
class Counters(Protocol):
    """Counts per window key; ``take`` is all-or-nothing over its keys."""

    async def take(self, keys: list[str], limits: list[float], ttls: list[float], amount: float
                   ) -> tuple[bool, list[float]]:
        """If every ``count < limit`` and ``count + amount <= limit``: add ``amount`` to all. Returns
        whether it did, and the counts after."""
        ...

    async def add(self, keys: list[str], ttls: list[float], amount: float) -> None: ...

    async def close(self) -> None: ...


class LocalCounters:
    """One process's counts: exact, as the event loop runs one request's check at a time."""

    def __init__(self) -> None:
        self._counts: dict[str, tuple[float, float]] = {}  # key -> (count, expires at)

    def _get(self, key: str, now: float) -> float:
        count, expires = self._counts.get(key, (0.0, 0.0))
        return count if expires > now else 0.0

    async def take(self, keys: list[str], limits: list[float], ttls: list[float], amount: float
                   ) -> tuple[bool, list[float]]:
        now = time.monotonic()
        counts = [self._get(k, now) for k in keys]
        if any(c >= lim or c + amount > lim for c, lim in zip(counts, limits, strict=True)):
            return False, counts
        await self.add(keys, ttls, amount)
        return True, [c + amount for c in counts]

    async def add(self, keys: list[str], ttls: list[float], amount: float) -> None:
        now = time.monotonic()
        if len(self._counts) > 100_000:  # windows that ended
            self._counts = {k: v for k, v in self._counts.items() if v[1] > now}
        for key, ttl in zip(keys, ttls, strict=True):
            count = self._get(key, now)
            expires = self._counts[key][1] if count else now + ttl
            self._counts[key] = (count + amount, expires)

    async def close(self) -> None:
        return None


# Every key of one request in one round trip, atomically: replicas cannot both take the last request.
_TAKE = """
local amount = tonumber(ARGV[1])
local n = #KEYS
local counts = {}
for i = 1, n do counts[i] = tonumber(redis.call('GET', KEYS[i]) or '0') end
if ARGV[2] == '1' then
  for i = 1, n do
    local limit = tonumber(ARGV[2 + i])
    if counts[i] >= limit or counts[i] + amount > limit then
      local out = {'0'}
      for j = 1, n do out[j + 1] = tostring(counts[j]) end
      return out
    end
  end
end
local out = {'1'}
for i = 1, n do
  out[i + 1] = redis.call('INCRBYFLOAT', KEYS[i], ARGV[1])
  if redis.call('PTTL', KEYS[i]) < 0 then redis.call('PEXPIRE', KEYS[i], ARGV[2 + n + i]) end
end
return out
"""


class RedisCounters:
    """Counts shared by every gateway replica that names the same Redis."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis  # only where Redis is configured

        self.client = aioredis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.script = self.client.register_script(_TAKE)

    async def _run(self, keys: list[str], limits: list[float], ttls: list[float], amount: float,
                   conditional: bool) -> tuple[bool, list[float]]:
        from redis.exceptions import RedisError

        args: list[Any] = [repr(float(amount)), "1" if conditional else "0", *limits,
                           *(max(1, int(t * 1000)) for t in ttls)]
        try:
            out = await self.script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            log.error("rate limiter: Redis failed: %s", exc)
            raise UnavailableError("The rate limiter is unavailable; retry shortly.", code="rate_limiter_unavailable",
                                   headers={"Retry-After": "1"}) from exc
        return out[0] in (b"1", "1", 1), [float(c) for c in out[1:]]

    async def take(self, keys: list[str], limits: list[float], ttls: list[float], amount: float
                   ) -> tuple[bool, list[float]]:
        return await self._run(keys, limits, ttls, amount, True)

    async def add(self, keys: list[str], ttls: list[float], amount: float) -> None:
        await self._run(keys, [0.0] * len(keys), ttls, amount, False)

    async def close(self) -> None:
        await self.client.aclose()


# ------------------------------------------------------------------------------------------------ requests
class ModelNotAllowedError(GenserveError):
    status, type, code = 403, "invalid_request_error", "model_not_allowed"


@dataclass
class Usage:
    """What one request of one key has used; the middleware charges it when the response ends, and
    anything noted after that (a stream's generator closed late, after its client left) is charged
    when it is noted."""

    key: KeyPolicy
    tenancy: Tenancy
    headers: dict[str, str] = field(default_factory=dict)
    used: dict[Unit, float] = field(default_factory=dict)
    billed: dict[Unit, float] = field(default_factory=dict)  # what has been charged of ``used``
    closed: bool = False  # the response has ended

    def note(self, unit: Unit, amount: float) -> None:
        if amount > 0:
            self.used[unit] = self.used.get(unit, 0.0) + amount
            if self.closed:
                self.tenancy.charge_soon(self)

    def unbilled(self) -> dict[Unit, float]:
        return {u: a - self.billed.get(u, 0.0) for u, a in self.used.items() if a > self.billed.get(u, 0.0)}


CURRENT: contextvars.ContextVar[Usage | None] = contextvars.ContextVar("genserve_usage", default=None)


def current_key() -> KeyPolicy | None:
    usage = CURRENT.get()
    return usage.key if usage is not None else None


def note_usage(modality: str, amount: float, usage: Usage | None = None) -> None:
    """Counts what a request made (in its modality's unit) against its key's limits. ``usage``: the
    request's, taken (``CURRENT.get()``) where a generator may finish outside the request's context."""
    usage, unit = usage or CURRENT.get(), UNIT_OF.get(modality)
    if usage is not None and unit is not None:
        usage.note(unit, amount)


def key_allows(entry: ModelEntry) -> bool:
    key = current_key()
    return key is None or key.allows(entry)


def check_scope(entry: ModelEntry) -> None:
    """403 unless the request's key may use ``entry``."""
    key = current_key()
    if key is not None and not key.allows(entry):
        raise ModelNotAllowedError(f"This API key ({key.name}) may not use the model '{entry.id}'.", param="model")


async def admit_model(entry: ModelEntry) -> None:
    """403 unless the request's key may use ``entry``; 429 while the key has used up its minute's or day's
    allowance of the model's unit."""
    check_scope(entry)
    if (usage := CURRENT.get()) is not None:
        await _admit_unit(usage, entry.modality)


async def admit_modality(modality: Modality) -> None:
    """``admit_model`` for an endpoint that names no model (``/v1/molecules/properties``): 403 unless the
    key may use the modality, 429 while its unit is used up."""
    usage = CURRENT.get()
    if usage is None:
        return
    if usage.key.modalities is not None and modality not in usage.key.modalities:
        raise ModelNotAllowedError(f"This API key ({usage.key.name}) may not use {modality} endpoints.")
    await _admit_unit(usage, modality)


async def _admit_unit(usage: Usage, modality: str) -> None:
    unit = UNIT_OF.get(modality)
    if unit is not None:
        await usage.tenancy.take(usage, unit, 0.0)


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1.5s``, ``6m0s``, ``1h2m3s`` (to the millisecond)."""
    ms = max(1, math.ceil(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    out, rest = "", ms
    for size, suffix in ((3_600_000, "h"), (60_000, "m")):
        if rest >= size or out:
            out, rest = out + f"{rest // size}{suffix}", rest % size
    return out + f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"


class Tenancy:
    """The keys and their counters; one per app."""

    def __init__(self, plain_keys: list[str], keys_file: Path | None, metrics: Metrics,
                 redis_url: str | None = None, check_moderation: Callable[[PolicyPatch], None] | None = None) -> None:
        self.plain_keys, self.keys_file, self.metrics = list(plain_keys), keys_file, metrics
        self.check_moderation = check_moderation
        self.counters: Counters = RedisCounters(redis_url) if redis_url else LocalCounters()
        self.loop: asyncio.AbstractEventLoop | None = None  # the serving loop, once the app has started
        self._charging: set[asyncio.Task[None]] = set()
        self._install(self._read())

    def _read(self) -> list[KeyPolicy]:
        """``read_keys``, each key's moderation checked against every model's policy (ConfigError)."""
        keys = read_keys(self.plain_keys, self.keys_file)
        for i, key in enumerate(keys):
            if key.moderation is not None and self.check_moderation is not None:
                try:
                    self.check_moderation(key.moderation)
                except ValueError as exc:
                    raise ConfigError(f"keys file {self.keys_file}: keys[{i - len(self.plain_keys)}] "
                                      f"({key.name}).moderation: {exc}") from exc
        return keys

    def reload_threadsafe(self) -> None:
        """``reload`` from a signal handler: on the event loop, between requests, never inside one."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.reload)

    def _install(self, keys: list[KeyPolicy]) -> None:
        self._digests = [(k.digest(), k) for k in keys]

    def reload(self) -> bool:
        """Rereads the keys file (SIGHUP); a file that cannot be used keeps the old keys, and so does one
        that lists none (a file truncated while an editor writes it must not open the API to anyone)."""
        try:
            keys = self._read()
        except Exception as exc:  # whatever the file holds, the server keeps serving
            log.error("keys not reloaded, the old ones stay: %s", exc)
            return False
        if self._digests and not keys:
            log.error("keys not reloaded, the old ones stay: %s lists no key, which would open the API to "
                      "anyone", self.keys_file)
            return False
        self._install(keys)
        log.info("keys reloaded from %s: %d keys", self.keys_file, len(keys))
        return True

    def authenticate(self, token: str | None) -> KeyPolicy | None:
        """The key's policy, or None when the API is open; raises for a missing or unknown key. Every
        digest is compared, so neither the key's length nor which key matched shows in the timing."""
        if not self._digests:
            return None
        if not token:
            raise AuthenticationError("Missing API key: send 'Authorization: Bearer <key>'.",
                                      headers={"WWW-Authenticate": "Bearer"})
        digest, found = hash_key(token), None
        for known, key in self._digests:
            if hmac.compare_digest(digest, known):
                found = key
        if found is None:
            raise AuthenticationError("Incorrect API key provided.", headers={"WWW-Authenticate": "Bearer"})
        return found

    def _windows(self, key: KeyPolicy, unit: Unit) -> list[tuple[str, str, float, float, float]]:
        """(period, counter key, limit, ttl, seconds to reset) of each window limiting ``unit``."""
        now, out = time.time(), []
        for period, seconds in PERIODS.items():
            limit = getattr(key.limits, period).of(unit)
            if limit is not None:
                index = int(now // seconds)
                reset = (index + 1) * seconds - now
                # {name}: a Redis Cluster hash tag, so one request's windows share a slot (one script, one node)
                out.append((period, f"genserve:rl:{{{key.name}}}:{unit}:{period}:{index}", float(limit), reset + 5,
                            reset))
        return out

    async def admit_request(self, key: KeyPolicy) -> Usage:
        """The request's ``Usage``, once its key's request limits let it in (429 otherwise)."""
        usage = Usage(key, self)
        await self.take(usage, "requests", 1)
        self.metrics.key_usage.labels(key.name, "requests").inc()
        return usage

    async def take(self, usage: Usage, unit: Unit, amount: float) -> None:
        """Takes ``amount`` of ``unit`` (0: only checks something is left); 429 if a window is used up.
        Sets the per-minute headers either way."""
        windows = self._windows(usage.key, unit)
        if not windows:
            return
        ok, counts = await self.counters.take([w[1] for w in windows], [w[2] for w in windows],
                                              [w[3] for w in windows], amount)
        for (period, _, limit, _, reset), count in zip(windows, counts, strict=True):
            if period == "per_minute":
                remaining = max(0.0, limit - count)
                usage.headers.update({f"x-ratelimit-limit-{unit}": _number(limit),
                                      f"x-ratelimit-remaining-{unit}": _number(remaining),
                                      f"x-ratelimit-reset-{unit}": _duration(reset)})
        if ok:
            return
        # the window used up the longest: retrying before it ends is refused again
        period, _, limit, _, reset = max((w for w, c in zip(windows, counts, strict=True)
                                          if c >= w[2] or c + amount > w[2]), key=lambda w: w[4])
        self.metrics.key_rate_limited.labels(usage.key.name, unit, period).inc()
        word = unit.replace("_", " ")
        if period == "per_day":
            raise RateLimitError(f"This API key ({usage.key.name}) has used its daily quota of {_number(limit)} "
                                 f"{word}; it renews at 00:00 UTC.", code="insufficient_quota",
                                 # the OpenAI SDKs retry a 429 unless told not to; hours later is no retry
                                 headers={**usage.headers, "Retry-After": str(math.ceil(reset)),
                                          "x-should-retry": "false"})
        raise RateLimitError(f"Rate limit reached for this API key ({usage.key.name}): {_number(limit)} {word} per "
                             f"minute. Retry in {_duration(reset)}.", code="rate_limit_exceeded",
                             headers={**usage.headers, "Retry-After": str(math.ceil(reset))})

    async def charge(self, usage: Usage) -> None:
        """Adds what the request made since the last charge to its key's windows."""
        for unit, amount in usage.unbilled().items():
            usage.billed[unit] = usage.billed.get(unit, 0.0) + amount
            self.metrics.key_usage.labels(usage.key.name, unit).inc(amount)
            windows = self._windows(usage.key, unit)
            if windows:
                await self.counters.add([w[1] for w in windows], [w[3] for w in windows], amount)

    def charge_soon(self, usage: Usage) -> asyncio.Task[None] | None:
        """``charge`` in a task of its own: a request cancelled while it waits (its client left) is still
        charged, and what is noted after the response ended too."""
        try:
            task = asyncio.get_running_loop().create_task(self.charge(usage))
        except RuntimeError:  # no loop: the process is ending
            return None
        self._charging.add(task)
        task.add_done_callback(self._charged)
        return task

    def _charged(self, task: asyncio.Task[None]) -> None:
        self._charging.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("usage not charged: %s", exc)

    async def close(self) -> None:
        await self.counters.close()


def _number(value: float) -> str:
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text
