"""The multi-process command's parts that need no ComfyUI: its options and the launcher's failure message."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from headless.cli import build_parser  # noqa: E402
from headless.direct import failure_message  # noqa: E402


class Failure:
    def __init__(self, exitcode, message=""):
        self.exitcode, self.message = exitcode, message

    def signal_name(self):
        return signal.Signals(-self.exitcode).name if self.exitcode < 0 else "<N/A>"


def test_killed_process_is_named_first_and_the_ones_the_launcher_stopped_last():
    text = failure_message({0: Failure(-signal.SIGTERM), 1: Failure(-signal.SIGKILL)}, "out")
    assert text.startswith("training stopped: process rank 1 was killed by SIGKILL; rank 0 was stopped by the launcher (SIGTERM)"), text


def test_a_process_that_raised_is_named_with_its_error():
    text = failure_message({1: Failure(1, {"message": "Traceback ...\nConfigError: batch_size: 8 is larger than the dataset"})}, "out")
    assert "rank 1 stopped: ConfigError: batch_size: 8 is larger than the dataset" in text, text


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_processes_must_be_a_whole_number_of_at_least_one(value, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--checkpoint", "c", "--dataset", "d", "--processes", value])
    assert "--processes" in capsys.readouterr().err


def test_processes_default_keeps_the_single_process_server_command():
    args = build_parser().parse_args(["train", "--checkpoint", "c", "--dataset", "d"])
    assert args.processes is None and args.save_every == 0
