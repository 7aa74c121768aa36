"""Regenerates the README's options table from tsam_fast.options.OPTIONS (tests/test_options.py checks it):
``python scripts/options_table.py`` from the repository root."""

from pathlib import Path

from tsam_fast import options

readme = Path(__file__).resolve().parents[1] / "README.md"
readme.write_text(options.with_table(readme.read_text(encoding="utf-8")), encoding="utf-8")
print(f"wrote the options table into {readme}")
