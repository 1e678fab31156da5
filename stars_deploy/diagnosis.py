"""What ``stars-deploy doctor`` reports: what this installation has, and whether each part works here.

Every check imports or runs the real part (Norse steps one LIF neuron, onnxruntime runs a
one-node graph, Lava's netx is imported as the ``lava`` target imports it), because the pins
that matter are fragile (docs/ENVIRONMENT.md: Lava wants numpy < 2 and a patched
var_model.py on Python 3.11; Norse's declared torchvision pulls a build that does not import).
A check is *required* when the core commands (distill, export --target nir|loihi|onnx,
simulate --target nir|loihi) need it; the rest are optional extras, reported but never failing the doctor.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from stars_deploy.version import __version__

MIN_PYTHON = (3, 11)  # tomllib


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    required: bool
    fix: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(name: str, probe: Callable[[], str], required: bool, fix: str) -> Check:
    """``probe`` returns what it found; any exception is the part not working (its first line)."""
    try:
        return Check(name, True, probe(), required)
    except Exception as exc:  # a broken optional part must not stop the report
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return Check(name, False, f"{type(exc).__name__}: {first}", required, fix)


def _python() -> str:
    if sys.version_info[:2] < MIN_PYTHON:
        raise RuntimeError(f"Python {platform.python_version()} is older than "
                           f"{'.'.join(map(str, MIN_PYTHON))}")
    return platform.python_version()


def _torch() -> str:
    import torch

    from stars_deploy.devices import fast_bf16

    bf16 = "native bf16" if fast_bf16("cpu") else "no native bf16"
    return f"{torch.__version__}, {torch.get_num_threads()} CPU threads, {bf16}"


def _norse() -> str:
    import norse
    import torch

    from stars_deploy.students.neurons import LIFConfig

    cell = LIFConfig().make_cell()  # the student's own Norse cell
    spikes, _ = cell(torch.full((1, 1), 1e3), None)  # a current far above threshold spikes at once
    if float(spikes.sum()) != 1.0:
        raise RuntimeError("one LIF step with a large input did not spike")
    return _version("norse") or norse.__version__


def _nir() -> str:
    import nir
    import numpy as np

    graph = nir.NIRGraph.from_list(nir.Affine(np.eye(2, dtype=np.float32), np.zeros(2, dtype=np.float32)))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "probe.nir"
        nir.write(path, graph)
        nir.read(path)
    return _version("nir") or "?"


def _onnxruntime() -> str:
    import numpy as np
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": np.array([-1.0], dtype=np.float32)})
    if float(out[0]) != 0.0:
        raise RuntimeError("Relu(-1) != 0")
    return f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}"


def _lava() -> str:
    import numpy as np

    from stars_deploy.targets.lava_sim import import_lava

    if int(np.__version__.split(".")[0]) >= 2:
        raise RuntimeError(f"numpy {np.__version__}: Lava 0.10 needs numpy < 2")
    import_lava()
    return f"lava-nc {_version('lava-nc')}, lava-dl {_version('lava-dl')}"


def _cuda() -> str:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device visible to torch (distill runs on the CPU)")
    name = torch.cuda.get_device_name(0)
    return f"{torch.cuda.device_count()} x {name}, CUDA {torch.version.cuda}"


def _chromium() -> str:
    found = [shutil.which(name) for name in ("chromium", "chromedriver")]
    if not all(found):
        raise RuntimeError("chromium and chromedriver not on PATH (only the report's browser test needs them)")
    return ", ".join(found)


def _cache() -> str:
    from stars_deploy.teachers.training import cache_dir

    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise RuntimeError(f"{folder} is not writable")
    return str(folder)


def diagnose() -> list[Check]:
    """Every check, required ones first."""
    return [
        Check("stars-deploy", True, __version__, True),
        _run("python", _python, True, "use Python 3.11 or newer"),
        _run("torch", _torch, True, "pip install the torch in constraints.txt (CPU wheels: "
             "--index-url https://download.pytorch.org/whl/cpu)"),
        _run("norse", _norse, True, "pip install --no-deps norse==1.1.0 (docs/ENVIRONMENT.md)"),
        _run("nir", _nir, True, "pip install nir==1.0.8"),
        _run("cache", _cache, True, "set STARS_DEPLOY_CACHE to a writable folder"),
        _run("onnx", _onnxruntime, True, "pip install onnx onnxruntime onnxscript (export --target onnx)"),
        _run("lava", _lava, False, "make lava (lava-nc 0.10.0, lava-dl 0.6.0, numpy < 2; docs/ENVIRONMENT.md)"),
        _run("cuda", _cuda, False, "optional: a CUDA build of torch and a GPU make distill faster"),
        _run("chromium", _chromium, False, "optional: apt-get install chromium chromium-driver (make browser)"),
    ]
