"""docs/configuration.md must list every SDPOConfig field with its real default; docs/README.md every page; the README
the command CI runs."""

import dataclasses
import re
from pathlib import Path

from sdpo_rl import SDPOConfig

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"


def documented_defaults() -> dict[str, str]:
    rows = re.findall(r"^\| `(\w+)` \| `(.*?)` \|", DOC.read_text(), flags=re.MULTILINE)
    return dict(rows)


def test_every_field_is_documented_with_its_default():
    documented = documented_defaults()
    config = SDPOConfig()
    fields = {f.name for f in dataclasses.fields(SDPOConfig)}
    assert set(documented) == fields
    for name in fields:
        value = getattr(config, name)
        expected = '"' + value.encode("unicode_escape").decode() + '"' if isinstance(value, str) else repr(value)
        assert documented[name] == expected, name


INTERVAL = re.compile(r"^([\[(])(-?\d+(?:\.\d+)?), (\d+(?:\.\d+)?|∞)([\])])")


def documented_valid_values() -> dict[str, str]:
    rows = re.findall(r"^\| `(\w+)` \| `.*?` \| (.+?) \|", DOC.read_text(), flags=re.MULTILINE)
    return dict(rows)


def accepts(name: str, value) -> bool:
    try:
        SDPOConfig(**{name: value, **({"full_logit_distillation": True} if name == "alpha" else {})})
    except ValueError:
        return False
    return True


def test_every_field_states_its_valid_values_and_documented_intervals_are_enforced():
    valid = documented_valid_values()
    assert set(valid) == {f.name for f in dataclasses.fields(SDPOConfig)}
    intervals = {name: INTERVAL.match(text) for name, text in valid.items() if INTERVAL.match(text)}
    assert set(intervals) == {"alpha", "is_clip", "teacher_update_rate", "grpo_weight"}
    for name, match in intervals.items():
        opening, low, high, closing = match.groups()
        low = float(low)
        assert accepts(name, low) == (opening == "["), name
        assert not accepts(name, low - 1e-9), name
        if high != "∞":
            assert accepts(name, float(high)) == (closing == "]"), name
            assert not accepts(name, float(high) + 1e-9), name
        assert not accepts(name, float("nan")), name


def test_the_reading_order_lists_every_docs_page():
    docs = DOC.parent
    listed = set(re.findall(r"\]\(([\w-]+\.md)\)", (docs / "README.md").read_text()))
    assert listed == {path.name for path in docs.glob("*.md")} - {"README.md"}


def make_recipe(target: str) -> str:
    """The commands of `target` in the Makefile."""
    makefile = (ROOT / "Makefile").read_text()
    return re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE).group(1)


def test_ci_runs_the_readmes_ci_command_which_runs_every_test():
    """Issue #28: `.ci/run` calls what the README gives for CI, `make test-all`, which deselects no test, while
    `make test` runs the fast tier."""
    commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and line[0] not in "# "]
    assert commands[-1] == "make test-all"
    assert "CI runs exactly `make test-all` through `.ci/run`" in " ".join((ROOT / "README.md").read_text().split())
    assert "pytest" in make_recipe("test-all") and "slow" not in make_recipe("test-all")
    assert '-m "not slow"' in make_recipe("test")
