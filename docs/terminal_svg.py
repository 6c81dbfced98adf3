"""Record a real terminal session of ``bnfold`` and ``bnfold check`` on the demo model as an SVG
(README's picture): ``python docs/terminal_svg.py docs/terminal.svg``, from the repository root,
with bnfold installed. Runs in a temporary folder, so nothing is written into the clone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from rich.console import Console
from rich.text import Text

WIDTH = 150
SESSION = (["models/demo.onnx", "deploy/"], ["check", "models/demo.onnx", "deploy/demo.folded.onnx"])


def main(target: str) -> None:
    exe = shutil.which("bnfold", path=os.path.dirname(sys.executable)) or "bnfold"
    env = {**os.environ, "FORCE_COLOR": "1", "COLUMNS": str(WIDTH)}
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models", "demo.onnx")
    with tempfile.TemporaryDirectory() as work, open(os.devnull, "w") as sink:
        os.mkdir(os.path.join(work, "models"))
        shutil.copy(source, os.path.join(work, "models", "demo.onnx"))
        console = Console(record=True, width=WIDTH, force_terminal=True, color_system="truecolor", file=sink)
        for args in SESSION:
            console.print(Text.assemble(("$ ", "bold green"), " ".join(["bnfold", *args])))
            run = subprocess.run([exe, *args], cwd=work, env=env, capture_output=True, text=True, check=False)
            console.print(Text.from_ansi((run.stdout + run.stderr).rstrip("\n")))
        console.save_svg(target, title="bnfold")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/terminal.svg")
