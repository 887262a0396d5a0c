"""Run progress for the Prefect UI (a progress artifact) and, when asked, the terminal (a tqdm bar)."""

from __future__ import annotations

import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact


class RunProgress:
    """Counts input rows as batches finish and moves a Prefect progress artifact.

    `total` comes from a cheap pre-count of the source (None when unknown: the artifact then stays
    at 0 % with a running count until `close`). Updates are throttled to one per `min_interval_s`.
    """

    def __init__(self, *, key: str, label: str, total: int | None, terminal: bool = False,
                 min_interval_s: float = 1.0) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.min_interval_s = min_interval_s
        self._last_update = time.monotonic()
        self.artifact_id = create_progress_artifact(0.0, key=key, description=self.description())
        self._bar = None
        if terminal:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit="row", dynamic_ncols=True)

    @property
    def percent(self) -> float:
        if not self.total:
            return 0.0
        return round(min(100.0, 100.0 * self.done / self.total), 1)

    def description(self) -> str:
        of_total = f" of {self.total}" if self.total is not None else ""
        return f"{self.label}: {self.done}{of_total} rows processed"

    def advance(self, rows: int) -> None:
        self.done += rows
        if self._bar is not None:
            self._bar.update(rows)
        now = time.monotonic()
        if now - self._last_update >= self.min_interval_s:
            self._last_update = now
            update_progress_artifact(self.artifact_id, self.percent, description=self.description())

    def close(self) -> None:
        """Mark the run's input as fully processed."""
        if self._bar is not None:
            self._bar.close()
        update_progress_artifact(self.artifact_id, 100.0, description=self.description())
