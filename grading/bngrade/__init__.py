"""The instructors' side of the Batch Normalization course, on top of nbgrader.

Students install ``bncore`` alone; instructors install this package as well (it brings
nbgrader). Every command runs from the course root, where ``nbgrader_config.py`` is:

    python -m bngrade release [ASSIGNMENT...]        solutions/ -> exercises/ (make exercises)
    python -m bngrade canary ASSIGNMENT              grade the solution first: is the set-up right?
    python -m bngrade.autograde ASSIGNMENT           grade a class on every core (canary first)
    python -m bngrade scan NOTEBOOK...               what is suspicious in submissions
    python -m bngrade similarity ASSIGNMENT          answers that match bncore or each other
    python -m bngrade written ASSIGNMENT [--score STUDENT CELL POINTS]
    python -m bngrade.sandbox check                  which sandbox this machine gives

The modules, one job each: ``execute`` (the Execute preprocessor: tests in the grader's
process), ``sandbox`` (the kernel's limits and bubblewrap), ``sanitize`` (repairing a
submission's metadata), ``report`` (the grader's record), ``feedback`` (no hidden tests in
feedback), ``asserts`` (what hidden tests compare with), ``release``, ``canary``,
``autograde``, ``scan``, ``similarity``, ``written``, ``course``.
"""

__version__ = "0.2.0"
