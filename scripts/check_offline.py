"""Fail if any built page loads a script, stylesheet, image or frame from the network.

Usage: python scripts/check_offline.py _build/html
"""

import re
import sys
from pathlib import Path

# src= on any tag, and href= on <link> tags (stylesheets, preloads, fonts).
PATTERNS = [
    re.compile(r"""\ssrc\s*=\s*["'](?:https?:)?//""", re.I),
    re.compile(r"""<link\b[^>]*\shref\s*=\s*["'](?:https?:)?//""", re.I),
]


def main(root: str) -> int:
    pages = sorted(Path(root).rglob("*.html"))
    if not pages:
        print(f"no HTML pages under {root}: build the book first", file=sys.stderr)
        return 2
    bad = []
    for page in pages:
        text = page.read_text(errors="replace")
        for pattern in PATTERNS:
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                snippet = text[match.start() : match.start() + 100].splitlines()[0]
                bad.append(f"{page}:{line}: {snippet.strip()}")
    if bad:
        print("These pages load resources from the network:", *bad, sep="\n  ", file=sys.stderr)
        return 1
    print(f"{len(pages)} pages checked: nothing is loaded from the network")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "_build/html"))
