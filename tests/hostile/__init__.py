"""The hostile corpus: bad and malicious submissions for the grading tests (see cases.py)."""
