"""Where a run's wall time goes: each phase (imports, data, model, first batch, every eval, every save and the
wait for it, the final write, export) with its start and end in seconds since the process started. A run
writes them to <output-dir>/phases.json, one entry per segment (a resumed run adds one), so that a slow run
explains itself; `summary` adds them up for the console line at the end.
"""

import contextlib
import json
import os
import threading
import time

from vitfood.common import seconds_since_start

FILE = "phases.json"


class Phases:
    """The phases of this process's segment of a run. `span` times a block, `mark` notes an instant;
    checkpoint writes record from their own thread, hence the lock."""

    def __init__(self):
        self.records = []
        self._lock = threading.Lock()
        self.started = time.time() - seconds_since_start()  # the process's start, as a Unix time

    def add(self, name, start, end=None, **info):
        record = dict(name=name, start=round(start, 4), end=round(start if end is None else end, 4), **info)
        with self._lock:
            self.records.append(record)
        return record

    @contextlib.contextmanager
    def span(self, name, **info):
        """Time the block as phase `name`; `info` (and what the block puts in the yielded dict) is kept with it."""
        start, extra = seconds_since_start(), dict(info)
        try:
            yield extra
        finally:
            self.add(name, start, seconds_since_start(), **extra)

    def mark(self, name, **info):
        return self.add(name, seconds_since_start(), **info)

    def total(self, name):
        """Seconds spent in phase `name`, summed over its records."""
        with self._lock:
            return sum(r["end"] - r["start"] for r in self.records if r["name"] == name)

    def count(self, name):
        with self._lock:
            return sum(r["name"] == name for r in self.records)

    def first(self, name):
        with self._lock:
            return next((r for r in self.records if r["name"] == name), None)

    def write(self, out, status):
        """Append this segment (ended with `status`) to out/phases.json; an unreadable old file is replaced."""
        path = os.path.join(out, FILE)
        try:
            with open(path) as fh:
                segments = json.load(fh)["segments"]
        except (OSError, ValueError, KeyError, TypeError):
            segments = []
        with self._lock:
            records = sorted(self.records, key=lambda r: r["start"])
        segments.append(dict(started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)), status=status,
                             seconds=round(seconds_since_start(), 3), phases=records, totals=self.totals()))
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(dict(segments=segments), fh, indent=1)
        os.replace(tmp, path)

    def totals(self):
        """{phase: seconds} over this segment, each kind of phase once."""
        with self._lock:
            names = dict.fromkeys(r["name"] for r in self.records)
        return {name: round(self.total(name), 3) for name in names}

    def summary(self):
        """One line: where this segment's time went."""
        first = self.first("first batch")
        parts = [f"{first['start']:.1f} s to the first batch" if first else None,
                 f"training {self.total('steps'):.1f} s" if self.count("steps") else None,
                 f"eval {self.total('eval'):.1f} s ({self.count('eval')})" if self.count("eval") else None,
                 f"saves {self.total('save'):.1f} s ({self.count('save')}, of which {self.total('save wait'):.1f} s "
                 "waiting for the previous write)" if self.count("save") else None,
                 f"last write {self.total('final wait'):.1f} s" if self.count("final wait") else None,
                 f"export {self.total('export'):.1f} s" if self.count("export") else None]
        return f"time: {', '.join(p for p in parts if p)}; {seconds_since_start():.1f} s in all"
