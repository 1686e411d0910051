"""The README's example results: copied by this command, never by hand, from the generated pages.

    .venv/bin/python -m analysis.readme            # rewrite README.md's results block
    .venv/bin/python -m analysis.readme --check    # exit 1 if the block differs (the tests run this)

The block sits between the two markers below and holds the run, budget and time lines and the
verdict table of docs/results.md, and the verdict line of docs/results_multispace.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

BEGIN, END = "<!-- results:begin (python -m analysis.readme) -->", "<!-- results:end -->"


def results_block(results_page: str, ablation_page: str | None) -> str:
    lines = results_page.splitlines()
    keep = [line for line in lines if line.startswith(("- **Run:**", "- **Budget:**", "- **Time:**"))]
    table: list[str] = []
    for line in lines[lines.index("## Verdicts"):]:  # the first table after the heading
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    block = ["From [docs/results.md](docs/results.md):", "", *keep, "", *table]
    if ablation_page:
        verdict = next((line for line in ablation_page.splitlines() if line.startswith("**Verdict")), None)
        budget = next((line for line in ablation_page.splitlines() if line.startswith("- **Budget:**")), None)
        if verdict:
            block += ["", "From [docs/results_multispace.md](docs/results_multispace.md) (multi-space "
                      "ablation):", "", *([budget] if budget else []), "", verdict]
    return "\n".join([BEGIN, *block, END])


def updated_readme(readme: str, block: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README.md: no block between {BEGIN!r} and {END!r}")
    head, rest = readme.split(BEGIN, 1)
    return head + block + rest.split(END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", type=Path, default=Path("README.md"))
    ap.add_argument("--results", type=Path, default=Path("docs/results.md"))
    ap.add_argument("--ablation", type=Path, default=Path("docs/results_multispace.md"))
    ap.add_argument("--check", action="store_true", help="exit 1 if the README's block is not up to date")
    args = ap.parse_args(argv)
    ablation = args.ablation.read_text() if args.ablation.is_file() else None
    want = updated_readme(args.readme.read_text(), results_block(args.results.read_text(), ablation))
    if args.check:
        if want != args.readme.read_text():
            print(f"{args.readme}: its results block differs from {args.results}; run: python -m analysis.readme",
                  file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(want)
    return 0


if __name__ == "__main__":
    sys.exit(main())
