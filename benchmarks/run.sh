#!/usr/bin/env bash
# Benchmarks flows against a hand-written DataLoader, lhotse and Hugging Face datasets.
# Builds benchmarks/.venv once (torch from ci/constraints.txt: the CPU wheel), then runs
# benchmarks/run.py; extra arguments go to it (e.g. --quick). Results: benchmarks/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x benchmarks/.venv/bin/python ]; then
  python3 -m venv benchmarks/.venv
  benchmarks/.venv/bin/pip install -c ci/constraints.txt -e . -r benchmarks/requirements.txt
fi
exec benchmarks/.venv/bin/python benchmarks/run.py "$@"
