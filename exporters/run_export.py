"""``stars-deploy export``: a run directory's student -> RUN_DIR/export/ files + export.json.

    RUN_DIR/export/
      student.nir    NIR graph (BatchNorm folded; conventions in nir_format.py)
      student.net    Loihi fixed point as a lava-dl netx HDF5 file (loihi target, lowered from
                     student.nir: exporters/loihi_export.py, format in netx_format.py)
      student.onnx   the student unrolled over T steps (ONNX target)
      teacher.onnx   the teacher (ONNX target with teacher=True)
      export.json    {"target", "files": {name: {"sha256", "bytes"}}, "input_shape",
                      "output_shape", "timesteps", "parameters", "layers": [layer table rows],
                      loihi: "quantization": [per-layer report], "netx_layers": [layer table rows],
                      "pipeline_delay_steps"}
"""

from __future__ import annotations

from pathlib import Path

import nir
import numpy as np

from stars_deploy.distill import DistillConfig
from stars_deploy.errors import ConfigError
from stars_deploy.fileio import read_json, write_json
from stars_deploy.progress import log
from stars_deploy.runs import MANIFEST, STUDENT, sha256_file
from stars_deploy.students import load_student
from stars_deploy.teachers import Normalizer

from .nir_export import student_to_nir
from .nir_format import write_nir

EXPORT_DIR = "export"
EXPORT_JSON = "export.json"
TARGETS = ("nir", "onnx", "loihi")
WEIGHT_FIELDS = ("weight", "bias")


def run_config(run_dir: Path) -> DistillConfig:
    return DistillConfig.from_dict(read_json(Path(run_dir) / MANIFEST, "run manifest")["config"])


def layer_table(graph: nir.NIRGraph) -> list[dict]:
    """One row per node in edge order: name, type, input and output shape, parameters."""
    order = []
    for source, target in graph.edges:
        for name in (source, target):
            if name not in order:
                order.append(name)
    order += [name for name in graph.nodes if name not in order]
    rows = []
    for name in order:
        node = graph.nodes[name]
        shape_in = next(iter(node.input_type.values()), None)
        shape_out = next(iter(node.output_type.values()), None)
        params = sum(int(np.asarray(getattr(node, f)).size) for f in WEIGHT_FIELDS if hasattr(node, f))
        row = {"name": name, "type": type(node).__name__,
               "input_shape": None if shape_in is None else [int(s) for s in shape_in],
               "output_shape": None if shape_out is None else [int(s) for s in shape_out], "parameters": params}
        if isinstance(node, nir.Conv2d):
            row.update(kernel=[int(k) for k in node.weight.shape[2:]], stride=[int(s) for s in node.stride])
        rows.append(row)
    return rows


def netx_table(network) -> list[dict]:
    """One row per netx layer: index, type, shape, kernel/stride, neuron fields, exponent."""
    rows = []
    for index, (layer, meta) in enumerate(zip(network.layers, network.metadata["layers"])):
        row = {"index": index, "type": layer.kind, "shape": list(layer.shape), "flatten_before": layer.flatten_before,
               "iDecay": layer.neuron.i_decay, "vDecay": layer.neuron.v_decay, "vThMant": layer.neuron.v_th_mant,
               "exponent": meta["exponent"], "spike_name": meta["spike_name"], "node": meta.get("node")}
        if layer.kind == "conv":
            row.update(kernel=list(layer.weight.shape[2:]), stride=list(layer.stride), padding=list(layer.padding))
        rows.append(row)
    return rows


def _merge_record(out_dir: Path, payload: dict) -> dict:
    previous = read_json(out_dir / EXPORT_JSON, "export record") if (out_dir / EXPORT_JSON).is_file() else {}
    merged = {**previous, **payload, "files": {**previous.get("files", {}), **payload["files"]}}
    write_json(out_dir / EXPORT_JSON, merged)
    return merged


def export_loihi(path: Path, dt_s: float | None = None, timesteps: int | None = None) -> dict:
    """Lower a NIR graph to Loihi fixed point and write it as a netx .net file.

    ``path`` is a run directory (its student is exported to export/student.nir first, and the
    lowering reads that file) or any .nir file (written beside it as FILE.net, with
    export.json in the same folder). Returns the export.json payload."""
    from .loihi_export import lower_nir
    from .netx_format import write_network
    from .nir_format import read_nir

    path = Path(path)
    if path.is_dir():
        export_run(path, "nir")
        nir_file = path / EXPORT_DIR / "student.nir"
    elif path.suffix == ".nir":
        nir_file = path
    else:
        raise ConfigError(f"{path}: give a run directory or a .nir file")
    graph = read_nir(nir_file)
    network, report = lower_nir(graph, dt_s=dt_s, timesteps=timesteps, source=str(nir_file))
    net_file = nir_file.with_suffix(".net")
    write_network(net_file, network)
    layers = layer_table(graph)
    meta = network.metadata
    payload = {
        "target": "loihi", "source": str(nir_file),
        "files": {net_file.name: {"sha256": sha256_file(net_file), "bytes": net_file.stat().st_size}},
        "input_shape": list(network.input_stage.input_shape), "output_shape": list(network.layers[-1].shape),
        "timesteps": meta["timesteps"], "dt_s": meta["dt_s"], "readout": meta["readout"],
        "pipeline_delay_steps": network.pipeline_delay_steps, "parameters": sum(row["parameters"] for row in layers),
        "layers": layers, "netx_layers": netx_table(network), "quantization": report,
    }
    if path.is_dir():
        payload["run_dir"] = str(path)
    return _merge_record(nir_file.parent, payload)


def export_run(run_dir: Path, target: str = "nir", teacher: bool = False, dt_s: float | None = None,
               timesteps: int | None = None) -> dict:
    """Export the run's student for ``target`` (nir, onnx — also the teacher if asked — or
    loihi, which also accepts a .nir file) into RUN_DIR/export/ and return the export.json payload."""
    if target not in TARGETS:
        raise ConfigError(f"--target {target!r}: choose one of {', '.join(TARGETS)}")
    if target == "loihi":
        return export_loihi(run_dir, dt_s, timesteps)
    run_dir = Path(run_dir)
    config = run_config(run_dir)
    student = load_student(run_dir / STUDENT)
    spec = config.teacher
    mean, std = spec.mean_std
    out_dir = run_dir / EXPORT_DIR
    graph = student_to_nir(student, class_names=list(spec.classes), normalization=(list(mean), list(std)))
    files = {}
    if target == "nir":
        write_nir(out_dir / "student.nir", graph)
        files["student.nir"] = out_dir / "student.nir"
    else:
        from .onnx_export import student_onnx_bytes, teacher_onnx_bytes, write_onnx

        normalizer = Normalizer(mean, std)
        log("exporting the student to ONNX (unrolled over T steps; about 10 s)")
        write_onnx(out_dir / "student.onnx", student_onnx_bytes(student, normalizer))
        files["student.onnx"] = out_dir / "student.onnx"
        if teacher:
            from stars_deploy.teacher_training import ensure_default_teacher
            from stars_deploy.teachers import load_teacher

            weights = Path(spec.weights) if spec.weights else ensure_default_teacher()
            write_onnx(out_dir / "teacher.onnx",
                       teacher_onnx_bytes(load_teacher(spec, weights), normalizer, spec.input_shape))
            files["teacher.onnx"] = out_dir / "teacher.onnx"
    layers = layer_table(graph)
    payload = {
        "target": target, "run_dir": str(run_dir),
        "files": {name: {"sha256": sha256_file(path), "bytes": path.stat().st_size} for name, path in files.items()},
        "input_shape": list(student.config.input_shape), "output_shape": [student.config.num_classes],
        "timesteps": student.config.timesteps, "dt_s": student.config.lif.dt_s,
        "parameters": sum(row["parameters"] for row in layers),
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "layers": layers,
    }
    return _merge_record(out_dir, payload)
