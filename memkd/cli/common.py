"""What the command modules share: exit statuses, printing, and the summary of one evaluation."""
from __future__ import annotations

from pathlib import Path
from typing import Any

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def say(*args: Any) -> None:
    print(*args, flush=True)


def report_evaluation(report: dict, out_dir: Path) -> None:
    """Print the metric table, the threshold and what was written, of one ``evaluate_model`` report."""
    from memkd import reports

    say(reports.metrics_table([(report["category"] or "test", report["metrics"])]).rstrip())
    threshold = report["threshold"]
    if threshold is not None:
        say(f"decision threshold {threshold['value']:.6g} ({threshold['mode']} F1-max; {threshold['rule']})")
    say(f"wrote {out_dir / 'metrics.json'}, {out_dir / 'metrics.md'} and {len(report['figures'])} figure(s) in {out_dir / 'figures'}")
