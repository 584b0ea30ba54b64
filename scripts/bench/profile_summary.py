#!/usr/bin/env python3
"""Summarise py-spy raw (collapsed) stacks written by ``serve.py --profile DIR``.

    .venv/bin/python scripts/bench/profile_summary.py DIR/*.txt [--top 25]

For each file: the share of on-CPU samples per process/thread, then the functions with the
most samples *including* what they call (where time goes), and the leaf functions (where
the CPU actually is). Frames are named ``function (file)`` without line numbers.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

_LINE = re.compile(r":\d+\)$")
# Leaves where a thread waits rather than works (py-spy cannot always tell they are idle).
_IDLE = (
    "_worker (concurrent/futures/thread.py)",
    "WorkerThread.run (anyio/",
    "Thread.run (threading.py)",
    "EpollSelector.select (selectors.py)",
    "Condition.wait (threading.py)",
    "Event.wait (threading.py)",
    "ThreadedChildWatcher._do_waitpid (asyncio/unix_events.py)",
)
_SITE = re.compile(r"\(/.*?/site-packages/")


def _frame(raw: str) -> str:
    return _SITE.sub("(", _LINE.sub(")", raw.strip()))


def summarise(path: Path, top: int) -> str:
    threads: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        # --threads puts "process ..." then "thread (0x...)" first.
        owner = frames[0][:60]
        body = frames[1:]
        if body and body[0].startswith("thread"):
            owner += " / " + body[0]
            body = body[1:]
        names = [_frame(f) for f in body]
        if names and names[-1].startswith(_IDLE):
            continue
        total += n
        threads[owner] += n
        for name in set(names):
            inclusive[name] += n
        if names:
            leaf[names[-1]] += n
    out = [f"== {path.name}: {total} busy samples (waits left out)"]
    out.append("  by process/thread:")
    out += [f"    {n / total:6.1%}  {k}" for k, n in threads.most_common(8)]
    out.append("  inclusive (function and what it calls):")
    out += [f"    {n / total:6.1%}  {k[:140]}" for k, n in inclusive.most_common(top)]
    out.append("  self (leaf):")
    out += [f"    {n / total:6.1%}  {k[:140]}" for k, n in leaf.most_common(top)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    for path in args.files:
        print(summarise(path, args.top))
        print()


if __name__ == "__main__":
    main()
