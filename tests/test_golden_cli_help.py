"""The CLI is a contract: every subcommand's ``--help`` must stay what it was (tests/golden/help/*.txt).

Adding a flag is allowed (ARCHITECTURE.md: "add more freely"), but it changes the text: regenerate with
``TRAJFLOW_UPDATE_GOLDEN=1 pytest tests/test_golden_cli_help.py`` and review the diff, which must only add.
"""

import argparse
import os
from pathlib import Path

import pytest

from trajflow.cli import build_parser

GOLDEN = Path(__file__).parent / "golden" / "help"


def _help_texts() -> dict[str, str]:
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width
    parser = build_parser()
    texts = {"trajflow": parser.format_help()}
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        texts[name] = p.format_help()
        for a in p._actions:  # nested subcommands (pool up|status|down)
            if isinstance(a, argparse._SubParsersAction):
                for n2, p2 in a.choices.items():
                    texts[f"{name}-{n2}"] = p2.format_help()
    return texts


TEXTS = _help_texts()


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_help_text_is_unchanged(name):
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("TRAJFLOW_UPDATE_GOLDEN"):
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path.write_text(TEXTS[name])
    assert path.exists(), f"no golden help for {name!r}: a new subcommand? regenerate (see module docstring)"
    assert TEXTS[name] == path.read_text()


def test_no_subcommand_disappeared():
    assert {p.stem for p in GOLDEN.glob("*.txt")} <= set(TEXTS)
