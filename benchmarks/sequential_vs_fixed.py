"""Sequential against fixed-n CERTIFY on the same noise, on real models.

`sample` runs the model once per image and records the *count trajectory* of its estimation
noise stream: the cumulative votes for the tested class (and for the label) after every
`step` samples (the first look, 1024 by default) and after exactly `n` (100,000). `table`
then replays, from those counts and without the model:

- fixed-n CERTIFY (Cohen et al.): the class from n0 selection samples, the one-sided
  Clopper-Pearson bound on the first n estimation samples at level alpha;
- each sequential policy, by feeding `SequentialTest` (the code `smoothadv certify --mode
  sequential` runs) the counts at its looks; its cost is the look at which it stops, plus n0.

Both use the noise streams `smoothadv certify --mode sequential` draws (selection stream 0,
estimation stream 1 of each image under --seed), so the sequential rows are the CLI's rows
(`tests/e2e/test_sequential_replay.py` checks this) and the fixed-n rows use the first n samples of
the same estimation stream: the two tables differ only through the stopping rule, not through
Monte Carlo noise. Trajectories stop at the first multiple of `step` >= n unless one of the
replayed policies has not stopped by then; they are then continued to the largest last look.
`sample` appends one JSON line per image and resumes where a previous run stopped; when the
replayed policies change, it first continues earlier trajectories that are now too short, from
the same noise stream. `sample --part I/N` records every N-th image only, so that N one-thread processes share
the work (each image's noise streams depend on its index alone: the records are those of a single run), and
`gather` folds their files into one. `summary` prints one row per model and a total.

    OMP_NUM_THREADS=1 python benchmarks/sequential_vs_fixed.py sample model.pth.tar --sigma 0.25 \\
        --skip 20 --max 500 --out g025.jsonl --channels-last
    python benchmarks/sequential_vs_fixed.py table g025.jsonl --sigma 0.25
    python benchmarks/sequential_vs_fixed.py summary g025.jsonl:0.25 g05.jsonl:0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from smoothadv.betting import BettingConfig, BettingTest, betting_last
from smoothadv.errors import SmoothAdvError
from smoothadv.files import atomic_write_text, read_tsv
from smoothadv.report import load_results
from smoothadv.run import select_indices
from smoothadv.sequential import (
    DEFAULT_LOOKS,
    SequentialConfig,
    SequentialTest,
    doubling_looks,
    selection_step,
    stream_generator,
)
from smoothadv.smoothing import ABSTAIN, PackedSampler, SampleRequest, Smooth
from smoothadv.stats import certified_accuracy, certified_radius, clopper_pearson_lower

Config = SequentialConfig | BettingConfig


def betting(sigma: float, alpha: float, looks: Sequence[int], radii: Sequence[float] = (), **options: object
            ) -> BettingConfig:
    """The betting test replayed on trajectories with looks `looks`: its checks are every looks[0] / 64 samples
    below looks[0] (the `fine` counts) and every looks[0] samples from there (first draw looks[0] / 16); its last
    size keeps the cap of `looks` (at alpha / K), as `certify --test betting` does for the default looks."""
    last = betting_last(alpha, 0.5, looks[0], looks)
    return BettingConfig(sigma, alpha, radii=tuple(radii), first=looks[0] // 16, last=last,
                         **options)  # type: ignore[arg-type]


def policies(sigma: float, alpha: float, looks: Sequence[int], single: Sequence[float]) -> dict[str, Config]:
    """The replayed policies, all with Cohen's class selection (all n0 selection samples): the alpha-spending
    grid ("grid": the standard radii, the schedule and alpha spending fitted to them, forecast level 0.05), the
    same with the strict forecast (each look's own level), with forecast level 0.2, and on the plain doubling
    looks with alpha / K at every look; the betting test (`--test betting`) with the same radii; and single
    radii (default, strict, betting). Then the grid, betting grid and single radii with adaptive selection
    (", adaptive selection": `smoothadv certify --mode sequential`'s default, `sequential.selection_step`)."""
    base = tuple(looks)

    def grid(radii: Sequence[float] = (), forecast: float | None = 0.05) -> SequentialConfig:
        return SequentialConfig(sigma, alpha, radii=tuple(radii), forecast_alpha=forecast, base=base,
                                selection="fixed")

    out: dict[str, Config] = {
        "grid": grid(), "grid, strict forecast": grid(forecast=None), "grid, forecast 0.2": grid(forecast=0.2),
        "grid, doubling looks, equal split": SequentialConfig(sigma, alpha, looks=base, selection="fixed"),
        "betting grid": betting(sigma, alpha, base, grid().schedule.radii, selection="fixed")}
    for r in single:
        out[f"radius {r:g}"] = grid((r,))
        out[f"radius {r:g}, strict"] = grid((r,), forecast=None)
        out[f"betting radius {r:g}"] = betting(sigma, alpha, base, (r,), selection="fixed")
    for name in ["grid", "betting grid", *(f"{kind}radius {r:g}" for r in single for kind in ("", "betting "))]:
        out[f"{name}, adaptive selection"] = dataclasses.replace(out[name], selection="adaptive")
    return out


def grid_of(configs: dict[str, Config]) -> SequentialConfig:
    """The alpha-spending grid policy of `policies` (the schedule the others are compared on)."""
    grid = configs["grid"]
    assert isinstance(grid, SequentialConfig)
    return grid


def last_look(configs: Sequence[Config], step: int) -> int:
    """The largest sample size the replayed policies may need (every look must be a multiple of `step`)."""
    if any(look % step for cfg in configs if isinstance(cfg, SequentialConfig) for look in cfg.schedule.looks):
        raise SmoothAdvError("every look must be a multiple of the first")
    if any(cfg.coarse != step or cfg.schedule.last % step for cfg in configs if isinstance(cfg, BettingConfig)):
        raise SmoothAdvError("a betting test must check every first look and end at a multiple of it")
    return max(cfg.schedule.looks[-1] if isinstance(cfg, SequentialConfig) else cfg.schedule.last for cfg in configs)


def replay(config: Config, at: dict[int, int]) -> SequentialTest | BettingTest | None:
    """Feed a test the cumulative counts `at[size]`; None if it needs a size not recorded."""
    test = config.start()
    while segments := test.next_segments():
        ends = np.cumsum((test.n, *segments)).tolist()
        if any(end not in at for end in ends[1:]):
            return None
        test.update_segments([at[b] - (at[a] if a else 0) for a, b in zip(ends, ends[1:])])
    return test


def replay_all(config: Config, counts: Sequence[dict[int, int]]) -> list[SequentialTest | BettingTest] | None:
    """`replay` on every image's cumulative counts; None if any of them needs a size not recorded."""
    tests = [replay(config, at) for at in counts]
    return None if any(t is None for t in tests) else [t for t in tests if t is not None]


def needs_more(record: dict, configs: Sequence[Config]) -> bool:
    at = dict(zip(record["sizes"], record["counts"]))
    return any(replay(cfg, at) is None for cfg in configs)


def fine_step(looks: Sequence[int]) -> int:
    """The spacing of the counts recorded below the first look (the betting test's checks there)."""
    return max(1, looks[0] // 64)


def extend(sampler: PackedSampler, records: list[dict], xs: Sequence[torch.Tensor], gens: Sequence[torch.Generator],
           sizes: Sequence[int], batch_size: int) -> None:
    """Append each record's cumulative counts (tested class and label) at the increasing sample sizes
    `sizes`, drawn from `gens` (positioned where the record's stream stopped) in one request per record."""
    start = records[0]["sizes"][-1] if records[0]["sizes"] else 0
    if any((r["sizes"][-1] if r["sizes"] else 0) != start for r in records):
        raise SmoothAdvError("records extended together must end at the same size")
    segments = tuple(np.diff([start, *sizes]).tolist())
    counts = sampler.counts([SampleRequest(x, segments, g) for x, g in zip(xs, gens)], batch_size)
    counts = counts.cpu().view(len(records), len(sizes), -1).cumsum(1)
    for r, ext in zip(records, counts):
        r["counts"] += (ext[:, r["class"]] + (r["counts"][-1] if r["counts"] else 0)).tolist()
        r["label_counts"] += (ext[:, r["label"]] + (r["label_counts"][-1] if r["label_counts"] else 0)).tolist()
        r["sizes"] += list(sizes)
        r["requests"].append(sizes[-1] - start)


def advance(generator: torch.Generator, requests: Sequence[int], shape: Sequence[int], sigma: float,
            batch_size: int) -> None:
    """Draw (and discard) the noise NoisySampler drew for `requests` (their sample totals), in its pieces
    of min(batch_size, remaining) samples per request, so `generator` continues the same stream."""
    for total in requests:
        while total > 0:
            size = min(batch_size, total)
            torch.empty((size, *shape), device=generator.device).normal_(0.0, sigma, generator=generator)
            total -= size


def trajectories(smooth: Smooth, dataset: torch.utils.data.Dataset, indices: Sequence[int], *, n0: int, n: int,
                 looks: Sequence[int], configs: Sequence[Config], batch_size: int, seed: int,
                 device: torch.device, group: int) -> Iterator[dict]:
    """One record per image: selection counts, the tested class and the count trajectories (see module doc)."""
    step, top = looks[0], last_look(configs, looks[0])
    if not 0 < n <= top:
        raise SmoothAdvError(f"fixed n must be in [1, {top}] (the last look), got {n}")
    first_cut = -(-n // step) * step
    head = sorted(set(range(fine_step(looks), step, fine_step(looks))) | set(range(step, first_cut + 1, step)) | {n})
    sampler = PackedSampler(smooth.sampler)
    for start in range(0, len(indices), group):
        chunk = list(indices[start:start + group])
        began = time.time()
        xs, labels = zip(*[(dataset[i][0].to(device), int(dataset[i][1])) for i in chunk])
        selection = sampler.counts([SampleRequest(x, (n0,), stream_generator(seed, i, 0, device))
                                    for x, i in zip(xs, chunk)], batch_size).cpu()
        gens = [stream_generator(seed, i, 1, device) for i in chunk]
        records = [{"idx": i, "label": label, "selection": counts.tolist(), "class": int(counts.argmax()),
                    "sizes": [], "counts": [], "label_counts": [], "requests": []}
                   for i, label, counts in zip(chunk, labels, selection)]
        extend(sampler, records, xs, gens, head, batch_size)
        need = [k for k, r in enumerate(records) if needs_more(r, configs)] if top > first_cut else []
        if need:
            extend(sampler, [records[k] for k in need], [xs[k] for k in need], [gens[k] for k in need],
                   range(first_cut + step, top + 1, step), batch_size)
        elapsed = time.time() - began
        for r in records:
            r["seconds"] = round(elapsed / len(records), 3)
            yield r


def top_up(smooth: Smooth, dataset: torch.utils.data.Dataset, records: list[dict], *, looks: Sequence[int],
           configs: Sequence[Config], batch_size: int, seed: int, device: torch.device,
           group: int) -> int:
    """Continue, in place, the trajectories that a replayed policy needs further (e.g. after the schedule
    changed), from the same noise stream; returns how many records were extended."""
    step, top = looks[0], last_look(configs, looks[0])
    need = [r for r in records if needs_more(r, configs)]
    by_end: dict[int, list[dict]] = {}
    for r in need:
        if "requests" not in r:
            r["requests"] = _requests_of(r, step)
        by_end.setdefault(r["sizes"][-1], []).append(r)
    for batch in (rs[k:k + group] for rs in by_end.values() for k in range(0, len(rs), group)):
        xs = [dataset[r["idx"]][0].to(device) for r in batch]
        gens = [stream_generator(seed, r["idx"], 1, device) for r in batch]
        for g, x, r in zip(gens, xs, batch):
            advance(g, r["requests"], x.shape, smooth.sigma, batch_size)
        extend(PackedSampler(smooth.sampler), batch, xs, gens, range(batch[0]["sizes"][-1] + step, top + 1, step),
               batch_size)
    return len(need)


def _requests_of(record: dict, step: int) -> list[int]:
    """Request totals of a record written before they were stored: the head up to the first multiple of
    `step` at or after n (the first size that is not a multiple of step, or the first multiple after it),
    then one extension request to the last size if there is one."""
    sizes = [s for s in record["sizes"] if s >= step]  # the fine counts below the first look are no request
    odd = next((s for s in sizes if s % step), None)
    head = -(-odd // step) * step if odd is not None else sizes[-1]
    return [head] if sizes[-1] == head else [head, sizes[-1] - head]


def refine(smooth: Smooth, dataset: torch.utils.data.Dataset, records: list[dict], *, looks: Sequence[int],
           batch_size: int, seed: int, device: torch.device, group: int) -> int:
    """Add, in place, the cumulative counts (tested class and label) after every `fine_step(looks)` samples below
    the first look to the records without them (trajectories recorded before the betting test), from the same
    estimation stream; the count at the first look must equal the recorded one (else SmoothAdvError: not the
    same noise). Returns how many records were refined."""
    step, fine = looks[0], fine_step(looks)
    todo = [r for r in records if fine < step and fine not in r["sizes"]]
    sampler = PackedSampler(smooth.sampler)
    segments = (fine,) * (step // fine)
    for k in range(0, len(todo), group):
        batch = todo[k:k + group]
        requests = [SampleRequest(dataset[r["idx"]][0].to(device), segments,
                                  stream_generator(seed, r["idx"], 1, device)) for r in batch]
        counts = sampler.counts(requests, batch_size).cpu().view(len(batch), len(segments), -1).cumsum(1)
        for r, c in zip(batch, counts):
            at = dict(zip(r["sizes"], zip(r["counts"], r["label_counts"])))
            if (int(c[-1, r["class"]]), int(c[-1, r["label"]])) != tuple(at[step]):
                raise SmoothAdvError(f"image {r['idx']}: the first {step} samples do not give the recorded counts")
            r.setdefault("requests", _requests_of(r, step))
            r["sizes"] = list(range(fine, step, fine)) + r["sizes"]
            r["counts"] = c[:-1, r["class"]].tolist() + r["counts"]
            r["label_counts"] = c[:-1, r["label"]].tolist() + r["label_counts"]
    return len(todo)


def dump(record: dict) -> str:
    """One JSON line of a trajectory file."""
    return json.dumps(record, separators=(",", ":")) + "\n"


def smoothed_model(args: argparse.Namespace) -> tuple[Smooth, torch.utils.data.Dataset, torch.device]:
    """The smoothed classifier of `args.checkpoint` at `args.sigma` (behind `args.denoiser` when given: f o D,
    a diffusion model's directory included), prepared as `smoothadv certify` prepares it (`run.load_smoothed`),
    its test set and the device."""
    from smoothadv.run import load_smoothed
    from smoothadv.settings import CertifySettings, RunSettings

    run = RunSettings(checkpoint=args.checkpoint, out=Path(args.out), device=args.device, data_dir=args.data_dir,
                      channels_last=args.channels_last, denoiser=getattr(args, "denoiser", None))
    smooth, dataset, _, device = load_smoothed(run, CertifySettings(sigma=args.sigma))
    return smooth, dataset, device


def run_sample(args: argparse.Namespace) -> None:
    smooth, dataset, device = smoothed_model(args)
    looks = doubling_looks(*args.looks)
    configs = list(policies(args.sigma, args.alpha, looks, args.single).values())
    out = Path(args.out)
    done = set()
    if out.exists():
        records = load(str(out))
        done = {r["idx"] for r in records}
        refined = refine(smooth, dataset, records, looks=looks, batch_size=args.batch, seed=args.seed, device=device,
                         group=args.group)
        extended = top_up(smooth, dataset, records, looks=looks, configs=configs, batch_size=args.batch,
                          seed=args.seed, device=device, group=args.group)
        if refined or extended or not out.read_text().endswith("\n"):  # rewrite atomically (an interruption keeps
            atomic_write_text(out, "".join(dump(r) for r in records))  # the old file)
            print(f"refined {refined} and extended {extended} earlier trajectories", file=sys.stderr)
    for other in args.also:  # images another part's file (or the gathered one) holds are done as well
        if Path(other).exists():
            done |= {r["idx"] for r in _load_lines(other)}
    part, parts = args.part
    selected = select_indices(len(dataset), args.skip, args.max)  # type: ignore[arg-type]
    todo = [i for k, i in enumerate(selected) if k % parts == part - 1 and i not in done]
    header = {"checkpoint": os.path.basename(args.checkpoint), "denoiser": args.denoiser, "sigma": args.sigma,
              "alpha": args.alpha, "n0": args.n0,
              "n": args.n, "looks": list(looks), "seed": args.seed, "batch": args.batch, "torch": torch.__version__}
    print(json.dumps(header), file=sys.stderr)
    with out.open("a") as handle:
        for count, record in enumerate(trajectories(smooth, dataset, todo, n0=args.n0, n=args.n, looks=looks,
                                                    configs=configs, batch_size=args.batch, seed=args.seed,
                                                    device=device, group=args.group), 1):
            handle.write(dump(record))
            handle.flush()
            if count % 10 == 0:
                print(f"{len(done) + count} images", file=sys.stderr, flush=True)


def run_gather(args: argparse.Namespace) -> None:
    """Fold the records of part files (`sample --part`) into `args.out`: one file in image order, as a single run
    writes it, then remove the parts. An image both hold must have the same record (else SmoothAdvError, and
    nothing is changed)."""
    out = Path(args.out)
    records = {r["idx"]: r for r in _load_lines(str(out))} if out.exists() else {}
    added = 0
    for part in args.parts:
        if not Path(part).exists():
            continue
        for record in _load_lines(part):
            held = records.get(record["idx"])
            if held is not None and held != record:
                raise SmoothAdvError(f"image {record['idx']}: {part} and {out} hold different trajectories")
            added += held is None
            records[record["idx"]] = record
    atomic_write_text(out, "".join(dump(records[i]) for i in sorted(records)))
    for part in args.parts:
        Path(part).unlink(missing_ok=True)
    print(f"{out}: {len(records)} images ({added} from {len(args.parts)} part file(s), now removed)", file=sys.stderr)


def _part(text: str) -> tuple[int, int]:
    """`--part I/N`: the I-th of N parts (1 <= I <= N)."""
    try:
        part, parts = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 1/2, got {text!r}") from None
    if not 1 <= part <= parts:
        raise argparse.ArgumentTypeError(f"expected 1 <= I <= N, got {text!r}")
    return part, parts


def selection_steps(smooth: Smooth, dataset: torch.utils.data.Dataset, records: list[dict], *, chunk: int,
                    batch_size: int, seed: int, device: torch.device, group: int) -> Iterator[dict]:
    """For each record, the cumulative selection votes (every class) after every `chunk` samples of its n0,
    from the same selection stream (one request of n0 samples split into segments, so the noise is the recorded
    one); the votes at n0 must equal the recorded "selection" (else SmoothAdvError: not the same noise)."""
    sampler = PackedSampler(smooth.sampler)
    for k in range(0, len(records), group):
        batch = records[k:k + group]
        n0 = sum(batch[0]["selection"])
        sizes = [*range(chunk, n0, chunk), n0]
        segments = tuple(np.diff([0, *sizes]).tolist())
        requests = [SampleRequest(dataset[r["idx"]][0].to(device), segments,
                                  stream_generator(seed, r["idx"], 0, device)) for r in batch]
        votes = sampler.counts(requests, batch_size).cpu().view(len(batch), len(sizes), -1).cumsum(1)
        for r, v in zip(batch, votes):
            if v[-1].tolist() != r["selection"]:
                raise SmoothAdvError(f"image {r['idx']}: the {n0} selection samples do not give the recorded votes")
            yield {"idx": r["idx"], "sizes": sizes, "votes": v.tolist()}


def run_selection(args: argparse.Namespace) -> None:
    smooth, dataset, device = smoothed_model(args)
    records = load(args.trajectories)
    rows = list(selection_steps(smooth, dataset, records, chunk=args.chunk, batch_size=args.batch, seed=args.seed,
                                device=device, group=args.group))
    atomic_write_text(Path(args.out), "".join(dump(r) for r in rows))
    print(f"{len(rows)} images: selection votes every {args.chunk} samples, equal to the recorded ones at "
          f"{rows[0]['sizes'][-1]}", file=sys.stderr)


def fixed_row(record: dict, n: int, alpha: float, sigma: float, key: str = "counts") -> tuple[int, float]:
    """(prediction, radius) of fixed-n CERTIFY from the first n estimation samples of the record: Cohen's, of the
    selected class (key "counts"), or in label mode, of the label ("label_counts")."""
    count = dict(zip(record["sizes"], record[key]))[n]
    p_lower = clopper_pearson_lower(count, n, alpha)
    tested = record["class"] if key == "counts" else record["label"]
    return (tested, certified_radius(p_lower, sigma)) if p_lower > 0.5 else (ABSTAIN, 0.0)


def fixed_accuracy(records: list[dict], fixed: list[tuple[int, float]], radii: Sequence[float]) -> np.ndarray:
    """Certified accuracy at `radii` of fixed-n rows (`fixed_row`) of these records."""
    return certified_accuracy([radius for _, radius in fixed],
                              [int(p == r["label"]) for (p, _), r in zip(fixed, records)], radii)


def selection_path(path: str) -> Path:
    """Where `selection` writes the chunked selection votes of a trajectory file: selection_X.jsonl beside
    vs_fixed_X.jsonl (selection_votes_of_NAME.jsonl for another NAME.jsonl)."""
    p = Path(path)
    stem = p.stem.removeprefix("vs_fixed_") if p.stem.startswith("vs_fixed_") else f"votes_of_{p.stem}"
    return p.with_name(f"selection_{stem}.jsonl")


def tested(record: dict, config: Config, key: str) -> tuple[str, int, int]:
    """(counts key, tested class, selection samples used) of a record under the config's selection rule: label
    mode (key "label_counts") tests the label with no selection samples; Cohen's rule the recorded class with
    all n0; the adaptive rule replays `selection_step` on the votes recorded every chunk ("selection_votes",
    from `selection`; without them only the votes at n0 are known). A class other than the recorded one is
    replayable only if it is the label (its counts are recorded too)."""
    if key == "label_counts":
        return key, record["label"], 0
    n0 = sum(record["selection"])
    if config.selection == "fixed":
        return key, record["class"], n0
    votes = {**record.get("selection_votes", {}), n0: record["selection"]}
    current = [0] * len(record["selection"])
    while (step := selection_step(current, n0, config.selection)) < 0:
        size = sum(current) - step
        if size not in votes:
            raise SmoothAdvError(f"image {record['idx']}: no selection votes recorded at {size} (run `selection`)")
        current = votes[size]
    if step == record["class"]:
        return key, step, sum(current)
    if step == record["label"]:
        return "label_counts", step, sum(current)
    raise SmoothAdvError(f"image {record['idx']}: adaptive selection chose class {step}, whose counts are not "
                         "recorded")


def load(path: str, selection: str | None = None) -> list[dict]:
    """The records of a trajectory file, with the chunked selection votes of `selection` (default:
    `selection_path(path)` if it exists) as "selection_votes" {size: votes}; a torn last line (a run killed
    mid-write) is dropped."""
    records = _load_lines(path)
    votes_file = Path(selection) if selection else selection_path(path)
    if selection or votes_file.exists():
        steps = {r["idx"]: r for r in _load_lines(str(votes_file))}
        for r in records:
            if r["idx"] in steps:
                r["selection_votes"] = dict(zip(steps[r["idx"]]["sizes"], steps[r["idx"]]["votes"]))
    return records


def _load_lines(path: str) -> list[dict]:
    """The JSON records of a file, one a line; a torn last line (a run killed mid-write) is dropped."""
    with open(path) as handle:
        lines = [line for line in handle if line.strip()]
    records = []
    for k, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if k != len(lines) - 1:
                raise SmoothAdvError(f"{path}: line {k + 1} is not a trajectory record") from None
    return records


def run_table(args: argparse.Namespace) -> None:
    looks = doubling_looks(*args.looks)
    configs = policies(args.sigma, args.alpha, looks, args.single)
    radii = list(args.radii or grid_of(configs).schedule.radii)
    records = load(args.trajectories)
    if not records:
        raise SmoothAdvError(f"{args.trajectories} has no records")
    n0, n = sum(records[0]["selection"]), args.n
    rows = [(name, config, "counts", n0) for name, config in configs.items()]
    rows += [(f"{name}, label mode", configs[name], "label_counts", 0) for name in configs
             if name in ("grid", "betting grid") or ("radius" in name and not name.endswith("strict"))]
    if args.policies:
        unknown = sorted(set(args.policies) - {name for name, *_ in rows})
        if unknown:
            raise SmoothAdvError(f"unknown policy {unknown[0]!r}; the table's policies: "
                                 + "; ".join(repr(name) for name, *_ in rows))
        rows = [row for row in rows if row[0] in args.policies]
    fixed_acc, label_acc = (fixed_accuracy(records, [fixed_row(r, n, args.alpha, args.sigma, key) for r in records],
                                           radii) for key in ("counts", "label_counts"))
    cost = n0 + n
    print("looks of the fitted schedule: " + ", ".join(f"{n:,}" for n in grid_of(configs).schedule.looks))
    print(f"{args.trajectories}: {len(records)} images, sigma {args.sigma:g}, alpha {args.alpha:g}, n0 {n0}, "
          f"fixed n {n:,}, base looks {looks[0]:,}..{looks[-1]:,}")
    cols = " | ".join(f"{r:g}" for r in radii)
    print(f"\n| run | forward passes / image | fewer than fixed | max diff (pp) | decisions differing | {cols} |")
    print("|---|---|---|---|---|" + "---|" * len(radii))
    print(f"| fixed n = {n:,} | {cost:,} | 1x | | | " + " | ".join(f"{100 * a:.1f}" for a in fixed_acc) + " |")
    if any(key == "label_counts" for _, _, key, _ in rows):
        print(f"| fixed n = {n:,}, label mode | {n:,} | 1x | | | " + " | ".join(f"{100 * a:.1f}" for a in label_acc)
              + " |")
    for name, config, key, used_n0 in rows:
        ev = evaluate_policy(records, config, key, used_n0, radii, n)
        if ev is None:
            print(f"| {name} | trajectories too short to replay | | | |")
            continue
        cells = [f"{100 * v:.1f}" if q in ev["asked"] else "" for v, q in zip(ev["acc"], radii)]
        print(f"| {name} | {ev['used']:,.0f} | {ev['fixed_cost'] / ev['used']:.1f}x | {ev['max_diff']:.2f} | "
              f"{ev['differ']} of {len(records) * len(ev['asked'])} | " + " | ".join(cells) + " |")


def evaluate_policy(records: list[dict], config: Config, key: str, used_n0: int, radii: Sequence[float],
                    n: int) -> dict | None:
    """Replay one policy on every record: mean forward passes (its selection samples, by its selection rule,
    and estimation samples), its certified accuracy at `radii`, and its differences from fixed-n CERTIFY in the
    same mode (Cohen's selection of n0 = `used_n0` samples with key "counts", the label with "label_counts") on
    the radii it decides (None if a trajectory is too short)."""
    fixed = [fixed_row(r, n, config.alpha, config.sigma, key) for r in records]
    chosen = [tested(r, config, key) for r in records]
    tests = replay_all(config, [dict(zip(r["sizes"], r[k])) for r, (k, _, _) in zip(records, chosen)])
    if tests is None:
        return None
    results = [t.result() for t in tests]
    # correct when the tested class is the label (in label mode it is)
    ok = [int(res.certified and c == r["label"]) for res, r, (_, c, _) in zip(results, records, chosen)]
    rad = [res.radius if res.certified else 0.0 for res in results]
    fixed_ok = [int(p == r["label"]) for (p, _), r in zip(fixed, records)]
    asked = list(radii) if len(config.schedule.radii) > 1 else list(config.schedule.radii)
    a = certified_accuracy(rad, ok, asked)
    b = fixed_accuracy(records, fixed, asked)
    differ = sum((o and x >= q) != (fo and fx >= q) for o, x, fo, (_, fx) in zip(ok, rad, fixed_ok, fixed)
                 for q in asked)
    selection = float(np.mean([used for _, _, used in chosen]))
    return {"used": selection + float(np.mean([res.n for res in results])), "acc": certified_accuracy(rad, ok, radii),
            "asked": asked, "max_diff": 100 * float(np.max(np.abs(a - b))), "signed": 100 * (a - b), "differ": differ,
            "fixed_cost": used_n0 + n, "selection": selection}


def cpu_time(totals: dict[str, list[float]], ms_per_pass: float, n: int) -> None:
    """CPU time per image of each policy and of fixed n over all images, at `ms_per_pass` CPU-ms per forward pass:
    every noise sample is one pass through the certified model, and the tests' own work per sample is negligible
    against it (`benchmarks/certify_throughput.py`), so CPU time is passes times the price of one."""
    print(f"\nCPU time at {ms_per_pass:g} CPU-ms per forward pass (one noise sample through the certified model), "
          "over all images:\n")
    print(f"| policy | CPU-s / image | fixed n = {n:,}: CPU-s / image | CPU time saved |")
    print("|---|---|---|---|")
    for name, (used, fixed_cost, count, _, _) in totals.items():
        policy, fixed = used / count * ms_per_pass / 1e3, fixed_cost / count * ms_per_pass / 1e3
        print(f"| {name} | {policy:,.1f} | {fixed:,.1f} | {fixed - policy:,.1f} CPU-s ({1 - policy / fixed:.1%}) |")


def run_summary(args: argparse.Namespace) -> None:
    """One row per model and a total over all of them, for the default grid and single-radius policies, the
    alpha-spending schedule's and the betting test's: mean forward passes, the saving against fixed n in the same
    mode, the largest table difference, the decisions that differ, and the share reached of two bounds on the
    saving of any level-alpha test (`clairvoyant_cost`, `wald_cost`)."""
    looks = doubling_looks(*args.looks)
    print(f"| model | images | policy | forward passes / image | fewer than fixed n = {args.n:,} (same mode) | "
          "max table difference (pp) | decisions differing | share of clairvoyant bound | share of Wald bound |")
    print("|---|---|---|---|---|---|---|---|---|")
    bounds = []
    totals: dict[str, list[float]] = {}
    for spec in args.runs:
        path, _, sigma_text = spec.rpartition(":")
        sigma = float(sigma_text)
        records = load(path)
        configs = policies(sigma, args.alpha, looks, args.single)
        n0 = sum(records[0]["selection"])
        grid_radii = grid_of(configs).schedule.radii
        model_bounds = {}
        for name in args.policies:
            label = name.endswith(", label mode")
            config = configs.get(name.removesuffix(", label mode"))
            if config is None:
                raise SmoothAdvError(f"unknown policy {name!r}")
            key, used_n0 = ("label_counts", 0) if label else ("counts", n0)
            ev = evaluate_policy(records, config, key, used_n0, grid_radii, args.n)
            if ev is None:
                print(f"| {Path(path).stem} | {len(records)} | {name} | too short to replay | | | | | |")
                continue
            asked = tuple(ev["asked"])
            if (asked, key, ev["selection"]) not in model_bounds:  # the bounds pay the policy's selection samples
                fixed = [fixed_row(r, args.n, args.alpha, sigma, key) for r in records]
                model_bounds[asked, key, ev["selection"]] = (
                    ev["fixed_cost"] / (ev["selection"] + clairvoyant_cost(records, fixed, asked, args.alpha, sigma)),
                    ev["fixed_cost"] / (ev["selection"] + wald_cost(records, asked, args.alpha, sigma, args.n, key)))
            clair, wald = model_bounds[asked, key, ev["selection"]]
            saving = ev["fixed_cost"] / ev["used"]
            total = totals.setdefault(name, [0.0, 0.0, 0.0, 0.0, 0.0])
            total[0] += ev["used"] * len(records)
            total[1] += ev["fixed_cost"] * len(records)
            total[2] += len(records)
            total[3] += ev["fixed_cost"] / clair * len(records)
            total[4] += ev["fixed_cost"] / wald * len(records)
            print(f"| {Path(path).stem} (sigma {sigma:g}) | {len(records)} | {name} | {ev['used']:,.0f} | "
                  f"{saving:.2f}x | {ev['max_diff']:.2f} | {ev['differ']} | {saving / clair:.0%} of {clair:.1f}x | "
                  f"{saving / wald:.0%} of {wald:.1f}x |")
        bounds.append((Path(path).stem, model_bounds))
    for name, (used, fixed_cost, count, clair_cost, wald_total) in totals.items():
        clair, wald = fixed_cost / clair_cost, fixed_cost / wald_total
        print(f"| all | {int(count)} | {name} | {used / count:,.0f} | {fixed_cost / used:.2f}x | | | "
              f"{fixed_cost / used / clair:.0%} of {clair:.1f}x | {fixed_cost / used / wald:.0%} of {wald:.1f}x |")
    print("\nclairvoyant bound: a single test, at the full alpha, of the largest asked radius fixed n certifies, seeing"
          " only agreeing votes (ln(1/alpha) / -ln Phi(r / sigma) samples). Wald bound: for each image, any level-alpha"
          " test that certifies radius r as often as fixed n does (probability pi at the image's vote rate p) needs on"
          " average at least kl(pi || alpha) / KL(p || Phi(r / sigma)) samples (Wald's inequality; the oracle knows p,"
          " pays nothing to rule out the next radius and is not attainable)")
    if args.ms_per_pass:
        cpu_time(totals, args.ms_per_pass, args.n)


def run_where(args: argparse.Namespace) -> None:
    """Where the samples go: images by kind, with the share of each method's samples they take and their mean
    samples per image against the Wald bound (`wald_cost`) for the same images."""
    looks = doubling_looks(*args.looks)
    records = load(args.trajectories)
    configs = policies(args.sigma, args.alpha, looks, args.single)
    n0 = sum(records[0]["selection"])
    names = args.policies
    radii = grid_of(configs).schedule.radii
    fixed = [fixed_row(r, args.n, args.alpha, args.sigma) for r in records]
    used = {}
    for name in names:
        tests = replay_all(configs[name], [dict(zip(r["sizes"], r["counts"])) for r in records])
        if tests is None:
            raise SmoothAdvError(f"trajectories too short to replay {name!r}")
        used[name] = np.array([n0 + t.n for t in tests])
    asked = {name: radii if len(configs[name].schedule.radii) > 1 else configs[name].schedule.radii for name in names}
    kinds: dict[str, list[int]] = {}
    from scipy.stats import norm

    for i, (record, (prediction, _)) in enumerate(zip(records, fixed)):
        p = record["counts"][-1] / record["sizes"][-1]
        qs = [float(norm.cdf(r / args.sigma)) for r in asked[names[0]]]
        z = min(abs(p - q) / math.sqrt(q * (1 - q) / args.n) for q in qs)
        if prediction == ABSTAIN:
            kind = "fixed n abstains"
        elif prediction != record["label"]:
            kind = "fixed n certifies a wrong class (not in the table)"
        elif record["counts"][-1] == record["sizes"][-1]:
            kind = f"every vote agrees (all {record['sizes'][-1]:,})"
        elif z < 10:
            kind = "vote rate within 10 standard errors (at n) of a radius's threshold"
        else:
            kind = "other certified"
        kinds.setdefault(kind, []).append(i)
    print(f"{args.trajectories}: {len(records)} images, sigma {args.sigma:g}, radii {list(asked[names[0]])}; "
          f"selection mode (n0 = {n0} per image)")
    print("\n| images | share | " + " | ".join(f"{name}: share of samples, mean / image" for name in names)
          + " | Wald bound, mean / image |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for kind, members in sorted(kinds.items(), key=lambda item: -len(item[1])):
        sub = [records[i] for i in members]
        wald = n0 + wald_cost(sub, asked[names[0]], args.alpha, args.sigma, args.n)
        cells = " | ".join(f"{used[name][members].sum() / used[name].sum():.0%}, {used[name][members].mean():,.0f}"
                           for name in names)
        print(f"| {kind} | {len(members) / len(records):.0%} ({len(members)}) | {cells} | {wald:,.0f} |")
    wald = n0 + wald_cost(records, asked[names[0]], args.alpha, args.sigma, args.n)
    print(f"| all | 100% ({len(records)}) | " + " | ".join(f"100%, {used[name].mean():,.0f}" for name in names)
          + f" | {wald:,.0f} |")


def wald_cost(records: list[dict], radii: Sequence[float], alpha: float, sigma: float, n: int,
              key: str = "counts") -> float:
    """Mean estimation samples that any level-alpha sequential test needs to certify what fixed n certifies, by
    Wald's inequality: a test that rejects H0: p <= q (q = Phi(r / sigma)) with probability at most alpha at
    p = q and with probability pi at the true p takes on average at least kl(pi || alpha) / KL(p || q)
    samples (data processing: E_p[N] KL(p || q) = E_p[log LR_N] >= kl(pi || alpha)). For each image, p is its
    trajectory's vote rate, pi fixed n's probability of certifying r with the right class; the bound is the
    largest over the radii (0 for a radius fixed n certifies with probability <= alpha)."""
    from scipy.stats import binom, norm

    from smoothadv.validity import clopper_pearson_lower_all

    lower = clopper_pearson_lower_all(n, alpha)
    needs = []
    for r in radii:
        q = float(norm.cdf(r / sigma))
        needs.append((q, int(np.searchsorted(lower, q, side="right" if r == 0 else "left"))))

    def kl(a: float, b: float) -> float:
        return sum(x * math.log(x / y) for x, y in ((a, b), (1 - a, 1 - b)) if x > 0)

    costs = []
    for record in records:
        p = record[key][-1] / record["sizes"][-1]
        right = key == "label_counts" or record["class"] == record["label"]
        best = 0.0
        for q, k in needs:
            pi = float(binom.sf(k - 1, n, p)) if right and k <= n else 0.0
            if pi > alpha and p > q:
                best = max(best, kl(min(pi, 1 - 1e-15), alpha) / kl(p, q))
        costs.append(best)
    return float(np.mean(costs))


def clairvoyant_cost(records: list[dict], fixed: list[tuple[int, float]], radii: Sequence[float], alpha: float,
                     sigma: float) -> float:
    """Mean estimation samples of a test that knows each input's answer: certifying radius r needs at least
    ln(1/alpha) / -ln Phi(r / sigma) samples even when all of them agree (every level-alpha bound is at most
    alpha^(1/N) then); r is the largest grid radius fixed n certifies with the right class (0: nothing)."""
    from scipy.stats import norm

    need = []
    for (prediction, radius), record in zip(fixed, records):
        top = max((r for r in radii if r > 0 and prediction == record["label"] and radius >= r), default=0.0)
        need.append(math.log(alpha) / math.log(float(norm.cdf(top / sigma))) if top > 0 else 0.0)
    return float(np.mean(need))


def expected_accuracy(records: list[dict], config: SequentialConfig, radii: Sequence[float], n: int, alpha: float,
                      reps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Expected certified accuracy at `radii` of fixed-n CERTIFY (exact binomial tails) and of the sequential
    policy (Monte Carlo, `reps` runs per image), if each image's vote rate for its selected class were the rate
    its trajectory shows. Their difference is the systematic part of the table difference; the rest is noise."""
    from scipy.stats import binom, norm

    from smoothadv.validity import clopper_pearson_lower_all

    lower = clopper_pearson_lower_all(n, alpha)
    need = [int(np.searchsorted(lower, max(0.5 + 1e-12, float(norm.cdf(r / config.sigma))))) for r in radii]
    rng = np.random.default_rng(seed)
    fixed, sequential = np.zeros(len(radii)), np.zeros(len(radii))
    steps = np.diff((0, *config.schedule.looks))
    for record in records:
        if record["class"] != record["label"]:
            continue  # both procedures certify the selected class: wrong for either
        p = record["counts"][-1] / record["sizes"][-1]
        fixed += [float(binom.sf(k - 1, n, p)) if k <= n else 0.0 for k in need]
        for _ in range(reps):
            draws = rng.binomial(steps, p)
            test = SequentialTest(config)
            while test.next_draw() > 0:
                test.update(int(draws[test.look]))
            result = test.result()
            sequential += [result.certified and result.radius >= r for r in radii]
    return fixed / len(records), sequential / (reps * len(records))


def run_bias(args: argparse.Namespace) -> None:
    configs = policies(args.sigma, args.alpha, doubling_looks(*args.looks), args.single)
    config = grid_of(configs)
    records = load(args.trajectories)
    if not records:
        raise SmoothAdvError(f"{args.trajectories} has no records")
    realized = evaluate_policy(records, config, "counts", sum(records[0]["selection"]), config.schedule.radii, args.n)
    if realized is None:
        raise SmoothAdvError("trajectories too short to replay the grid policy")
    fixed, sequential = expected_accuracy(records, config, config.schedule.radii, args.n, args.alpha, args.reps,
                                          args.seed)
    print(f"{args.trajectories}: {len(records)} images, grid policy, {args.reps} simulated runs per image")
    print("\n| radius | expected fixed n (%) | expected sequential (%) | expected difference (pp) | realized (pp) |")
    print("|---|---|---|---|---|")
    for r, a, b, d in zip(config.schedule.radii, fixed, sequential, realized["signed"]):
        print(f"| {r:g} | {100 * a:.2f} | {100 * b:.2f} | {100 * (b - a):+.2f} | {d:+.2f} |")


def run_check(args: argparse.Namespace) -> None:
    """Compare the rows of a `smoothadv certify --mode sequential` TSV with the replay of a policy on the
    trajectories (same model, seed, sigma and alpha): the end-to-end check that the recorded counts are the
    CLI's."""
    config = policies(args.sigma, args.alpha, doubling_looks(*args.looks), args.single).get(args.policy)
    if config is None:
        raise SmoothAdvError(f"unknown policy {args.policy!r}")
    records = {r["idx"]: r for r in load(args.trajectories, args.selection)}
    results = load_results(args.tsv)
    header, rows = read_tsv(args.tsv)
    columns = header.split("\t")
    if results.samples is None or results.radius is None or "mode" not in columns:
        raise SmoothAdvError(f"{args.tsv} is not a sequential certify TSV")
    modes = [row[columns.index("mode")] for row in rows]
    bad, checked = [], 0
    for idx, n, predict, radius, mode in zip(results.idx.tolist(), results.samples.tolist(),
                                             results.predict.tolist(), results.radius.tolist(), modes):
        label_mode = mode.endswith("/label")
        record = records.get(idx)
        if record is None:
            continue
        key, chosen, selection = tested(record, config, "label_counts" if label_mode else "counts")
        test = replay(config, dict(zip(record["sizes"], record[key])))
        if test is None:
            raise SmoothAdvError(f"trajectory of image {idx} is too short for policy {args.policy!r}")
        result = test.result()
        used = selection + result.n
        certified = chosen if result.certified else ABSTAIN
        checked += 1
        if (n, predict) != (used, certified) or abs(radius - result.radius) > 2e-6:
            bad.append(f"image {idx}: TSV (n {n}, predict {predict}, radius {radius:.4f}), replay (n {used}, "
                       f"predict {certified}, radius {result.radius:.4f})")
    if not checked:
        raise SmoothAdvError(f"no row of {args.tsv} has a trajectory in {args.trajectories}")
    if bad:
        raise SmoothAdvError(f"{len(bad)} of {checked} rows differ from the replay; first: {bad[0]}")
    print(f"{checked} rows of {args.tsv} equal the replay of policy {args.policy!r} (samples used, class, radius)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("sample", "selection", "table", "summary", "check", "bias", "where", "gather"):
        p = sub.add_parser(name)
        if name == "gather":
            p.add_argument("out", help="the trajectory file the parts are folded into (created if missing)")
            p.add_argument("parts", nargs="+", help="`sample --part` output files (removed once folded in)")
            continue
        if name == "summary":
            p.add_argument("runs", nargs="+", metavar="FILE:SIGMA", help="trajectory files and their sigma")
            p.add_argument("--policies", nargs="+", default=[
                "grid", "betting grid", "grid, label mode", "betting grid, label mode", "radius 0.5",
                "betting radius 0.5", "radius 0.5, label mode", "betting radius 0.5, label mode"],
                           help="replayed policies; \", label mode\" tests the label (no selection samples)")
            p.add_argument("--ms-per-pass", type=float, default=0.0,
                           help="also give CPU-s per image at this many CPU-ms per forward pass (0: no)")
        elif name in ("sample", "selection"):
            if name == "sample":
                p.add_argument("checkpoint")
                p.add_argument("--out", required=True, help="JSON-lines output (appended; resumes)")
                p.add_argument("--skip", type=int, default=20)
                p.add_argument("--max", type=int, default=500)
                p.add_argument("--n0", type=int, default=100)
                p.add_argument("--part", type=_part, default=(1, 1), metavar="I/N",
                               help="record only the I-th of every N selected images (N processes, one core each, "
                               "each with its own --out; `gather` folds their files into one)")
                p.add_argument("--also", action="append", default=[], metavar="FILE",
                               help="images this trajectory file holds count as recorded (repeatable)")
            else:
                p.add_argument("trajectories")
                p.add_argument("checkpoint")
                p.add_argument("--out", required=True, help="JSON lines: selection votes every --chunk samples")
                p.add_argument("--chunk", type=int, default=16)
            p.add_argument("--batch", type=int, default=256, help="a divisor of the first look keeps the CLI's noise")
            p.add_argument("--group", type=int, default=8, help="images sampled together")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--device", default="cpu")
            p.add_argument("--data-dir", default=None)
            p.add_argument("--channels-last", action="store_true")
            p.add_argument("--denoiser", default=None, help="certify f o D, as certify --denoiser (a denoiser "
                           "checkpoint or a diffusion model's directory)")
        elif name == "check":
            p.add_argument("trajectories")
            p.add_argument("--tsv", required=True, help="a `smoothadv certify --mode sequential` TSV of the same model")
            p.add_argument("--policy", default="grid", help="the replayed policy the TSV ran (default: grid)")
            p.add_argument("--selection", default=None, help="selection votes of `selection` (default: "
                           "selection_X.jsonl beside vs_fixed_X.jsonl, if there)")
        elif name == "where":
            p.add_argument("trajectories")
            p.add_argument("--policies", nargs="+", default=["grid", "betting grid"], help="replayed policies")
        elif name == "bias":
            p.add_argument("trajectories")
            p.add_argument("--reps", type=int, default=200, help="simulated sequential runs per image")
            p.add_argument("--seed", type=int, default=0)
        else:
            p.add_argument("trajectories")
            p.add_argument("--radii", type=float, nargs="+", default=None, help="table radii (default: the grid's)")
            p.add_argument("--policies", nargs="+", default=None, help="the rows of these replayed policies only "
                           "(default: every policy, in both modes)")
        if name != "summary":
            p.add_argument("--sigma", type=float, required=True)
        p.add_argument("--alpha", type=float, default=0.001)
        p.add_argument("--n", type=int, default=100_000, help="fixed-n CERTIFY's estimation samples")
        p.add_argument("--looks", type=int, nargs=2, default=(DEFAULT_LOOKS[0], DEFAULT_LOOKS[-1]),
                       metavar=("FIRST", "LAST"))
        p.add_argument("--single", type=float, nargs="*", default=[0.5], help="single radii replayed")
    args = parser.parse_args(argv)
    if args.command not in ("summary", "gather") and (math.isnan(args.sigma) or args.sigma <= 0):
        parser.error("--sigma must be > 0")
    try:
        {"sample": run_sample, "selection": run_selection, "table": run_table, "summary": run_summary,
         "check": run_check, "bias": run_bias, "where": run_where, "gather": run_gather}[args.command](args)
    except SmoothAdvError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
