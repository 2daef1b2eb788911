"""Memory of a process and every process below it, read from /proc (Linux): what the benchmarks sample while a
step runs in a subprocess of its own."""

from __future__ import annotations

from pathlib import Path


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def tree_memory_mb(pid: int) -> tuple[float, float]:
    """(resident, anonymous) MB summed over the process tree. Resident memory includes pages of memory-mapped
    files, which the kernel can drop at will; anonymous memory is what the step itself allocated."""
    rss = anon = 0
    for p in descendants(pid):
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines())
            rss += int(status["VmRSS"].split()[0])
            anon += int(status["RssAnon"].split()[0])
        except (OSError, KeyError, ValueError):
            pass
    return rss / 1024, anon / 1024
