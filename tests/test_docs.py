"""The README's configuration table is the config's own help text (written once, checked here)."""

from dataclasses import MISSING, fields
from pathlib import Path

from tdrlt_peft import TuckerAdapterConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_table_matches_field_help():
    text = README.read_text()
    for f in fields(TuckerAdapterConfig):
        if f.name not in TuckerAdapterConfig.__annotations__:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        row = f"| `{f.name}` | `{default!r}` | {f.metadata['help'].replace('|', chr(92) + '|')} |"
        assert row in text, f"README table row for {f.name} is out of date; expected:\n{row}"


def test_readme_has_the_two_commands():
    text = README.read_text()
    assert "./run demo     # the main job" in text and "./run test     # the tests" in text
    assert "\n./run test\n" in (README.parent / ".ci" / "run").read_text()   # CI runs the same command
