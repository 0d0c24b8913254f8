"""Students behind one interface (``trainer.students.base.Student``), one implementation per family.

``student_class_for(card)`` is the one place that maps a corpus's teacher kind to its student family;
``check_run(card, cfg)`` runs that family's refusals (before any teacher pool starts).
"""

from __future__ import annotations

from trainer.students.base import Student
from trainer.students.flownet import FlowNetStudent
from trainer.students.sd3 import SD3Student
from trainer.students.unet import UNetStudent

__all__ = ["Student", "FlowNetStudent", "SD3Student", "UNetStudent", "student_class_for", "check_run",
           "STUDENTS_BY_TEACHER_KIND"]

#: card ``teacher.kind`` -> the student family that distils it
STUDENTS_BY_TEACHER_KIND = {"gmm": FlowNetStudent, "flownet": FlowNetStudent, "diffusers": SD3Student,
                            "diffusers_unet": UNetStudent}


def student_class_for(card) -> type:
    try:
        return STUDENTS_BY_TEACHER_KIND[card.teacher.kind]
    except KeyError:
        raise ValueError(f"training from a {card.teacher.kind!r} teacher corpus is not supported by this trainer "
                         f"(known: {', '.join(STUDENTS_BY_TEACHER_KIND)})") from None


def check_run(card, cfg) -> type:
    """The student family for ``card``, after its refusals of ``cfg`` (clear ValueErrors)."""
    cls = student_class_for(card)
    cls.check_corpus(card, cfg)
    return cls
