"""The digit generators (GAN, VAE, RealNVP) on tiny seeded networks, plus the shipped weights when present:
the ImageGenerator contract (shapes, seeds, byte-exact batch invariance, class conditioning, save → load),
the flow's exact likelihood, the VAE's bounds, FID and the data split."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from genserve.models.common.evaluation import fid
from genserve.models.common.loading import weights_dir
from genserve.models.common.training import adamw
from genserve.models.common.weights import save_net
from genserve.models.image import flow as flow_mod
from genserve.models.image import gan as gan_mod
from genserve.models.image import vae as vae_mod
from genserve.models.image.classifier import ClassifierConfig, DigitClassifier
from genserve.models.image.digits import dequantize, splits
from genserve.models.image.generator import ImageGenerator, class_from_latent


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_net(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gan":
        return gan_mod.Generator(gan_mod.GANConfig(latent_dim=8, width=8, class_dim=4))
    if family == "image-vae":
        return vae_mod.VAE(vae_mod.VAEConfig(latent_dim=4, width=8))
    net = flow_mod.RealNVP(flow_mod.FlowConfig(hidden=8, couplings_8x8=2, couplings_4x4=4))
    with torch.no_grad():  # a fresh flow is the identity (zero-initialised outputs): give it something to invert
        for p in net.parameters():
            p.normal_(0, 0.1)
    return net


MODULES = {"gan": gan_mod, "image-vae": vae_mod, "flow": flow_mod}
FAMILIES = list(MODULES)


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> tuple[str, torch.nn.Module, Path]:
    net = tiny_net(request.param)
    path = tmp_path_factory.mktemp(request.param)
    save_net(net, request.param, path)
    return request.param, net, path


def test_sample_shape_and_seeds(saved: tuple[str, torch.nn.Module, Path]) -> None:
    family, _, path = saved
    gen = MODULES[family].load(path, torch.device("cpu"), torch.float32)
    assert gen.family == family and gen.size == (8, 8) and gen.channels == 1
    assert gen.class_names == [str(d) for d in range(10)]
    images = gen.sample([1, 2, 3], [0, 5, None])
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, gen.sample([1, 2, 3], [0, 5, None]))
    z = gen.latents([7, 8])
    assert z.shape == (2, gen.latent_dim)
    alone = torch.randn(gen.latent_dim, generator=torch.Generator().manual_seed(8)) * gen.latent_scale
    assert torch.equal(z[1], alone)
    assert not np.array_equal(gen.sample([1], [3]), gen.sample([2], [3]))


def test_batch_invariance_is_byte_exact(saved: tuple[str, torch.nn.Module, Path]) -> None:
    family, _, path = saved
    gen = MODULES[family].load(path, torch.device("cpu"), torch.float32)
    seeds, classes = [11, 12, 13, 14, 15], [4, None, 0, 9, 4]
    batch = gen.sample(seeds, classes)
    for i in range(len(seeds)):
        assert np.array_equal(gen.sample([seeds[i]], [classes[i]])[0], batch[i]), (family, i)


def test_class_changes_the_image_and_none_reads_the_latent(saved: tuple[str, torch.nn.Module, Path]) -> None:
    family, _, path = saved
    gen = MODULES[family].load(path, torch.device("cpu"), torch.float32)
    per_class = gen.sample([3] * 10, list(range(10)))
    assert len({img.tobytes() for img in per_class}) > 1
    z = gen.latents([3])
    implied = class_from_latent(z[0], gen.latent_scale)
    assert np.array_equal(gen.decode(z, [None]), gen.decode(z, [implied]))
    classes = {class_from_latent(row, gen.latent_scale) for row in gen.latents(list(range(200)))}
    assert classes == set(range(10))
    with pytest.raises(ValueError, match="class"):
        gen.sample([1], [10])
    with pytest.raises(ValueError, match="latents"):
        gen.decode(torch.zeros(1, gen.latent_dim + 1), [0])


def test_save_load_round_trip(saved: tuple[str, torch.nn.Module, Path]) -> None:
    family, net, path = saved
    loaded = MODULES[family].load(path, torch.device("cpu"), torch.float32)
    scale = net.config.temperature if family == "flow" else 1.0
    direct = ImageGenerator(net, family, scale)
    np.testing.assert_array_equal(direct.sample([0, 1, 2], [1, 2, None]), loaded.sample([0, 1, 2], [1, 2, None]))
    for key, value in net.state_dict().items():
        assert torch.equal(value, loaded.net.state_dict()[key]), key


def test_flow_inverse_and_log_det_are_exact() -> None:
    net = tiny_net("flow").double()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64) * 0.9 + 0.05
    y = torch.tensor([0, 4, 9])
    z, logdet = net(x, y)
    assert torch.allclose(net.inverse(z, y), x, atol=1e-5)
    for i in range(3):
        def to_z(v: torch.Tensor, i: int = i) -> torch.Tensor:
            return net(v.view(1, 1, 8, 8), y[i:i + 1])[0][0]

        jac = torch.autograd.functional.jacobian(to_z, x[i].flatten())
        assert jac.shape == (64, 64)
        assert torch.allclose(torch.linalg.slogdet(jac).logabsdet, logdet[i], atol=1e-6)
    assert not torch.allclose(net(x, torch.tensor([1, 1, 1]))[1], logdet)  # the class changes the density


def test_flow_bits_per_dim_of_dequantised_levels() -> None:
    net = tiny_net("flow")
    levels = torch.randint(0, 17, (4, 1, 8, 8)).float()
    x = dequantize(levels, torch.Generator().manual_seed(0))
    assert ((x * 17).floor() == levels).all()
    nll = -net.log_prob(x, torch.zeros(4, dtype=torch.long))
    assert torch.isfinite(nll).all()
    assert flow_mod.bits_per_dim(0.0) == pytest.approx(np.log2(17))  # a uniform density on [0, 1)^64


def test_vae_elbo_terms_and_importance_weighted_bound() -> None:
    net = tiny_net("image-vae").eval()
    train, _ = splits()
    levels, labels = train.levels[:16], train.labels[:16]
    recon, kl = net.elbo_terms(levels, labels, torch.Generator().manual_seed(0))
    assert torch.isfinite(recon).all() and (recon > 0).all() and (kl >= 0).all()
    with torch.no_grad():
        elbo = -torch.stack([sum(net.elbo_terms(levels, labels, torch.Generator().manual_seed(s))) for s in range(8)])
        iwae = net.iwae_log_likelihood(levels, labels, k=64, generator=torch.Generator().manual_seed(0))
    assert iwae.mean() >= elbo.mean(0).mean()  # tighter bound on log p(x | c) than the ELBO


def test_fid_is_zero_for_identical_sets_and_grows_with_a_shift() -> None:
    a = np.random.default_rng(0).normal(size=(500, 16))
    assert abs(fid(a, a)) < 1e-6
    shifts = [fid(a, a + d) for d in (0.1, 0.5, 1.0)]
    assert shifts[0] < shifts[1] < shifts[2]
    assert shifts[2] == pytest.approx(16.0, rel=1e-6)  # |Δμ|² with equal covariances


@pytest.mark.parametrize("family", ["image-vae", "flow"])
def test_optimizer_trains_every_parameter(family: str) -> None:
    net = tiny_net(family)
    opt = adamw(net, 1e-3, 0.01)
    grouped = [id(p) for group in opt.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in net.parameters())  # conv kernels included, none twice


def test_classifier_features_shape() -> None:
    net = DigitClassifier(ClassifierConfig()).eval()
    assert net.features(torch.rand(5, 1, 8, 8)).shape == (5, 128)
    assert net(torch.rand(5, 1, 8, 8)).shape == (5, 10)


def test_split_is_stratified_and_deterministic() -> None:
    train, held = splits()
    assert (len(train), len(held)) == (1437, 360)
    assert held.levels.min() == 0 and held.levels.max() == 16
    counts = torch.bincount(held.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


@pytest.mark.parametrize("name", ["genserve-gan", "genserve-vae", "genserve-flow"])
def test_shipped_generators(name: str) -> None:
    path = weights_dir() / name
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"{name} not trained")
    module = {"genserve-gan": gan_mod, "genserve-vae": vae_mod, "genserve-flow": flow_mod}[name]
    gen = module.load(path, torch.device("cpu"), torch.float32)
    batch = gen.sample([0, 1, 2, 3], [7, None, 0, 7])
    assert batch.shape == (4, 8, 8, 1) and batch.max() > 128  # some ink
    assert np.array_equal(gen.sample([3], [7])[0], batch[3])
