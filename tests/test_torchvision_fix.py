"""The CUDA-built torchvision wheel imports on CPU torch once the package's fix is installed."""

import subprocess
import sys
import sysconfig

import pytest
import torch


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_importing_the_package_first_makes_torchvision_and_avalanche_import():
    r = _python(
        "import clcompose.bench, torchvision, avalanche; from torchvision import transforms; print(torchvision.__version__)"
    )
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_fix_is_lazy_and_cheap():
    r = _python("import sys, clcompose.strategies, clcompose.bench.cli; print('torch' in sys.modules)")
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]


def test_avalanche_imports_first_through_the_startup_hook():
    """The installed start-up hook (clcompose-torchvision.pth) applies the fix before any import of ours."""
    r = _python("import avalanche, torchvision; import clcompose.strategies; print(torchvision.__version__)")
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.skipif(torch.version.cuda is not None, reason="only a CPU torch shows the upstream failure")
def test_without_the_fix_torchvision_fails_on_cpu_torch():
    purelib = sysconfig.get_paths()["purelib"]  # on sys.path without `site`: its .pth start-up hooks do not run
    r = subprocess.run(
        [sys.executable, "-S", "-c", f"import sys; sys.path.append({purelib!r}); import torchvision"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode == 0:
        pytest.skip("this torchvision build imports on CPU torch by itself")
    assert "torchvision::nms" in r.stderr
