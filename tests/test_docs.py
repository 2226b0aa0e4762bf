"""docs/configuration.md must list every SDPOConfig field with its real default."""

import dataclasses
import re
from pathlib import Path

from sdpo_rl import SDPOConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


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
