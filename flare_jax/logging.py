"""Run logging: CSV files, TensorBoard (tensorboardX) and a progress bar.

One `RunLogger` per run directory. `log(kind, step, values)` appends a row to `<dir>/<kind>.csv`
(written and closed at once, so nothing is lost on interruption) and writes the scalars to
TensorBoard under `<kind>/<name>`; `image(step, tag, hwc_uint8)` writes an image (TensorBoard
only, e.g. the frame strip of an evaluation video).
"""
from __future__ import annotations

import csv
import os
import shlex
import sys
import time
from typing import Any, Mapping, Optional, Sequence

import numpy as np


def _scalar(v: Any):
    """A Python int (ints and bools) or float of a scalar."""
    v = np.asarray(v).reshape(())
    return int(v) if v.dtype.kind in "biu" else float(v)


class RunLogger:
    """CSV and TensorBoard logs of one run directory.

    `resume_step`: the logs continue a run restored at this step (the x-axis unit of the rows):
    rows with a larger step are cut from every `<kind>.csv` first, and TensorBoard is told to
    purge its events after that step (`purge_step`), so each step appears once after a resume.
    A row with columns the file lacks rewrites the file with the union of the columns.
    """

    def __init__(self, run_dir: str, tensorboard: bool = True, resume_step: Optional[int] = None):
        self.run_dir = run_dir
        os.makedirs(run_dir, exist_ok=True)
        self._columns: dict[str, list[str]] = {}
        self._tb = None
        if resume_step is not None:
            truncate_csvs(run_dir, resume_step)
        if tensorboard:
            self._tb = _TensorBoard(os.path.join(run_dir, "tb"),
                                    purge_step=None if resume_step is None else int(resume_step) + 1)

    def _path(self, kind: str) -> str:
        return os.path.join(self.run_dir, f"{kind}.csv")

    def log(self, kind: str, step: int, values: Mapping[str, Any]):
        row = {"step": int(step)}
        row.update({k: (_scalar(v) if not isinstance(v, str) else v) for k, v in values.items()})
        path = self._path(kind)
        if kind not in self._columns:
            self._columns[kind] = read_csv(path)[0] if os.path.exists(path) else []
        columns = self._columns[kind]
        new = [k for k in row if k not in columns]
        if new:   # a new file, or new columns: (re)write the header with all columns
            _, rows = read_csv(path) if os.path.exists(path) else ([], [])
            columns.extend(new)
            _write_csv(path, columns, rows)
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=columns, restval="").writerow(row)
        if self._tb is not None:
            self._tb.write(int(step), {f"{kind}/{k}": v for k, v in row.items()
                                       if k != "step" and not isinstance(v, str) and np.isfinite(v)})

    def image(self, step: int, tag: str, image: np.ndarray):
        """Writes an [H, W, 3] (or [H, W, 1]) uint8 image to TensorBoard under `tag` at `step`
        (nothing without TensorBoard)."""
        if self._tb is not None:
            self._tb.image(int(step), tag, image)

    def close(self):
        if self._tb is not None:
            self._tb.close()


class _TensorBoard:
    """A TensorBoard event file written synchronously (tensorboardX's SummaryWriter queues
    events in a thread that a killed process never drains). `purge_step`: TensorBoard hides the
    earlier files' events at steps >= it (a SessionLog START event, as SummaryWriter writes)."""

    def __init__(self, logdir: str, purge_step: Optional[int] = None):
        from tensorboardX.event_file_writer import EventsWriter  # pylint: disable=g-import-not-at-top
        from tensorboardX.proto.event_pb2 import Event, SessionLog  # pylint: disable=g-import-not-at-top
        from tensorboardX.summary import image, scalar  # pylint: disable=g-import-not-at-top
        os.makedirs(logdir, exist_ok=True)
        self._event, self._scalar, self._image = Event, scalar, image
        self._writer = EventsWriter(os.path.join(logdir, "events"))
        if purge_step is not None:
            self._writer.write_event(Event(step=purge_step, wall_time=time.time(),
                                           session_log=SessionLog(status=SessionLog.START)))
        self._writer.flush()

    def write(self, step: int, scalars: Mapping[str, float]):
        for tag, value in scalars.items():
            self._writer.write_event(self._event(wall_time=time.time(), step=step,
                                                 summary=self._scalar(tag, float(value))))
        self._writer.flush()

    def image(self, step: int, tag: str, image: np.ndarray):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"a TensorBoard image must be [H, W, 1|3|4] uint8, got "
                             f"{list(image.shape)} {image.dtype}")
        self._writer.write_event(self._event(wall_time=time.time(), step=step,
                                             summary=self._image(tag, image, dataformats="HWC")))
        self._writer.flush()

    def close(self):
        self._writer.close()


def read_csv(path: str) -> tuple[list[str], list[dict]]:
    """(columns, rows) of a log CSV; rows whose step is not an integer, or with missing fields
    (a line cut by a killed process), are dropped."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = []
        for row in reader:
            if None in row.values() or None in row:
                continue
            try:
                int(row["step"])
            except (KeyError, TypeError, ValueError):
                continue
            rows.append(row)
        return list(reader.fieldnames or []), rows


def _write_csv(path: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def truncate_csvs(run_dir: str, max_step: int):
    """Keeps only the rows with step <= max_step in every `<run_dir>/*.csv`."""
    for name in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        if name.endswith(".csv"):
            path = os.path.join(run_dir, name)
            columns, rows = read_csv(path)
            _write_csv(path, columns, [r for r in rows if int(r["step"]) <= max_step])


class Progress:
    """A progress bar over env steps (tqdm on a terminal, a line every `every_s` seconds otherwise)."""

    def __init__(self, total: int, unit: str = "env steps", every_s: float = 30.0,
                 stream=sys.stderr, desc: str = "", initial: int = 0):
        self.total, self.unit, self.every_s, self.desc = total, unit, every_s, desc
        self.count, self.start, self.last_print = initial, time.time(), 0.0
        self.initial = initial
        self.info: dict[str, str] = {}
        self._bar = None
        if stream.isatty():
            from tqdm import tqdm  # pylint: disable=g-import-not-at-top
            self._bar = tqdm(total=total, initial=initial, unit=" " + unit.split()[-1], desc=desc,
                             dynamic_ncols=True)
        self.stream = stream

    def update(self, count: int, **info):
        """Sets the absolute progress `count` and the shown fields."""
        self.info.update({k: str(v) for k, v in info.items()})
        delta = count - self.count
        self.count = count
        rate = (count - self.initial) / max(time.time() - self.start, 1e-9)
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
