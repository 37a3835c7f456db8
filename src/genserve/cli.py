"""The ``genserve`` command: ``serve`` runs the HTTP server, ``train`` trains embedded models and ``eval``
measures them (targets and their entry points: the family table, ``models/registry.py``)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from pydantic import ValidationError

from genserve import __version__
from genserve.app import logs
from genserve.app.registry import ConfigError
from genserve.app.settings import Settings
from genserve.models.registry import EVAL_TARGETS, TRAIN_TARGETS, Target

GIL_SWITCH_INTERVAL_S = 0.001  # see _serve
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

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn dies by the signal again once it has shut down; a stop asked for and done cleanly
        exits 0 instead, so ``make serve`` prints no "Error 143" and supervisors log a clean stop."""
        with super().capture_signals():
            yield
            if self._captured_signals and not self.force_exit:  # a second Ctrl-C: dies by the signal
                log.info("stopped cleanly (signal %d)", self._captured_signals[-1])
                self._captured_signals.clear()


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings({"host": args.host, "port": args.port, "config": args.config, "models": args.models,
                              "api_keys_file": args.api_keys_file, "log_level": args.log_level,
                              "log_format": args.log_format,
                              "allow_unauthenticated": args.allow_unauthenticated or None})
    # Before the app's imports: the libraries read their progress-bar and verbosity settings on import.
    logs.setup(settings.log_level, settings.log_format, quiet=True)
    from genserve.app.deps import services_of
    from genserve.app.main import create_app
    from genserve.app.protocol import bounded_protocol
    from genserve.app.registry import entry_for_source, load_registry, select
    from genserve.app.tenancy import serving_keys

    if args.model is None:
        if args.id is not None:
            raise ConfigError("--id names the model of --model: pass --model DIR_OR_HUB_ID too")
        entries = load_registry(settings.config)
        if settings.models:
            entries = select(entries, settings.models, "--models" if args.models else "GENSERVE_MODELS")
    elif settings.models or settings.config:
        other = (("--models" if args.models else "GENSERVE_MODELS") if settings.models
                 else "--config" if args.config else "GENSERVE_CONFIG")
        raise ConfigError(f"--model serves that one model alone and cannot be combined with {other}; to serve "
                          "several, list them in a registry file (--config) and choose with --models")
    else:
        entries = [entry_for_source(args.model, args.id)]
    # A bad keys file stops here, named. Joining a Ray cluster, the proxies bind what its Serve runs with.
    keys = serving_keys(settings, public=args.ray not in (None, "local"))
    if not keys:  # on loopback (the default) only this machine's users can; elsewhere it was asked for
        log.log(logging.INFO if settings.binds_loopback_only() else logging.WARNING,
                "no API keys configured: the API is open to anyone who can reach %s", settings.host)
    if settings.public_url is None and not settings.binds_loopback_only():
        log.warning("GENSERVE_PUBLIC_URL is not set: the links of response_format=url point at %s, which "
                    "clients elsewhere cannot open; set it to the address they use", settings.base_url())
    if args.ray is not None:
        try:
            from genserve.app import ray_app
        except ImportError as exc:
            raise ConfigError(f"--ray needs Ray Serve: pip install 'genserve[ray]' ({exc})") from exc
        return ray_app.run(settings, entries, args.ray)
    app = create_app(settings, entries)
    if hasattr(signal, "SIGHUP"):  # the keys file again, without a restart (a bad file keeps the old keys)
        signal.signal(signal.SIGHUP, lambda *_: services_of(app).tenancy.reload_threadsafe())
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            log_config=None,  # its lines go through the root handler (logs.setup)
                            # X-Forwarded-* only from the proxies the operator names (uvicorn trusts loopback).
                            proxy_headers=bool(settings.trusted_proxies),
                            forwarded_allow_ips=settings.trusted_proxies or None,
                            # bounded heads (size, count, time) and connections: app/protocol.py
                            http=bounded_protocol(settings.max_header_bytes, settings.max_headers,
                                                  settings.header_timeout_s, settings.body_timeout_s),
                            limit_concurrency=settings.max_connections,
                            # uvicorn annotates int but hands it to asyncio.timeout, which takes float seconds.
                            timeout_graceful_shutdown=settings.shutdown_grace_s)  # type: ignore[arg-type]
    # The event loop waits for the GIL while a helper thread runs Python (moderation's classifiers in
    # their pool, the engine's reader unpickling a step); at CPython's default switch interval (5 ms) a
    # 2 ms engine step runs on past a moderation stop meanwhile. A shorter interval hands it back sooner.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    try:
        DrainingServer(config, on_exit=services_of(app).manager.drain_threadsafe).run()
    finally:
        sys.setswitchinterval(interval)
    return 0


def _keys(args: argparse.Namespace) -> int:
    """Prints the SHA-256 of each key read from standard input, for a keys file's ``key_sha256``: the key
    itself need never be written into the file."""
    from genserve.app.tenancy import hash_key

    for line in sys.stdin:
        if key := line.strip():
            print(hash_key(key).hex())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genserve", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="One HTTP API for generative models: text, images, audio and molecules.\n"
        "'genserve COMMAND -h' describes a command and its options.",
        epilog="examples:\n"
        "  genserve serve                         serve the embedded models on port 8000\n"
        "  genserve serve --model /models/llama   serve one model directory alone\n"
        "  genserve serve --config my.yaml        add models or replace built-in ones\n"
        "  genserve serve --ray local             the same on Ray Serve, each model its own deployment\n"
        "  genserve train text-tiny --minutes 40  retrain the embedded text model")
    parser.add_argument("--version", action="version", version=f"genserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the models of the registry over HTTP")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1, GENSERVE_HOST)")
    serve.add_argument("--port", type=int, help="port (default 8000, GENSERVE_PORT)")
    serve.add_argument("--config", help="model registry YAML extending the built-in one (GENSERVE_CONFIG)")
    serve.add_argument("--models", metavar="ID,ID", help="serve only these registry entries (GENSERVE_MODELS)")
    serve.add_argument("--model", metavar="DIR_OR_HUB_ID", help="serve this one model alone, its family "
                       "recognised from its files (a model directory, or an org/name in the Hugging Face cache)")
    serve.add_argument("--id", help="--model's public id (default: the directory's name, or the hub id)")
    serve.add_argument("--api-keys-file", help="keys file: one API key a line, or YAML with each key's models, "
                       "rate limits, quotas and moderation (docs/keys.md; reread on SIGHUP; GENSERVE_API_KEYS_FILE)")
    serve.add_argument("--allow-unauthenticated", action="store_true",
                       help="serve a non-loopback address without API keys")
    serve.add_argument("--ray", metavar="local|auto|ADDRESS", help="deploy on Ray Serve: the gateway and one "
                       "deployment per local model, on a new local cluster (local), the cluster this machine is in "
                       "(auto) or the one at ADDRESS (docs/deploy.md; needs genserve[ray])")
    serve.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--log-format", choices=["text", "json"],
                       help="json: one JSON object a line (default text, GENSERVE_LOG_FORMAT)")
    serve.set_defaults(func=_serve)
    keys = sub.add_parser("keys", help="print the key_sha256 of API keys for the keys file")
    keys.add_argument("action", choices=["hash"], help="hash: read keys, one per line, from standard input")
    keys.set_defaults(func=_keys)
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
    ev = sub.add_parser("eval", help="measure a model: text (held-out perplexity, int8 and int4 against full "
                        "precision), molecules (MOSES metrics), music, images (FID and more)")
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
    logs.setup("info")
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
