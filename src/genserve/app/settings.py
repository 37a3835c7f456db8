"""Process settings: ``GENSERVE_*`` environment variables, overridden by CLI flags.

One ``Settings`` object is built at start-up and passed to ``create_app``; nothing reads the
environment later, so tests build their own.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from genserve.app.moderation.policy import Policy


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/genserve``, by default ``~/.local/state/genserve``."""
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "genserve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENSERVE_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    config: Path | None = Field(None, description="model registry YAML that extends or replaces the built-in one")
    models: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated ids: serve "
                                                   "only these entries of the registry (default: all)")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated keys")
    api_keys_file: Path | None = Field(None, description="keys file: one API key per line, or YAML with each "
                                       "key's name, models, limits and moderation (docs/keys.md)")
    redis_url: str | None = Field(None, pattern=r"^(redis|rediss|unix)://", description="Redis that every "
                                  "gateway replica shares its keys' rate-limit counts through (default: "
                                  "counted in this process)")
    allow_unauthenticated: bool = False
    max_body_bytes: int = Field(1 << 20, gt=0, description="largest request body accepted (413 above)")
    max_upload_bytes: int = Field(16 << 20, gt=0, description="largest multipart body of an image edit "
                                  "(files and fields; each model's limits cap the files further)")
    max_header_bytes: int = Field(64 << 10, ge=1024, description="largest request head (request line and "
                                  "headers; 431 above)")
    max_headers: int = Field(100, ge=8, description="most headers in one request (431 above)")
    header_timeout_s: float = Field(10.0, gt=0, description="time a client has to send a request's headers once "
                                    "it has connected or had its previous response (408 after)")
    body_timeout_s: float = Field(30.0, gt=0, description="longest pause inside a request body while the server "
                                  "reads it (408 after)")
    max_connections: int = Field(1000, ge=1, description="open connections and running requests beyond which "
                                 "new ones get 503")
    image_url_ttl_s: float = Field(3600.0, gt=0, description="how long an image made with response_format=url "
                                   "stays downloadable")
    image_store_bytes: int = Field(256 << 20, gt=0, description="memory for those images; the oldest go first")
    request_timeout_s: float = Field(300.0, gt=0, description="default deadline of a request (504 after)")
    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, how long running requests may "
                                    "finish (queued ones get 503 at once)")
    moderation: Policy = Field(default_factory=Policy, description="the global moderation policy (JSON), "
                               "e.g. GENSERVE_MODERATION='{\"action\": \"flag\"}'; models tighten it")
    state_dir: Path = Field(default_factory=default_state_dir, description="where genserve keeps what it "
                            "makes for itself: the watermark key and the C2PA private CA when none are given")
    watermark_key: SecretStr | None = Field(None, description="the secret that keys the watermarks (default: "
                                            "one made on first start in state_dir); give every replica the same")
    c2pa_cert: Path | None = Field(None, description="PEM chain (signing certificate first) that signs the C2PA "
                                   "content credentials of images and audio (default: a private CA's, made "
                                   "in state_dir)")
    c2pa_key: Path | None = Field(None, description="PEM private key of c2pa_cert")
    c2pa_trust_anchors: Path | None = Field(None, description="PEM certificates /v1/provenance/verify trusts "
                                            "(default: the private CA genserve made)")
    ray_gateway_replicas: int = Field(1, ge=1, description="genserve serve --ray: replicas of the gateway "
                                      "(the ingress deployment)")
    ray_retry: bool = Field(True, description="genserve serve --ray: run a request again, once, when the replica "
                            "serving it dies (off only to measure what the retry saves)")
    ray_proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="genserve serve --ray: where Ray Serve runs its HTTP proxies on port: every node "
        "with a replica (behind a load balancer) or the head only")
    ray_gateway_num_cpus: float = Field(1.0, ge=0, description="genserve serve --ray: CPUs Ray reserves for "
                                        "each gateway replica")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object a line")
    public_url: str | None = Field(None, pattern=r"^https?://[^/?#\s]+(/[^?#\s]*)?$",
                                   description="the address clients reach this server at, for the image URLs "
                                   "it hands out (default: http://HOST:PORT, loopback for a wildcard HOST); "
                                   "never taken from a request's Host header")
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated addresses whose X-Forwarded-For/-Proto headers "
        "are believed (default: nobody's)")

    @field_validator("api_keys", "trusted_proxies", "models", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("config", "api_keys_file", "c2pa_cert", "c2pa_key", "c2pa_trust_anchors")
    @classmethod
    def _must_exist(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file not found: {value}")
        return value

    def base_url(self) -> str:
        """Where clients reach this server: ``public_url``, else the bound address (loopback when the
        server binds every interface, which no client can dial)."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def binds_loopback_only(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
