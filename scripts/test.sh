#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# run against the installed package, not the source tree (it holds no compiled library)
cd "$root/tests"
exec "${VENV:-$root/.venv}/bin/python" -m pytest -p no:cacheprovider -q --rootdir "$root" -c "$root/pyproject.toml" "$@"
