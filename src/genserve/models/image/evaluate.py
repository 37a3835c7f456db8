"""``genserve eval images``: the digit generators against the held-out digits, and their model cards.

Per model, ``samples`` generated images (default 2000: seeds 0..n−1, class = seed mod 10, so the ten
digits are balanced) are compared with the held-out split (360 images) through the features of
*our* digit classifier (``classifier.py``, penultimate layer, 128 units; not Inception):

- FID: Fréchet distance between Gaussians fitted to the two feature sets (Heusel et al. 2017), beside
  the real-vs-real floor (train split vs held-out split through the same features: what a perfect
  generator scores with these sample sizes) and a baseline of per-class independent pixels (each
  pixel drawn from the train split's distribution of that pixel for that digit: right marginals, no
  strokes);
- class accuracy: the share of samples of class c that the classifier calls c;
- nearest-train distance: mean L2 distance (intensities in [0, 1]) from a sample to its nearest
  train image, beside the same for held-out images: far below it would mean copying the train set;
- likelihoods on the held-out split: the flow's exact bits/dim (dequantised), the VAE's ELBO and an
  importance-weighted estimate (k = 64) in nats/image and bits/dim, both for p(x | c) (true class
  given) and p(x) = Σ_c p(x | c) / 10.

Files: ``MODEL/eval/samples.png`` (rows: digits 0..9; columns: seeds 0..9; ×4 nearest upscaling),
``MODEL/eval/metrics.json``; the model card ``MODEL/README.md`` is rewritten with the numbers.

``genserve-diffusion`` (the emoji model) is measured the same way through its own classifier,
``emoji-classifier``, by ``models/diffusion/evaluate.py``: one sample per emoji name, prompt top-1
and top-5 accuracy, FID against the held-out emoji with its floor and baseline.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image

from genserve.models.common.evaluation import fid
from genserve.models.common.loading import weights_dir
from genserve.models.common.weights import load_net
from genserve.models.image.classifier import ClassifierConfig, DigitClassifier, predict
from genserve.models.image.digits import LEVELS, Split, splits
from genserve.models.image.generator import ImageGenerator
from genserve.models.registry import EVAL_IMAGES, FAMILIES, Family

log = logging.getLogger(__name__)

CLASSIFIER = "digits-classifier"


def image_models() -> dict[str, Family]:
    """What ``genserve eval images`` measures, by model name: the shipped models of every family of the
    table measured by it; those of this package are digit generators, ``genserve-diffusion`` is
    measured by ``models/diffusion/evaluate.py``."""
    return {t.weights: f for f in FAMILIES.values() if f.evaluate == EVAL_IMAGES for t in f.train}


def _is_digits(family: Family) -> bool:
    return family.module.startswith(f"{__package__}.")


def load_classifier(path: Path | None = None) -> DigitClassifier:
    return load_net(path or weights_dir() / CLASSIFIER, ClassifierConfig, DigitClassifier)


def generate(gen: ImageGenerator, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples (N, 1, 8, 8) in [0, 1] for seeds seed..seed+n−1 and their classes (seed mod 10)."""
    seeds = list(range(seed, seed + n))
    classes = [s % 10 for s in seeds]
    images = np.concatenate([gen.sample(seeds[i:i + 500], classes[i:i + 500]) for i in range(0, n, 500)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.tensor(classes)


def independent_pixels(train: Split, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: for class c, each pixel drawn alone from the train split's values of that pixel in class c."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.arange(n) % 10
    out = torch.empty(n, 1, 8, 8)
    for c in range(10):
        pool = train.unit()[train.labels == c]  # (Nc, 1, 8, 8)
        rows = (classes == c).nonzero()[:, 0]
        pick = torch.randint(0, len(pool), (len(rows), 1, 8, 8), generator=g)
        out[rows] = torch.gather(pool.expand(len(rows), -1, -1, -1, -1), 1, pick[:, None]).squeeze(1)
    return out, classes


def nearest_distance(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over x of the L2 distance to the nearest image of ``reference``."""
    return torch.cdist(x.flatten(1), reference.flatten(1)).min(1).values.mean().item()


def reference_rows(train: Split, held: Split, classifier: DigitClassifier, samples: int) -> dict:
    """The rows every model's table shares: real-vs-real floor and the independent-pixels baseline."""
    held_feats = predict(classifier, held.unit())[0].numpy()
    train_feats, _ = predict(classifier, train.unit())
    base, base_classes = independent_pixels(train, samples)
    base_feats, base_pred = predict(classifier, base)
    return {
        "held_feats": held_feats,
        "floor": {"fid": fid(train_feats.numpy(), held_feats), "n": len(train),
                  "class_accuracy": (predict(classifier, held.unit())[1] == held.labels).float().mean().item(),
                  "nearest_train_distance": nearest_distance(held.unit(), train.unit())},
        "baseline": {"fid": fid(base_feats.numpy(), held_feats), "n": samples,
                     "class_accuracy": (base_pred == base_classes).float().mean().item(),
                     "nearest_train_distance": nearest_distance(base, train.unit())},
    }


def independent_pixels_nll(train: Split, held: Split) -> float:
    """The likelihood baseline, nats/image: −log p(x | c) of held-out images under a categorical per pixel and
    class, fitted to the train split (counts + 1/2, Krichevsky–Trofimov)."""
    total = 0.0
    rows, cols = torch.arange(8)[:, None], torch.arange(8)[None, :]
    for c in range(10):
        fit, test = train.levels[train.labels == c, 0].long(), held.levels[held.labels == c, 0].long()  # (N, 8, 8)
        counts = torch.stack([(fit == g).sum(0) for g in range(LEVELS)]).double() + 0.5  # (17, 8, 8)
        p = counts / counts.sum(0)
        total -= torch.log(p[test, rows, cols]).sum().item()
    return total / len(held)


def likelihoods(generator: ModuleType, path: Path, held: Split, seed: int = 0) -> dict:
    """Held-out likelihood numbers of a generator whose module measures them (``heldout_likelihoods``:
    the VAE and the flow, not the GAN), with the independent-pixels baseline's."""
    measure = getattr(generator, "heldout_likelihoods", None)
    if measure is None:
        return {}
    baseline = independent_pixels_nll(splits()[0], held) / (64 * math.log(2))
    return {"heldout_independent_pixels_bits_per_dim": baseline, **measure(path, held, seed)}


def marginal_nll(nll_given: Callable[[torch.Tensor], torch.Tensor], held: Split) -> float:
    """Mean −log p(x) with p(x) = Σ_c p(x | c) / 10, from per-class −log p(x | c)."""
    per_class = torch.stack([nll_given(torch.full_like(held.labels, c)) for c in range(10)])  # (10, N)
    return (-(torch.logsumexp(-per_class, dim=0) - math.log(10))).mean().item()


def sample_grid(gen: ImageGenerator, out: Path, scale: int = 4, gap: int = 1) -> None:
    """Rows digits 0..9, columns seeds 0..9, upscaled ×``scale`` with nearest, ``gap`` grey pixels between."""
    cell = 8 * scale + gap
    grid = np.full((10 * cell + gap, 10 * cell + gap), 96, dtype=np.uint8)
    for c in range(10):
        row = gen.sample(list(range(10)), [c] * 10)[..., 0]  # (10, 8, 8)
        for s in range(10):
            img = row[s].repeat(scale, 0).repeat(scale, 1)
            grid[gap + c * cell: gap + c * cell + 8 * scale, gap + s * cell: gap + s * cell + 8 * scale] = img
    Image.fromarray(grid).save(out)


def eval_model(name: str, path: Path, classifier: DigitClassifier, refs: dict, samples: int, seed: int = 0) -> dict:
    train, held = splits()
    generator = importlib.import_module(image_models()[name].module)
    gen = generator.load(path, torch.device("cpu"), torch.float32)
    x, classes = generate(gen, samples, seed)
    feats, pred = predict(classifier, x)
    (path / "eval").mkdir(parents=True, exist_ok=True)
    sample_grid(gen, path / "eval" / "samples.png")
    metrics = {
        "model": name, "samples": samples, "seed": seed, "heldout_images": len(held),
        "generated": {"fid": fid(feats.numpy(), refs["held_feats"]), "n": samples,
                      "class_accuracy": (pred == classes).float().mean().item(),
                      "nearest_train_distance": nearest_distance(x, train.unit())},
        "real_vs_real_floor": refs["floor"], "independent_pixels_baseline": refs["baseline"],
        "per_class_accuracy": [(pred[classes == c] == c).float().mean().item() for c in range(10)],
        **likelihoods(generator, path, held, seed),
    }
    (path / "eval" / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def eval_images(model: str = "all", samples: int = 2000, seed: int = 0, root: Path | None = None,
                diffusion: dict | None = None) -> list[dict]:
    """Evaluates ``model`` (a name of :func:`image_models` or ``all``) under ``root`` (default
    models/weights) and rewrites each one's eval/ and model card. ``samples`` is for the digit models (the
    diffusion model gets one sample per emoji name); ``diffusion``: keyword arguments of ``eval_diffusion``
    (scheduler, steps, guidance, names)."""
    root = root or weights_dir()
    models = image_models()
    if model != "all" and model not in models:
        raise ValueError(f"--model must be one of {', '.join(models)} or all, got {model!r}")
    names = list(models) if model == "all" else [model]
    digits = [n for n in names if _is_digits(models[n])]
    results = _eval_digits(digits, root, samples, seed) if digits else []
    for name in (n for n in names if not _is_digits(models[n])):
        results += _eval_diffusion(root / name, root, seed, diffusion or {})
    return results


def _eval_digits(names: list[str], root: Path, samples: int, seed: int) -> list[dict]:
    classifier = load_classifier(root / CLASSIFIER)
    train, held = splits()
    refs = reference_rows(train, held, classifier, samples)
    results = []
    for name in names:
        if not (root / name / "model.safetensors").is_file():
            log.warning("%s: no weights under %s, skipped", name, root / name)
            continue
        metrics = eval_model(name, root / name, classifier, refs, samples, seed)
        write_card(root / name, metrics)
        results.append(metrics)
    return results


def _eval_diffusion(path: Path, root: Path, seed: int, sampler: dict) -> list[dict]:
    from genserve.models.diffusion import evaluate as diffusion_eval

    if not (path / "model_index.json").is_file():
        log.warning("%s: no weights under %s, skipped", path.name, path)
        return []
    instrument = root / diffusion_eval.CLASSIFIER
    if not (instrument / "model.safetensors").is_file():
        raise FileNotFoundError(f"{instrument}: no emoji classifier; train it first: genserve train emoji-classifier")
    metrics = diffusion_eval.eval_diffusion(path, instrument, seed=seed, **sampler)
    diffusion_eval.write_card(path, metrics)
    return [metrics]


def evaluate(model: str | None = None, samples: int | None = None, seed: int = 0, scheduler: str | None = None,
             steps: int | None = None, guidance: float | None = None, names: int | None = None) -> str:
    """``genserve eval images``: the table of :func:`eval_images` (``model`` default all, ``samples`` 2000;
    the sampler options apply to ``genserve-diffusion``)."""
    sampler = {"scheduler": scheduler, "steps": steps, "guidance": guidance, "names": names}
    diffusion = {k: v for k, v in sampler.items() if v is not None}
    return format_table(eval_images(model or "all", samples or 2000, seed, diffusion=diffusion))


def format_table(results: list[dict]) -> str:
    lines = [f"{'model':<18} {'FID':>8} {'floor':>7} {'baseline':>9} {'class acc':>9} {'NN-train':>8} {'bits/dim':>8}"]
    for m in results:
        g = m["generated"]
        bpd = m.get("heldout_bits_per_dim", m.get("heldout_neg_elbo_bits_per_dim"))
        accuracy = g.get("class_accuracy", g.get("top1"))  # diffusion: prompt top-1 on training names
        nearest = g.get("nearest_train_distance")
        lines.append(f"{m['model']:<18} {g['fid']:>8.2f} {m['real_vs_real_floor']['fid']:>7.2f} "
                     f"{m['independent_pixels_baseline']['fid']:>9.2f} {accuracy:>9.3f} "
                     + (f"{nearest:>8.3f} " if nearest is not None else f"{'-':>8} ")
                     + (f"{bpd:>8.3f}" if bpd else f"{'-':>8}"))
    return "\n".join(lines)

ABOUT = {
    "genserve-gan": ("A class-conditional DCGAN (Radford et al. 2016) with a spectrally normalised projection "
                     "discriminator and hinge loss (Miyato et al. 2018; Miyato & Koyama 2018); the generator's "
                     "weights are an exponential moving average. Code: `models/image/gan.py` (family `gan`). "
                     "Latent: N(0, I) noise of dimension {latent_dim}. No likelihood."),
    "genserve-vae": ("A convolutional class-conditional VAE (Kingma & Welling 2014; Sohn et al. 2015) with a "
                     "categorical likelihood over the 17 grey levels of each pixel, so its ELBO bounds the discrete "
                     "log-likelihood. Code: `models/image/vae.py` (family `image-vae`). Latent: the prior N(0, I) "
                     "of dimension {latent_dim}; images served are the mean of p(x | z, c)."),
    "genserve-flow": ("A class-conditional RealNVP (Dinh et al. 2017): logit preprocessing, checkerboard "
                      "couplings at 8×8, a squeeze, channel and checkerboard couplings at 4×4×4, the class as a "
                      "learned bias in every coupling network; exact log-likelihood. Code: `models/image/flow.py` "
                      "(family `flow`). Latent: the base Gaussian of dimension 64 at temperature {temperature} "
                      "(z ~ N(0, {temperature}²·I)); a sample is mapped back to its grey level ⌊17·x⌋."),
}


def write_card(path: Path, metrics: dict) -> None:
    """The model card ``README.md`` of a generator directory, from its training report and ``metrics``."""
    name = metrics["model"]
    train = json.loads((path / "training_report.json").read_text())
    config = json.loads((path / "config.json").read_text())
    g, floor, base = metrics["generated"], metrics["real_vs_real_floor"], metrics["independent_pixels_baseline"]

    def row(label: str, m: dict) -> str:
        return (f"| {label} | {m['n']} | {m['fid']:.2f} | {m['class_accuracy']:.3f} "
                f"| {m['nearest_train_distance']:.3f} |")

    lines = [
        f"# {name}", "", ABOUT[name].format(**config), "",
        "## Data", "",
        "scikit-learn's handwritten digits (`sklearn.datasets.load_digits`: 1797 images, 8×8, 17 grey levels, ten",
        f"classes), split 80/20 stratified by class with seed 0: {train['train_images']} train images, "
        f"{metrics['heldout_images']} held-out.",
        "Images served keep scikit-learn's convention, ink high: a light digit on a dark ground, 8×8×1 uint8,",
        "grey level g ↦ round(255·g/16). A request without a class gets the class ⌊10·Φ(z₀/scale)⌋ of its latent.", "",
        "## Training", "",
        f"- Command: `{train['command']}`.",
        f"- {train['steps']} steps in {train['train_seconds'] / 60:.1f} min ({train['minutes_total']:.1f} min in all) "
        f"on {train['machine']}.",
        *([f"- Checkpoint: the best of every {train['config']['eval_every']} steps by the likelihood of a"
           f" validation set ({train['validation_images']} train images set aside, stratified), at step"
           f" {train['best_step']}; the held-out split chose nothing."] if "best_step" in train else []),
        f"- {train['parameters']:,} parameters shipped, {train['file_bytes'] / 1e6:.2f} MB (float32 safetensors).", "",
        f"## Measured quality (`genserve eval images --model {name}`)", "",
        f"FID here is computed in the 128-d penultimate features of our own digit classifier (`digits-classifier`,"
        f" held-out accuracy {floor['class_accuracy']:.3f}), **not Inception FID**: compare numbers only within this"
        f" table. Generated: {g['n']} samples, seeds {metrics['seed']}..{metrics['seed'] + g['n'] - 1}, class ="
        f" seed mod 10; all rows against the {metrics['heldout_images']} held-out images.", "",
        "| images | n | FID ↓ | classified as their class | mean L2 to nearest train image |",
        "|---|---|---|---|---|",
        row("generated", g),
        row("real: FID train split vs held-out (floor); other columns held-out images", floor),
        row("independent pixels per class (baseline)", base), "",
        "The floor is what a perfect generator would score at these sample sizes; the baseline has the right",
        "per-pixel marginals and no strokes. The nearest-train distance of held-out images is what a generator",
        "that does not copy its train set should show.",
    ]
    if "heldout_bits_per_dim" in metrics:
        lines += ["", "Held-out likelihood (dequantisation: " + metrics["dequantisation"] + "; an upper bound on the",
                  "discrete bits/dim; uniform over 17 levels would be 4.09):", "",
                  f"- −log p(x | c): **{metrics['heldout_bits_per_dim']:.3f} bits/dim**",
                  f"- −log p(x), p(x) = Σ_c p(x | c)/10: {metrics['heldout_bits_per_dim_marginal']:.3f} bits/dim"]
    if "heldout_neg_elbo_nats" in metrics:
        lines += ["", "Held-out likelihood (discrete, categorical over 17 levels; uniform would be 4.09 bits/dim):", "",
                  f"- −ELBO of p(x | c): **{metrics['heldout_neg_elbo_nats']:.2f} nats/image = "
                  f"{metrics['heldout_neg_elbo_bits_per_dim']:.3f} bits/dim** (reconstruction "
                  f"{metrics['heldout_recon_nats']:.2f}, KL {metrics['heldout_kl_nats']:.2f} nats)",
                  f"- importance-weighted (k = 64) −log p(x | c): {metrics['heldout_iwae_nll_nats']:.2f} nats/image = "
                  f"{metrics['heldout_iwae_bits_per_dim']:.3f} bits/dim",
                  f"- −log p(x), p(x) = Σ_c p(x | c)/10 (importance-weighted): "
                  f"{metrics['heldout_iwae_bits_per_dim_marginal']:.3f} bits/dim"]
    if "heldout_independent_pixels_bits_per_dim" in metrics:
        lines += [f"- baseline, independent pixels per class (a categorical per pixel and digit fitted to the train"
                  f" split): {metrics['heldout_independent_pixels_bits_per_dim']:.3f} bits/dim"]
    lines += ["", "## Samples", "", "`eval/samples.png`: rows digits 0..9, columns seeds 0..9 (×4, nearest).",
              "", "![samples](eval/samples.png)", ""]
    (path / "README.md").write_text("\n".join(lines))
