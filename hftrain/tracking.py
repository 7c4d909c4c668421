"""What a run reports: metrics.jsonl lines and a progress bar, on the main process only."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class MetricsLog:
    """Appends one JSON object per logged step or evaluation to `metrics.jsonl`."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
                 for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")


    def keep_until(self, step: int) -> None:
        """Drop records after `step`: a resumed run writes them again."""
        if not self.enabled or not self.path.exists():
            return
        kept = [json.dumps(r) for r in read_metrics(self.path) if r["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_bar(total: int, enabled: bool) -> tqdm:
    """A live bar on a terminal; in a log file (CI, batch jobs) one line every 30 seconds."""
    interactive = sys.stderr.isatty()
    return tqdm(total=total, disable=not enabled, desc="train", unit="step", dynamic_ncols=True,
                mininterval=0.1 if interactive else 30.0)
