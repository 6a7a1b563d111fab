"""The rows of a run folder a judge scores: every metrics row of a complete cell whose `judge` field
names a question kind, checked against the judge contract (see `experiments.judge`), and the prompt
that shows its image bundle, with the question of its experiment, property, kind and setting.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

from experiments import judges, runs, tables
from experiments.cli import slug
from experiments.judge_questions import ContractError, Questions
from experiments.judges import IMAGES_PER_KIND, ImageFile, Prompt


@dataclasses.dataclass(frozen=True)
class Item:
    """One judged row of the run folder."""

    experiment: str
    property: str
    kind: str
    setting: str
    entity: str
    bundle: tuple[tuple[str, str], ...]  # (label given by the experiment, path in the run folder)
    metric: bool | None  # the row's automatic verdict (the study's relative rule), None where it has none
    baseline_misses: bool | None  # lost / kept colour rows: the baseline edit misses the colour (the stricter
    #                               rule leaves the row out); None where the stricter rule does not apply

    @property
    def group(self) -> str:
        """The verdict file of the row, relative to the judge's folder."""
        return f"{self.experiment}/{self.property}-{self.kind}/{slug(self.setting)}.csv"


def _entity(row: Mapping) -> str:
    value = row.get("task", row.get("pair"))
    if isinstance(value, (list, tuple)):
        return "__".join(map(str, value))
    if value is None:
        raise ContractError(f"row {_show(row)} names no 'task' or 'pair'")
    return str(value)


def _show(row: Mapping) -> str:
    return json.dumps({k: row.get(k) for k in ("experiment", "setting", "task", "pair") if k in row})


REQUIRED = ("experiment", "property", "judge", "bundle", "setting", "pass", "pass_absolute")


def items(run_path: Path) -> list[Item]:
    """The judged rows of every complete cell, in cell order; ContractError when rows lack the
    fields a judge needs (e.g. a folder written before the experiments recorded them)."""
    view = runs.RunFolder(path=Path(run_path), config={}, resumed=True)  # read only: no lock needed
    # (the cells' prefix, row): one folder may hold an experiment under several prefixes (run_all's
    # `lens` sweep and its study lens, `study-lens`); their settings are told apart by the prefix
    rows = [(cell.key.split("/")[0], r) for cell in view.cells() for r in cell.record().get("rows", [])]
    if not rows:
        raise ContractError(f"{run_path} holds no complete cell with metrics rows; run an experiment first")
    if not any("judge" in r for _, r in rows) or not any("bundle" in r for _, r in rows):
        raise ContractError(
            f"the rows of {run_path} carry no 'judge' or 'bundle' field: the folder was written by experiments "
            "that predate the judge contract (experiment, property, judge, bundle, pass, pass_absolute per row). "
            "Rerun the experiments with the current code into a new run folder.")
    out, seen = [], set()
    for prefix, r in rows:
        if r.get("judge") is None:
            continue  # a control row: not judged
        absent = [k for k in REQUIRED if k not in r]
        if absent:
            raise ContractError(f"row {_show(r)} lacks {', '.join(absent)}")
        kind, experiment = r["judge"], r["experiment"]
        if kind not in IMAGES_PER_KIND:
            raise ContractError(f"row {_show(r)}: judge {kind!r} is not one of {', '.join(IMAGES_PER_KIND)}")
        bundle = tuple((str(label), str(path)) for label, path in r["bundle"])
        if len(bundle) != IMAGES_PER_KIND[kind]:
            raise ContractError(f"row {_show(r)}: a {kind!r} bundle holds {IMAGES_PER_KIND[kind]} images, "
                                f"got {len(bundle)}")
        setting = str(r["setting"]) if prefix == experiment else f"{prefix} {r['setting']}"
        metric, misses = tables.row_verdict(r)
        item = Item(experiment=str(experiment), property=str(r["property"]), kind=kind, setting=setting,
                    entity=_entity(r), bundle=bundle, metric=None if metric is None else bool(metric),
                    baseline_misses=None if misses is None else bool(misses))
        if (item.group, item.entity) in seen:
            raise ContractError(f"two rows score {item.entity} in {item.group}; settings must name rows uniquely")
        seen.add((item.group, item.entity))
        out.append(item)
    return out


def prompt(run_path: Path, item: Item, questions: Questions, hashes: dict[Path, str] | None = None) -> Prompt:
    """The judge's prompt for a row; `hashes` caches the images' SHA-256 across rows (a reference
    image appears in many bundles)."""
    q = questions.get(item.experiment, item.property, item.kind, item.setting)
    run_path, hashes = Path(run_path).resolve(), {} if hashes is None else hashes
    images = []
    for label, (_, rel) in zip(q.labels, item.bundle):
        path = (run_path / rel).resolve()
        if run_path not in path.parents:
            raise ContractError(f"bundle image {rel} lies outside the run folder")
        if not path.is_file():
            raise ContractError(f"bundle image {rel} of {item.entity} ({item.group}) does not exist")
        if path not in hashes:
            hashes[path] = ImageFile.of(label, path).sha256
        images.append(ImageFile(label, path, hashes[path], judges.media_type(path)))
    return Prompt(system=questions.system, images=tuple(images), question=q.question, kind=item.kind,
                  property=item.property, negated=q.negated, source=q.source)
