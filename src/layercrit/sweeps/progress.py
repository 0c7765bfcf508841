"""A sweep's progress: an overall bar over units and, on a terminal, one status line per worker."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from .store import Unit

if TYPE_CHECKING:
    from .worker import Outcome


class _Progress:
    """An overall bar over units (with ETA) and, on a terminal, one status line per worker."""

    def __init__(self, enabled: bool, total: int, workers: int):
        from tqdm.auto import tqdm

        self.enabled = enabled
        self.failed = 0
        self.bar = tqdm(total=total, desc="sweep", unit="unit", disable=not enabled, dynamic_ncols=True)
        lines = enabled and sys.stderr.isatty()
        self.lines = [tqdm(total=0, position=i + 1, bar_format="{desc}", disable=not lines, leave=False)
                      for i in range(workers)]

    def started(self, i: int, unit: Unit) -> None:
        self.lines[i].set_description_str(f"  worker {i}: {unit.describe()}")

    def finished(self, i: int, outcome: Outcome) -> None:
        self.bar.update(1)
        self.lines[i].set_description_str(f"  worker {i}: idle")
        if outcome.error is not None:
            self.failed += 1
            self.bar.set_postfix(failed=self.failed)
            if self.enabled:
                self.bar.write(f"failed: {outcome.unit.describe()}: {outcome.error}")

    def close(self) -> None:
        for line in self.lines:
            line.close()
        self.bar.close()


