"""Answers that look copied: ``python -m bngrade similarity ASSIGNMENT [--csv FILE]``.

The reference implementation ships with the course (``bncore``), and the solutions are in the
course repository, so copying them is the easiest cheat left; copying another student is the
oldest. For every code answer of an assignment this compares each submission's answer with the
functions and classes of bncore's modules, with the model answer in ``solutions/``, and with
every other submission's answer to the same cell.

Code is compared after normalisation, so renaming variables, reformatting, comments and
docstrings change nothing: the answer is parsed, docstrings are dropped, every name the answer
defines or uses as a variable becomes ``v0, v1, ...`` in order of appearance (attribute names
such as ``.mean`` and ``.sum`` are kept: they are the computation), and the syntax tree is
written as a sequence of tokens. The similarity of two answers is the Jaccard index of their
sets of 4-token shingles (1.0: the same code up to names and layout). Answers shorter than
``min_tokens`` (one-liners that everyone writes alike) and answers left as released are
skipped. Pairs at or above ``threshold`` are reported, most similar first; a high score is a
reason to read both answers, not a verdict.
"""

from __future__ import annotations

import ast
import csv
import functools
import sys
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, TextIO

import nbformat

from bncore.runner import nbgrader_meta

SHINGLE = 4


@dataclass(frozen=True)
class Match:
    assignment: str
    cell: str
    student: str
    other: str  # another student's id, or "bncore.<module>.<name>", or "the model solution"
    similarity: float


def normalized_tokens(source: str) -> list[str]:
    """The answer's syntax tree as tokens, with its own names replaced by v0, v1, ..."""
    lines = [line for line in source.split("\n") if not line.lstrip().startswith(("%", "!"))]
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError:
        return []
    names: dict[str, str] = {}

    def rename(name: str) -> str:
        return names.setdefault(name, f"v{len(names)}")

    tokens: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            first = body[0] if body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body = body[1:] or [ast.Pass()]  # drop the docstring
    for node in ast.walk(tree):
        kind = type(node).__name__
        if isinstance(node, ast.Name):
            tokens.append(rename(node.id))
        elif isinstance(node, ast.arg):
            tokens.append(rename(node.arg))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            tokens += [kind, rename(node.name)]
        elif isinstance(node, ast.Attribute):
            tokens += [kind, node.attr]
        elif isinstance(node, ast.Constant):
            tokens.append(repr(node.value)[:20])
        elif isinstance(node, (ast.Load, ast.Store, ast.Del)):
            continue
        else:
            tokens.append(kind)
    return tokens


def shingles(tokens: list[str]) -> frozenset:
    return frozenset(tuple(tokens[i:i + SHINGLE]) for i in range(len(tokens) - SHINGLE + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


def similar(a: frozenset, b: frozenset, threshold: float) -> float | None:
    """``jaccard(a, b)`` when it reaches ``threshold``, else None. Sets whose sizes differ
    too much are skipped without intersecting them: the index is at most small / large."""
    small, large = sorted((len(a), len(b)))
    if not small or small < threshold * large:
        return None
    common = len(a & b)
    score = common / (small + large - common)
    return score if score >= threshold else None


def reference_sources() -> dict[str, str]:
    """Every top-level function and class of bncore's modules, by dotted name."""
    import bncore

    found = {}
    for path in sorted(Path(bncore.__file__).parent.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.end_lineno:
                found[f"bncore.{path.stem}.{node.name}"] = "".join(
                    lines[node.lineno - 1:node.end_lineno])
    return found


@functools.lru_cache(maxsize=1)
def _reference_shingles() -> dict[str, frozenset]:
    return {name: shingles(normalized_tokens(source))
            for name, source in reference_sources().items()}


def answers_of(notebook_path: Path) -> dict[str, str]:
    """The code answers of a notebook: {grade_id: source}."""
    notebook = nbformat.read(notebook_path, as_version=4)
    return {nbgrader_meta(c)["grade_id"]: c.source for c in notebook.cells
            if c.cell_type == "code" and nbgrader_meta(c).get("solution")
            and nbgrader_meta(c).get("grade_id")}


def compare(assignment: str, submissions: dict[str, Path], *, release: Path | None = None,
            solution: Path | None = None, threshold: float = 0.8,
            min_tokens: int = 40) -> list[Match]:
    """The pairs of similar answers of ``assignment``. ``submissions``: {student: notebook}."""
    stubs = answers_of(release) if release and release.is_file() else {}
    references = dict(_reference_shingles())
    if solution and solution.is_file():
        for cell, source in answers_of(solution).items():
            references[f"the model solution of {cell}"] = shingles(normalized_tokens(source))
    by_cell: dict[str, dict[str, frozenset]] = {}
    for student, path in sorted(submissions.items()):
        try:
            sources = answers_of(path)
        except Exception:  # an unreadable notebook has no answers to compare
            continue
        for cell, source in sources.items():
            tokens = normalized_tokens(source)
            if len(tokens) < min_tokens or source.strip() == stubs.get(cell, "").strip():
                continue
            by_cell.setdefault(cell, {})[student] = shingles(tokens)
    found = []
    for cell, answers in by_cell.items():
        for student, mine in answers.items():
            for name, theirs in references.items():
                score = similar(mine, theirs, threshold)
                if score is not None:
                    found.append(Match(assignment, cell, student, name, round(score, 3)))
        for (a, mine), (b, theirs) in combinations(sorted(answers.items()), 2):
            score = similar(mine, theirs, threshold)
            if score is not None:
                found.append(Match(assignment, cell, a, b, round(score, 3)))
    return sorted(found, key=lambda m: (-m.similarity, m.cell, m.student, m.other))


def course_submissions(coursedir: Any, assignment: str) -> dict[str, Path]:
    """{student: notebook} for an assignment's submissions in the course directory."""
    found = {}
    pattern = Path(coursedir.format_path(coursedir.submitted_directory, "*", assignment))
    for folder in sorted(Path(pattern.parent.parent).glob(f"*/{assignment}")):
        notebook = folder / f"{assignment}.ipynb"
        if notebook.is_file():
            found[folder.parent.name] = notebook
    return found


def write_csv(matches: list[Match], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["similarity", "assignment", "cell", "student", "matches"])
        for m in matches:
            writer.writerow([f"{m.similarity:.3f}", m.assignment, m.cell, m.student, m.other])


def report(assignment: str, root: Path | str = ".", *, csv_path: Path | None = None,
           threshold: float = 0.8, out: TextIO = sys.stdout) -> list[Match]:
    """Compare the course's submissions of ``assignment``; print the pairs, write the CSV."""
    from bngrade.course import course_directory

    root = Path(root).resolve()
    coursedir = course_directory(root)
    name = f"{assignment}.ipynb"
    matches = compare(assignment, course_submissions(coursedir, assignment),
                      release=root / "exercises" / assignment / name,
                      solution=root / "solutions" / assignment / name, threshold=threshold)
    csv_path = csv_path or root / ".grading" / f"similarity-{assignment}.csv"
    write_csv(matches, csv_path)
    for m in matches[:20]:
        print(f"  {m.similarity:.2f}  {m.cell:<16} {m.student:<12} {m.other}", file=out)
    more = " (the first 20 shown)" if len(matches) > 20 else ""
    print(f"{len(matches)} similar answer(s) at {threshold:g} or above{more}; all of them, "
          f"sortable, in {csv_path}", file=out)
    return matches
