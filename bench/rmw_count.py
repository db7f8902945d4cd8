#!/usr/bin/env python3
"""Atomic read-modify-write instructions a program executed, from a callgrind profile.

Usage: rmw_count.py CALLGRIND_OUT BINARY

CALLGRIND_OUT must come from `valgrind --tool=callgrind --dump-instr=yes`, so that it has a cost
per instruction address; BINARY is the program profiled (statically linked code only: the
instructions of shared libraries are not looked at). Prints the number of executed
`lock`-prefixed instructions and `xchg` with a memory operand (implicitly locked): each costs
some 20 cycles on x86, the price of dozens of plain instructions, which an instruction count
alone hides.
"""

import re
import subprocess
import sys


def executed_per_address(path):
    """Self cost (executions) per instruction address, from callgrind's compressed format."""
    cost = {}
    last = [0, 0]
    after_calls = False
    for line in open(path):
        if line.startswith("calls="):
            # The next cost line is the call's inclusive cost, not this function's own.
            after_calls = True
            continue
        if not line or line[0] not in "0123456789+-*":
            continue
        parts = line.split()
        if len(parts) < 3:
            after_calls = False
            continue
        pos = []
        for i, p in enumerate(parts[:2]):
            if p == "*":
                value = last[i]
            elif p[0] in "+-":
                value = last[i] + int(p, 0)
            else:
                value = int(p, 0)
            pos.append(value)
        last = pos
        if after_calls:
            after_calls = False
            continue
        cost[pos[0]] = cost.get(pos[0], 0) + int(parts[2])
    return cost


def locked_addresses(binary):
    """Addresses of the binary's locked instructions."""
    out = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", binary], capture_output=True, text=True, check=True
    ).stdout
    found = set()
    for line in out.splitlines():
        m = re.match(r"^\s*([0-9a-f]+):\s*(.*)$", line)
        if not m:
            continue
        insn = m.group(2)
        if insn.startswith("lock ") or (insn.startswith("xchg") and "(" in insn):
            found.add(int(m.group(1), 16))
    return found


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    cost = executed_per_address(sys.argv[1])
    if not cost:
        sys.exit(f"{sys.argv[1]}: no per-instruction costs (profile with --dump-instr=yes)")
    print(sum(cost.get(a, 0) for a in locked_addresses(sys.argv[2])))


if __name__ == "__main__":
    main()
