"""Benchmarks and measurements: `python -m bench.NAME` (`make bench` runs the benchmarks)."""


def markdown_table(rows: list[dict]) -> str:
    """A markdown table of `rows`, the first row's keys as columns, floats to 3 decimals."""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])
                                for c in cols) + " |" for r in rows]
    return "\n".join(lines)
