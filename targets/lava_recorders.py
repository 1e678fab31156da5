"""Two Lava processes that write every step into a .npy file (np.memmap) instead of a Var.

Reading a Var back goes through Lava's runtime one element at a time (about a minute for the
digits student's 100 samples), which would time the read-back instead of the simulator.
``StepFile`` records an InPort (a layer's spikes), ``VarFile`` a Var through a RefPort (the
readout's u, read after every step). Imported only by targets/lava_sim.py once Lava imports;
Lava finds the models here, in the processes' own module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lava.magma.core.decorator import implements, requires, tag
from lava.magma.core.model.py.model import PyLoihiProcessModel
from lava.magma.core.model.py.ports import PyInPort, PyRefPort
from lava.magma.core.model.py.type import LavaPyType
from lava.magma.core.process.ports.ports import InPort, RefPort
from lava.magma.core.process.process import AbstractProcess
from lava.magma.core.resources import CPU
from lava.magma.core.sync.protocols.loihi_protocol import LoihiProtocol


def record_file(folder: Path, name: str, steps: int, shape: tuple) -> str:
    """Create an int32 .npy file of (steps, *shape) zeros for a recorder to fill."""
    path = Path(folder) / f"{name}.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(steps, *shape)).flush()
    return str(path)


class StepFile(AbstractProcess):
    """Writes its input of step t to row t - 1 of the .npy file at ``path``."""

    def __init__(self, *, shape: tuple, path: str) -> None:
        super().__init__(shape=shape, path=path)
        self.a_in = InPort(shape=shape)


class VarFile(AbstractProcess):
    """Writes ``var`` after step t (post-management phase) to row t - 1 of ``path``."""

    def __init__(self, *, var, path: str) -> None:
        super().__init__(shape=var.shape, path=path)
        self.state = RefPort(var.shape)
        self.state.connect_var(var)


class _FileModel(PyLoihiProcessModel):
    def write(self, data: np.ndarray) -> None:
        if not hasattr(self, "file"):
            self.file = np.load(self.proc_params["path"], mmap_mode="r+")
        self.file[self.time_step - 1] = data


@implements(proc=StepFile, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyStepFile(_FileModel):
    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int32)

    def run_spk(self) -> None:
        self.write(self.a_in.recv())


@implements(proc=VarFile, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyVarFile(_FileModel):
    state: PyRefPort = LavaPyType(PyRefPort.VEC_DENSE, np.int32)

    def post_guard(self) -> bool:
        return True

    def run_post_mgmt(self) -> None:
        self.write(self.state.read())
