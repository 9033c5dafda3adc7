"""The README's configuration table is the one the config dataclasses generate."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_config_table_matches_the_code():
    table = subprocess.run([sys.executable, str(ROOT / "tools" / "config_reference.py")],
                           capture_output=True, text=True, check=True).stdout.strip()
    readme = (ROOT / "README.md").read_text()
    missing = [row for row in table.splitlines() if row not in readme]
    assert not missing, f"README config table is stale (run tools/config_reference.py): {missing[:3]}"
    assert len(table.splitlines()) > 60
