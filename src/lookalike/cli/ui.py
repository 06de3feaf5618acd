"""Terminal plumbing of the ``lookalike`` command: consoles, messages, logging, progress bars.

The only place in the package that attaches log handlers or draws progress bars; the
stages report progress through plain ``update(done, total)`` callbacks.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


def print_error(message: str) -> None:
    """``error: message`` on one line of stderr (whitespace in ``message`` collapsed)."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def print_warning(message: str) -> None:
    """``warning: message`` on one line of stderr, for what the user should act on."""
    print(f"warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


def silence_stdout() -> None:
    """Point stdout at /dev/null, so a closed pipe raises nothing more at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def stderr_console() -> Console:
    """The console for logs and progress bars."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def stdout_console() -> Console:
    """The console for results (tables)."""
    from rich.console import Console

    # Piped output is not cut at 80 columns: paths stay whole for grep and friends.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 240)


def configure_logging(verbose: int, console: Console) -> Callable[[], None]:
    """Send logs to stderr (WARNING, -v INFO, -vv DEBUG); returns the undo function."""
    if console.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(
            console=console, show_time=False, show_path=False, markup=False
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root, ours = logging.getLogger(), logging.getLogger("lookalike")
    old_level = ours.level
    root.addHandler(handler)
    ours.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING)

    def restore() -> None:
        root.removeHandler(handler)
        ours.setLevel(old_level)

    return restore


class Ui:
    """Progress bars on stderr: rich bars with rate and ETA, off when quiet or not a TTY."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self.console = console
        self.enabled = enabled and console.is_terminal

    def bars(self) -> Bars:
        return Bars(self.console, self.enabled)


class Bars:
    """A rich Progress whose bars appear on the first call of their :meth:`callback`."""

    def __init__(self, console: Console, enabled: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class RateColumn(ProgressColumn):
            def render(self, task: Any) -> Text:
                unit = task.fields.get("unit", "it")
                return Text(f"{task.speed:.1f} {unit}/s" if task.speed else f"- {unit}/s")

        class StatusColumn(ProgressColumn):
            def render(self, task: Any) -> Text:
                return Text(task.fields.get("status", ""))

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            StatusColumn(),
            console=console,
            disable=not enabled,
            redirect_stdout=False,
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tasks:
            self._progress.stop()

    def callback(self, description: str, unit: str) -> Callable[[int, int], None]:
        """``update(done, total)`` for the bar called ``description``."""

        def update(done: int, total: int) -> None:
            task = self._tasks.get(description)
            if task is None:  # started on first use: nothing is drawn for a stage never run
                if not self._tasks:
                    self._progress.start()
                task = self._progress.add_task(description, total=total, unit=unit)
                self._tasks[description] = task
            self._progress.update(task, completed=done, total=total)

        return update

    def training(self) -> Callable[[Any], None]:
        """A callback for :class:`lookalike.train.Progress`: a bar per epoch with the loss,
        the learning rate, images/s and the time left."""

        def update(p: Any) -> None:
            frozen = ", backbone frozen" if p.frozen else ""
            description = f"epoch {p.epoch + 1}/{p.epochs} ({p.size} px{frozen})"
            task = self._tasks.get(description)
            if task is None:
                if not self._tasks:
                    self._progress.start()
                task = self._progress.add_task(description, total=p.steps, unit="step")
                self._tasks[description] = task
            status = f"loss {p.loss:.3f}  lr {p.lr:.1e}  {p.images_per_s:.1f} img/s"
            self._progress.update(task, completed=p.step, total=p.steps, status=status)

        return update
