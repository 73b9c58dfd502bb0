"""A suite run that survives interruption: finished run groups are journaled in its ``--out`` directory.

A suite on a 2-core CPU runs for hours, and a session, a time limit or a signal can end it before its results are
written. :func:`~metaopt.evaluate.run_suite` with ``out`` therefore appends to ``out/journal.jsonl`` as it goes:

* a first line with the run's **protocol** (suite, steps, seeds, dataset, tasks, optimizers and their
  hyper-parameters, sources and checkpoint fingerprints, …: everything that decides what a run computes) and, once
  tuning has finished, a line with the **tuned learning rates**;
* one line per finished **run group** (one optimizer on one task, every seed), the runs as :func:`report.runs_to_json`
  writes them (exact float32 losses);
* one line per finished **LRS-OPT seed** (marthe-schedules: tens of minutes each), its run and its record (the
  outer iterations' validation losses and the optimized schedule).

Run again with the same arguments and the suite continues: the tuned rates and the finished groups are read back
instead of recomputed (seeds fix every weight and minibatch, so they are the runs the full command would make). A
journal of another protocol is refused with the differences named, never mixed in. The journal is removed when the
results are written. ``max_minutes`` (``--max-minutes``) stops a run cleanly after the group (or LRS-OPT seed) that
crosses the limit, leaving the journal for the next piece.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import metaopt.evaluate.report as report
from metaopt.evaluate.runner import Run

JOURNAL_FILE = "journal.jsonl"


class JournalMismatch(ValueError):
    """``out`` holds the journal of an interrupted run with another protocol."""


def normalized(protocol: Mapping[str, Any]) -> dict[str, Any]:
    """``protocol`` as it reads back from JSON (tuples become lists, keys strings), so that a recorded protocol and
    a computed one compare equal exactly when they describe the same runs."""
    return json.loads(json.dumps(protocol, sort_keys=True, default=repr))


def _short(value: Any, width: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 1] + "…"


class Journal:
    """The journal of one suite run in ``directory`` (see the module docstring).

    ``tuned`` is the recorded tuned rates (None where tuning had not finished); ``groups`` maps (task label,
    optimizer label) to the runs of each finished group; ``lrs`` maps (task label, seed) to each finished LRS-OPT
    seed's (run, record).
    """

    def __init__(self, directory: str | os.PathLike[str], protocol: Mapping[str, Any]):
        self.path = Path(directory) / JOURNAL_FILE
        self.protocol = normalized(protocol)
        self.tuned: dict[str, Any] | None = None
        self.groups: dict[tuple[str, str], list[Run]] = {}
        self.lrs: dict[tuple[str, int], tuple[Run, dict[str, Any]]] = {}
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):  # a line cut by the interruption itself: that group is rerun
                    break
                raise JournalMismatch(f"{self.path}: line {number} is not JSON; delete the file to start the suite "
                                      "afresh") from None
        if not records or "protocol" not in records[0]:
            raise JournalMismatch(f"{self.path}: no protocol line; delete the file to start the suite afresh")
        recorded = records[0]["protocol"]
        if recorded != self.protocol:
            differ = [f"{key}: {_short(recorded.get(key))} there, {_short(self.protocol.get(key))} now"
                      for key in sorted(recorded.keys() | self.protocol.keys())
                      if recorded.get(key) != self.protocol.get(key)]
            raise JournalMismatch(
                f"{self.path} is the journal of an interrupted run with another protocol ({'; '.join(differ)}). "
                "Run that command again to finish it, write to another --out, or delete the file to discard its "
                f"{sum('runs' in r for r in records)} finished run group(s).")
        for record in records[1:]:
            if "tuned" in record:
                self.tuned = record["tuned"]
            elif "runs" in record:
                self.groups[(record["task"], record["optimizer"])] = report.runs_from_json(record["runs"])
            elif "lrs" in record:
                (run,) = report.runs_from_json([record["run"]])
                self.lrs[(record["lrs"]["task"], record["lrs"]["seed"])] = (run, record["lrs"])
        self.path.write_text("".join(json.dumps(r) + "\n" for r in records))  # drop a cut last line

    def _append(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` (after the protocol line, written with the first record: a run refused before it
        computed anything leaves no journal)."""
        if not self.path.is_file():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"protocol": self.protocol}) + "\n")
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @property
    def resumed(self) -> bool:
        """Whether anything was read back (tuned rates or finished groups)."""
        return self.tuned is not None or bool(self.groups) or bool(self.lrs)

    def record_tuned(self, tuned: Mapping[str, Any]) -> None:
        self.tuned = normalized(tuned)
        self._append({"tuned": self.tuned})

    def record_group(self, runs: Sequence[Run]) -> None:
        """Journal one finished group (runs of one optimizer on one task)."""
        task, label = runs[0].task, runs[0].optimizer
        self.groups[(task, label)] = list(runs)
        self._append({"task": task, "optimizer": label, "runs": report.runs_to_json(runs)})

    def record_lrs(self, run: Run, record: Mapping[str, Any]) -> None:
        """Journal one finished LRS-OPT seed: its run and its record (task and seed included)."""
        self.lrs[(record["task"], record["seed"])] = (run, dict(record))
        self._append({"lrs": dict(record), "run": report.runs_to_json([run])[0]})

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
