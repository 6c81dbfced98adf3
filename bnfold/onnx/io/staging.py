"""Write a candidate model beside its destination, check it, then publish it atomically.

The fold pipeline saves the folded model into a hidden staging folder next to the output,
verifies it there, and only then publishes it::

    with Staging(dst, reads=[src]) as stage:
        save_model(model, stage.path, location=stage.location, ...)
        ...  # verify stage.path
        stage.publish()

:attr:`Staging.location` names the data file as it will be called next to ``dst``: not a file
an input reads, not the data of the model now at ``dst``. :meth:`Staging.publish` moves the
data in first, then swaps the model in, then removes the replaced model's own data (see
:func:`bnfold.onnx.io.atomic.commit`), so a reader -- or a run killed at any instant -- finds
a consistent model and data pair. Leaving the ``with`` block removes the staging folder; a
folder left by a killed process is removed by the next run in that directory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from contextlib import ExitStack
from types import TracebackType

from bnfold.errors import InputError

from .atomic import check_output, commit, owned_name, remove_stale, terminate_as_exit
from .datanames import choose_data_name, model_files, obsolete_data_files, old_data_files


class Staging:
    """A hidden ``.bnfold-<pid>-<random>`` folder beside ``dst`` for one candidate output."""

    def __init__(self, dst: str | os.PathLike[str], *, reads: Sequence[str | os.PathLike[str]] = ()) -> None:
        self.display = os.fspath(dst)
        self.dst = os.path.abspath(self.display)
        check_output(self.dst, self.display)
        self.directory = os.path.dirname(self.dst)
        self._reads = [os.path.abspath(os.fspath(r)) for r in reads]
        self._exit = ExitStack()
        self.folder = ""
        self.path = ""
        self.location = ""
        self._kept: set[str] = set()
        self._old: set[str] = set()

    def __enter__(self) -> Staging:  # noqa: PYI034 - a final class; typing.Self needs 3.11
        self._exit.enter_context(terminate_as_exit())
        try:
            remove_stale(self.directory)
            inputs: set[str] = set()
            for model in self._reads:
                files = model_files(model)
                inputs |= files
                if os.path.realpath(model) != os.path.realpath(self.dst):
                    self._kept |= files  # another model reads them: never removed
            self._old = old_data_files(self.dst)
            self.location = choose_data_name(self.dst, self.display, None, inputs | self._old)
            self.folder = os.path.join(self.directory, owned_name())
            try:
                os.mkdir(self.folder, 0o700)
            except OSError as err:
                raise InputError(
                    f"{self.display}: cannot write in {self.directory} ({err.strerror})"
                ) from None
            self.path = os.path.join(self.folder, os.path.basename(self.dst))
        except BaseException:
            self._exit.close()
            raise
        return self

    def publish(self) -> None:
        """Move the staged model (``path``) and its data files into place, atomically as a pair."""
        if not os.path.isfile(self.path):
            raise FileNotFoundError(self.path)  # pragma: no cover - a caller bug
        name = os.path.basename(self.path)
        moves = [
            (os.path.join(self.folder, entry), os.path.join(self.directory, entry))
            for entry in sorted(os.listdir(self.folder))
            if entry != name
        ]
        new = {os.path.realpath(final) for _, final in moves}
        obsolete = obsolete_data_files(self.dst, self._old, self._kept | new)
        commit(moves, (self.path, self.dst), obsolete)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self.folder:
                shutil.rmtree(self.folder, ignore_errors=True)
        finally:
            self._exit.close()
