"""The package's shape: no import cycles, no private names imported across modules, click only in
the CLI, and the extension points (a target, a student family) are one record each."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = {"exporters": "stars_deploy.exporters", "targets": "stars_deploy.targets"}


def _modules() -> dict[str, Path]:
    """Module name -> file, with exporters/ and targets/ installed inside stars_deploy."""
    folders = {"stars_deploy": ROOT / "stars_deploy", **{name: ROOT / folder for folder, name in SUBPACKAGES.items()}}
    modules = {}
    for package, folder in folders.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _resolve(module: str, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".")
    is_package = MODULES[module].name == "__init__.py"
    base = base if is_package else base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(module: str) -> list[tuple[str, list[str]]]:
    """(imported stars_deploy module, names imported from it) for every import in the file,
    at module level and inside functions."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node.level, node.module)
            names = [alias.name for alias in node.names]
            # `from package import submodule` imports the submodule
            for name in names:
                if f"{source}.{name}" in MODULES:
                    found.append((f"{source}.{name}", []))
            others = [n for n in names if f"{source}.{n}" not in MODULES]
            if others or not names:  # (a package's own names, not only its submodules)
                found.append((source, others))
    return [(name, names) for name, names in found if name in MODULES]


def _graph() -> dict[str, set[str]]:
    return {module: {target for target, _ in _imports(module) if target != module} for module in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return result


def test_the_walker_sees_the_package():
    assert {"stars_deploy.cli", "stars_deploy.distillation.loop", "stars_deploy.targets.registry",
            "stars_deploy.exporters.registry", "stars_deploy.students.convnet"} <= set(MODULES)
    assert "stars_deploy.distillation.loop" in _graph()["stars_deploy.distillation"]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_names_imported_across_modules():
    private = [(module, source, name) for module in MODULES for source, names in _imports(module)
               for name in names if name.startswith("_") and not name.startswith("__") and source != module]
    assert private == []


def test_only_the_cli_imports_click():
    users = sorted(module for module in MODULES
                   if any(isinstance(node, (ast.Import, ast.ImportFrom)) and
                          any(alias.name.split(".")[0] == "click" for alias in node.names) or
                          isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "click"
                          for node in ast.walk(ast.parse(MODULES[module].read_text()))))
    assert users and all(module.startswith("stars_deploy.cli") for module in users), users


def test_cli_submodules_never_import_the_entry_module():
    entry = "stars_deploy.cli"
    back = [module for module in MODULES if module.startswith(entry + ".") and entry in _graph()[module]]
    assert back == []


# ---- extension points -------------------------------------------------------------------------
@pytest.fixture
def fake_target():
    """A target defined here, in one record: the NIR reference under another name, whose
    logits are doubled (so its results are its own). Removed again after the test."""
    from stars_deploy.targets.nir_reference import load_reference
    from stars_deploy.targets.record import TargetResult
    from stars_deploy.targets.target import TARGETS, Target

    class Doubled:
        def __init__(self, path, options):
            self.reference = load_reference(path, options.dt_s, options.timesteps, options.device)
            self.metadata = self.reference.metadata

        def run(self, images):
            result = self.reference.run(images)
            return TargetResult("doubled", 2 * result.logits_t, result.spikes, result.synops,
                                latency_steps=result.latency_steps, neuron_updates=result.neuron_updates)

    record = Target("doubled", export="nir", load=Doubled, summary="the NIR reference, logits doubled",
                    latency_note="as the NIR reference", conventions="as the NIR reference",
                    compares=("nir",))
    yield record
    TARGETS.pop(record.name)


def test_a_new_target_is_one_record(fake_target, digits_run_dir, tmp_path, capsys):
    """Registered in this test only: simulate, check --target and the report's row work for it
    without any other module naming it."""
    from stars_deploy.cli import main
    from stars_deploy.targets.report import write_report

    run_dir = digits_run_dir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--target", "nir", str(run_dir), "--json"])
    assert exit_info.value.code == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--target", "doubled", str(run_dir), "--samples", "40", "--compare", "nir", "--json"])
    assert exit_info.value.code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["target"] == "doubled" and summary["reference"] == "nir"
    assert summary["spike_mismatches"] == 0 and summary["agreement"] == 1.0  # doubling keeps the argmax
    assert summary["max_logit_difference"] > 0 and summary["energy_per_sample"] is None
    with pytest.raises(SystemExit) as exit_info:
        main(["check", str(run_dir), "--target", "doubled", "--min-agreement", "0.5", "--samples", "40", "--json"])
    assert exit_info.value.code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == "doubled" and result["passed"]
    payload = write_report(run_dir, samples=40)
    assert "doubled" in payload["targets"]
    assert "<td>doubled</td>" in (run_dir / "report.html").read_text()


def test_an_unknown_target_lists_the_registered_ones(tmp_path, capsys):
    from stars_deploy.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--target", "doubled", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "'doubled' is not one of 'nir', 'loihi', 'lava'" in error


@pytest.fixture
def fake_family():
    """A student family defined here, in one record: one spiking dense layer on the flattened
    image, then the readout."""
    import torch
    from torch import nn

    from stars_deploy.students import FAMILIES, StudentFamily, StudentOutput, register_family
    from stars_deploy.students.layers import repeat_over_time
    from stars_deploy.students.neurons import LIFSequence

    class SpikingMLP(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config
            channels, height, width = config.input_shape
            self.hidden = nn.Linear(channels * height * width, config.width)
            self.lif = LIFSequence(config.lif)
            self.readout = nn.Linear(config.width, config.num_classes)

        def forward(self, images: torch.Tensor) -> StudentOutput:
            spikes = self.lif(repeat_over_time(self.hidden(images.flatten(1)), self.config.timesteps))
            logits_t = self.readout(spikes)
            return StudentOutput(logits_t.mean(0), logits_t, spikes.mean(0), {"hidden": spikes})

    def describe(builder, student, lif):
        source = builder.flatten("flatten", "input")
        source = builder.affine("hidden", student.hidden, source)
        source = builder.neuron("hidden.lif", lif, [source])
        return builder.affine("readout", student.readout, source), {source: "hidden"}

    family = register_family(StudentFamily("mlp", build=SpikingMLP, fold=lambda student: None,
                                           describe=describe, default_width=48, default_depth=1,
                                           summary="one spiking dense layer"))
    yield family
    FAMILIES.pop(family.name)


def test_a_new_student_family_is_one_record(fake_family, digits_teacher, tmp_path, capsys):
    """Registered in this test only: distill --student mlp, export to NIR and the NIR
    reference agree with it spike for spike."""
    from stars_deploy.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--student", "mlp", "--rounds", "2", "--kd-steps", "2", "--batch-size", "32",
              "--synthesis-steps", "3", "--runs-dir", str(tmp_path / "runs"), "--json"])
    assert exit_info.value.code == 0
    run_dir = Path(json.loads(capsys.readouterr().out)["run_dir"])
    for command in (["export", "--target", "nir", str(run_dir), "--json"],
                    ["simulate", "--target", "nir", str(run_dir), "--samples", "60", "--json"]):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["reference"] == "student" and summary["spike_mismatches"] == 0
    assert summary["agreement"] == 1.0 and list(summary["spikes_per_layer"]) == ["hidden"]


# ---- the command line, made consistent ---------------------------------------------------------
def _commands():
    import click

    from stars_deploy.cli import cli

    def walk(command, path):
        yield path, command
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, f"{path} {name}")
    return list(walk(cli, "stars-deploy"))


def test_every_option_has_help_and_every_fixed_choice_is_a_choice():
    import click

    for path, command in _commands():
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert param.help, f"{path} {param.opts[0]} has no help"
                assert not (param.show_default is False and param.default not in (None, False)
                            and not param.is_flag), f"{path} {param.opts[0]} hides its default"
        names = {opt for param in command.params for opt in getattr(param, "opts", [])}
        for flag in ("--target", "--student", "--objective", "--compare", "--lif-kernel", "--synthesizer"):
            if flag in names:
                param = next(p for p in command.params if flag in p.opts)
                assert isinstance(param.type, click.Choice), f"{path} {flag} is not a click.Choice"


def test_one_name_and_one_default_for_the_same_thing():
    """--data for evaluation data and --device auto in every command that has them."""
    for path, command in _commands():
        params = {opt: param for param in command.params for opt in getattr(param, "opts", [])}
        if "--device" in params:
            assert params["--device"].default == "auto", path
        assert "--eval-data" not in params or "--data" in params, path


def test_old_spellings_are_hidden_aliases(digits_teacher, tmp_path, capsys):
    from stars_deploy.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--data" in help_text and "--eval-data" not in help_text
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--eval-data", "digits", "--rounds", "1", "--kd-steps", "1", "--batch-size", "16",
              "--synthesis-steps", "2", "--quiet", "--runs-dir", str(tmp_path), "--json"])
    assert exit_info.value.code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["eval_data"] == "digits-test" and summary["eval_images"] == 450


@pytest.mark.parametrize("argv, message", [
    (["simulate", "--samples", "0"], "Invalid value for '--samples': 0 is not in the range x>=1"),
    (["export", "--target", "tpu"], "'tpu' is not one of 'nir', 'loihi', 'onnx'"),
    (["check", "--min-accuracy", "1.5"], "1.5 is not in the range 0.0<=x<=1.0"),
    (["distill", "--no-such-option"], "No such option '--no-such-option'"),
])
def test_usage_errors_are_one_line_and_json_too(argv, message, tmp_path, capsys):
    from stars_deploy.cli import main

    for as_json in (False, True):
        with pytest.raises(SystemExit) as exit_info:
            main(argv + (["--json"] if as_json else []))
        assert exit_info.value.code == 2
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1 and captured.err.startswith("stars-deploy: error: ")
        assert message in captured.err
        if as_json:
            assert message in json.loads(captured.out)["error"]
        else:
            assert captured.out == ""
