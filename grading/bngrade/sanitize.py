"""Repairing a submission before nbgrader reads it: the first of the sanitize preprocessors
in ``nbgrader_config.py`` (see :class:`SanitizeSubmission`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
from nbgrader.preprocessors import NbGraderPreprocessor

from bncore.runner import grade_ids, insertion_index, nbgrader_meta, split_hidden


class SanitizeSubmission(NbGraderPreprocessor):
    """Runs first when nbgrader sanitizes a submission, before its own preprocessors:

    * every cell that claims a grade_id of the assignment gets that cell's nbgrader metadata
      back from the gradebook (points, locked, grade, solution, schema version): a submission
      cannot change its points, and a cell with another schema version no longer stops the
      whole grading run (nbgrader raises SchemaTooOldError for the entire class);
    * nbgrader metadata that names no cell of the assignment, or is malformed, is removed: the
      cell is the student's own;
    * a deleted locked cell (the setup cell, a test cell, an instruction) is put back where
      it belongs, after the cell that precedes it in the source notebook.

    * an edited locked cell gets its source back (a test cell with its hidden tests), and
      only a cell the student edited is named in the log.

    Retyped or duplicated cells are left to nbgrader (OverwriteCells restores a retyped
    locked cell, DeduplicateIds keeps the last copy of a cell).
    """

    def preprocess(self, nb: Any, resources: Any) -> tuple[Any, Any]:
        from nbgrader.api import Gradebook, MissingEntry

        info = resources["nbgrader"]
        with Gradebook(info["db_url"]) as gb:
            try:
                notebook = gb.find_notebook(info["notebook"], info["assignment"])
            except MissingEntry:
                return nb, resources
            grades = {c.name: c for c in notebook.grade_cells}
            solutions = {c.name for c in notebook.solution_cells}
            tasks = {c.name for c in notebook.task_cells}
            sources = {c.name: c for c in notebook.source_cells}
            canonical = {}
            for name, source in sources.items():
                meta = {"grade": name in grades, "grade_id": name, "locked": bool(source.locked),
                        "schema_version": 3, "solution": name in solutions,
                        "task": name in tasks}
                if name in grades:
                    meta["points"] = float(grades[name].max_score)
                canonical[name] = (meta, source.cell_type, source.source)

        last = {}
        for index, cell in enumerate(nb.cells):
            meta = cell.get("metadata", {}).get("nbgrader")
            name = meta.get("grade_id") if isinstance(meta, dict) else None
            if isinstance(name, str) and name in canonical:
                last[name] = index
        for index, cell in enumerate(nb.cells):
            meta = cell.get("metadata", {}).get("nbgrader")
            if meta is None:
                continue
            name = meta.get("grade_id") if isinstance(meta, dict) else None
            if isinstance(name, str) and last.get(name) == index:
                meta, cell_type, source = canonical[name]
                cell.metadata["nbgrader"] = dict(meta)
                if meta["locked"] and cell.cell_type == cell_type and cell.source != source:
                    # A test cell as released lacks its hidden tests: put them back quietly
                    # (nbgrader's OverwriteCells would warn about every test cell of every
                    # submission); a cell the student edited is named in the log.
                    if _visible(cell.source) != _visible(source):
                        self.log.warning("putting back the original of the edited cell %s",
                                         name)
                    cell.source = source
            else:
                # An unknown id, malformed metadata, or an earlier copy of a duplicated cell
                # (nbgrader's DeduplicateIds would leave it an empty nbgrader dict, which
                # CheckCellMetadata then takes for schema version 0: the whole run stops).
                self.log.warning("removing nbgrader metadata from cell %d: %r", index,
                                 meta if name is None else name)
                del cell.metadata["nbgrader"]

        present = {nbgrader_meta(c).get("grade_id") for c in nb.cells}
        order = self._source_order(info) or list(canonical)
        for name in order:
            if name in present or name not in canonical or not canonical[name][0]["locked"]:
                continue
            meta, cell_type, source = canonical[name]
            if cell_type == "code":
                cell = nbformat.v4.new_code_cell(source)
            else:
                cell = nbformat.v4.new_markdown_cell(source)
            cell.metadata["nbgrader"] = dict(meta)
            cell.metadata.update(deletable=False, editable=False)
            nb.cells.insert(insertion_index(nb.cells, order, name, present), cell)
            present.add(name)
            self.log.warning("putting back the deleted cell %s", name)
        return nb, resources

    def _source_order(self, info: dict[str, Any]) -> list[str]:
        """The grade_ids of the source notebook, in order (the gradebook keeps no order)."""
        from nbgrader.coursedir import CourseDirectory

        coursedir = CourseDirectory(config=self.config)
        path = Path(coursedir.format_path(coursedir.source_directory, ".", info["assignment"]))
        path = path / f"{info['notebook']}.ipynb"
        try:
            source = nbformat.read(path, as_version=4)
        except Exception:
            return []
        return grade_ids(source)


def _visible(source: str) -> str:
    """A cell's source without its hidden regions, blank lines and trailing spaces: what a
    student was shown of it."""
    return "\n".join(line.rstrip() for line in split_hidden(source)[0].split("\n")
                     if line.strip())
