"""RUN/log.txt: a timestamped record of every stage run on a run directory, appended to.

Jobs of one run on several machines append to the same file, so each line names its host and
process. Warnings of the pipeline's modules also go to the console (the CLI prints its own errors).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

from rundir.layout import RunLayout

CLI_LOGGER = "cli"
PIPELINE_LOGGERS = (CLI_LOGGER, "rundir", "evaluation", "metadata", "cnn", "fusion", "ensemble", "triage")


@contextmanager
def run_log(run_dir: Path) -> Iterator[Path]:
    """Send the pipeline's log records to RUN/log.txt (and warnings to stderr) while the block runs.

    Nested stages (`demo`, or `stack` running `report`) reuse the outer block's handlers.
    """
    path = RunLayout(run_dir).log
    loggers = [logging.getLogger(name) for name in PIPELINE_LOGGERS]
    if any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in loggers[0].handlers):
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, mode="a", encoding="utf-8")
    to_file.setFormatter(
        logging.Formatter(f"%(asctime)s {socket.gethostname()}[%(process)d] %(name)s %(levelname)s: %(message)s")
    )
    to_console = RichHandler(console=Console(stderr=True), level=logging.WARNING, show_time=False, show_path=False)
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO)
        logger.addHandler(to_file)
        if logger.name != CLI_LOGGER:
            logger.addHandler(to_console)
    try:
        yield path
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(to_file)
            logger.removeHandler(to_console)
            logger.setLevel(level)
        to_file.close()
