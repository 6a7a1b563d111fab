"""Evaluate an organism on held-out seeds: quality, and the study's routing experiments.

    python -m organisms.evaluate runs/text-routed/organism --out runs/text-routed/eval --n 64

Every function takes an organism folder (or an `(Organism, OrganismParams)` pair) and returns
`experiments.metrics.PassRate`s. Held-out examples come from `organisms.data.heldout_example`;
the noise seed of held-out example i of a kind is crc32 of its id `"{kind}_{i}"` (the study's
convention), and every run of the same example uses the same seed unless said.

Quality (`quality`):
    swatch colour   the output's dominant colour within CIEDE2000 15 of the swatch
    swatch shape    the shape classifier (organisms.shapes) finds the asked shape
    t2i shape / colour name   the shape; the nearest named colour is the one asked for
    recolour colour / shape   the new colour within CIEDE2000 15; the reference's shape kept

Routing (colour tasks: `draw a {shape} in this color` with a swatch):
    `knockout(setting)`  the edge cut in every block and step, on top of the organism's own cuts;
                         passes when the colour is lost (CIEDE2000 to the swatch > 15)
    `patching(mode, block)`  I2I -> I2I: pairs with the same instruction and different swatches;
                         the target run's text stream at the output of `block` is replaced at
                         every step by the source run's (all / padding / content positions);
                         passes when the output's colour is closer to the source's than the target's
    `lens(mode, block)`  T2I Lens: a 1-step edit's text stream at the output of `block` replaces the
                         text stream fed to block 0 of an empty-prompt text-to-image run (noise
                         seed + 1), at every step; passes when the swatch colour appears (<= 15)
    `t2i_clean`          the instruction as text-to-image, no reference: the colour by chance
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import zlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

import fluxjax
from fluxjax.interventions import per_step
from fluxjax.metrics import (COLOUR_MATCH_DE00, PassRate, ciede2000, closer_to_source, colour_error,
                                 dominant_colour, nearest_colour, reference_colour, srgb_to_lab, write_pass_rates_csv)
from organisms import codec
from organisms.checkpoint import load_organism
from organisms.data import COLOURS, DESIGN, Example, SceneDesign, heldout_examples
from organisms.model import GRID, Organism, OrganismParams, generate
from organisms.shapes import classify

KNOCKOUTS = ("ref->image", "ref->text", "ref->text[padding]", "ref->text[content]")
MODES = {"all": "text", "padding": "text[padding]", "content": "text[content]"}
MIN_PAIR_DE00 = 30.0  # patching pairs: the two swatches differ by at least this much


def _load(organism) -> tuple[Organism, OrganismParams]:
    return load_organism(organism) if isinstance(organism, str | Path) else organism


def noise_seed(kind: str, index: int) -> int:
    return zlib.crc32(f"{kind}_{index}".encode())


def _rate(setting: str, criterion: str, verdicts, threshold=COLOUR_MATCH_DE00) -> PassRate:
    verdicts = [bool(v) for v in verdicts]
    return PassRate(setting=setting, criterion=criterion, threshold=threshold, n=len(verdicts), passed=sum(verdicts))


def _run(org, examples, seeds, *, refs=True, interventions=None, capture=None, num_steps=None, txt=None,
         tokens=None):
    """Sample the examples in one batch; returns (tokens, captures)."""
    organism, params = org
    if tokens is None:
        tokens, content = organism.tokenize([e.instruction for e in examples])
    else:
        tokens, content = tokens
    ref_tokens = jnp.asarray(codec.images_to_tokens(np.stack([e.reference for e in examples]))) if refs else None
    kwargs = {} if num_steps is None else {"num_steps": num_steps}
    return generate(params, organism, tokens, content, refs=ref_tokens, seed=np.asarray(seeds),
                    interventions=interventions, capture=capture, txt=txt, **kwargs)


def _images(latents) -> np.ndarray:
    return codec.tokens_to_images(latents, GRID)


def swatch_tasks(n: int) -> tuple[list[Example], list[int]]:
    return heldout_examples("swatch", n), [noise_seed("swatch", i) for i in range(n)]


def _next_seeds(seeds) -> list[int]:
    """The study's target seed of a lens run: the task's seed + 1 (wrapped into 32 bits)."""
    return [(s + 1) % 2**32 for s in seeds]


def _swatch_lab(example: Example):
    return reference_colour(example.reference)


# ---------------------------------------------------------------------------------------------
# quality


def quality(organism, n: int = 64, design: SceneDesign = DESIGN
            ) -> tuple[list[PassRate], dict[str, tuple[list[Example], np.ndarray]]]:
    """Quality pass rates on n held-out examples of each task, and per task the examples and samples.

    design: the held-out scenes' design (the organisms' own unless probing another)."""
    org = _load(organism)
    samples = {}
    for kind in ("swatch", "t2i", "recolour"):
        indexed = [(i, e) for i, e in enumerate(heldout_examples(kind, 2 * n, design=design)) if e.instruction][:n]
        examples = [e for _, e in indexed]
        out = _images(_run(org, examples, [noise_seed(kind, i) for i, _ in indexed], refs=kind != "t2i")[0])
        samples[kind] = (examples, out)

    def shape_rate(kind, criterion):
        examples, out = samples[kind]
        return _rate(f"{kind} shape", criterion, [classify(o) == e.shape for o, e in zip(out, examples)], None)

    def colour_rate(kind, criterion):
        examples, out = samples[kind]
        return _rate(f"{kind} colour", criterion, [colour_error(o, srgb_to_lab(np.asarray(e.colour, np.float64)))
                                                   <= COLOUR_MATCH_DE00 for o, e in zip(out, examples)])

    t2i, t2i_out = samples["t2i"]
    rates = [
        colour_rate("swatch", "CIEDE2000 to the swatch <= 15"),
        shape_rate("swatch", "classified as the asked shape"),
        shape_rate("t2i", "classified as the asked shape"),
        _rate("t2i colour name", "the nearest named colour is the asked one",
              [nearest_colour(dominant_colour(o).lab, COLOURS)[0] == e.colour_name for o, e in zip(t2i_out, t2i)],
              None),
        colour_rate("recolour", "CIEDE2000 to the asked colour (as drawn in the ground truth) <= 15"),
        shape_rate("recolour", "the reference's shape kept"),
    ]
    return rates, samples


# ---------------------------------------------------------------------------------------------
# routing


def knockout(organism, setting: str, n: int = 64, from_block: int = 0) -> PassRate:
    """Share of colour tasks whose colour is lost with `setting` cut in blocks from_block.. (every
    block by default; 'none': baseline)."""
    org = _load(organism)
    examples, seeds = swatch_tasks(n)
    iv = None
    if setting != "none":
        _, content = org[0].tokenize([e.instruction for e in examples])
        blocks = range(from_block, org[0].transformer.num_blocks)
        iv = fluxjax.Interventions(knockout=fluxjax.knockout(org[0].transformer, org[0].layout(refs=True), content,
                                                             setting,
                                                             blocks=list(blocks)))
    out = _images(_run(org, examples, seeds, interventions=iv)[0])
    lost = [colour_error(o, _swatch_lab(e)) > COLOUR_MATCH_DE00 for o, e in zip(out, examples)]
    name = "no knockout (baseline)" if setting == "none" else f"knockout {setting}"
    if from_block:
        name += f" from block {from_block}"
    return _rate(name, "colour lost: CIEDE2000 to the swatch > 15", lost)


def knockout_from_blocks(organism, setting: str, n: int = 64) -> list[PassRate]:
    """The knockout of `setting` from block k to the last, for every k: where the route is read
    (the block after which cutting it no longer loses the colour)."""
    org = _load(organism)
    return [knockout(org, setting, n, from_block=k) for k in range(org[0].transformer.num_blocks)]


def patching_pairs(n: int) -> list[tuple[int, int]]:
    """(source, target) indices of held-out swatch tasks with the same instruction and swatches at
    least MIN_PAIR_DE00 apart: each target is paired with the next such source after it."""
    examples, _ = swatch_tasks(4 * n)
    pairs = []
    for t, target in enumerate(examples):
        for s in range(t + 1, len(examples)):
            source = examples[s]
            if source.instruction == target.instruction and \
                    _de(source.colour, target.colour) >= MIN_PAIR_DE00:
                pairs.append((s, t))
                break
        if len(pairs) == n:
            break
    return pairs


def _de(a, b) -> float:
    return float(ciede2000(srgb_to_lab(np.asarray(a, np.float64)), srgb_to_lab(np.asarray(b, np.float64))))


def default_block(organism) -> int:
    """The last double block (the study's cell for style and identity is klein's last double block)."""
    return _load(organism)[0].transformer.depth - 1


def patching(organism, mode: str = "padding", block: int | None = None, n: int = 64) -> PassRate:
    """I2I -> I2I patching of the text stream (`mode`: all, padding, content) at the output of `block`."""
    org = _load(organism)
    block = default_block(org) if block is None else block
    pairs = patching_pairs(n)
    examples, seeds = swatch_tasks(4 * n)
    sources = [examples[s] for s, _ in pairs]
    targets = [examples[t] for _, t in pairs]
    at = fluxjax.site(block, "text", "output")
    _, caps = _run(org, sources, [seeds[s] for s, _ in pairs], capture=fluxjax.Capture(sites=(at,)))
    _, content = org[0].tokenize([e.instruction for e in targets])
    mask = org[0].layout(refs=True).text_mask(MODES[mode], content)
    sub = fluxjax.substitution(at, per_step(caps[at]), mask)  # value [S, B, T, D]: one slice per step
    out = _images(_run(org, targets, [seeds[t] for _, t in pairs],
                       interventions=fluxjax.Interventions(substitutions=(sub,)))[0])
    verdicts = [closer_to_source(o, _swatch_lab(s), _swatch_lab(t))[0] for o, s, t in zip(out, sources, targets)]
    return _rate(f"patching {mode} @ block {block}", "colour closer to the source's swatch than the target's",
                 verdicts, None)


def lens(organism, mode: str = "all", block: int | None = None, n: int = 64) -> PassRate:
    """T2I Lens (`mode`: all, padding, content positions replaced) from the output of `block`."""
    org = _load(organism)
    block = default_block(org) if block is None else block
    examples, seeds = swatch_tasks(n)
    at = fluxjax.site(block, "text", "output")
    _, caps = _run(org, examples, seeds, capture=fluxjax.Capture(sites=(at,)), num_steps=1)
    _, content = org[0].tokenize([e.instruction for e in examples])
    empty = org[0].tokenize([""] * n)
    mask = org[0].layout(refs=False).text_mask(MODES[mode], content)
    sub = fluxjax.substitution("embed.text.output", caps[at][0], mask)  # the 1-step run's only step
    out = _images(_run(org, examples, _next_seeds(seeds), refs=False, tokens=empty,
                       interventions=fluxjax.Interventions(substitutions=(sub,)))[0])
    shown = [colour_error(o, _swatch_lab(e)) <= COLOUR_MATCH_DE00 for o, e in zip(out, examples)]
    return _rate(f"lens {mode} @ block {block}", "swatch colour appears: CIEDE2000 <= 15", shown)


def t2i_clean(organism, n: int = 64) -> PassRate:
    """The colour instruction as text-to-image with no reference: how often the colour matches by chance."""
    org = _load(organism)
    examples, seeds = swatch_tasks(n)
    out = _images(_run(org, examples, _next_seeds(seeds), refs=False)[0])
    shown = [colour_error(o, _swatch_lab(e)) <= COLOUR_MATCH_DE00 for o, e in zip(out, examples)]
    return _rate("t2i_clean", "swatch colour appears without the swatch: CIEDE2000 <= 15", shown)


def routing(organism, n: int = 64, block: int | None = None) -> list[PassRate]:
    """Every routing experiment of the organism: the knockouts, patching and lens in each mode."""
    org = _load(organism)
    rates = [knockout(org, "none", n)] + [knockout(org, s, n) for s in KNOCKOUTS]
    rates += [patching(org, mode, block, n) for mode in MODES]
    rates += [lens(org, mode, block, n) for mode in MODES]
    return rates + [t2i_clean(org, n)]


# ---------------------------------------------------------------------------------------------
# the sample grid


def sample_grid(rows: list[tuple[str, np.ndarray | None, np.ndarray, np.ndarray]], scale: int = 3, gap: int = 2,
                caption_width: int = 200) -> Image.Image:
    """A PNG-ready grid: one row per task, (reference or blank, sample, ground truth) upscaled, then
    the instruction."""
    side = rows[0][2].shape[0] * scale
    width, height = 3 * side + 4 * gap + caption_width, len(rows) * (side + gap) + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (caption, *tiles) in enumerate(rows):
        top = gap + r * (side + gap)
        for c, tile in enumerate(tiles):
            if tile is not None:
                canvas.paste(Image.fromarray(tile).resize((side, side), Image.Resampling.NEAREST),
                             (gap + c * (side + gap), top))
        draw.text((4 * gap + 3 * side, top + side // 2 - 6), caption or '""', fill=(0, 0, 0))
    return canvas


def check_arguments(args: argparse.Namespace) -> list[str]:
    """The problems of the command line, read from organism.json without loading the organism."""
    problems = []
    meta_file = Path(args.organism) / "organism.json"
    try:
        num_blocks = json.loads(meta_file.read_text())["transformer"]
        num_blocks = int(num_blocks["depth"]) + int(num_blocks["depth_single_blocks"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        problems.append(f"{args.organism}: not a readable organism folder ({meta_file}: {e})")
        num_blocks = None
    if num_blocks is not None and args.block is not None and not 0 <= args.block < num_blocks:
        problems.append(f"--block {args.block}: the organism has blocks 0..{num_blocks - 1}")
    if args.n < 1:
        problems.append(f"--n {args.n}: give at least one example")
    for setting in filter(None, args.from_block_sweep.split(",")):
        if setting.strip() not in KNOCKOUTS:
            problems.append(f"--from-block-sweep {setting.strip()!r}: choose from {', '.join(KNOCKOUTS)}")
    if args.steps is not None and args.steps < 1:
        problems.append(f"--steps {args.steps}: give at least one sampler step")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("organism", help="organism folder (the run folder's organism/)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=64, help="held-out examples per measurement")
    parser.add_argument("--block", type=int, default=None, help="patching / lens block (default: last double)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the organism's)")
    parser.add_argument("--from-block-sweep", default="", metavar="SETTINGS",
                        help="comma-separated knockout settings to cut from block k on, for every k "
                             "(e.g. 'ref->text[padding],ref->image')")
    args = parser.parse_args(argv)
    problems = check_arguments(args)
    if problems:  # one line each, before anything loads or is written
        parser.exit(2, "".join(f"{parser.prog}: error: {p}\n" for p in problems))
    organism, params = _load(args.organism)
    if args.steps is not None:
        organism = dataclasses.replace(organism, sampler_steps=args.steps)
    org = (organism, params)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rates, images = quality(org, args.n)
    rates += routing(org, args.n, args.block)
    for setting in filter(None, args.from_block_sweep.split(",")):
        rates += knockout_from_blocks(org, setting.strip(), args.n)
    write_pass_rates_csv(out / "pass_rates.csv", rates)
    (out / "pass_rates.json").write_text(json.dumps(
        [dataclasses.asdict(r) | {"rate": r.rate, "low": r.low, "high": r.high} for r in rates], indent=1))
    rows = []
    for kind in ("swatch", "t2i", "recolour"):
        examples, out_images = images[kind]
        rows += [(e.instruction, e.reference, img, e.target) for e, img in zip(examples[:4], out_images[:4])]
    sample_grid(rows).save(out / "samples.png")  # columns: reference, sample, ground truth
    for r in rates:
        print(f"{org[0].name:12s} {r.setting:32s} {r.text:32s} ({r.criterion})")


if __name__ == "__main__":
    main()
