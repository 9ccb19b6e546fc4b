"""The stage machinery of a cached, resumable pipeline (:class:`StageCache`): a folder per stage, reused while the
settings it was computed with are unchanged. The stages themselves are in :mod:`bft.pipelines.reproduce.stages`."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

from bft.atomic import atomic_write_json

__all__ = ["StageCache"]


class StageCache:
    """Stage folders with a ``stage.json`` holding the settings they were computed with.

    A stage is reused when its ``stage.json`` exists (it is written last, atomically), records the same settings and
    none of the stages it reads (``after``) was recomputed in this run after it; a recomputed stage is remembered so
    that every stage reading it is recomputed too, once (a stage computed in this run after the stages it reads is
    reused when it is asked for again). Stage names are paths under the root (``shallow/bft``).
    """

    def __init__(self, root: Path, log):
        self.root = Path(root).resolve()  # the stages' paths are absolute: each compares as "<run>/..."
        self.recomputed: set[str] = set()
        self.finished: dict[str, int] = {}  # stage -> its place in the order stages finished in this run
        self._finish_count = 0
        self.fresh_caches: set[Path] = set()  # teacher caches checked (or rebuilt) in this run
        self.log = log

    def dir(self, name: str) -> Path:
        return self.root / name

    def cached(self, name: str, settings: dict, after: tuple = ()) -> bool:
        marker = self.dir(name) / "stage.json"
        if not self.upstream_changed(name, after) and marker.is_file():
            try:
                if self.comparable(json.loads(marker.read_text())["settings"]) == self.comparable(settings):
                    self.log(f"[{name}] cached: {self.dir(name)}")
                    return True
            except (json.JSONDecodeError, KeyError):
                pass
        self.recomputed.add(name)
        return False

    def upstream_changed(self, name: str, after: tuple) -> bool:
        """Whether a stage that ``name`` reads (``after``) was recomputed in this run and ``name`` not since: what
        ``name`` left on disk (checkpoints, a cache built from the old models) belongs to the old inputs."""
        return any(self._stale(name, dep) for dep in after)

    def _stale(self, name: str, dep: str) -> bool:
        """Whether ``dep``, read by stage ``name``, was recomputed in this run and ``name`` not since it finished."""
        if dep not in self.recomputed:
            return False
        return not (dep in self.finished and name in self.finished and self.finished[dep] < self.finished[name])

    def comparable(self, settings):
        """``settings`` as two runs compare them and ``stage.json`` stores them: JSON types, and every string that
        names a path under the root written relative to it (``<run>/models/base``), so that ``--out runs/x`` and
        ``--out /abs/path/runs/x`` are the same run, and so is a run folder moved or copied elsewhere (else every
        stage would look changed and a trained student would be thrown away to train it again). A relative string is
        a path only where it exists. Settings already in this form are returned as they are."""
        root = self.root

        def walk(value):
            if isinstance(value, dict):
                return {k: walk(v) for k, v in value.items()}
            if isinstance(value, list):
                return [walk(v) for v in value]
            if isinstance(value, str) and "/" in value and not value.startswith("<run>/"):
                path = Path(value)
                if not (path.is_absolute() or path.exists()):
                    return value  # a Hub id ("org/name") is not a folder, even in a run rooted at the working folder
                try:
                    return "<run>/" + path.resolve().relative_to(root).as_posix()
                except (ValueError, OSError):
                    return value
            return value

        return walk(json.loads(json.dumps(settings)))

    def record_attempt(self, name: str, settings: dict) -> None:
        """Records, as ``settings.json`` in the stage's folder, the settings of an attempt at a stage that keeps its
        partial work (checkpoints) when interrupted, in :meth:`comparable` form: a later attempt resumes only
        under the same settings (:meth:`attempt_settings`), even from a run folder moved elsewhere."""
        atomic_write_json(self.dir(name) / "settings.json", self.comparable(settings), indent=1)

    def attempt_settings(self, name: str):
        """The settings the last attempt at ``name`` recorded (:meth:`record_attempt`), in :meth:`comparable` form;
        None when there is no readable record."""
        try:
            return self.comparable(json.loads((self.dir(name) / "settings.json").read_text()))
        except (OSError, json.JSONDecodeError):
            return None

    def start(self, name: str, *, keep: bool = False) -> Path:
        """A clean folder for a stage about to run (a half-written earlier attempt is removed unless ``keep``: a
        training stage keeps its checkpoints, and an interrupted run resumes)."""
        d = self.dir(name)
        if not keep and d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        self.log(f"[{name}] running ...")
        return d

    def finish(self, name: str, settings: dict, seconds: float) -> None:
        marker = {"settings": self.comparable(settings), "seconds": round(seconds, 1)}
        atomic_write_json(self.dir(name) / "stage.json", marker, indent=1)
        self.finished[name] = self._finish_count = self._finish_count + 1

    @contextlib.contextmanager
    def computing(self, name: str, settings: dict, *, keep: bool = False):
        """``with stages.computing(name, settings) as d:`` runs a stage's body in its clean folder ``d``
        (:meth:`start`) and marks it done with its settings and time (:meth:`finish`) only when the body returns:
        a stage that raises is computed again next time."""
        t0 = time.time()
        d = self.start(name, keep=keep)
        yield d
        self.finish(name, settings, time.time() - t0)
