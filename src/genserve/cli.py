"""The ``genserve`` command: ``serve`` runs the HTTP server, ``train`` trains embedded models and ``eval``
measures them (targets and their entry points: the family table, ``models/registry.py``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from pydantic import ValidationError

from genserve import __version__
from genserve.app.registry import ConfigError
from genserve.app.settings import Settings
from genserve.models.registry import EVAL_TARGETS, TRAIN_TARGETS, Target

log = logging.getLogger("genserve")


def _options(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in target.options}


def _train(args: argparse.Namespace) -> int:
    target = TRAIN_TARGETS[args.target]
    target.resolve()(out=Path(args.out), minutes=args.minutes, seed=args.seed, **_options(target, args))
    return 0


def _eval(args: argparse.Namespace) -> int:
    target = EVAL_TARGETS[args.target]
    print(target.resolve()(**_options(target, args)))
    return 0


def load_settings(overrides: dict[str, Any]) -> Settings:
    """Environment first, CLI flags over it; a bad value stops with the variable or flag named."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "?"
        where = f"--{name.replace('_', '-')}" if overrides.get(name) is not None else f"GENSERVE_{name.upper()}"
        raise ConfigError(f"invalid setting {where}: {err['msg']}") from exc


class DrainingServer(uvicorn.Server):
    """uvicorn runs the app's shutdown only after running requests end; queued ones must hear at
    once, when the signal arrives, that they will not be served here."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)


def _serve(args: argparse.Namespace) -> int:
    from genserve.app.deps import services_of
    from genserve.app.main import create_app
    from genserve.app.registry import load_registry

    settings = load_settings({"host": args.host, "port": args.port, "config": args.config,
                              "api_keys_file": args.api_keys_file, "log_level": args.log_level,
                              "allow_unauthenticated": args.allow_unauthenticated or None})
    logging.getLogger().setLevel(settings.log_level.upper())
    entries = load_registry(settings.config)
    if not settings.keys() and not settings.binds_loopback_only() and not settings.allow_unauthenticated:
        raise ConfigError(f"refusing to serve on {settings.host} without API keys: set GENSERVE_API_KEYS "
                          "or GENSERVE_API_KEYS_FILE, or pass --allow-unauthenticated")
    if not settings.keys():
        log.warning("no API keys configured: the API is open to anyone who can reach %s", settings.host)
    if settings.public_url is None and not settings.binds_loopback_only():
        log.warning("GENSERVE_PUBLIC_URL is not set: the links of response_format=url point at %s, which "
                    "clients elsewhere cannot open; set it to the address they use", settings.base_url())
    app = create_app(settings, entries)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            # X-Forwarded-* only from the proxies the operator names (uvicorn trusts loopback).
                            proxy_headers=bool(settings.trusted_proxies),
                            forwarded_allow_ips=settings.trusted_proxies or None,
                            # uvicorn annotates int but hands it to asyncio.timeout, which takes float seconds.
                            timeout_graceful_shutdown=settings.shutdown_grace_s)  # type: ignore[arg-type]
    DrainingServer(config, on_exit=services_of(app).manager.drain_threadsafe).run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"genserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the models of the registry over HTTP")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1, GENSERVE_HOST)")
    serve.add_argument("--port", type=int, help="port (default 8000, GENSERVE_PORT)")
    serve.add_argument("--config", help="model registry YAML extending the built-in one (GENSERVE_CONFIG)")
    serve.add_argument("--api-keys-file", help="file with one API key per line (GENSERVE_API_KEYS_FILE)")
    serve.add_argument("--allow-unauthenticated", action="store_true",
                       help="serve a non-loopback address without API keys")
    serve.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=_serve)
    train = sub.add_parser("train", help="train an embedded model and save it under models/weights/")
    train.add_argument("target", choices=list(TRAIN_TARGETS))
    train.add_argument("--out", default=None, help="output directory (default: the shipped one)")
    train.add_argument("--minutes", type=float, default=None,
                       help="wall-clock training budget (default 45; emoji-classifier: 3)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=None,
                       help="torch threads (mol, mol-vae, music, diffusion, emoji-classifier; default 2, "
                       "emoji-classifier: 1)")
    train.add_argument("--molecules", type=int, help="mol: train on a random subset of this many molecules")
    train.add_argument("--init-from", help="diffusion: continue from this saved pipeline directory's UNet")
    train.add_argument("--prediction-type", choices=["v_prediction", "epsilon"], default="v_prediction",
                       help="diffusion: what the UNet predicts (default v_prediction)")
    train.add_argument("--lr", type=float, help="diffusion: peak learning rate (default 1e-3)")
    train.set_defaults(func=_train)
    ev = sub.add_parser("eval", help="measure a model: held-out perplexity, int8 and int4 against full precision")
    ev.add_argument("target", choices=list(EVAL_TARGETS))
    ev.add_argument("--model", help="model directory (default: the embedded genserve-text-tiny, genserve-mol or "
                    "genserve-music); images: genserve-gan, genserve-vae, genserve-flow, genserve-diffusion or all "
                    "(default)")
    ev.add_argument("--quantization", nargs="+", default=["none", "int8", "int4"], choices=["none", "int8", "int4"],
                    help="variants to compare; the first is the baseline")
    ev.add_argument("--max-tokens", type=int, help="evaluate on the first N held-out tokens only")
    ev.add_argument("--threads", type=int, help="torch threads")
    ev.add_argument("--samples", type=int, help="molecules (default 30000), images (default 2000): how many to sample")
    ev.add_argument("--seed", type=int, default=0, help="molecules, music: sampling seed")
    ev.add_argument("--out", help="molecules, music: where plots and results go (default: MODEL/eval)")
    ev.add_argument("--scheduler", choices=["dpmsolver++", "ddim", "ddpm", "euler"],
                    help="images, genserve-diffusion: sampler (default dpmsolver++)")
    ev.add_argument("--steps", type=int, help="images, genserve-diffusion: sampling steps (default 25)")
    ev.add_argument("--guidance", type=float, help="images, genserve-diffusion: guidance scale (default 4)")
    ev.add_argument("--names", type=int, help="images, genserve-diffusion: evaluate this many evenly spaced emoji "
                    "names only (default all 1358)")
    ev.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "train":
        target = TRAIN_TARGETS[args.target]
        args.minutes = args.minutes if args.minutes is not None else target.minutes
        args.threads = args.threads if args.threads is not None else target.threads
        if args.out is None:
            from genserve.models.common.loading import weights_dir  # torch: only for train

            args.out = str(weights_dir() / target.weights)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"genserve: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
