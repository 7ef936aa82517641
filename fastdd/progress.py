"""Progress bars that stay readable in a log: tqdm on a terminal; elsewhere one plain line per update, at most every
30 seconds (and at the end), instead of thousands of carriage-return redraws, and no transient inner bars."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


class _LineWriter:
    """A file wrapper that turns tqdm's carriage-return redraws into whole lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").replace("\x1b[A", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)`; when stderr is not a terminal: one line per LOG_INTERVAL_S, and transient bars
    (leave=False, e.g. the steps of one batch) not shown at all."""
    stream = kwargs.pop("file", sys.stderr)
    if not getattr(stream, "isatty", lambda: False)():
        if kwargs.get("leave") is False:
            kwargs["disable"] = True
        kwargs.update(
            file=_LineWriter(stream),
            mininterval=LOG_INTERVAL_S,
            maxinterval=LOG_INTERVAL_S * 10,
            ascii=True,
            ncols=100,
            leave=True,
        )
    else:
        kwargs["file"] = stream
    return tqdm(iterable, **kwargs)
