#!/usr/bin/env bash
# Benchmarks flows against a hand-written DataLoader, lhotse, Hugging Face datasets and SPDL.
# Builds benchmarks/.venv once (torch from ci/constraints.txt: the CPU wheel), installs FFmpeg's
# shared libraries with apt-get when missing (SPDL decodes with them), then runs
# benchmarks/run.py; extra arguments go to it (e.g. --quick). Results: benchmarks/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ldconfig -p | grep -q 'libavfilter\.so\.'; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  packages=$(apt-cache pkgnames libav | grep -E '^lib(avutil|avcodec|avformat|avdevice|avfilter)[0-9]+$' || true)
  packages="$packages $(apt-cache pkgnames libsw | grep -E '^lib(swresample|swscale)[0-9]+$' || true)"
  echo "installing FFmpeg libraries for SPDL: $packages"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
    --no-install-recommends $packages \
    || echo "could not install FFmpeg's libraries: SPDL will be reported as failed"
fi
if [ ! -x benchmarks/.venv/bin/python ]; then
  python3 -m venv benchmarks/.venv
  benchmarks/.venv/bin/pip install -c ci/constraints.txt -e . -r benchmarks/requirements.txt
elif ! benchmarks/.venv/bin/python -c "import spdl.pipeline" 2>/dev/null; then
  benchmarks/.venv/bin/pip install -c ci/constraints.txt -r benchmarks/requirements.txt
fi
exec benchmarks/.venv/bin/python benchmarks/run.py "$@"
