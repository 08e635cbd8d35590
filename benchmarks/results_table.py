"""Appending one measurement as a markdown table row (benchmarks/RESULTS.md)."""


def append_row(path, cells):
  with open(path, "a") as f:
    f.write("| " + " | ".join(str(c) for c in cells) + " |\n")
