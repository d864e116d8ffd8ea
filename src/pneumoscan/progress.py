"""Progress bars and messages (Rich, on stderr so stdout stays clean for data)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Reporter:
    """Where long-running work reports progress and problems.

    Args:
        console: Rich console to write to (default: stderr).
        quiet: Print nothing but warnings.
    """

    def __init__(self, console: Console | None = None, quiet: bool = False) -> None:
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.warnings: list[str] = []

    def info(self, message: str) -> None:
        """A normal progress message."""
        if not self.quiet:
            self.console.print(message, highlight=False)

    def warn(self, message: str) -> None:
        """A problem that does not stop the work (kept in :attr:`warnings`)."""
        self.warnings.append(message)
        self.console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, markup=True)

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            disable=self.quiet,
            transient=False,
        )

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """A progress bar; the context yields ``advance(n)``."""
        with self._progress() as progress:
            task_id = progress.add_task(description, total=total, status="")

            def advance(n: int = 1) -> None:
                progress.advance(task_id, n)

            yield advance

    def keras_callback(self, n_images: int, batch_size: int) -> Any:
        """A Keras callback drawing one bar per epoch with the running loss."""
        import keras  # lazy: loads TensorFlow

        reporter = self
        steps = -(-n_images // batch_size)

        class _EpochBar(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
                self.progress = reporter._progress()
                self.progress.start()
                total = self.params.get("epochs", "?")
                self.task = self.progress.add_task(
                    f"epoch {epoch + 1}/{total}", total=steps, status=""
                )

            def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
                loss = (logs or {}).get("loss")
                status = f"loss {float(loss):.4f}" if loss is not None else ""
                self.progress.update(self.task, advance=1, status=status)

            def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
                self.progress.stop()

        return _EpochBar()
