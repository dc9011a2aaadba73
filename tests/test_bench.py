"""The benchmark module's helpers and command line (timings themselves are never asserted)."""
import subprocess
import sys

import pytest

from experiments import bench


def test_matmul_peak_reports_the_best_size_with_its_rate():
    gflops, n = bench.matmul_peak_gflops(sizes=(64, 128), repeats=1)
    assert n in (64, 128)
    assert 0.0 < gflops < 1e6


def test_unknown_benchmark_names_the_valid_ones():
    proc = subprocess.run([sys.executable, "-m", "experiments.bench", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    for name in ("encoders", "peak", "rainbow", "sac_update", "seeds"):
        assert name in proc.stderr + proc.stdout


@pytest.mark.parametrize("name", sorted(bench.BENCHMARKS))
def test_every_benchmark_is_in_the_module_docstring(name):
    assert f"  {name} " in bench.__doc__
