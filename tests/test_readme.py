"""Run every Python code block of README.md and docs/*.md, as a reader would, in order.

The blocks of one file share one namespace (like the cells of a notebook) and run in a fresh
temporary folder, with matplotlib's Agg backend. A block runs unless the line before its fence is
an HTML comment ``<!-- not run: REASON -->`` (for example a block that needs a SLURM cluster); the
reason must be given, and :func:`test_blocks_not_run_are_few` lists them. Shell blocks (``bash``)
are never run: they install packages or call the command line, which ``tests/test_cli.py`` covers.

Every ``FitFlagWarning`` an example raises must be named (by its flag code) in the file's prose, so
that a flagged fit in an example is said, not hidden.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")
NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<reason>\S.*?)\s*-->")
#: Languages whose blocks are Python and run.
PYTHON = {"python", "py", "python3", "{code-cell} python", "{code-cell} ipython3"}
#: Languages that are never run (shell, output, formats, directives).
NEVER = {"bash", "sh", "console", "shell", "text", "", "toctree", "{toctree}", "{eval-rst}", "json", "ini", "toml",
         "math", "{math}", "{note}", "{warning}"}


@dataclass
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int
    language: str
    source: str
    not_run: str | None


def blocks(path: Path) -> list[Block]:
    """Every fenced code block of ``path``, with the line its fence is on (1-based)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info, start = m["fence"], m["info"].strip(), i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        previous = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        skip = NOT_RUN.search(previous)
        out.append(Block(path, start + 1, info.lower(), "\n".join(body) + "\n", skip["reason"] if skip else None))
    return out


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_every_block_has_a_known_language():
    unknown = [f"{_rel(b.path)}:{b.line} ({b.language!r})" for p in FILES for b in blocks(p)
               if b.language not in PYTHON | NEVER]
    assert not unknown, f"code blocks in a language this test neither runs nor knows to skip: {unknown}"


def test_blocks_not_run_are_few():
    """The blocks that are not run, each with its reason (printed with ``pytest -s``)."""
    skipped = [b for p in FILES for b in blocks(p) if b.language in PYTHON and b.not_run]
    for b in skipped:
        print(f"not run: {_rel(b.path)}:{b.line}: {b.not_run}")
    assert all(b.not_run.strip() for b in skipped)
    assert not [b for b in skipped if b.path.name == "README.md"], "every Python block of the README must run"


def _python_files() -> list[Path]:
    return [p for p in FILES if any(b.language in PYTHON and not b.not_run for b in blocks(p))]


@pytest.mark.medium
@pytest.mark.parametrize("path", _python_files(), ids=lambda p: _rel(p))
def test_markdown_examples_run(path: Path, tmp_path, monkeypatch, capsys):
    """Each Python block runs as written, in order, in a fresh folder; flagged fits are named in the prose."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from blase_specutils.fitting import FitFlagWarning

    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    text = path.read_text(encoding="utf-8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in blocks(path):
            if b.language not in PYTHON or b.not_run:
                continue
            code = compile(b.source, f"{_rel(path)}:{b.line}", "exec")
            try:
                exec(code, namespace)  # noqa: S102 - running the documentation is the point
            except Exception as err:
                raise AssertionError(f"the code block at {_rel(path)}:{b.line} failed: {err!r}") from err
            finally:
                plt.close("all")
    printed = capsys.readouterr().out
    with capsys.disabled():
        print(f"\n--- {_rel(path)} printed:\n{printed}")
    codes = set()
    for w in caught:
        if issubclass(w.category, FitFlagWarning):
            codes |= set(re.findall(r"\[([a-z_]+)\]", str(w.message)))
    unsaid = sorted(c for c in codes if c not in text)
    assert not unsaid, f"{_rel(path)}: an example's fit is flagged {unsaid} but the text does not say so"
    assert os.getcwd() == str(tmp_path)


def test_docs_tutorials_are_links_to_the_notebooks():
    """The docs read the notebooks where they are (links), so a docs build writes nothing into the source."""
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    for nb in notebooks:
        link = ROOT / "docs" / "tutorials" / nb.name
        assert link.is_symlink() and link.resolve() == nb.resolve(), f"docs/tutorials/{nb.name} is not a link to {nb}"
    conf = (ROOT / "docs" / "conf.py").read_text(encoding="utf-8")
    assert "shutil.copy" not in conf and 'nb_execution_cache_path = str(DOCS / "_build"' in conf
