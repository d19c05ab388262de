"""The train command's progress line (rich, on a terminal) and its closing summary."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from gradstream.client._models import StepResult

_APPLIED = ("APPLIED", "ACCUMULATED")


@dataclass(slots=True)
class Tally:
    """What a training run did, batch by batch, as the server answered."""

    sent: int = 0  # batches handed to the SDK
    acknowledged: int = 0  # results received
    applied: int = 0
    duplicate: int = 0
    skipped_nonfinite: int = 0
    rejected: list[str] = field(default_factory=list)  # "rows a-b: reason"
    step: int = 0
    loss: float | None = None
    loss_step: int = 0

    def add(self, result: StepResult) -> None:
        """Count one result."""
        self.acknowledged += 1
        self.step = max(self.step, result.step)
        if result.outcome in _APPLIED:
            self.applied += 1
        elif result.outcome == "DUPLICATE":
            self.duplicate += 1
        elif result.outcome == "SKIPPED_NONFINITE":
            self.skipped_nonfinite += 1
        if result.loss is not None:
            self.loss, self.loss_step = result.loss, result.step

    def summary(self, interrupted: bool = False) -> str:
        """One line: what was sent, acknowledged and applied, the last step and loss."""
        loss = "n/a" if self.loss is None else f"{self.loss:.8g}"
        if self.loss is not None and self.loss_step != self.step:
            loss += f" (at step {self.loss_step})"
        parts = [
            f"{'interrupted: ' if interrupted else ''}trained {self.acknowledged} batches",
            f"step {self.step}",
            f"loss {loss}",
        ]
        if interrupted or self.sent != self.acknowledged:
            parts.insert(
                1, f"sent {self.sent}, acknowledged {self.acknowledged}, applied {self.applied}"
            )
        if self.duplicate:
            parts.append(f"{self.duplicate} duplicate (applied before, not again)")
        if self.skipped_nonfinite:
            parts.append(f"{self.skipped_nonfinite} skipped as non-finite")
        if self.rejected:
            parts.append(f"{len(self.rejected)} rejected")
        return ", ".join(parts)


class ProgressLine:
    """Batches done, step, rate, last loss and connection state; redrawn on a terminal.

    Off a terminal nothing is redrawn: one line is written when the run ends, so logs
    stay readable.
    """

    def __init__(self, total: int | None, quiet: bool, target: str) -> None:
        self.total, self.target = total, target
        self.console = Console(stderr=True, highlight=False)
        self.live = not quiet and self.console.is_terminal
        self.quiet = quiet
        self.start = time.monotonic()
        self.status = ""
        self._shown = 0.0
        self._lock = threading.Lock()
        self._progress = Progress(
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("step {task.fields[step]}"),
            TextColumn("{task.fields[rate]} batches/s"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("[yellow]{task.fields[status]}"),
            console=self.console,
            transient=False,
            auto_refresh=True,
            refresh_per_second=8,
        )
        self._task = self._progress.add_task(
            "train", total=total, step=0, rate="0", loss="n/a", status=""
        )
        if self.live:
            self._progress.start()

    def update(self, tally: Tally, force: bool = False) -> None:
        """Show the tally (at most every 0.1 s unless forced)."""
        now = time.monotonic()
        if not self.live or (not force and now - self._shown < 0.1):
            return
        self._shown = now
        rate = tally.acknowledged / max(now - self.start, 1e-9)
        loss = "n/a" if tally.loss is None else f"{tally.loss:.6g}"
        with self._lock:
            self._progress.update(
                self._task,
                completed=tally.acknowledged,
                step=tally.step,
                rate=f"{rate:,.0f}",
                loss=loss,
                status=self.status,
            )

    def set_status(self, status: str) -> None:
        """A note on the connection ("reconnecting ..."); off a terminal, a line of its own."""
        if status == self.status:
            return
        self.status = status
        if self.live:
            with self._lock:
                self._progress.update(self._task, status=status)
        elif status and not self.quiet:
            print(f"gradstream: {status}", file=sys.stderr, flush=True)

    def close(self, tally: Tally, shown: bool = True) -> None:
        """End the line, so whatever is printed next starts on a line of its own.

        Off a terminal the closing line is written only when ``shown`` (not before an error).
        """
        if self.live:
            self.status = ""
            self.update(tally, force=True)
            self._progress.stop()
        elif not self.quiet and shown:
            rate = tally.acknowledged / max(time.monotonic() - self.start, 1e-9)
            total = "?" if self.total is None else str(self.total)
            print(
                f"{tally.acknowledged}/{total} batches, step {tally.step}, {rate:,.0f} batches/s",
                file=sys.stderr,
                flush=True,
            )
