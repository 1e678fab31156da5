"""export.json: what every export kind records about the files it wrote (merged per folder).

    RUN_DIR/export/export.json
      {"target", "files": {name: {"sha256", "bytes"}}, "input_shape", "output_shape",
       "timesteps", "dt_s", "parameters", "layers": [layer table rows], ...
       loihi: "quantization": [per-layer report], "netx_layers": [rows], "pipeline_delay_steps"}
"""

from __future__ import annotations

from pathlib import Path

from stars_deploy.fileio import read_json, write_json
from stars_deploy.layout import EXPORT_JSON
from stars_deploy.runs import sha256_file


def file_entries(files: list[Path]) -> dict[str, dict]:
    """{file name: {"sha256", "bytes"}} for files just written."""
    return {path.name: {"sha256": sha256_file(path), "bytes": path.stat().st_size} for path in files}


def merge_record(out_dir: Path, payload: dict) -> dict:
    """Write ``payload`` into out_dir/export.json, keeping what other export kinds recorded
    there (their files stay listed); returns the merged record."""
    path = Path(out_dir) / EXPORT_JSON
    previous = read_json(path, "export record") if path.is_file() else {}
    merged = {**previous, **payload, "files": {**previous.get("files", {}), **payload["files"]}}
    write_json(path, merged)
    return merged
