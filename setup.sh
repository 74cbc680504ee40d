#!/usr/bin/env bash
# smoothadv setup: a virtual environment in .venv (pip), the Fashion-MNIST data, then one of
#   ./setup.sh            -> smoothadv demo   (the main job, on the embedded Fashion-MNIST data)
#   ./setup.sh test       -> the whole test suite
#   ./setup.sh install    -> set up only
# Extra arguments after the mode are passed on (e.g. ./setup.sh demo --quick, ./setup.sh test -k stats).
set -euo pipefail
cd "$(dirname "$0")"
mode="${1:-demo}"
[ $# -gt 0 ] && shift
PY="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import smoothadv, torch, torchvision, pytest, matplotlib" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.installed ]; then
  echo "setup: installing smoothadv and its dependencies with pip (torch, torchvision, scipy, ...)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[test]"
  touch .venv/.installed
fi

# Fashion-MNIST, the embedded default dataset, comes from Debian's dataset-fashion-mnist package.
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian package dataset-fashion-mnist"
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
      || echo "setup: could not install dataset-fashion-mnist; smoothadv will try a download into ./data"
  else
    echo "setup: Fashion-MNIST is not installed. Run 'sudo apt-get install dataset-fashion-mnist', or put the"
    echo "       IDX files under ./data/FashionMNIST/raw/ (or --data-dir); when online smoothadv downloads them."
  fi
fi

case "$mode" in
  demo) exec .venv/bin/smoothadv demo "$@" ;;
  test) exec .venv/bin/python -m pytest "$@" ;;
  install) echo "setup: done; run .venv/bin/smoothadv --help" ;;
  *) echo "usage: ./setup.sh [demo|test|install] [args...]" >&2; exit 2 ;;
esac
