"""Every patch the package makes is listed, with its reason, in one registry, and made through it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightning_gpipe.patching import PATCHES, patched, shadow, unshadow

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_gpipe"


def test_every_listed_patch_is_made_somewhere_and_every_patch_is_listed():
    text = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py") if p.name != "patching.py")
    made = set(re.findall(r"(?:patched|shadow|unshadow)\([^,()]+, \"(\w+)\"", text))
    assert {"forward", "log", "print", "_summary", "rank"} <= made  # the search finds them
    made |= {"named_parameters"} if '("parameters", "named_parameters")' in text else set()  # by a loop
    assert made == PATCHES.keys()
    # Attributes of objects the package does not own are set through the registry only.
    assert re.findall(r"(\w+)\.__dict__\[[^\]]+\] = ", text) == ["self", "self"]  # AbsentLayer's own


def test_an_unlisted_patch_is_refused_and_a_patch_is_undone():
    class Thing:
        def run(self):
            return "own"

    thing = Thing()
    with pytest.raises(KeyError, match="'run' is not in PATCHES; list it there with the reason"):
        with patched(thing, "run", lambda: "patched"):
            pass
    with patched(thing, "forward", lambda: "patched"):
        assert thing.forward() == "patched"
    assert "forward" not in thing.__dict__
    previous = shadow(thing, "log", 1)
    assert thing.log == 1
    unshadow(thing, "log", previous)
    assert "log" not in thing.__dict__
