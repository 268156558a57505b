"""One experiment = K-fold cross-validation + a final fit on all usable studies, for one or more variants.

Every run is a separate process (so several can share one GPU), writes its model and its out-of-fold
predictions to disk, and resumes from its own state file. The parent aggregates out-of-fold metrics from
the saved (half-precision) fold models, exactly as `ccfnet evaluate --folds` recomputes them, and prints a
table last.

    python -m ccfnet_core.experiment --data DIR --folds FILE --config exp.toml --out runs/exp --parallel 5

A `[pairs.NAME]` table (`localiser = ...`, `classifier = ...`, each a variant of the file or a checkpoint path with
its `.folds/` beside it; `classifier = [...]` for an ensemble) is assembled after the variants finish
(`ccfnet_core.pair`) and reported as a row too. A `[graders.NAME]` table (`network = ...`: a variant, a pair of the
file or a checkpoint path; optionally `network_share`, `epochs`, `seed` (a list trains one grader per seed, their
logits averaged), or `grader = PATH` (or a list) to reuse trained ones) trains the patch grader fold by fold
(`ccfnet_core.grading`), attaches it to the network's fold and final models, and is reported as a row after them.
With `--report-only` nothing is trained: graders that exist are attached.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

from ccfnet_core.datasets import read_dataset
from ccfnet_core.evaluate import PAPER_KEYS, per_fold_metrics, predict_out_of_fold, record_in_card, summarise
from ccfnet_core.folds import load_folds
from ccfnet_core.sample import SliceSample
from ccfnet_core.train import TrainConfig, Trainer, write_json

LIMITATIONS = (
    "single mid-sagittal slice per study; no volumetric context",
    "6 mm criterion uses an estimated pixel spacing (144 mm / |L1-L5|), not DICOM PixelSpacing",
    "trained on research-only challenge data (Tianchi 2020 licence): not for clinical use",
    "disc abnormality is one probability: bulge / protrusion / extrusion are not told apart",
)


def load_variants(config_path: Path) -> dict[str, dict[str, Any]]:
    """TOML with a [base] table and [variants.NAME] tables of overrides -> NAME -> options."""
    data = tomllib.loads(config_path.read_text())
    base = data.get("base", {})
    variants = data.get("variants")
    if variants is None:  # a file of pairs or graders only trains no network
        variants = {} if {"pairs", "graders"} & data.keys() else {"default": {}}
    return {name: {**base, **overrides} for name, overrides in variants.items()}


def load_pairs(config_path: Path) -> dict[str, dict[str, Any]]:
    """[pairs.NAME] tables -> NAME -> {localiser, classifier, logits}; each source a variant name or a checkpoint
    path, `classifier` one or a list of them (an ensemble); `logits` (optional, default "classifier") as
    `ccfnet pair --logits`."""
    from ccfnet_core.pair import check_logits

    pairs: dict[str, dict[str, Any]] = tomllib.loads(config_path.read_text()).get("pairs", {})
    for name, sources in pairs.items():
        if not {"localiser", "classifier"} <= set(sources) <= {"localiser", "classifier", "logits"}:
            raise ValueError(f"[pairs.{name}] needs `localiser` and `classifier` (and optionally `logits`)")
        classifier = sources["classifier"]
        if not (isinstance(classifier, str) or (isinstance(classifier, list) and classifier)):
            raise ValueError(f"[pairs.{name}] `classifier` is a variant or path, or a list of them")
        sources.setdefault("logits", "classifier")
        try:
            check_logits(sources["logits"])
        except ValueError as exc:
            raise ValueError(f"[pairs.{name}] {exc}") from exc
    return pairs


GRADER_KEYS = {"network", "network_share", "epochs", "seed", "grader"}


def load_graders(config_path: Path) -> dict[str, dict[str, Any]]:
    """[graders.NAME] tables -> NAME -> {network, network_share, epochs, seeds (a list), graders (paths; empty: train
    one per seed)}."""
    graders: dict[str, dict[str, Any]] = tomllib.loads(config_path.read_text()).get("graders", {})
    for name, spec in graders.items():
        if "network" not in spec or not set(spec) <= GRADER_KEYS:
            optional = ", ".join(sorted(GRADER_KEYS - {"network"}))
            raise ValueError(f"[graders.{name}] needs `network` (and optionally {optional})")
        spec.setdefault("network_share", 0.0)
        spec.setdefault("epochs", 30)
        seed = spec.pop("seed", 0)
        spec["seeds"] = [int(s) for s in seed] if isinstance(seed, list) else [int(seed)]
        grader = spec.pop("grader", [])
        spec["graders"] = [grader] if isinstance(grader, str) else list(grader)
        if not 0.0 <= float(spec["network_share"]) < 1.0:
            raise ValueError(f"[graders.{name}] network_share must be in [0, 1), not {spec['network_share']}")
    return graders


def build_graded(
    args: argparse.Namespace, variants: dict[str, dict[str, Any]], k: int, train: bool = True
) -> list[str]:
    """Train each table's grader (unless it names one, or `train` is off), attach it to every fold model and the
    final model its network has; returns the graded models with at least one fold."""
    from ccfnet_core.evaluate import fold_checkpoint
    from ccfnet_core.grading import GraderRecipe, attach_grader, train_grader_folds

    known = {*variants, *load_pairs(args.config)}
    built = []
    for name, spec in load_graders(args.config).items():
        network = _pair_source(args, known, spec["network"])
        graders = [Path(p) for p in spec["graders"]] or _trained_graders(args.out / name, spec["seeds"])
        if train and not spec["graders"]:
            samples = usable(read_dataset(args.data))
            for seed, grader in zip(spec["seeds"], graders, strict=True):
                recipe = GraderRecipe(epochs=int(spec["epochs"]), seed=seed)
                data = f"{args.data.name}, unflagged studies"
                train_grader_folds(samples, load_folds(args.folds), grader, recipe, data)
        out = args.out / name / "final.pt"
        members = [
            (fold_checkpoint(network, f), [fold_checkpoint(g, f) for g in graders], fold_checkpoint(out, f))
            for f in range(k)
        ]
        for net, grds, result in [*members, (network, graders, out)]:
            if net.is_file() and all(g.is_file() for g in grds):
                attach_grader(net, grds, result, float(spec["network_share"]))
                built.append(name)
    return list(dict.fromkeys(built))


def _trained_graders(folder: Path, seeds: list[int]) -> list[Path]:
    """Where a table's own graders go: grader.pt for one seed, grader-seed<s>.pt for each of several."""
    if len(seeds) == 1:
        return [folder / "grader.pt"]
    return [folder / f"grader-seed{seed}.pt" for seed in seeds]


def classifier_sources(sources: dict[str, Any]) -> list[str]:
    """A [pairs.NAME] table's classifiers as a list, whether it names one or several."""
    classifier = sources["classifier"]
    return classifier if isinstance(classifier, list) else [classifier]


def _pair_source(args: argparse.Namespace, known: Collection[str], source: str) -> Path:
    """A source named in a table: a variant (or pair) of the file is its final model under --out, else a path."""
    return args.out / source / "final.pt" if source in known else Path(source)


def build_pairs(args: argparse.Namespace, variants: dict[str, dict[str, Any]], k: int) -> list[str]:
    """Pair every fold model (and final model) that all sources have; returns the pairs with at least one."""
    from ccfnet_core.pair import assemble_pair, pair_members

    built = []
    for name, sources in load_pairs(args.config).items():
        loc = _pair_source(args, variants, sources["localiser"])
        cls = [_pair_source(args, variants, source) for source in classifier_sources(sources)]
        for loc_path, cls_paths, out_path in pair_members(loc, cls, args.out / name / "final.pt", k):
            if loc_path.is_file() and all(path.is_file() for path in cls_paths):
                assemble_pair(loc_path, cls_paths, out_path, logits=sources["logits"])
                built.append(name)
    return list(dict.fromkeys(built))


def usable(samples: list[SliceSample]) -> list[SliceSample]:
    return [s for s in samples if not s.flag]


def run_one(data: Path, folds_path: Path, options: dict[str, Any], fold: int, out_dir: Path) -> None:
    """Train one model: fold k held out (fold >= 0), or the final fit on every usable study (fold = -1)."""
    samples = read_dataset(data)
    folds = load_folds(folds_path)
    cfg = TrainConfig.from_mapping(options)
    train_pool = samples if cfg.include_flagged else usable(samples)
    if fold >= 0:
        train = [s for s in train_pool if folds[s.study_id] != fold]
        val = [s for s in usable(samples) if folds[s.study_id] == fold]
    else:
        train, val = train_pool, []
    from ccfnet_core.evaluate import score_for_training

    def progress(kind: str, done: int, total: int) -> None:
        if kind == "epoch":
            print(f"[{out_dir.name}] epoch {done}/{total}", flush=True)

    trainer = Trainer(cfg, train, out_dir, val, score_for_training if val else None, progress)
    started = time.perf_counter()
    trainer.fit()
    trainer.export(
        out_dir.parent / _model_name(fold),
        {
            "training_data": cfg.training_data or f"{len(train)} studies from {data.name}",
            "intended_use": "research; lumbar MR sagittal T2 landmarking and grading",
            "phantom_only": False,
            "limitations": LIMITATIONS,
        },
        half=True,
    )
    write_json(out_dir / "done.json", {"seconds": time.perf_counter() - started, "train_studies": len(train)})


def _launch(args: argparse.Namespace, variant: str, fold: int) -> subprocess.Popen[bytes]:
    run_dir = args.out / variant / ("final" if fold < 0 else f"fold{fold}-run")
    run_dir.mkdir(parents=True, exist_ok=True)
    log = (run_dir / "log.txt").open("ab")
    cmd = [
        sys.executable, "-m", "ccfnet_core.experiment", "--data", str(args.data), "--folds", str(args.folds),
        "--config", str(args.config), "--out", str(args.out), "--variant", variant, "--fold", str(fold),
    ]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())


def measure_step_seconds(data: Path, options: dict[str, Any], steps: int = 12) -> float:
    """Seconds per training step of one variant on this machine (after a warm-up), for planning."""
    import torch

    samples = usable(read_dataset(data))
    cfg = replace(TrainConfig.from_mapping(options), epochs=1, max_steps=steps + 4, repeats=50)
    trainer = Trainer(cfg, samples, Path(os.devnull))
    trainer.cfg = replace(cfg, max_steps=4)
    trainer.train_epoch()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    trainer.step = 0
    trainer.cfg = replace(cfg, max_steps=steps)
    trainer.train_epoch()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return seconds


def plan(args: argparse.Namespace, variants: dict[str, dict[str, Any]], k: int) -> list[str]:
    """Keep variants, in file order, while their projected serial time fits the budget (0 = no budget)."""
    if not args.budget_seconds:
        return list(variants)
    n = len(usable(read_dataset(args.data)))
    chosen, total = [], 0.0
    for name, options in variants.items():
        cfg = TrainConfig.from_mapping(options)
        fold_train = n * (k - 1) // k
        steps = cfg.epochs * (
            k * math.ceil(fold_train * cfg.repeats / cfg.batch_size) + math.ceil(n * cfg.repeats / cfg.batch_size)
        )
        seconds = measure_step_seconds(args.data, options) * steps
        fits = total + seconds <= args.budget_seconds
        print(f"plan: {name}: {steps} steps, projected {seconds:.0f} s serial -> {'run' if fits else 'skip'}",
              flush=True)
        if fits:
            chosen.append(name)
            total += seconds
    return chosen


def run_all(args: argparse.Namespace) -> int:
    variants = load_variants(args.config)
    folds = load_folds(args.folds)
    k = max(folds.values()) + 1
    started = time.perf_counter()
    selected = plan(args, variants, k)
    variants = {name: variants[name] for name in selected}
    jobs = [(v, f) for v in variants for f in [*range(k), -1] if not (args.out / v / _model_name(f)).is_file()]
    print(f"{len(jobs)} runs to do, {args.parallel} at a time", flush=True)
    running: list[tuple[str, int, subprocess.Popen[bytes]]] = []
    failures = 0
    while jobs or running:
        if args.deadline_seconds and time.perf_counter() - started > args.deadline_seconds:
            for variant, fold, process in running:
                process.kill()
                print(f"{variant} fold {fold}: stopped at the deadline (resumable from its state.pt)", flush=True)
            break
        while jobs and len(running) < args.parallel:
            variant, fold = jobs.pop(0)
            running.append((variant, fold, _launch(args, variant, fold)))
        time.sleep(2)
        for item in list(running):
            if item[2].poll() is not None:
                running.remove(item)
                status = "done" if item[2].returncode == 0 else f"FAILED ({item[2].returncode})"
                failures += item[2].returncode != 0
                print(f"{item[0]} fold {item[1]}: {status}", flush=True)
    all_variants = load_variants(args.config)
    names = [*variants, *build_pairs(args, all_variants, k), *build_graded(args, all_variants, k)]
    return report(args, names, k) or (1 if failures else 0)


def _model_name(fold: int) -> str:
    """final.pt, and the fold models where `ccfnet evaluate --folds` looks for them: final.folds/fold<k>.pt."""
    return f"final.folds/fold{fold}.pt" if fold >= 0 else "final.pt"


def report(args: argparse.Namespace, variants: list[str], k: int) -> int:
    """Out-of-fold metrics per variant from the saved fold models; the card of each final model gets them.

    A variant with only some folds done (a CPU experiment spread over sessions) is scored on those folds'
    studies, labelled with them, into cv_metrics_partial.json; its card is left alone.
    """
    samples = usable(read_dataset(args.data))
    folds = load_folds(args.folds)
    rows: dict[str, dict[str, Any]] = {}
    for variant in variants:
        final = args.out / variant / "final.pt"
        done = [f for f in range(k) if (args.out / variant / _model_name(f)).is_file()]
        if not done:
            print(f"{variant}: no fold model yet, skipped in the table")
            continue
        complete = len(done) == k and final.is_file()
        scored = [s for s in samples if folds[s.study_id] in done]
        predictions = predict_out_of_fold(scored, final, folds)
        summary = summarise(scored, predictions)
        per_fold = per_fold_metrics(scored, predictions, folds)
        summary["per_fold"] = per_fold
        if not complete:
            write_json(args.out / variant / "cv_metrics_partial.json", summary)
            rows[f"{variant} [folds {','.join(map(str, done))}]"] = summary
            continue
        write_json(args.out / variant / "cv_metrics.json", summary)
        record_in_card(final, summary, per_fold, k)
        rows[variant] = summary
    header = f"{'variant':<40}" + "".join(f"{key:>12}" for key in (*PAPER_KEYS, "macroF1"))
    print(header)
    for variant, summary in rows.items():
        values = [summary[key] for key in PAPER_KEYS] + [100 * summary["challenge_macro_f1"]]
        print(f"{variant:<40}" + "".join(f"{value:>12.2f}" for value in values))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--folds", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--variant", default="")
    parser.add_argument("--fold", type=int, default=None)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--budget-seconds", type=float, default=0.0, help="plan variants to fit this")
    parser.add_argument("--deadline-seconds", type=float, default=0.0, help="stop unfinished runs after this")
    args = parser.parse_args(argv)
    if args.variant:
        options = load_variants(args.config)[args.variant]
        run_dir = args.out / args.variant / ("final" if args.fold < 0 else f"fold{args.fold}-run")
        run_one(args.data, args.folds, options, args.fold, run_dir)
        return 0
    if args.report_only:
        variants = load_variants(args.config)
        k = max(load_folds(args.folds).values()) + 1
        pairs = build_pairs(args, variants, k)
        return report(args, [*variants, *pairs, *build_graded(args, variants, k, train=False)], k)
    return run_all(args)


if __name__ == "__main__":
    raise SystemExit(main())


