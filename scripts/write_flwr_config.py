"""Write pyproject.toml's [tool.flwr.app.config] from the Spec defaults (lte_fed/spec.py).

Flower needs that table (`flwr run --run-config` takes only the keys it lists, with their
defaults), but the defaults live in lte_fed/spec.py: run this after adding or changing a key.
tests/test_spec.py fails while the table and the spec disagree.

    python scripts/write_flwr_config.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lte_fed.spec import flower_run_config, toml_lines  # noqa: E402

HEADER = "[tool.flwr.app.config]"


def main() -> None:
    path = ROOT / "pyproject.toml"
    text = path.read_text()
    if HEADER not in text:
        raise SystemExit(f"{path} has no {HEADER} table to replace")
    # The table runs from its header to the next table (or the end of the file).
    table = f"{HEADER}\n{toml_lines(flower_run_config())}"
    path.write_text(re.sub(re.escape(HEADER) + r"\n(?:(?!\[).*\n?)*", lambda _: table, text, count=1))
    print(f"wrote {HEADER} in {path}")


if __name__ == "__main__":
    main()
