"""`stars-deploy doctor`: every part is really exercised, and a broken required part fails it."""

import json
import os
import subprocess
import sys


def doctor(*args, **env):
    return subprocess.run([sys.executable, "-m", "stars_deploy", "doctor", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_doctor_reports_every_part_working_here():
    done = doctor("--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    checks = {c["name"]: c for c in result["checks"]}
    assert result["healthy"]
    required = {name for name, c in checks.items() if c["required"]}
    assert required == {"stars-deploy", "python", "torch", "norse", "nir", "onnx", "cache"}
    assert all(checks[name]["ok"] for name in required), checks
    assert checks["lava"]["ok"], checks["lava"]  # `make install` installs Lava, so CI proves it imports
    assert checks["norse"]["detail"] == "1.1.0" and "onnxruntime" in checks["onnx"]["detail"]
    assert not checks["cuda"]["required"] and not checks["chromium"]["required"]


def test_a_cache_path_that_is_a_file_is_a_broken_required_part(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    done = doctor("--json", STARS_DEPLOY_CACHE=str(blocker / "cache"))
    assert done.returncode == 1
    cache = next(c for c in json.loads(done.stdout)["checks"] if c["name"] == "cache")
    assert not cache["ok"] and cache["detail"].startswith(("FileExistsError", "NotADirectoryError"))


def test_the_cache_follows_xdg_cache_home(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "STARS_DEPLOY_CACHE"}
    done = subprocess.run([sys.executable, "-m", "stars_deploy", "doctor", "--json"], capture_output=True, text=True,
                          env={**env, "XDG_CACHE_HOME": str(tmp_path / "xdg")}, timeout=300)
    cache = next(c for c in json.loads(done.stdout)["checks"] if c["name"] == "cache")
    assert cache["detail"] == str(tmp_path / "xdg" / "stars-deploy")
