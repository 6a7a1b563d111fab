"""Scoring a run folder as the study scored it: a binary judge per row, over labelled images.

    python -m experiments.judge RUN_FOLDER --judge anthropic:claude-opus-4-7
    python -m experiments.judge RUN_FOLDER --judge openai:Qwen/Qwen2.5-VL-7B-Instruct@http://localhost:8000/v1
    python -m experiments.judge RUN_FOLDER --judge hf:/models/some-vlm
    python -m experiments.judge RUN_FOLDER --judge colour          # the colour metric as a judge
    python -m experiments.judge agree RUN_FOLDER anthropic:claude-opus-4-7 metric

Which rows are judged: every metrics row of a complete cell (DONE.json `record["rows"]`) whose
`judge` field names a question kind, as the study did: it sent every knockout and drop bundle to
its judge and let the question's "compared with Image 2" carry the baseline edit. The experiments
write, per row, `experiment` (lens, knockout, drop, patching), `property` (colour, style, identity,
reference), `judge` (the kind: present, lost, kept, transferred; None for control rows), `bundle`
([label, path relative to the run folder] in the order shown to the judge), `setting`, `task` or
`pair`, the automatic metric's `pass` (the study's rule; None where the metric has no verdict, as
for style) and `pass_absolute`, and `baseline_misses` (lost / kept colour rows whose baseline edit
already misses the colour). `--strict` applies this project's stricter rule instead: those rows
are not asked and leave the rates. Either way the report gives both rates where both exist: the
rate over every row, and the strict rate over the rows whose baseline edit shows the property.

The kinds (what a "yes" means):
    present      Image 3 shows Image 1's property and Image 2 does not (T2I Lens: reference,
                 t2i_clean, lens output)
    lost         Image 1's property, shown by Image 2, is absent from Image 3 (reference, baseline
                 edit, intervened edit)
    kept         Image 3, like Image 2, still shows Image 1's property (same bundle)
    transferred  Image 4 takes Image 1's property rather than Image 2's (source reference, target
                 reference, target edit, patched target edit)

Rows: `experiments.judge_rows`. Questions (`experiments.judge_questions`): one system instruction
and a question per experiment x property x kind, and per setting where one needs its own (this
project's own wording, `QUESTIONS`); `--questions FILE` replaces any of them (JSON, see
`load_questions`); `--questions-from STUDY_CHECKOUT` reads the study's own system text and its
per-cell prompts from a checkout of its repository (`load_study_questions`), keyed by the setting
of the same cell here. A question asked the other way round (the study's identity lens: "a
different person?") counts its noes: the row's verdict is the answer's opposite.
The judge answers with one JSON object, {"answer": "yes" | "no", "reason": "..."}
({"pass": 0 | 1, ...} is read too); anything else is unparseable.

Outputs, in RUN_FOLDER/judge/<judge slug>/:
    <experiment>/<property>-<kind>/<setting slug>.csv
        one row per entity (task or source__target pair): entity_id, pass (1, 0, or empty on an
        error or an unparseable answer), reason (prefixed ERROR: or PARSE_ERROR: then), model,
        input_tokens, output_tokens: the study's verdict file columns; then answer, the judge's
        own yes (1) or no (0), which differs from pass where the question is asked the other way
    pass-rates.csv   per experiment, property, kind and setting: the question's source, rows,
                     baseline_misses, excluded (by --strict), errors, unparseable, judged, passed,
                     the judge's rate and the metric's, each with its 95 % Wilson interval, the
                     strict rates where they apply, and the two's agreement and Cohen's kappa on
                     the entities both scored
    summary.json     the same counts in total, the calls made and the verdicts read from the cache
and RUN_FOLDER/judge-<judge slug>.html, the report page. Errors and unparseable answers are
excluded from the rate and counted, never a pass or a fail.

Cache and resume: each verdict is stored as it arrives (RUN_FOLDER/judge/cache unless --cache),
keyed by the judge's name, the system text, the labels, the question and the SHA-256 of every
image file, so a rerun asks nothing already answered and a killed run resumes where it stopped.
Errors and unparseable answers are not cached: a rerun asks again (as the study retried them).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import fnmatch
import hashlib
import json
import math
import os
import re
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments import judges, report, runs, tables
from experiments.judge_questions import (EXPERIMENTS, KINDS_OF, PROPERTIES, QUESTIONS, SYSTEM,  # noqa: F401
                                        ContractError, Question, Questions, load_questions, load_study_questions,
                                        parse_answer)
from experiments.judge_rows import Item, items, prompt
from experiments.judges import Judge, JudgeAuthError, JudgeError, Prompt
from fluxjax.files import atomic_write_text
from fluxjax.metrics import rows_to_csv

VERDICT_COLUMNS = ("entity_id", "pass", "reason", "model", "input_tokens", "output_tokens", "answer")
METRIC = "metric"  # the agreement tool's name for the rows' own automatic verdicts
JUDGE_DIR = "judge"


# ---------------------------------------------------------------------------------------------
# answers


@dataclasses.dataclass(frozen=True)
class Verdict:
    passed: bool | None  # None: an error or an unparseable answer
    reason: str
    input_tokens: int = 0
    output_tokens: int = 0
    status: str = "ok"  # "ok", "error" or "unparseable"
    answer: bool | None = None  # the judge's own yes / no where `passed` is its opposite (a negated question)

    def for_row(self, negated: bool) -> "Verdict":
        """The verdict on the row's question kind: the answer itself, or its opposite for a question
        asked the other way round."""
        if not negated or self.passed is None:
            return self
        return dataclasses.replace(self, passed=not self.passed, answer=self.passed)

    @property
    def yes(self) -> bool | None:
        """The judge's own answer."""
        return self.passed if self.answer is None else self.answer


def ask(judge: Judge, prompt: Prompt) -> Verdict:
    """One judge call, with errors and unparseable answers recorded rather than raised
    (JudgeAuthError is raised: every later call would fail the same way)."""
    try:
        reply = judge.ask(prompt)
    except JudgeAuthError:
        raise
    except JudgeError as e:
        return Verdict(None, f"ERROR: {e}", status="error")
    parsed = parse_answer(reply.text)
    if parsed is None:
        return Verdict(None, f"PARSE_ERROR: {reply.text[:200]!r}", reply.input_tokens, reply.output_tokens,
                       status="unparseable")
    return Verdict(parsed[0], parsed[1], reply.input_tokens, reply.output_tokens)


# ---------------------------------------------------------------------------------------------
# cache


class Cache:
    """Verdicts on disk, one small JSON file each, written atomically as they arrive."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    @staticmethod
    def key(judge_name: str, p: Prompt) -> str:
        content = {"judge": judge_name, "system": p.system, "labels": [im.label for im in p.images],
                   "images": [im.sha256 for im in p.images], "question": p.question}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> Verdict | None:
        try:
            data = json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None
        return Verdict(bool(data["pass"]), data["reason"], data["input_tokens"], data["output_tokens"])

    def put(self, key: str, v: Verdict) -> None:
        if v.passed is None:
            raise ValueError("only verdicts are cached; errors and unparseable answers are asked again")
        atomic_write_text(self._path(key), json.dumps({"pass": v.passed, "reason": v.reason,
                                                       "input_tokens": v.input_tokens,
                                                       "output_tokens": v.output_tokens}) + "\n")


# ---------------------------------------------------------------------------------------------
# scoring


def judge_slug(name: str) -> str:
    """A folder name for a judge: its name made safe, with a short hash when that lost anything."""
    safe = re.sub(r"[^A-Za-z0-9._=+-]+", "-", name).strip("-")
    if safe != name:
        safe = f"{safe[:60].strip('-')}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return safe if safe[:1].isalnum() else "x" + safe


@dataclasses.dataclass
class Outcome:
    judge: str
    folder: Path  # RUN/judge/<slug>
    calls: int  # judge calls made by this invocation
    cached: int  # verdicts read from the cache
    rates: list[dict]
    verdicts: dict[str, dict[str, Verdict]]  # group -> entity -> verdict


def excluded(item: Item, strict: bool) -> bool:
    """Whether the stricter rule (`strict`) leaves the row out: its baseline edit misses the property."""
    return strict and bool(item.baseline_misses)


def select(found: Sequence[Item], patterns: Sequence[str] = (), limit: int | None = None,
           strict: bool = False) -> list[Item]:
    """The rows to ask about: those whose "experiment/property-kind/setting" matches one of the glob
    patterns (all when none is given), at most `limit` per setting (the first ones, in cell order);
    every row, as the study, unless `strict` leaves out those whose baseline edit misses the property."""
    kept, count = [], {}
    for it in found:
        if excluded(it, strict):
            continue
        name = f"{it.experiment}/{it.property}-{it.kind}/{it.setting}"
        if patterns and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        count[it.group] = count.get(it.group, 0) + 1
        if limit is None or count[it.group] <= limit:
            kept.append(it)
    return kept


def score(run_path: str | os.PathLike, judge: Judge, *, questions: Questions = QUESTIONS,
          cache: str | os.PathLike | None = None, concurrency: int = 1, patterns: Sequence[str] = (),
          limit: int | None = None, dry_run: bool = False, show_progress: bool | None = None,
          argv: Sequence[str] | None = None, strict: bool = False) -> Outcome:
    """Judge every judged row of a run folder (see the module docstring); writes the verdict files,
    the rates and the report page into the folder, which is locked meanwhile.

    patterns, limit: ask only about the rows `select` keeps; the outputs still cover every row,
    those neither asked nor in the cache counted as not asked. strict: the stricter rule, rows whose
    baseline edit misses the property neither asked nor counted. dry_run: count the calls that would
    be made (Outcome.calls), call and write nothing."""
    run_path = Path(run_path).resolve()
    try:
        config = json.loads((run_path / runs.CONFIG_FILE).read_text())
    except (OSError, ValueError):
        raise runs.RunError(f"{run_path} is not a run folder (no readable {runs.CONFIG_FILE})") from None
    found = items(run_path)
    chosen = {(it.group, it.entity) for it in select(found, patterns, limit, strict)}
    if not chosen:
        raise ContractError(f"no judged row of {run_path} matches {' '.join(patterns)}")
    run = runs.open_run(run_path.parent, run_path.name, config, on_conflict="refuse",
                        argv=list(argv) if argv is not None else None)
    try:
        store = Cache(cache if cache is not None else run_path / JUDGE_DIR / "cache")
        folder = run_path / JUDGE_DIR / judge_slug(judge.name)
        verdicts: dict[str, dict[str, Verdict]] = {}
        todo: dict[str, tuple[Prompt, list[Item]]] = {}  # cache key -> prompt, the rows it answers
        hashes: dict[Path, str] = {}
        sources: dict[str, str] = {}  # group -> where its question's wording comes from
        cached = 0
        for item in found:
            if excluded(item, strict) or (judge.properties is not None and item.property not in judge.properties):
                continue
            p = prompt(run_path, item, questions, hashes)
            sources[item.group] = p.source + (" (asked the other way round)" if p.negated else "")
            key = Cache.key(judge.name, p)
            hit = store.get(key)
            if hit is not None:
                verdicts.setdefault(item.group, {})[item.entity] = hit.for_row(p.negated)
                cached += 1
            elif (item.group, item.entity) in chosen:  # identical bundles under one question are asked once
                todo.setdefault(key, (p, []))[1].append(item)
        if dry_run:
            return Outcome(judge=judge.name, folder=folder, calls=len(todo), cached=cached,
                           rates=[], verdicts={})
        lock = threading.Lock()
        bar = runs.progress(desc=f"judging ({judge.name})", unit="verdict", total=len(todo),
                            enabled=None if show_progress else False)

        def one(key: str):
            p, answered = todo[key]
            v = ask(judge, p)
            if v.passed is not None:
                store.put(key, v)
            with lock:
                for item in answered:
                    verdicts.setdefault(item.group, {})[item.entity] = v.for_row(p.negated)
                bar.update()

        try:
            if concurrency <= 1:
                for key in todo:
                    one(key)
            else:
                with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
                    for f in [pool.submit(one, key) for key in todo]:
                        f.result()
        finally:
            bar.close()
        rates = _write(run, found, judge, verdicts, folder, calls=len(todo), cached=cached, strict=strict,
                       sources=sources)
        return Outcome(judge=judge.name, folder=folder, calls=len(todo), cached=cached, rates=rates,
                       verdicts=verdicts)
    finally:
        run.close()


def _rates(name: str, verdicts: Sequence[bool], applies: bool = True) -> dict:
    """{name: the share of True, name_low, name_high: its 95 % Wilson interval}, all None where it
    does not apply or there is no verdict."""
    if not applies:
        return {name: None, f"{name}_low": None, f"{name}_high": None}
    return tables.interval_columns(name, sum(map(bool, verdicts)), len(verdicts))


def _write(run: runs.RunFolder, found: Sequence[Item], judge: Judge, verdicts: Mapping[str, Mapping[str, Verdict]],
           folder: Path, *, calls: int, cached: int, strict: bool = False,
           sources: Mapping[str, str] | None = None) -> list[dict]:
    rel = folder.relative_to(run.path).as_posix()
    groups: dict[str, list[Item]] = {}
    for item in sorted(found, key=lambda it: EXPERIMENTS.index(it.experiment) if it.experiment in EXPERIMENTS
                       else len(EXPERIMENTS)):  # the study's order; within one experiment, the cells' order
        groups.setdefault(item.group, []).append(item)
    rates = []
    for group, members in groups.items():
        first = members[0]
        applicable = judge.properties is None or first.property in judge.properties
        mine = verdicts.get(group, {})
        rows = [{"entity_id": it.entity, "pass": "" if v.passed is None else int(v.passed), "reason": v.reason,
                 "model": judge.name, "input_tokens": v.input_tokens, "output_tokens": v.output_tokens,
                 "answer": "" if v.yes is None else int(v.yes)}
                for it in members if (v := mine.get(it.entity)) is not None]
        if applicable:
            run.write_derived(f"{rel}/{group}", rows_to_csv(rows, VERDICT_COLUMNS))
        judged = [(it, mine[it.entity]) for it in members if it.entity in mine and mine[it.entity].passed is not None]
        metric = [it for it in members if not excluded(it, strict) and it.metric is not None]
        both = [(it.metric, v.passed) for it, v in judged if it.metric is not None]
        agreement = kappa_and_agreement(both)
        has_strict = any(it.baseline_misses is not None for it in members)
        rates.append({
            "experiment": first.experiment, "property": first.property, "kind": first.kind, "setting": first.setting,
            "question": (sources or {}).get(group, ""),
            "rows": len(members), "baseline_misses": sum(bool(it.baseline_misses) for it in members),
            "excluded": sum(excluded(it, strict) for it in members),
            "not_applicable": 0 if applicable else sum(not excluded(it, strict) for it in members),
            "not_asked": sum(applicable and not excluded(it, strict) and it.entity not in mine for it in members),
            "errors": sum(v.status == "error" for v in mine.values()),
            "unparseable": sum(v.status == "unparseable" for v in mine.values()),
            "judged": len(judged), "passed": sum(v.passed for _, v in judged),
            **_rates("judge_rate", [v.passed for _, v in judged]),
            **_rates("judge_rate_strict", [v.passed for it, v in judged if not it.baseline_misses], has_strict),
            "metric_n": len(metric), "metric_passed": sum(it.metric for it in metric),
            **_rates("metric_rate", [it.metric for it in metric]),
            **_rates("metric_rate_strict", [it.metric for it in metric if not it.baseline_misses], has_strict),
            "both": len(both), "agreement": agreement["agreement"], "kappa": agreement["kappa"],
            "file": group if applicable else "",
        })
    run.write_derived(f"{rel}/pass-rates.csv", rows_to_csv(rates))
    totals = {k: sum(r[k] for r in rates) for k in ("rows", "baseline_misses", "excluded", "not_applicable",
                                                     "not_asked", "errors", "unparseable", "judged", "passed")}
    run.write_derived(f"{rel}/summary.json", runs.canonical_json(
        {"judge": judge.name, "calls": calls, "cached": cached, "strict": strict, **totals}, indent=2) + "\n")
    pairs = [(it.metric, v.passed) for it in found if (v := verdicts.get(it.group, {}).get(it.entity)) is not None
             and v.passed is not None and it.metric is not None and not excluded(it, strict)]
    _report(run, judge.name, rel, rates, totals, kappa_and_agreement(pairs), strict)
    return rates


def _report(run: runs.RunFolder, name: str, rel: str, rates: Sequence[Mapping], totals: Mapping,
            overall: Mapping, strict: bool = False) -> Path:
    shown = [{**r, **{f"{k} [95% CI]": tables.rate_text(r[k], r[f"{k}_low"], r[f"{k}_high"])
                      for k in ("judge_rate", "judge_rate_strict", "metric_rate", "metric_rate_strict")}}
             for r in rates]
    has_strict = any(r["judge_rate_strict"] is not None or r["metric_rate_strict"] is not None for r in rates)
    columns = ["experiment", "property", "kind", "setting", "question", "rows", "baseline_misses", "excluded",
               "not_asked", "errors", "unparseable", "judged", "passed", "judge_rate [95% CI]",
               *(["judge_rate_strict [95% CI]"] if has_strict else []), "metric_rate [95% CI]",
               *(["metric_rate_strict [95% CI]"] if has_strict else []), "both", "agreement", "kappa"]
    pct = {"agreement": "{:.1%}", "kappa": "{:.3f}"}
    rule = ("--strict: the rows whose baseline edit misses the property (baseline_misses) were neither asked nor "
            "counted (excluded)" if strict else
            "every row asked and counted, as the study did; the strict rates leave out the rows whose baseline edit "
            "misses the property (baseline_misses), this project's stricter rule")
    sections = [report.Section("Judge", [report.Text(
        f"Judge: {name}. Every judged row of the run folder, scored with one yes/no question over its bundle of "
        f"labelled images; {rule}. Rows: {totals['rows']}; baseline edit missing the property: "
        f"{totals['baseline_misses']}; excluded: {totals['excluded']}; not scored by this judge: "
        f"{totals['not_applicable']}; not asked (left out by --select or --limit): {totals['not_asked']}; errors: "
        f"{totals['errors']}; unparseable answers: {totals['unparseable']}; judged: {totals['judged']}, of which "
        f"{totals['passed']} passed.\n\nErrors and unparseable answers are left out of the rates. Brackets: 95 % "
        "intervals (Wilson). The metric's rate is the automatic verdict of the same rows; agreement and Cohen's "
        "kappa are over the rows both scored (kappa is empty when both are constant). question: where each "
        "setting's wording comes from (project, a --questions file, or study:<the study's bundle builder>). "
        f"Overall, on the {overall['n']} rows both scored: agreement "
        f"{_fmt(overall['agreement'], '.1%')}, kappa {_fmt(overall['kappa'], '.3f')}.\n\n"
        f"Verdict files: {rel}/<experiment>/<property>-<kind>/<setting>.csv.")])]
    for experiment in dict.fromkeys(r["experiment"] for r in shown):
        mine = [r for r in shown if r["experiment"] == experiment]
        sections.append(report.Section(f"{experiment}: judge and metric per setting", [
            report.Table(title=f"{experiment}", columns=columns, rows=mine, formats=pct)]))
    code = json.loads((run.path / runs.CODE_VERSION_FILE).read_text())
    return run.write_derived(f"{JUDGE_DIR}-{judge_slug(name)}.html",
                             report.render_html(run.path, f"Judge verdicts: {name}", sections, code=code))


# ---------------------------------------------------------------------------------------------
# agreement


def kappa_and_agreement(pairs: Sequence[tuple[bool, bool]]) -> dict[str, Any]:
    """Raw agreement and Cohen's kappa of paired binary verdicts (kappa None when both raters are
    constant and equal, where chance agreement is 1 and kappa is undefined; None for no pairs)."""
    n = len(pairs)
    if n == 0:
        return {"n": 0, "agreement": None, "kappa": None}
    po = sum(a == b for a, b in pairs) / n
    pa, pb = sum(a for a, _ in pairs) / n, sum(b for _, b in pairs) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    kappa = None if math.isclose(pe, 1.0) else (po - pe) / (1 - pe)
    return {"n": n, "agreement": po, "kappa": kappa}


def read_verdicts(run_path: str | os.PathLike, who: str) -> dict[tuple[str, str], bool]:
    """(verdict file, entity) -> pass, for a judge's verdict files in the run folder or, for
    who == "metric", the rows' own automatic verdicts (the study's rule)."""
    run_path = Path(run_path).resolve()
    if who == METRIC:
        return {(it.group, it.entity): it.metric for it in items(run_path) if it.metric is not None}
    folder = run_path / JUDGE_DIR / judge_slug(judges.name_of(who))
    if not folder.is_dir():
        raise FileNotFoundError(f"no verdicts of {who} in {run_path}: run python -m experiments.judge {run_path} "
                                f"--judge {who} first")
    out = {}
    for path in sorted(folder.rglob("*.csv")):
        if path.name == "pass-rates.csv":
            continue
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row["pass"] in ("0", "1"):
                    out[(path.relative_to(folder).as_posix(), row["entity_id"])] = row["pass"] == "1"
    return out


def agreement(run_path: str | os.PathLike, a: str, b: str) -> dict[str, Any]:
    """Agreement and kappa between two judges (or a judge and "metric") per verdict file and overall,
    on the entities both scored."""
    va, vb = read_verdicts(run_path, a), read_verdicts(run_path, b)
    shared = sorted(va.keys() & vb.keys())
    per_file: dict[str, list[tuple[bool, bool]]] = {}
    for key in shared:
        per_file.setdefault(key[0], []).append((va[key], vb[key]))
    return {"a": a, "b": b, "n_a": len(va), "n_b": len(vb),
            "files": [{"file": f, **kappa_and_agreement(p)} for f, p in per_file.items()],
            "overall": kappa_and_agreement([(va[k], vb[k]) for k in shared]),
            "disagreements": [{"file": k[0], "entity": k[1], a: va[k], b: vb[k]} for k in shared if va[k] != vb[k]]}


def _fmt(x: float | None, f: str) -> str:
    return "n/a" if x is None else format(x, f)


# ---------------------------------------------------------------------------------------------
# command line


def _score_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.judge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the run folder to score")
    p.add_argument("--judge", required=True, help="anthropic:MODEL, openai:MODEL@URL, hf:PATH or colour")
    p.add_argument("--questions", default=None, help="a JSON file of questions replacing the project's own")
    p.add_argument("--questions-from", default=None, metavar="STUDY_CHECKOUT",
                   help="read the study's own system text and per-cell prompts from a checkout of its repository "
                        "(ChrisG777/i2i-interp: scripts/judge/bundles.py, scripts/judge/api.py); a --questions "
                        "file goes over them")
    p.add_argument("--strict", action="store_true",
                   help="this project's stricter rule: do not ask about (nor count) the lost / kept rows whose "
                        "baseline edit misses the property (default: every row, as the study)")
    p.add_argument("--cache", default=None, help="the verdict cache folder (default: RUN/judge/cache)")
    p.add_argument("--concurrency", type=int, default=4, help="judge calls in flight at once (default 4)")
    p.add_argument("--attempts", type=int, default=judges.Retry.attempts, help="calls per question on rate limits "
                   "and server errors, the first included")
    p.add_argument("--max-tokens", type=int, default=judges.MAX_TOKENS, help="the answer's token budget")
    p.add_argument("--select", nargs="+", default=(), metavar="GLOB",
                   help="judge only the rows whose experiment/property-kind/setting matches one of these "
                        "(e.g. 'knockout/*/ref->text @ all' 'lens/colour-present/*')")
    p.add_argument("--limit", type=int, default=None, help="at most this many rows per setting (a smoke test)")
    p.add_argument("--dry-run", action="store_true", help="print the number of judge calls needed, make none")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        questions = QUESTIONS if args.questions_from is None else load_study_questions(args.questions_from)
        if args.questions is not None:
            questions = load_questions(args.questions, questions)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        try:
            judge = judges.make_judge(args.judge, retry=judges.Retry(attempts=args.attempts),
                                      max_tokens=args.max_tokens)
        except ValueError as e:  # a spec that names no judge
            print(f"error: --judge {args.judge}: {e}", file=sys.stderr)
            return 2
        concurrency = 1 if isinstance(judge, (judges.HFJudge, judges.ColourJudge)) else args.concurrency
        out = score(args.run, judge, questions=questions, cache=args.cache, concurrency=concurrency,
                    patterns=args.select, limit=args.limit, dry_run=args.dry_run,
                    show_progress=not args.no_progress, argv=["experiments.judge", *argv], strict=args.strict)
    except (ContractError, JudgeAuthError, runs.RunError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"{out.judge}: {out.calls} calls to make, {out.cached} verdicts in the cache")
        return 0
    print(f"{out.judge}: {out.calls} calls, {out.cached} verdicts from the cache; verdicts in {out.folder}")
    for r in out.rates:
        print(f"  {r['experiment']:<9} {r['property'] + '-' + r['kind']:<21} {r['setting']:<32} judge "
              f"{tables.rate_text(r['judge_rate'], r['judge_rate_low'], r['judge_rate_high']) or 'n/a':>16} "
              f"(n={r['judged']}, errors {r['errors']}, unparseable {r['unparseable']}, excluded {r['excluded']})  "
              f"metric {tables.rate_text(r['metric_rate'], r['metric_rate_low'], r['metric_rate_high']) or 'n/a'}")
    return 0


def _agree_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.judge agree",
                                description="Agreement and Cohen's kappa between two judges' verdicts on one run "
                                            "folder; 'metric' names the rows' automatic verdicts.")
    p.add_argument("run")
    p.add_argument("a", help="a judge spec (as given to --judge) or 'metric'")
    p.add_argument("b", help="a judge spec or 'metric'")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    try:
        result = agreement(args.run, args.a, args.b)
    except (ContractError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for f in result["files"]:
        print(f"  {f['file']:<60} n={f['n']:<5} agreement {_fmt(f['agreement'], '.1%'):>6} "
              f"kappa {_fmt(f['kappa'], '.3f')}")
    o = result["overall"]
    print(f"overall: {o['n']} shared verdicts, agreement {_fmt(o['agreement'], '.1%')}, "
          f"kappa {_fmt(o['kappa'], '.3f')} ({args.a} vs {args.b})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["agree"]:
        return _agree_main(argv[1:])
    return _score_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
