"""Plot committed benchmark results: python -m bench.plot bench/results/gpu.json [more.json ...]

Writes a PNG beside each JSON: seconds per image and peak VRAM for every row, the baseline marked.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if r.get("s_per_image") is not None]
    labels = [f"{r['case']}: {r['name']}" for r in rows]
    secs = [r["s_per_image"] for r in rows]
    peaks = [r.get("peak_vram_gib") or 0 for r in rows]
    h = max(3.0, 0.32 * len(rows) + 1.4)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, h), sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    ys = range(len(rows))
    colors = ["#888" if r["case"] == "baseline" or r["name"].startswith("baseline") else "#2a7" for r in rows]
    ax1.barh(ys, secs, color=colors)
    ax1.set_yticks(list(ys), labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("seconds per image (lower is better)")
    for y, s in zip(ys, secs):
        ax1.text(s, y, f" {s:.2f}", va="center", fontsize=7)
    ax2.barh(ys, peaks, color=["#555" if c == "#888" else "#37a" for c in colors])
    ax2.set_xlabel("peak VRAM, GiB")
    for y, p in zip(ys, peaks):
        ax2.text(p, y, f" {p:.2f}", va="center", fontsize=7)
    meta = data["meta"]
    import textwrap

    subtitle = textwrap.fill(f"random SDXL weights · {meta['command']}", width=170)
    fig.suptitle(f"{meta['device']} · {meta['mode']}\n{subtitle}", fontsize=9)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    for p in argv:
        print(plot(Path(p)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
