"""flare_jax: Flare (Shang et al., NeurIPS 2021) and the RL suite around it, in JAX."""
from pathlib import Path

from setuptools import find_packages, setup

_TEST_ONLY = {"pytest", "pytest-xdist", "dm-haiku", "rliable", "pandas", "nbclient", "nbformat", "ipykernel"}


def _requirements():
    reqs = []
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
          reqs.append(line)
    return reqs


_ALL = _requirements()
_name = lambda r: r.split("==")[0].split(">=")[0].strip().lower()

setup(
        name="flare_jax",
        version="0.1.0",
        description="Reinforcement Learning with Latent Flow (Flare) in JAX: RAD-SAC and Rainbow",
        python_requires=">=3.11,<3.12",
        packages=find_packages(include=["flare_jax*", "agents*", "experiments*"]),
        package_data={"experiments": ["data/*.json"]},
        install_requires=[r for r in _ALL if _name(r) not in _TEST_ONLY],
        extras_require={"test": [r for r in _ALL if _name(r) in _TEST_ONLY]},
)
