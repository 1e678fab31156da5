#!/usr/bin/env bash
# Build one virtual environment per third-party NIR reader under .venv-interop/<reader>/
# (git-ignored), with pinned versions, for tests/test_interop.py and tools/interop/run_<reader>.py.
#
#   tools/interop/setup.sh norse snntorch sinabs spyx rockpool   # or: tools/interop/setup.sh all
#
# Every reader gets nir==1.0.8 (the version stars-deploy writes with). torch is always pinned to
# torch==2.13.0 (the CPU build on this machine's disk; an unpinned torch downloads GBs of CUDA
# wheels). Packages whose declared requirements do not install or contradict nir 1.0.8 go in
# with --no-deps beside their real run-time needs (said per reader below). Each venv records
# what it holds in .venv-interop/<reader>/interop.json (reader, version, packages, install_s).
#
# sinabs is AGPL-3.0: it is only ever installed here, as an optional test-time extra, never a
# dependency of stars-deploy.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
ROOT="${INTEROP_ROOT:-.venv-interop}"
TORCH="torch==2.13.0"
NIR="nir==1.0.8"
NIRTORCH="nirtorch==2.6"
READERS=(norse snntorch sinabs spyx rockpool)

# reader -> "version|packages installed with dependencies|packages installed with --no-deps"
spec() {
  case "$1" in
    # norse declares torchvision, whose PyPI build does not import beside torch 2.13
    norse)    echo "1.1.0|$TORCH $NIR $NIRTORCH numpy h5py|norse==1.1.0" ;;
    # snntorch 1.0.0 declares no requirements at all; import_from_nir needs nir and nirtorch
    snntorch) echo "1.0.0|$TORCH $NIR $NIRTORCH numpy pandas matplotlib snntorch==1.0.0|" ;;
    # sinabs 3.1.3 declares nir<=1.0.4 (cannot read our files: no LIF.v_reset there) and samna
    # (the Speck/DYNAP-CNN tool chain, not needed to import or simulate)
    sinabs)   echo "3.1.3|$TORCH $NIR $NIRTORCH numpy pbr matplotlib|sinabs==3.1.3" ;;
    # spyx is JAX/flax; no torch. jax 0.10.2 is what an unpinned install gave on this CPU
    spyx)     echo "1.0.0|jax==0.10.2 jaxlib==0.10.2 $NIR spyx==1.0.0|" ;;
    # rockpool's [nir] extra declares nir<=1.0.4; its torch backend needs torch and nirtorch
    rockpool) echo "3.1.0|$TORCH $NIR $NIRTORCH numpy scipy rockpool==3.1.0|" ;;
    *) return 1 ;;
  esac
}

build() {
  local reader="$1" version deps nodeps
  IFS='|' read -r version deps nodeps <<<"$(spec "$reader")" || { echo "unknown reader $reader (${READERS[*]})" >&2; exit 2; }
  local venv="$ROOT/$reader" start end
  start=$(date +%s.%N)
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install -q $deps
  # shellcheck disable=SC2086
  [ -z "$nodeps" ] || "$venv/bin/python" -m pip install -q --no-deps $nodeps
  "$venv/bin/python" tools/interop/run_"$reader".py --check
  end=$(date +%s.%N)
  "$venv/bin/python" - "$reader" "$version" "$start" "$end" "$deps $nodeps" > "$venv/interop.json" <<'PY'
import json, sys
from importlib.metadata import version, distributions
reader, wanted, start, end, requested = sys.argv[1:]
installed = sorted(f"{d.metadata['Name']}=={d.version}" for d in distributions())
print(json.dumps({"reader": reader, "version": version(reader), "wanted": wanted, "nir": version("nir"),
                  "requested": requested.split(), "install_s": round(float(end) - float(start), 1),
                  "packages": installed}, indent=1))
PY
  echo "$reader $version: $(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['install_s'])" "$venv/interop.json") s -> $venv"
}

[ $# -gt 0 ] || { echo "usage: $0 READER... | all   (readers: ${READERS[*]})" >&2; exit 2; }
[ "$1" != all ] || set -- "${READERS[@]}"
for reader in "$@"; do build "$reader"; done
