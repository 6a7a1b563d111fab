"""The context every experiment works in: the model, the open run folder, the sampling choices, and
the task baselines shared by every experiment of a run folder.

A task's baseline edits live in the cell `baselines/<task_id>`:

    reference.png       the reference image as given
    edit.png            the edit: instruction + reference, the task's noise seed
    t2i.png             text-to-image: the instruction, no reference, the task's seed
    t2i-next-seed.png   text-to-image with seed + 1: the T2I Lens's `t2i_clean`

Cells are computed by `Context.cells` and `Context.complete`, the one place a run's work is
skipped on resume (complete and intact, `runs.RunFolder.intact`) or done and marked complete.

Several processes (`experiments.hosts`): with the cells split among them, `cells` computes this
process's share and then waits for every process's; the task baselines, which several experiments'
cells read, are computed first as cells of their own (`compute_baselines`). With one model sharded
over all of them, every process computes every cell, process 0 decides which are pending
(`Hosts.agree`) and writes them, and the others read them after it has.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from experiments import models, runs, tasks as tasklib
from experiments.hosts import Hosts
from fluxjax import metrics
from fluxjax.options import RuntimeOptions


@dataclasses.dataclass
class Context:
    """The model, the open run folder and the sampling choices of one invocation."""

    model: Any  # fluxjax.pipeline.Flux2Model
    run: runs.RunFolder
    options: Any  # fluxjax.sampler.SamplerOptions of every edit
    chunk: int | None = models.TINY_CHUNK
    runtime: RuntimeOptions | None = None  # the attention kernel and its tiles (None: the backend's default)
    show_progress: bool = True
    judged_property: str = "colour"  # the reference property its rows are about (their `property`)
    hosts: Hosts = dataclasses.field(default_factory=Hosts)  # this process among the command's processes
    placement: Any = None  # experiments.sweep.Placement: the devices of the sampler calls (None: the default one)
    _texts: dict = dataclasses.field(default_factory=dict)
    _steps: Any = None
    _lines: Any = None  # runs.ProgressLines of the cells in progress (off a terminal)
    _task: str = ""  # the name of the cell in progress
    _mine: set = dataclasses.field(default_factory=set)  # cells dealt to this process (cells split among processes)

    @property
    def num_blocks(self) -> int:
        return self.model.config.num_blocks

    def describe(self) -> str:
        """The model and sampling, one paragraph for a report's setup section."""
        cfg = self.model.config
        return (f"Model: {self.run.config['model']['name']} ({cfg.depth} double + {cfg.depth_single_blocks} single "
                f"blocks = {cfg.num_blocks}, hidden {cfg.hidden_size}, {self.run.config['model']['dtype']}); "
                f"{self.options.num_steps} denoising steps, guidance {self.options.guidance}. Blocks are numbered "
                f"globally, double blocks first (0..{cfg.depth - 1}).{self._devices()}")

    def _devices(self) -> str:
        """Where the sampler calls ran, when not on one device of one process."""
        if self.placement is None and self.hosts.count == 1:
            return ""
        mesh = "one device each" if self.placement is None else \
            ", ".join(f"{k} {v}" for k, v in self.placement.mesh.shape.items()) + " mesh"
        return f" Ran on {self.hosts.describe()}, {mesh}."

    # text and edits ---------------------------------------------------------------------------
    def text(self, prompt: str):
        """A one-prompt TextConditioning (encoded once; the encoder caches on disk too)."""
        if prompt not in self._texts:
            from experiments.sweep import backend

            self._texts[prompt] = backend(self.model).encode_prompts([prompt])
        return self._texts[prompt]

    def edit(self, prompt: str, reference, seed: int, height: int, width: int):
        """A prepared edit (`experiments.sweep.Edit`): the prompt, an optional reference, the seed's noise."""
        from experiments import sweep

        uncond = self.text("") if self.model.options.guidance == "cfg" else None
        return sweep.prepare(self.model, self.text(prompt), references=() if reference is None else [reference],
                             seed=seed % 2**32, height=height, width=width, uncond=uncond)

    # sampling, with the steps progress bar ------------------------------------------------------
    def _advance(self, options, calls: int = 1):
        if self._steps is not None:
            self._steps.update(options.num_steps * calls)

    def sample(self, edit, interventions=None, capture=None, options=None):
        """One sampler call: (pixels uint8 [1, H, W, 3], captures or None)."""
        from experiments import sweep

        options = options or self.options
        out = sweep.run(self.model, edit, options, interventions, capture, runtime=self.runtime,
                        placement=self.placement)
        self._advance(options)
        return out

    def sweep(self, edit, cells: Sequence, options=None) -> np.ndarray:
        """Every cell's image from vmapped compiled calls: uint8 [V, H, W, 3]."""
        from experiments import sweep

        options = options or self.options
        chunk = sweep.fitting_chunk(self.model, edit, options, cells, self.chunk, self.runtime,
                                    placement=self.placement)

        def chunk_done(done: int, total: int):
            self._advance(options)
            if self._lines is not None:
                self._lines.chunk(self._task, done, total)

        return sweep.sweep(self.model, edit, options, cells, chunk=chunk, runtime=self.runtime,
                           placement=self.placement, on_chunk=chunk_done)

    # cells --------------------------------------------------------------------------------------
    def cells(self, desc: str, prefix: str, jobs: Mapping[str, Callable[[runs.Cell], Mapping]],
              unit: str = "task") -> list[dict]:
        """Run `jobs` ({name: compute}) as the cells `<prefix>/<name>`, in order; complete cells are skipped.
        Returns the metrics rows of every record (its "rows"), in order.

        compute(cell) writes the cell's files and returns its record; the cell is then marked
        complete. On a terminal, bars: one for the jobs (tasks), one nested for the denoising steps;
        else (a log) lines: what is skipped and to compute, then one per sweep chunk and per task
        done, with the time elapsed and an estimate of the time left (`runs.ProgressLines`). With
        the cells split among processes, this process computes its share (`Hosts.share`; its bars
        and lines count that share) and then waits until every process has computed its own.
        """
        keys = [f"{prefix}/{name}" for name in jobs]
        mine = self.hosts.share(keys)
        self._mine.update(mine)
        if self.hosts.lockstep:  # process 0 decides: the others do not read the folder as it changes
            pending = set(self.hosts.agree(f"pending {prefix}", self.run.pending(mine) if self.hosts.writer else None))
        else:
            pending = set(self.run.pending(mine))
        terminal = runs.is_terminal()
        bar = runs.progress(desc=desc, unit=unit, total=len(mine), initial=len(mine) - len(pending),
                            enabled=None if self.show_progress and terminal else False)
        lines = runs.ProgressLines(f"{self.run.path.name} {prefix}", len(mine), len(mine) - len(pending), unit=unit,
                                   enabled=self.show_progress and not terminal)
        lines.begin(desc, repaired=len({self.run.cell(k).key for k in pending} & self.run.reopened))
        outer_steps, self._lines = self._steps, lines
        self._steps = runs.progress(desc="  denoising", unit="step", nested=True,
                                    enabled=None if self.show_progress and terminal else False)
        try:
            for name, key, compute in zip(jobs, keys, jobs.values()):
                if key in pending:
                    self._task = name
                    self.complete(key, compute)
                    bar.update()
                    lines.task_done(name)
            lines.end()
        finally:
            self._steps.close()
            self._steps, self._lines = outer_steps, None
            bar.close()
        self.hosts.barrier(f"cells {prefix}")
        if self.hosts.split:  # the others' cells: finished or found intact by the process they were dealt to
            self.run.adopt(k for k in keys if k not in self._mine)
        return [row for key in keys for row in self.run.cell(key).record().get("rows", ())]

    def complete(self, key: str, compute: Callable[[runs.Cell], Mapping]) -> dict:
        """The record of cell `key`, computing and completing the cell unless it is already complete.

        Several processes: a cell of another process's share is never computed here (RunError if
        it is not complete); with one model sharded over every process, all of them compute the
        cell together, process 0 writes it, and the others wait until it has."""
        cell = self.run.cell(key)
        if self.hosts.lockstep:
            if self.hosts.agree(f"intact {key}", self.run.intact(key) if self.hosts.writer else None):
                return cell.record()
            record = dict(compute(cell))  # the other processes' writes are dropped (`runs.join_run`)
            if self.hosts.writer:
                self.run.finish(cell, record)
            self.hosts.barrier(f"finished {key}")
            return record
        if self.run.intact(key):
            return cell.record()
        if self.hosts.split and key not in self._mine:
            raise runs.RunError(f"cell {key} belongs to another process's share and is not complete: rerun the "
                                "command (every process) to compute it")
        record = dict(compute(cell))
        self.run.finish(cell, record)
        return record

    def compute_baselines(self, tasks: Sequence[tasklib.Task]) -> None:
        """With the cells split among processes, the baselines of `tasks` first, as cells dealt out
        like any others: several experiments' cells (and patching's pairs) read one task's
        baselines, so none may compute them on demand. One process computes them on demand
        (`baselines`); so does the sharded mode, every process taking every step together."""
        if self.hosts.split:
            self.cells("Baselines", "baselines", {t.task_id: functools.partial(self._baselines, t) for t in tasks})

    # baselines ------------------------------------------------------------------------------------
    def baselines(self, task: tasklib.Task) -> dict[str, np.ndarray]:
        """The task's baseline images (uint8 [H, W, 3]): reference, edit, t2i, t2i-next-seed."""
        key = f"baselines/{task.task_id}"
        self.complete(key, functools.partial(self._baselines, task))
        cell = self.run.cell(key)
        return {name: np.asarray(cell.load_image(f"{name}.png"))
                for name in ("reference", "edit", "t2i", "t2i-next-seed")}

    def _baselines(self, task: tasklib.Task, cell: runs.Cell) -> dict:
        reference = load_reference(task)
        cell.write_image("reference.png", reference)
        edit = self.edit(task.instruction, task.reference, task.seed, task.height, task.width)
        cell.write_image("edit.png", self.sample(edit)[0][0])
        t2i = self.edit(task.instruction, None, task.seed, task.height, task.width)
        cell.write_image("t2i.png", self.sample(t2i)[0][0])
        t2i_next = self.edit(task.instruction, None, task.seed + 1, task.height, task.width)
        cell.write_image("t2i-next-seed.png", self.sample(t2i_next)[0][0])
        return {"reference_lab": list(metrics.reference_colour(reference))}

    def file(self, cell: runs.Cell, name: str) -> str:
        """A cell file's path relative to the run folder, as a judge bundle names it."""
        return (cell.path / name).relative_to(self.run.path).as_posix()

    def baseline_file(self, task: tasklib.Task, name: str) -> str:
        """A baseline image's path relative to the run folder: name is reference, edit, t2i or t2i-next-seed."""
        return self.file(self.run.cell(f"baselines/{task.task_id}"), f"{name}.png")

    def against_edit(self, task: tasklib.Task, cell: runs.Cell, output: str) -> list[tuple[str, str]]:
        """The bundle of a lost / kept question: the reference, the baseline edit, the cell's `output`."""
        return [("reference", self.baseline_file(task, "reference")),
                ("baseline edit", self.baseline_file(task, "edit")), ("output", self.file(cell, output))]

    def reference_lab(self, task: tasklib.Task) -> tuple[float, float, float]:
        self.baselines(task)
        return tuple(self.run.cell(f"baselines/{task.task_id}").record()["reference_lab"])


def load_reference(task: tasklib.Task) -> np.ndarray:
    """The task's reference image as uint8 RGB [H, W, 3], every PIL mode converted as the models read it."""
    from fluxjax.images import load_image, to_rgb

    return np.asarray(to_rgb(load_image(task.reference)))

