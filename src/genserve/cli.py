"""The ``genserve`` command: ``serve`` runs the HTTP server, ``train`` trains embedded models."""

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

log = logging.getLogger("genserve")


def _train(args: argparse.Namespace) -> int:
    if args.target == "text-tiny":
        from genserve.models.llama.train import TrainConfig, train_text_tiny

        cfg = TrainConfig(minutes=args.minutes, seed=args.seed)
        report = train_text_tiny(Path(args.out), cfg)
        log.info("saved %s: held-out perplexity %.2f after %d steps", args.out,
                 report["heldout_ppl"], report["steps"])
    elif args.target == "mol":
        from genserve.models.molecule.train_generator import MolTrainConfig, train_mol

        train_mol(Path(args.out), MolTrainConfig(minutes=args.minutes, seed=args.seed, threads=args.threads,
                                                 train_molecules=args.molecules))
    elif args.target == "mol-vae":
        from genserve.models.molecule.vae import train_mol_vae

        train_mol_vae(Path(args.out), args.minutes, args.seed, threads=args.threads)
    elif args.target == "music":
        from genserve.models.music.train import MusicTrainConfig, train_music

        train_music(Path(args.out), MusicTrainConfig(minutes=args.minutes, seed=args.seed, threads=args.threads))
    elif args.target in ("gan", "vae", "flow", "digits-classifier"):
        from genserve.models.image.train import train_image_model

        train_image_model(args.target, Path(args.out), args.minutes, args.seed, threads=args.threads)
    elif args.target == "emoji-classifier":
        from genserve.models.diffusion.classifier import train_emoji_classifier

        train_emoji_classifier(Path(args.out), args.minutes, args.seed, threads=args.threads)
    elif args.target == "diffusion":
        from genserve.models.diffusion.train import DiffusionTrainConfig, train_diffusion

        train_diffusion(Path(args.out), DiffusionTrainConfig(
            minutes=args.minutes, seed=args.seed, threads=args.threads,
            init_from=Path(args.init_from) if args.init_from else None,
            prediction_type=args.prediction_type, lr=args.lr or DiffusionTrainConfig.lr))
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.target == "images":
        from genserve.models.image.evaluate import eval_images
        from genserve.models.image.evaluate import format_table as image_table

        sampler = {"scheduler": args.scheduler, "steps": args.steps, "guidance": args.guidance, "names": args.names}
        diffusion = {k: v for k, v in sampler.items() if v is not None}
        print(image_table(eval_images(args.model or "all", args.samples or 2000, args.seed, diffusion=diffusion)))
    elif args.target == "text":
        from genserve.models.families import weights_dir
        from genserve.models.llama.evaluate import eval_text, format_table

        path = Path(args.model) if args.model else weights_dir() / "genserve-text-tiny"
        rows = eval_text(path, tuple(args.quantization), args.max_tokens, args.threads)
        print(format_table(rows))
    elif args.target == "molecules":
        from genserve.models.families import weights_dir
        from genserve.models.molecule.evaluate import eval_molecules, write_card
        from genserve.models.molecule.evaluate import format_table as molecule_table

        path = Path(args.model) if args.model else weights_dir() / "genserve-mol"
        report = eval_molecules(path, args.samples or 30_000, Path(args.out) if args.out else path / "eval", args.seed)
        print(molecule_table(report["metrics"]))
        if args.out is None and (path / "training_report.json").is_file():
            write_card(path, report)  # the model card carries the numbers of its own directory's eval
    elif args.target == "music":
        from genserve.models.families import weights_dir
        from genserve.models.music.evaluate import eval_music, write_card
        from genserve.models.music.evaluate import format_table as music_table

        path = Path(args.model) if args.model else weights_dir() / "genserve-music"
        report = eval_music(path, Path(args.out) if args.out else path / "eval", args.seed, args.threads or 1)
        print(music_table(report["metrics"]))
        if args.out is None and (path / "training_report.json").is_file():
            write_card(path, report)
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
    app = create_app(settings, entries)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
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
    train.add_argument("target", choices=["text-tiny", "mol", "mol-vae", "music", "diffusion", "gan", "vae", "flow",
                                          "digits-classifier", "emoji-classifier"])
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
    ev.add_argument("target", choices=["text", "molecules", "music", "images"])
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
        small = args.target == "emoji-classifier"
        args.minutes = args.minutes if args.minutes is not None else 3.0 if small else 45.0
        args.threads = args.threads if args.threads is not None else 1 if small else 2
    if args.command == "train" and args.out is None:
        from genserve.models.families import weights_dir

        name = args.target if args.target.endswith("-classifier") else f"genserve-{args.target}"
        args.out = str(weights_dir() / name)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"genserve: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
