"""Block-sweep plots and the one HTML report per run.

`sweep_plot` draws a metric against the block (x: global block index, double blocks first; one
line per setting), `heatmap_plot` a metric over rows (e.g. text positions) x blocks; both return
PNG bytes, drawn with matplotlib's Agg canvas directly (no pyplot, so no global backend state).
`render_html` lays out sections of text, tables and figures as a single self-contained page:
figures are referenced by paths relative to the run folder (and must lie inside it), the style
sheet is inline, so the folder can be copied or zipped and still reads.
"""

from __future__ import annotations

import dataclasses
import html
import io
import json
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.runs import CODE_VERSION_FILE, RunFolder, atomic_write_text
from fluxjax.metrics import percent  # noqa: F401  (a share as every report writes it: '86 %', '12.5 %')


# ---------------------------------------------------------------------------------------------
# plots


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
COINCIDE_SHIFT = 0.12  # blocks: how far right a line that overlaps an earlier one is drawn
OVERLAP = 0.01  # lines closer than this share of the plot's y span everywhere are drawn on top of each other


def _close(a: Sequence[float], b: Sequence[float], tolerance: float) -> bool:
    """Whether two series lie within `tolerance` of each other at every block (gaps at the same blocks)."""
    import math

    return all((math.isnan(x) and math.isnan(y)) or (not math.isnan(x) and not math.isnan(y) and abs(x - y) <= tolerance)
               for x, y in zip(a, b))


def line_styles(series: Mapping[str, Sequence[float | None]]) -> list[dict]:
    """How `sweep_plot` draws each series: its own marker; a series that lies on ones drawn before it
    (equal: "coincides with"; within OVERLAP of the y span: "overlaps") is shifted right
    (COINCIDE_SHIFT per earlier one) and dashed, and its legend label says which, so that neither
    hides the other."""
    import math

    values = {name: [float("nan") if v is None else float(v) for v in vs] for name, vs in series.items()}
    finite = [y for ys in values.values() for y in ys if not math.isnan(y)]
    span = max(finite) - min(finite) if finite else 0.0
    out, drawn = [], []
    for i, (name, ys) in enumerate(values.items()):
        equal = [other for other, theirs in drawn if _close(ys, theirs, 1e-9)]
        near = [other for other, theirs in drawn if other not in equal and _close(ys, theirs, OVERLAP * span)]
        drawn.append((name, ys))
        said = ([f"coincides with {', '.join(equal)}"] if equal else []) + ([f"overlaps {', '.join(near)}"] if near
                                                                            else [])
        out.append({"name": name, "values": ys, "marker": MARKERS[i % len(MARKERS)],
                    "shift": COINCIDE_SHIFT * (len(equal) + len(near)), "linestyle": "--" if said else "-",
                    "label": f"{name} ({'; '.join(said)})" if said else name})
    return out


def sweep_plot(blocks: Sequence[int], series: Mapping[str, Sequence[float | None]], *, ylabel: str,
               title: str = "", xlabel: str = "block (global index)", threshold: float | None = None,
               num_double_blocks: int | None = None, ylim: tuple[float, float] | None = None) -> bytes:
    """PNG bytes of one line per series over the blocks; None values leave gaps. A series on top of one
    drawn before it (equal, or overlapping at this scale) is drawn dashed, shifted a little to the
    right, and its legend says so (`line_styles`).

    threshold: drawn as a dashed horizontal line (e.g. a pass threshold).
    num_double_blocks: shades blocks 0..num_double_blocks-1 as the double-stream blocks.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    blocks = list(blocks)
    if not blocks:
        raise ValueError("a sweep plot needs at least one block")
    for name, values in series.items():
        if len(values) != len(blocks):
            raise ValueError(f"series {name!r} has {len(values)} values for {len(blocks)} blocks")
    fig = Figure(figsize=(7.0, 3.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if num_double_blocks:
        ax.axvspan(-0.5, num_double_blocks - 0.5, color="0.93", zorder=0, label="double-stream blocks")
    for line in line_styles(series):
        ax.plot([b + line["shift"] for b in blocks], line["values"], marker=line["marker"],
                markersize=4.5 if line["shift"] else 3.5, linewidth=1.6, linestyle=line["linestyle"],
                label=line["label"])
    if threshold is not None:
        ax.axhline(threshold, color="0.35", linestyle="--", linewidth=1.0, label=f"threshold {threshold:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=11)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlim(min(blocks) - 0.5, max(blocks) + 0.5)
    if len(blocks) <= 40:
        ax.set_xticks(blocks if len(blocks) <= 16 else blocks[::2])
    ax.grid(True, color="0.88", linewidth=0.6)
    ax.legend(fontsize=8, frameon=False, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def heatmap_plot(blocks: Sequence[int], rows: Sequence[str], values: Sequence[Sequence[float | None]], *,
                 colour_label: str, title: str = "", xlabel: str = "block (global index)", ylabel: str = "text position",
                 cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None,
                 num_double_blocks: int | None = None) -> bytes:
    """PNG bytes of a grid of values, a row per `rows` label and a column per block; None is blank.

    num_double_blocks: a line between the double-stream and the single-stream blocks.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    blocks, rows = list(blocks), list(rows)
    grid = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)
    if grid.shape != (len(rows), len(blocks)):
        raise ValueError(f"a heatmap of {len(rows)} rows x {len(blocks)} blocks got values of shape {grid.shape}")
    fig = Figure(figsize=(min(3.0 + 0.35 * len(blocks), 14.0), min(2.0 + 0.2 * len(rows), 30.0)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, label=colour_label, fraction=0.05)
    step = max(1, len(blocks) // 16)
    ax.set_xticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]])
    step = max(1, len(rows) // 64)
    ax.set_yticks(range(0, len(rows), step), rows[::step], fontsize=7)
    if num_double_blocks is not None and blocks[0] < num_double_blocks <= blocks[-1]:
        ax.axvline(blocks.index(min(b for b in blocks if b >= num_double_blocks)) - 0.5, color="0.5",
                   linewidth=1.5)  # double | single blocks
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# report


@dataclasses.dataclass(frozen=True)
class Text:
    text: str  # plain text; blank lines separate paragraphs


@dataclasses.dataclass(frozen=True)
class Table:
    title: str
    columns: Sequence[str]
    rows: Sequence[Mapping[str, Any]]
    formats: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # column -> "{:.2f}" or a function
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Figure:
    path: Path  # an image inside the report's folder: absolute, or relative to that folder
    caption: str = ""


@dataclasses.dataclass(frozen=True)
class FigureRow:
    """Figures side by side (e.g. one per model), with an optional caption under the row."""

    figures: Sequence[Figure]
    caption: str = ""


@dataclasses.dataclass(frozen=True)
class Links:
    """A line of links to files inside the report's folder (other reports, grids), each (label, path
    with an optional '#section' anchor)."""

    text: str
    links: Sequence[tuple[str, str | os.PathLike]]


@dataclasses.dataclass(frozen=True)
class Section:
    title: str
    items: Sequence[Text | Table | Figure | FigureRow | Links]


def anchor(title: str) -> str:
    """The id of a section's heading: its title in lower case, runs of other characters as '-'."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; } pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
.note { color: #555; font-size: 0.9em; }
.row { display: flex; gap: 1em; align-items: flex-start; } .row figure { flex: 1; min-width: 0; }
"""


def _cell(value: Any, fmt: str | None) -> tuple[str, bool]:
    if value is None or value == "":
        return "", False
    if fmt is not None:
        try:
            return (fmt(value) if callable(fmt) else fmt.format(value)), True
        except (ValueError, TypeError):
            pass
    if isinstance(value, float):
        return f"{value:.3f}", True
    return str(value), isinstance(value, int) and not isinstance(value, bool)


def _relative_url(folder: Path, path: str | os.PathLike) -> str:
    path, _, fragment = os.fspath(path).partition("#")
    url = _file_url(folder, Path(path))
    return f"{url}#{fragment}" if fragment else url


def _file_url(folder: Path, path: Path) -> str:
    target = (folder / path).resolve() if not Path(path).is_absolute() else Path(path).resolve()
    root = folder.resolve()
    if root != target and root not in target.parents:
        raise ValueError(f"{path} lies outside the report folder {folder}; save it inside the run folder")
    if not target.is_file():
        raise FileNotFoundError(f"{target} does not exist; write it before the report")
    return urllib.parse.quote(target.relative_to(root).as_posix())


def render_html(folder: str | os.PathLike, title: str, sections: Sequence[Section], *,
                config: Mapping[str, Any] | None = None, code: Mapping[str, Any] | None = None,
                command: str | None = None) -> str:
    """The report page; figure paths are made relative to `folder`, where the page will be saved.
    command: the command line that wrote it, shown under the title; the sections are listed there
    too, each heading an anchor (`anchor(title)`)."""
    folder = Path(folder)

    def esc(text: str) -> str:  # element content; attributes go through html.escape with quotes
        return html.escape(text, quote=False)

    def figure(item: Figure) -> str:
        url = _relative_url(folder, Path(item.path))
        return (f'<figure><a href="{url}"><img src="{url}" alt="{html.escape(item.caption)}" loading="lazy"></a>'
                + (f"<figcaption>{esc(item.caption)}</figcaption>" if item.caption else "") + "</figure>")

    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    if command:
        out.append(f'<p class="note">Written by <code>{esc(command)}</code></p>')
    if code:
        out.append(f'<p class="note">code: {esc(", ".join(f"{k} = {v}" for k, v in code.items()))}</p>')
    ids = [anchor(section.title) for section in sections]
    if len(set(ids)) != len(ids):
        raise ValueError(f"two report sections share a heading: {[t.title for t in sections]}")
    if len(sections) > 2:
        out.append('<p class="note">Sections: ' + " &middot; ".join(
            f'<a href="#{i}">{esc(section.title)}</a>' for i, section in zip(ids, sections)) + "</p>")
    for section, section_id in zip(sections, ids):
        out.append(f'<h2 id="{section_id}">{esc(section.title)}</h2>')
        for item in section.items:
            if isinstance(item, Links):
                out.append(f"<p>{esc(item.text)} " + "; ".join(
                    f'<a href="{html.escape(_relative_url(folder, path))}">'
                    f"{esc(label)}</a>" for label, path in item.links) + "</p>")
            elif isinstance(item, Text):
                out += [f"<p>{esc(p.strip())}</p>" for p in item.text.split("\n\n") if p.strip()]
            elif isinstance(item, Table):
                out.append(f"<h3>{esc(item.title)}</h3><table><tr>"
                           + "".join(f"<th>{esc(c)}</th>" for c in item.columns) + "</tr>")
                for row in item.rows:
                    cells = [_cell(row.get(c), item.formats.get(c)) for c in item.columns]
                    out.append("<tr>" + "".join(f'<td class="num">{esc(t)}</td>' if num else f"<td>{esc(t)}</td>"
                                                for t, num in cells) + "</tr>")
                out.append("</table>")
                if item.note:
                    out.append(f'<p class="note">{esc(item.note)}</p>')
            elif isinstance(item, Figure):
                out.append(figure(item))
            elif isinstance(item, FigureRow):
                out.append('<div class="row">' + "".join(figure(f) for f in item.figures) + "</div>")
                if item.caption:
                    out.append(f'<p class="note">{esc(item.caption)}</p>')
            else:
                raise TypeError(f"a report section holds Text, Table, Figure, FigureRow or Links items, got "
                                f"{type(item).__name__}")
    if config is not None:
        out.append("<h2>Configuration</h2><pre>" + esc(json.dumps(config, indent=2, sort_keys=True)) + "</pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(folder: str | os.PathLike, title: str, sections: Sequence[Section], *,
                 config: Mapping[str, Any] | None = None, code: Mapping[str, Any] | None = None,
                 command: str | None = None, name: str = "report.html") -> Path:
    """Render and write the report as `folder/name` (atomically)."""
    folder = Path(folder)
    return atomic_write_text(folder / name, render_html(folder, title, sections, config=config, code=code,
                                                        command=command))


def write_run_report(run: RunFolder, title: str, sections: Sequence[Section], name: str = "report.html",
                     command: str | None = None) -> Path:
    """The run's report, with the command that wrote it, its config and the code version that made the folder."""
    code = json.loads((run.path / CODE_VERSION_FILE).read_text())
    return run.write_derived(name, render_html(run.path, title, sections, config=run.config, code=code,
                                               command=command))
