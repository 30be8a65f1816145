"""How long does `regdsl.parse` take on a file full of syntax errors? It should grow linearly.

    python benchmarks/recovery.py [--repeats 3]

Parses files of 1,000, 2,000 and 4,000 bad lines (`all l3 1`, every one an RD001) and a
valid file of 4,000 lines for comparison, and prints the median seconds of each and the
time per line. Before recovery resumed after the bad statement, 1k/2k/4k bad lines took
5/21/70 s. tests/test_front_end.py checks the linear growth by counting work, not time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import regdsl


def seconds(text: str, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        try:
            regdsl.parse(text)
        except regdsl.RegDslError:
            pass
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cases = [(f"{n:,} bad lines", "all l3 1\n" * n, n) for n in (1000, 2000, 4000)]
    cases.append(("4,000 valid lines", "all l2 1\n" * 4000, 4000))
    print(f"{'file':<18} {'seconds':>8} {'us/line':>8}")
    for name, text, lines in cases:
        took = seconds(text, args.repeats)
        print(f"{name:<18} {took:>8.3f} {took / lines * 1e6:>8.0f}")


if __name__ == "__main__":
    main()
