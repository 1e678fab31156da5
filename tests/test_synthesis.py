"""The synthesis objective compiled (--compile-synthesis) against the eager reference, and what
its student-tail term does to a batch."""

import pytest
import torch
import torch._dynamo.utils

from conftest import randomize_batchnorm
from stars_deploy.errors import ConfigError
from stars_deploy.students import StudentConfig, build_student
from stars_deploy.distillation.objectives import StudentProbe, TeacherProbe, student_tail_loss
from stars_deploy.distillation.synthesis import PixelSynthesizer, SynthesisConfig
from stars_deploy.teachers import ARCHITECTURES, Normalizer, batchnorm_layers

STEPS = 4


def synthesizer(compile_mode: str, **options) -> PixelSynthesizer:
    torch.manual_seed(0)
    teacher = randomize_batchnorm(ARCHITECTURES["digits_cnn"].build(10, 1)).eval().requires_grad_(False)
    config = SynthesisConfig(batch_size=16, steps=STEPS, l_tar=100.0, compile=compile_mode, **options)
    return PixelSynthesizer(teacher, Normalizer((0.5,), (0.25,)), config, 10, allow_flip=True)


def trajectory(synth: PixelSynthesizer, student=None) -> list:
    """(loss, terms, pixel gradient) at every step of one batch, the jitter's RNG seeded."""
    torch.manual_seed(3)
    images = torch.randn(16, 1, 8, 8, requires_grad=True)
    targets = torch.randint(10, (16,))
    steps = []
    for step in range(STEPS):
        images.grad = None
        loss, terms = synth.objective(images, targets, student, step)
        loss.backward()
        steps.append((loss.detach(), {k: v.detach() for k, v in terms.items()}, images.grad.clone()))
    return steps


def assert_same(eager: list, compiled: list) -> None:
    for (loss_e, terms_e, grad_e), (loss_c, terms_c, grad_c) in zip(eager, compiled, strict=True):
        assert terms_e.keys() == terms_c.keys()
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        for name in terms_e:
            torch.testing.assert_close(terms_c[name], terms_e[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(grad_c, grad_e, rtol=1e-4, atol=1e-7)


def test_compiled_objective_gives_the_eager_terms_and_gradients_and_one_graph_for_all_steps():
    eager = trajectory(synthesizer("none"))
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = trajectory(synthesizer("default"))
    assert_same(eager, compiled)
    # TAR's annealed temperature is a tensor input: the steps reuse the first step's graph
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before <= 1


def test_compiled_objective_with_the_student_terms():
    student = build_student(StudentConfig(input_shape=(1, 8, 8), num_classes=10)).eval()
    options = {"l_rca": 1.0, "l_tar_student": 1.0, "student_every": 2}
    assert_same(trajectory(synthesizer("none", **options), student),
                trajectory(synthesizer("default", **options), student))


def test_a_failing_compiler_falls_back_to_the_eager_objective_with_a_warning():
    eager = trajectory(synthesizer("none"))
    synth = synthesizer("default")

    def broken(*args):
        synth.probe.active = True  # as a graph that failed halfway would leave the probe
        synth.teacher.penultimate(args[0])
        raise RuntimeError("InductorError: no working C compiler")

    synth._compiled = broken
    with pytest.warns(RuntimeWarning, match="torch.compile of the synthesis objective failed .*running it eagerly"):
        fallback = trajectory(synth)
    assert synth._compiled is None
    assert_same(eager, fallback)


def test_compile_mode_is_checked():
    with pytest.raises(ConfigError, match="--compile-synthesis 'fast': choose one of none, default, reduce-overhead"):
        SynthesisConfig(compile="fast")


def test_compiled_objective_under_a_bf16_teacher_matches_eager_to_bf16_precision():
    eager = trajectory(synthesizer("none", teacher_bf16=True))
    compiled = trajectory(synthesizer("default", teacher_bf16=True))
    for (loss_e, _, grad_e), (loss_c, _, grad_c) in zip(eager, compiled, strict=True):
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
        assert float((grad_c - grad_e).abs().max()) < 0.02 * float(grad_e.abs().max())  # bf16: 8 mantissa bits


def tail_mismatch(teacher, student, images: torch.Tensor) -> float:
    """The student-tail loss of ``images`` at a sharp temperature: how far the student's
    firing rates per layer are from the teacher's ReLU rates."""
    probe = TeacherProbe(batchnorm_layers(teacher))
    probe.active = probe.want_rates = True
    with torch.no_grad(), StudentProbe(student) as neurons:
        teacher(images)
        student(images)
    probe.remove()
    return float(student_tail_loss(neurons.currents, neurons.firing_currents, probe.collect()[2], 0.02))


def test_the_student_tail_term_alone_brings_the_students_firing_rates_towards_the_teachers():
    torch.manual_seed(0)
    teacher = randomize_batchnorm(ARCHITECTURES["digits_cnn"].build(10, 1)).eval().requires_grad_(False)
    student = build_student(StudentConfig(input_shape=(1, 8, 8), num_classes=10, timesteps=4))
    for module in student.modules():  # BatchNorm statistics of random images: every layer fires a little
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        student.train()(torch.randn(256, 1, 8, 8))
    student.eval()
    torch.manual_seed(1)
    start = tail_mismatch(teacher, student, torch.randn(32, 1, 8, 8))
    config = SynthesisConfig(batch_size=32, steps=100, l_bn=0.0, l_ce=0.0, l_tv=0.0, l_tar_student=1.0,
                             student_every=1)
    synth = PixelSynthesizer(teacher, Normalizer((0.5,), (0.25,)), config, 10, allow_flip=True)
    images, terms = synth.synthesize(student, (1, 8, 8), torch.device("cpu"))
    assert set(terms) >= {"bn", "tar_student"}
    assert tail_mismatch(teacher, student, images) < 0.6 * start  # measured: 0.83 -> 0.39
