"""Re-render a results markdown from its JSON: python -m benchmarks.render benchmarks/results/<stem>.json"""

import json
import sys
from pathlib import Path

from .report import markdown

if __name__ == "__main__":
    for arg in sys.argv[1:]:
        p = Path(arg)
        p.with_suffix(".md").write_text(markdown(json.loads(p.read_text())))
