"""Console output of the mpnas commands: where the library's log records go.

The library modules (``nas``, ``evaluators``, ``search_spaces``) report progress through
``logging`` (``log = logging.getLogger(__name__)``) and never print; a program that imports them
decides what to show. :func:`configure_logging` is that decision for the ``mpnas`` commands and
the benchmark scripts: records of level INFO go to standard output as bare lines (the per-epoch
line of training, the pipeline's stage lines), WARNING and above to standard error as
``mpnas: warning: <message>``.
"""

from __future__ import annotations

import logging
import sys

PACKAGES = ("nas", "evaluators", "search_spaces")


class ConsoleHandler(logging.Handler):
    """INFO and below to ``sys.stdout``, WARNING and above to ``sys.stderr``.

    The streams are looked up at every record, not when the handler is made, so output follows
    a redirected ``sys.stdout`` (pytest's capture, ``contextlib.redirect_stdout``).
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.levelno >= logging.WARNING:
                stream, text = sys.stderr, f"mpnas: {record.levelname.lower()}: {self.format(record)}"
            else:
                stream, text = sys.stdout, self.format(record)
            stream.write(text + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise; the handler reports it
            self.handleError(record)


def configure_logging(level: int = logging.INFO) -> None:
    """Show the mpnas packages' log records at ``level`` and above on the console; idempotent.

    The handler sits on the package loggers, which still propagate, so handlers of the root
    logger (an application's own, pytest's ``caplog``) keep receiving the records.
    """
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
            logger.addHandler(ConsoleHandler())
