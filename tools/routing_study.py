#!/usr/bin/env python
"""Run the routing study (docs/routing_study.md) on CPU and write its JSON, figures and report page.

    python tools/routing_study.py                 # the full study (its wall time: docs/routing_study.md)
    python tools/routing_study.py --quick --out /tmp/study   # every arm for a few steps, 1 seed

    python tools/routing_study.py --parts language_model   # the LM experiment alone
    python tools/routing_study.py --render docs/figures/routing_study/routing_study.json
        # the page and figures again from a run's JSON, nothing trained (a change to the page's text)

Experiments: common-mode synthetic, digits gates, COMET width sweep, and the MoE LM (every router
against the strongest topk, on the fortunes; --quick adds tiny-shakespeare). The full run writes
docs/routing_study.md and docs/figures/routing_study/; --quick writes its page into --out and checks
that every number is finite.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys

from moe_dist.study.study import PARTS, render_study, run_study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "runs", "routing_study"),
                   help="folder for the JSON results, the figures and tokenized corpora")
    p.add_argument("--doc", default=None,
                   help="markdown page to write (default: docs/routing_study.md, or <out>/routing_study.md "
                        "with --quick so a quick run never overwrites the committed page)")
    p.add_argument("--data-dir", default=os.path.join(os.path.dirname(REPO), "shared", "data"),
                   help="folder with fortunes_{de,en,es}.jsonl and tinyshakespeare.txt")
    p.add_argument("--workers", type=int, default=2, help="worker processes, one thread each")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="experiments to run")
    p.add_argument("--quick", action="store_true", help="every arm for a few steps and one seed")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="write the figures (into --out) and the page again from this earlier run's JSON "
                        "without training: the page keeps that run's command, date and wall time")
    return p.parse_args(argv)


def non_finite(value, path: str = "") -> list[str]:
    """Paths of every non-finite float in a JSON-like structure."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in non_finite(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in non_finite(v, f"{path}[{i}]")]
    return []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    doc = args.doc or (os.path.join(args.out, "routing_study.md") if args.quick
                       else os.path.join(REPO, "docs", "routing_study.md"))
    command = "python tools/routing_study.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                     else sys.argv[1:]))
    if args.render:
        if not os.path.isfile(args.render):
            print(f"error: --render {args.render!r}: no such file (expected a routing_study.json)", file=sys.stderr)
            return 2
        render_study(args.render, args.out, doc)
        print(f"page: {doc}", flush=True)
        return 0
    study = run_study(out_dir=args.out, data_dir=args.data_dir, doc_path=doc, quick=args.quick,
                      workers=args.workers, command=command.strip(), parts=tuple(args.parts),
                      log=lambda line: print(line, flush=True))
    bad = non_finite(study["records"]) + non_finite(study["summary"])
    if bad:
        print(f"non-finite results at {bad[:10]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
