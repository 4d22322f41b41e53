"""Everything is declared in pyproject.toml; this only adds the interpreter start-up hook to the wheel.

``clcompose-torchvision.pth`` (a copy of strategies/_startup.pth) sits at the top of site-packages, so every
interpreter installs the torchvision CPU fix before anything imports torchvision, also when a user imports
avalanche before clcompose. It costs about a millisecond and imports no heavy library.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HOOK = "clcompose-torchvision.pth"


class BuildWithStartupHook(build_py):
    def run(self):
        super().run()
        source = Path(__file__).parent / "strategies" / "_startup.pth"
        target = Path(self.build_lib) / HOOK
        target.write_text(source.read_text())


setup(cmdclass={"build_py": BuildWithStartupHook})
