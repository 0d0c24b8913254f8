"""Students behind one interface (``trainer.students.base.Student``), one implementation per family.

``FAMILIES`` is the one family registry: every kind -> family lookup derives from it.
``student_class_for(card)`` maps a corpus's teacher kind to its student family (``Student.teacher_kinds``);
``check_run(card, cfg)`` runs that family's refusals (before any teacher pool starts);
``folder_kind_of(meta)`` maps an exported diffusers student folder's kind to its layout
(``Student.folder_kind``, ``trainer.students.folder``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainer.students.base import CAPABILITIES, Student, StudentBase, check_objective
from trainer.students.flownet import FlowNetStudent
from trainer.students.folder import DEFAULT_KIND, STUDENT_META, FolderKind
from trainer.students.sd3 import SD3Student
from trainer.students.unet import UNetStudent

__all__ = ["Student", "StudentBase", "FlowNetStudent", "SD3Student", "UNetStudent", "FAMILIES", "student_class_for",
           "check_run", "folder_kind_of", "STUDENTS_BY_TEACHER_KIND"]

#: every student family; a new family is one more entry (and its module)
FAMILIES: tuple[type[StudentBase], ...] = (FlowNetStudent, SD3Student, UNetStudent)


def _checked(family: type[StudentBase]) -> type[StudentBase]:
    """``family``, after the checks of what it must declare (a TypeError names what is missing or wrong)."""
    for name in ("kind", "display_name", "teacher_kinds", "capabilities", "DEFAULT_BUDGET", "DEFAULT_BATCH_SIZE",
                 "DEFAULT_MIXED_PRECISION_ON_BF16_GPU"):
        if name not in dir(family):
            raise TypeError(f"student family {family.__name__} does not declare {name}")
    unknown = set(family.capabilities) - set(CAPABILITIES)
    if unknown:
        raise TypeError(f"student family {family.__name__} declares unknown capabilities {sorted(unknown)}")
    return family


#: card ``teacher.kind`` -> the student family that distils it (derived from ``FAMILIES``)
STUDENTS_BY_TEACHER_KIND: Mapping[str, type[StudentBase]] = {
    kind: _checked(family) for family in FAMILIES for kind in family.teacher_kinds}
#: exported folder ``kind`` -> its layout (derived from ``FAMILIES``)
_FOLDER_KINDS: Mapping[str, FolderKind] = {
    f.folder_kind.kind: f.folder_kind for f in FAMILIES if f.folder_kind is not None}


def student_class_for(card) -> type[StudentBase]:
    """The student family of a corpus (its card, or the card's ``teacher.kind``); ValueError for a teacher kind
    no family distils."""
    kind = card if isinstance(card, str) else card.teacher.kind
    try:
        return STUDENTS_BY_TEACHER_KIND[kind]
    except KeyError:
        raise ValueError(f"training from a {kind!r} teacher corpus is not supported by this trainer "
                         f"(known: {', '.join(STUDENTS_BY_TEACHER_KIND)})") from None


def check_run(card, cfg) -> type[StudentBase]:
    """The student family for ``card``, after its refusals of ``cfg`` (clear ValueErrors): the family's
    ``check_corpus``, then the objective (``--objective unrolled`` needs "objective:unrolled")."""
    cls = student_class_for(card)
    cls.check_corpus(card, cfg)
    check_objective(cls, cfg)
    return cls


def folder_kind_of(meta: dict[str, Any]) -> FolderKind:
    """The layout of an exported diffusers student folder whose metadata (``STUDENT_META``) is ``meta``
    (no "kind": an SD3 folder written before kinds existed); ValueError for a kind no family exports."""
    kind = meta.get("kind", DEFAULT_KIND)
    if kind not in _FOLDER_KINDS:
        raise ValueError(f"unknown student kind {kind!r} in {STUDENT_META} (known: {', '.join(_FOLDER_KINDS)})")
    return _FOLDER_KINDS[kind]
