"""The fresh-clone benchmark's report and its stage runner (the run itself is `make first-run`: minutes)."""
from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.first_run import first_run_markdown, run_stage
from loadtest.report import machine


def report(total: float, correct: bool) -> dict:
    return {"command": "python -m loadtest first-run", "date": "2026-11-28T23:00:00+00:00", "commit": "0123456789abcdef",
            "machine": machine(), "pip_cache": {"directory": None, "mib": 0.0},
            "seconds": {"clone": 0.4, "make venv": 95.0, "make model-store": 130.0, "make serve": 20.0,
                        "first prediction": 0.1},
            "total_seconds": total, "target_seconds": 300.0, "met": total <= 300.0 and correct,
            "prediction": {"status": 200, "label": "cat" if correct else "dog", "true_label": "cat", "correct": correct}}


def test_the_report_names_every_stage_the_total_and_the_verdict() -> None:
    markdown = first_run_markdown(report(245.5, True))
    assert "| make model-store | 130.0 |" in markdown and "| **total** | **245.5** |" in markdown
    assert "label `cat` for an image whose true label is `cat`" in markdown and markdown.count("**met**") == 1
    assert "pip cache before the run: 0.0 MiB (none)" in markdown


@pytest.mark.parametrize(("total", "correct"), [(301.0, True), (120.0, False)])
def test_too_slow_or_a_wrong_first_answer_misses_the_target(total: float, correct: bool) -> None:
    assert "**not met**" in first_run_markdown(report(total, correct))


def test_a_stage_is_timed_in_its_directory_and_environment_with_its_output_logged(tmp_path: Path) -> None:
    log = tmp_path / "first-run.log"
    (tmp_path / "stage").mkdir()
    command = ["sh", "-c", 'sleep 0.3; echo "in $(pwd) with $STAGE_VALUE"']
    seconds = run_stage(command, tmp_path / "stage", log, {"PATH": "/usr/bin:/bin", "STAGE_VALUE": "42"})
    assert 0.3 <= seconds < 10
    assert log.read_text().splitlines() == ["$ sh -c 'sleep 0.3; echo \"in $(pwd) with $STAGE_VALUE\"'",
                                            f"in {tmp_path / 'stage'} with 42"]


def test_a_failing_stage_stops_the_run_and_points_at_its_log(tmp_path: Path) -> None:
    log = tmp_path / "first-run.log"
    with pytest.raises(RuntimeError, match=f"exit status 3; see {log}"):
        run_stage(["sh", "-c", "echo half done; exit 3"], tmp_path, log, {"PATH": "/usr/bin:/bin"})
    assert "half done" in log.read_text()
