"""Corpus audit: verify a trajflow corpus against its records and say plainly where each defect is.

    from storage_schemas.audit import audit_corpus
    report = audit_corpus("s3://bucket/corpus", deep=True, replay=8)
    report.exit_status        # 0 clean, 1 problems, 2 unreadable
    report.problems           # [Problem(kind, shard, detail, path)], kinds from PROBLEM_KINDS
    report.to_json()          # the `trajflow audit --json` document
    format_text(report)       # the terminal table
    write_html(report, "audit.html")   # with PNG plots embedded

See ``docs/audit.md`` for every check, the problem kinds and the statistics.
"""

from ._replay import TOLERANCES
from .auditor import audit_corpus
from .problems import PROBLEM_KINDS, AuditReport, Problem
from .render import format_html, format_text, write_html

__all__ = [
    "PROBLEM_KINDS",
    "TOLERANCES",
    "AuditReport",
    "Problem",
    "audit_corpus",
    "format_html",
    "format_text",
    "write_html",
]
