"""Run logging: CSV files, TensorBoard (tensorboardX) and a progress bar.

One `RunLogger` per run directory. `log(kind, step, values)` appends a row to `<dir>/<kind>.csv`
(columns fixed by the first row of that kind, file flushed at once, so nothing is lost on
interruption) and writes the scalars to TensorBoard under `<kind>/<name>`.
"""
from __future__ import annotations

import csv
import json
import os
import shlex
import sys
import time
from typing import Any, Mapping, Optional, Sequence

import numpy as np


def _scalar(v: Any) -> float:
    return float(np.asarray(v).reshape(()))


class RunLogger:
    def __init__(self, run_dir: str, tensorboard: bool = True):
        self.run_dir = run_dir
        os.makedirs(run_dir, exist_ok=True)
        self._files: dict[str, Any] = {}
        self._writers: dict[str, csv.DictWriter] = {}
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
            self._tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def write_config(self, config: Mapping[str, Any]):
        with open(os.path.join(self.run_dir, "config.json"), "w") as f:
            json.dump(dict(config), f, indent=2, sort_keys=True, default=str)

    def log(self, kind: str, step: int, values: Mapping[str, Any]):
        row = {"step": int(step)}
        row.update({k: (_scalar(v) if not isinstance(v, str) else v) for k, v in values.items()})
        if kind not in self._writers:
            path = os.path.join(self.run_dir, f"{kind}.csv")
            f = open(path, "a", newline="")
            writer = csv.DictWriter(f, fieldnames=list(row), extrasaction="ignore")
            if f.tell() == 0:
                writer.writeheader()
            self._files[kind], self._writers[kind] = f, writer
        self._writers[kind].writerow(row)
        self._files[kind].flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and not isinstance(v, str) and np.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, int(step))

    def close(self):
        for f in self._files.values():
            f.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A progress bar over env steps (tqdm on a terminal, a line every `every_s` seconds otherwise)."""

    def __init__(self, total: int, unit: str = "env steps", every_s: float = 30.0,
                 stream=sys.stderr, desc: str = ""):
        self.total, self.unit, self.every_s, self.desc = total, unit, every_s, desc
        self.count, self.start, self.last_print = 0, time.time(), 0.0
        self.info: dict[str, str] = {}
        self._bar = None
        if stream.isatty():
            from tqdm import tqdm  # pylint: disable=g-import-not-at-top
            self._bar = tqdm(total=total, unit=" " + unit.split()[-1], desc=desc, dynamic_ncols=True)
        self.stream = stream

    def update(self, count: int, **info):
        """Sets the absolute progress `count` and the shown fields."""
        self.info.update({k: str(v) for k, v in info.items()})
        delta = count - self.count
        self.count = count
        rate = count / max(time.time() - self.start, 1e-9)
        if self._bar is not None:
            self._bar.update(delta)
            self._bar.set_postfix({f"{self.unit}/s": f"{rate:.0f}", **self.info}, refresh=False)
        elif time.time() - self.last_print > self.every_s or count >= self.total:
            self.last_print = time.time()
            fields = " ".join(f"{k}={v}" for k, v in self.info.items())
            print(f"{self.desc}{count:,d}/{self.total:,d} {self.unit} ({100 * count / max(self.total, 1):.0f}%) "
                  f"{rate:.0f} {self.unit}/s {fields}", file=self.stream, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()


def format_optional(v: Optional[float], fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def write_command(out_dir: str, module: str, args: Sequence[str], append: bool = False) -> str:
    """Writes `<out_dir>/command.txt`: the command line that reproduces a run.

    Args:
      out_dir: the run directory (created if missing).
      module: the launcher, e.g. "experiments.train_sac".
      args: its flags, e.g. sys.argv[1:] or the effective flags of a study.
      append: add a line instead of replacing the file (a directory several commands fill).
    Returns the command written.
    """
    os.makedirs(out_dir, exist_ok=True)
    command = " ".join(["python", "-m", module, *(shlex.quote(a) for a in args)])
    with open(os.path.join(out_dir, "command.txt"), "a" if append else "w") as f:
        f.write(command + "\n")
    return command
