"""The launchers' flags come from the config dataclasses with the preset's values as defaults."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest

from experiments import presets
from flare_jax import config_flags


@pytest.mark.parametrize("module,preset,flag,value", [
    ("experiments.train_sac", "flare_paper", "hidden_dim", "1024"),   # = SACConfig's default
    ("experiments.train_sac", "state", "hidden_dim", "256"),
    ("experiments.train_sac", "state", "encoder", "state_full"),
    ("experiments.train_rainbow", "atari", "frames", "100000000"),
    ("experiments.train_rainbow", "cartpole", "frames", "30000"),
    ("experiments.train_rainbow", "cartpole", "torso", "mlp"),
    ("experiments.train_sac", "flare_paper", "compute_dtype", "float32"),
    ("experiments.train_rainbow", "atari", "compute_dtype", "float32"),
])
def test_helpfull_shows_the_presets_values(module, preset, flag, value):
    out = subprocess.run([sys.executable, "-m", module, f"--preset={preset}", "--helpfull"],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, FLARE_JAX_TCMALLOC="0"))
    text = out.stdout + out.stderr
    m = re.search(rf"\n  --(?:\[no\])?{flag}:.*?\(default: '([^']*)'\)", text, re.S)
    assert m and m.group(1) == value, text[-2000:]


def test_presets_are_configs_whose_flags_round_trip():
    for table in (presets.SAC_PRESETS, presets.RAINBOW_PRESETS):
        for name, cfg in table.items():
            again = config_flags.from_dict(type(cfg), config_flags.to_dict(cfg))
            assert again == cfg, name
            assert dataclasses.is_dataclass(cfg)
    assert presets.SAC_PRESETS["flare_paper"] == type(presets.SAC_PRESETS["flare_paper"])()


def test_only_bad_input_is_reported_in_one_line_a_bug_keeps_its_traceback():
    code = ("import os\nfrom experiments import cli\n"
            "def main(argv):\n"
            "    with cli.bad_input():\n"
            "        if os.environ['CASE'] == 'input':\n"
            "            raise ValueError('lr must be > 0')\n"
            "    raise ValueError('a bug while training')\n"
            "cli.run_main(main)\n")
    run = lambda case: subprocess.run([sys.executable, "-c", code], capture_output=True,  # noqa: E731
                                      text=True, timeout=300, env=dict(os.environ, CASE=case))
    bad = run("input")
    assert bad.returncode == 2 and bad.stderr.strip().endswith("error: lr must be > 0")
    assert "Traceback" not in bad.stderr
    bug = run("bug")
    assert bug.returncode not in (0, 2) and "Traceback" in bug.stderr and "a bug while training" in bug.stderr
