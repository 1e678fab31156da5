"""Lava's own simulator running the exported ``.net``: the independent check of the emulator.

``lava.lib.dl.netx.hdf5.Network`` loads the file (with ``reset_interval = T + D``, so layer i
resets at step i + 1 of every sample, see ``targets/loihi.py``) and runs under
``Loihi2SimCfg(select_tag='fixed_pt')``, i.e. Lava's bit-accurate LIF, conv and dense models.
All samples run in one continuous run, T + D steps each: a source ``RingBuffer`` sends each
sample's 13-bit input (the same integers the emulator uses,
``netx_format.input_bias_mantissa``) to the input layer's ``a_in`` during that sample's
steps. Every spiking layer's output feeds a recorder and another records the last layer's u
every step through a RefPort (both write .npy files: targets/lava_recorders.py); their
windows (layer i: steps i + 1 .. i + T of each sample) fill the record. No pause, no Var set
between samples: netx's reset_interval does the per-sample reset.

This module is the one place that knows Lava's quirks (docs/ENVIRONMENT.md): the
``object_detection`` stub needed to import lava-dl without cv2/torchvision, Lava's forced
'fork' start method, ``net.stop()`` in a ``finally`` (otherwise the interpreter hangs at
exit), and the worker traceback that Lava keeps in its actors. Lava is optional: ``lava_available()`` says whether it imports.
"""

from __future__ import annotations

import multiprocessing
import shutil
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch

from stars_deploy.errors import StarsDeployError
from stars_deploy.exporters.netx_format import read_network
from stars_deploy.progress import progress_bar

from .energy import loihi_energy
from .loihi import (CONVENTIONS, LATENCY_NOTE, LoihiEmulator, fan_out_synops, inputs_required, on_chip_neurons,
                    readout_logits)
from .record import TargetResult
from .target import Target

NAME = "lava"
OBJECT_DETECTION = "lava.lib.dl.slayer.object_detection"
SELECT_TAG = "fixed_pt"
PROGRESS_UPDATES = 10  # blocking runs a simulation is cut into, so that its progress bar moves


class LavaError(StarsDeployError):
    """Lava is missing, or its simulator failed (the message carries the worker's error)."""


def import_lava() -> dict:
    """Lava's netx, run configuration and I/O processes, importing lava-dl without its
    object-detection subpackage (which needs cv2 and torchvision)."""
    if OBJECT_DETECTION not in sys.modules:
        sys.modules[OBJECT_DETECTION] = types.ModuleType(OBJECT_DETECTION)
    if "lava.magma.runtime.message_infrastructure.multiprocessing" not in sys.modules and \
            multiprocessing.get_start_method(allow_none=True) is not None:
        # Lava calls set_start_method('fork') at import, which fails once anything (torch,
        # onnx, joblib...) has fixed the start method; Lava needs 'fork' regardless
        multiprocessing.set_start_method(None, force=True)
    try:
        from lava.lib.dl.netx import hdf5
        from lava.magma.core.run_conditions import RunSteps
        from lava.magma.core.run_configs import Loihi2SimCfg
        from lava.proc.io.source import RingBuffer as Source

        from . import lava_recorders
    except ImportError as exc:
        raise LavaError(f"Lava is not installed ({exc}): run `make lava` (lava-nc 0.10.0, lava-dl 0.6.0)") from None
    return {"Network": hdf5.Network, "RunSteps": RunSteps, "Loihi2SimCfg": Loihi2SimCfg,
            "Source": Source, "recorders": lava_recorders}


def lava_available() -> bool:
    try:
        import_lava()
    except LavaError:
        return False
    return True


def _worker_errors(net) -> str:
    """The tracebacks Lava's worker processes stored (it prints only their count)."""
    try:
        actors = net._runtime._messaging_infrastructure.actors
    except AttributeError:
        return ""
    return "; ".join(str(getattr(actor, "exception", None)) for actor in actors
                     if getattr(actor, "exception", None) is not None)


def _whc(array: np.ndarray) -> np.ndarray:
    """(C, H, W) -> Lava's (W, H, C); vectors unchanged."""
    return array.transpose(2, 1, 0) if array.ndim == 3 else array


class LavaRunner:
    """Runs a .net file in Lava's fixed-point simulator, all samples in one continuous run."""

    def __init__(self, path: Path, timesteps: int | None = None):
        self.path = Path(path)
        self.network = read_network(self.path)
        self.metadata = self.network.metadata
        self.timesteps = int(timesteps or self.metadata.get("timesteps") or 0)
        self.warnings = list(self.metadata.get("notes", []))
        self.inputs_required = inputs_required(self.network, str(self.path))

    def run(self, images: torch.Tensor, timesteps: int | None = None, sequence: bool | None = None) -> TargetResult:
        """Run ``images`` (our files: normalised images (B, *input shape); another tool's file:
        its inputs, (B, *shape) or (T, B, *shape)): one continuous run of B (T + D) steps."""
        lava = import_lava()
        steps = int(timesteps or self.timesteps)
        if steps < 1:
            raise LavaError(f"{self.path}: no number of steps in the file: give --timesteps")
        delay = self.network.pipeline_delay_steps
        period = steps + delay
        emulator = LoihiEmulator(self.network, source=str(self.path))
        sequence, clipped = emulator.input_sequence(images, steps, sequence)
        samples = sequence.shape[1]
        start = time.perf_counter()
        folder = Path(tempfile.mkdtemp(prefix="stars-lava-"))
        try:
            # netx resets layer i at step reset_offset + i + 1 of every period: one step later
            # when the inputs reach the first layer through a synapse
            net = lava["Network"](net_config=str(self.path), reset_interval=period,
                                  reset_offset=int(self.network.input_synapse))
            if len(net.layers) != len(self.network.layers):
                raise LavaError(f"{self.path}: netx built {len(net.layers)} layers, the file describes "
                                f"{len(self.network.layers)}")
            files, u_path = self._connect(lava, net, sequence, period, folder)
            self._execute(lava, net, samples, period)
            run_s = time.perf_counter() - start
            recorded = {index: np.load(path) for index, path in files.items()}
            currents = np.load(u_path) if u_path is not None else None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        result = self._record(recorded, currents, samples, steps, period)
        result.timings_s = {"run_s": run_s, "read_s": time.perf_counter() - start - run_s, "steps_per_sample": period}
        result.input_clipped = clipped
        return result

    def _connect(self, lava: dict, net, sequence: torch.Tensor, period: int, folder: Path):
        """The input source (step t of sample n at step n P + t + 1; the D steps after a
        sample's T repeat its last frame, which no window reads) and the recorders: every
        spiking layer's output, and the last layer's u for a non-spiking readout. Returns
        ({layer: spike file}, u file or None)."""
        meta, recorders = self.metadata["layers"], lava["recorders"]
        steps, samples = sequence.shape[:2]
        total = samples * period
        frames = np.stack([np.stack([_whc(x) for x in step], -1) for step in sequence.cpu().numpy()], -1)
        # (..., B, T) -> every sample's T frames, then its last frame for the D remaining steps
        padded = np.concatenate([frames, np.repeat(frames[..., -1:], period - steps, axis=-1)], axis=-1)
        source = lava["Source"](data=padded.reshape(*padded.shape[:-2], total).astype(np.int32))
        if self.network.input_synapse:
            source.s_out.connect(net.layers[0].inp)
        else:
            source.s_out.connect(net.layers[0].neuron.a_in)
        files = {}
        for index, block in enumerate(net.layers):
            if meta[index]["spiking"]:
                files[index] = recorders.record_file(folder, f"spikes{index}", total, tuple(block.out.shape))
                block.out.connect(recorders.StepFile(shape=block.out.shape, path=files[index]).a_in)
        u_path = None
        if not meta[-1]["spiking"]:
            u = net.layers[-1].neuron.u
            u_path = recorders.record_file(folder, "u", total, tuple(u.shape))
            recorders.VarFile(var=u, path=u_path)
        return files, u_path

    def _execute(self, lava: dict, net, samples: int, period: int) -> None:
        """Run the network for every sample's ``period`` steps, in up to PROGRESS_UPDATES
        blocking runs of whole samples (Lava continues where the last run stopped), so that the
        progress bar moves."""
        per_run = max(1, -(-samples // PROGRESS_UPDATES))
        bar = progress_bar(samples, "lava", "sample")
        try:
            with warnings.catch_warnings():
                # Lava's model search execs every module beside the recorders and warns for each
                warnings.filterwarnings("ignore", message="Cannot import module")
                for start in range(0, samples, per_run):
                    chunk = min(per_run, samples - start)
                    net.run(condition=lava["RunSteps"](num_steps=chunk * period),
                            run_cfg=lava["Loihi2SimCfg"](select_tag=SELECT_TAG))
                    bar.update(chunk)
        except Exception as exc:
            raise LavaError(f"Lava failed running {self.path}: {type(exc).__name__}: {exc} "
                            f"{_worker_errors(net)}".strip()) from None
        finally:
            bar.close()
            net.stop()

    def _record(self, recorded: dict, currents, samples: int, steps: int, period: int) -> TargetResult:
        """The common record from the recordings: each layer's T-step window per sample."""
        layers, meta = self.network.layers, self.metadata["layers"]
        delay, first = self.network.pipeline_delay_steps, int(self.network.input_synapse)

        def windows(data: np.ndarray, first: int) -> torch.Tensor:
            """(total steps, Lava's W, H, C or N) -> (T, B, C, H, W or N): steps first + 1 ..
            first + T of every sample."""
            chw = data.transpose(0, 3, 2, 1) if data.ndim == 4 else data
            per_sample = chw.reshape(samples, period, *chw.shape[1:])
            return torch.from_numpy(per_sample[:, first:first + steps].swapaxes(0, 1).astype(np.int64))
        spikes_of = {index: windows(data, first + index) > 0 for index, data in recorded.items()}
        spikes = {meta[i]["spike_name"]: s.to(torch.float32) for i, s in spikes_of.items()}
        synops = {meta[i]["spike_name"]: fan_out_synops(layers[i + 1], s)
                  for i, s in spikes_of.items() if i + 1 < len(layers)}
        if currents is not None:
            logits_t = readout_logits(windows(currents, delay), layers[-1], meta[-1]["exponent"])
        else:
            logits_t = spikes_of[len(layers) - 1].flatten(2).to(torch.float32)
        return TargetResult(NAME, logits_t, spikes, synops, latency_steps=period, pipeline_delay_steps=delay,
                            neuron_updates=float(on_chip_neurons(self.network) * samples * period), energy=loihi_energy)


def load_lava(path, timesteps: int | None = None) -> LavaRunner:
    """Prepare Lava's simulator for a .net file (Lava itself is imported when it runs)."""
    return LavaRunner(path, timesteps)


TARGET = Target(
    NAME, export="loihi", summary="Lava's own fixed-point simulator running the .net file (slow; the emulator's check)",
    load=lambda path, options: load_lava(path, options.timesteps), latency_note=LATENCY_NOTE,
    conventions=" ".join(CONVENTIONS.split()), energy=loihi_energy, whole_batch=True, report_simulates=False)
