"""The generator host: images inside the teacher's pixel range, a Reptile step that moves the
generator towards the fast weights, and refusals that name what to change."""

import pytest
import torch

from stars_deploy.distillation import make_config
from stars_deploy.errors import ConfigError
from stars_deploy.distillation.generator import GENERATOR_STEPS, GENERATOR_Z_LR, Generator, GeneratorSynthesizer
from stars_deploy.distillation.synthesis import SynthesisConfig
from stars_deploy.teachers import ARCHITECTURES, Normalizer


def make(steps=3, **options):
    torch.manual_seed(0)
    teacher = ARCHITECTURES["digits_cnn"].build(10, 1).eval()
    normalizer = Normalizer((0.5,), (0.25,))
    config = SynthesisConfig(batch_size=16, steps=steps, method="generator", lr=GENERATOR_Z_LR, **options)
    return GeneratorSynthesizer(teacher, normalizer, config, 10, allow_flip=False, input_shape=(1, 8, 8),
                                device=torch.device("cpu")), normalizer


def test_images_stay_in_the_normalised_pixel_range_and_the_generator_learns():
    synthesizer, normalizer = make()
    before = {k: v.clone() for k, v in synthesizer.generator.state_dict().items()}
    images, terms = synthesizer.synthesize(None, (1, 8, 8), torch.device("cpu"))
    low, high = normalizer.bounds()
    assert images.shape == (16, 1, 8, 8) and not images.requires_grad
    assert bool((images >= low).all() and (images <= high).all())
    assert {"bn", "ce", "tv"} <= terms.keys() and all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    after = synthesizer.generator.state_dict()
    moved = [k for k in before if before[k].dtype.is_floating_point and not torch.equal(before[k], after[k])]
    assert "project.weight" in moved  # the Reptile step changed the slow weights
    assert synthesizer.meta_optimizer.state  # and the meta optimiser has state to checkpoint


@pytest.mark.parametrize("options", [{}, {"generator_meta": "fomaml", "bn_momentum": 0.9}])
def test_state_round_trip_continues_identically(options):
    a, _ = make(**options)
    a.synthesize(None, (1, 8, 8), torch.device("cpu"))
    b, _ = make(**options)
    b.load_state_dict(a.state_dict())
    torch.manual_seed(5)
    first, _ = a.synthesize(None, (1, 8, 8), torch.device("cpu"))
    torch.manual_seed(5)
    second, _ = b.synthesize(None, (1, 8, 8), torch.device("cpu"))
    assert torch.equal(first, second)


def test_generator_refuses_a_side_it_cannot_reach():
    with pytest.raises(ConfigError, match="divisible by 4.*--synthesizer pixel"):
        Generator(16, (3, 30, 30))


def test_make_config_gives_the_generator_its_own_step_and_latent_defaults():
    config = make_config("stars", synthesis={"method": "generator"})
    assert config.synthesis.steps == GENERATOR_STEPS and config.synthesis.lr == GENERATOR_Z_LR
    assert make_config(synthesis={"method": "generator", "steps": 9}).synthesis.steps == 9
    with pytest.raises(ConfigError, match="--synthesizer 'gan'"):
        make_config(synthesis={"method": "gan"})


def test_fomaml_meta_gradient_is_the_sum_of_the_inner_gradients():
    """Two inner steps, replayed by hand: the meta gradient is g(G) + g(G'), so the first meta
    Adam step moves each weight by -meta_lr * sign(g(G) + g(G')) (Reptile's would follow
    G - G', the sum of two normalised Adam steps)."""
    synthesizer, _ = make(steps=2, generator_meta="fomaml")
    reference, _ = make(steps=2)
    before = [p.detach().clone() for p in synthesizer.generator.parameters()]
    torch.manual_seed(7)
    synthesizer.synthesize(None, (1, 8, 8), torch.device("cpu"))
    torch.manual_seed(7)
    targets = reference.random_targets(torch.device("cpu"))
    z = torch.randn(16, reference.config.z_dim).requires_grad_(True)
    fast = reference.generator
    inner = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": reference.config.lr}],
                             lr=reference.config.generator_lr, betas=(reference.config.beta1, 0.999))
    total = [torch.zeros_like(p) for p in fast.parameters()]
    for step in range(2):
        inner.zero_grad()
        reference.objective(reference._to_images(fast(z)), targets, None, step)[0].backward()
        total = [t + p.grad for t, p in zip(total, fast.parameters())]
        inner.step()
    meta_lr = synthesizer.meta_optimizer.param_groups[0]["lr"]
    for old, new, grad in zip(before, synthesizer.generator.parameters(), total):
        big = grad.abs() > 1e-4  # where Adam's eps does not matter
        torch.testing.assert_close((old - new.detach())[big], meta_lr * torch.sign(grad[big]), rtol=1e-3, atol=1e-6)
