"""Command line of the signattention package: one section per mode, each opening with its entry point.

    python run.py poses PATH [--out data/NAME] [--annotations ann.csv] [--workers N] [--shard K/N]
    python run.py train                      # synthetic GSL, default model, about 1.5 minutes on 2 CPU cores
    python run.py train --preset signattention
    python run.py train --data PATH [--format gsl|pose|signjoey] [--signcl 0.01]
    python run.py train --resume runs/<name>
    python run.py eval runs/<name> [--split test]
    python run.py extract [RUN] [--methods all]   # attention maps, CTC posteriors and every relevance method
    python run.py bench [RUN] [--limit 20]        # batched explanations vs the per-token loop
    python run.py bench --recipes                 # the default training recipe against the previous one
    python run.py plot [RUN] --sample N | --all   # the SignAttention figures
    python run.py view [RUN] [--limit K]          # one offline HTML file: samples, signer, every method
    python run.py perturb [RUN] [--level token|sentence] [--perturb-mode mask|zero] [--limit K]

Every mode is a function of one configuration dataclass, which is also its command line: each field's help
and range sit in its metadata, from which the parser at the end of this file is built. A mode runs from
Python as it runs from the shell:

    import run
    run.train(run.TrainConfig(data="data/synthetic_gsl", overrides=dict(epochs=5, signcl=0.01)))
    run.extract(run.ExtractConfig(run="runs/<name>", methods="generic,lrp", limit=20))

The sections: configuration and what the modes share, then poses, train, eval, extract, bench, plot, view,
perturb, and the command line. This is the only module that parses arguments, lays out run folders and
prints progress.
"""
import argparse
import base64
import contextlib
import csv
import functools
import hashlib
import importlib.util
import io
import json
import math
import multiprocessing
import os
import re
import sys
import time
import types
import typing
import zlib
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

import numpy as np
import torch

import explain
import signattention as sa
from sign_cl import sdr
from signattention import option

# ----------------------------------------------------------------------------------------------------
# Configuration: one dataclass per mode, which is its command line
# ----------------------------------------------------------------------------------------------------

SYNTHETIC = os.path.join("data", "synthetic_gsl")
SYNTHETIC_FULL = os.path.join("data", "synthetic_gsl_full")       # GSL's size (sa.SYNTHETIC_SIZES["gsl"])
GENERATED = {SYNTHETIC: "default", SYNTHETIC_FULL: "gsl"}         # data folders generated on first use
METRICS = ("bleu4", "accuracy", "wer", "ce")         # validation metrics a run can select or stop on
LOWER_IS_BETTER = ("wer", "ce")
DEVICES = ("auto", "cpu", "cuda")
SEEDS = dict(low=0, high=2 ** 63 - 1)
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class Recipe:
    """How a model is trained, evaluated and selected: the "train" section of a run's configuration (beside
    signattention's DataConfig and ModelConfig), saved in config.json and every checkpoint."""
    epochs: int = option(14, "training epochs", low=1)
    batch_size: int = option(16, "samples per batch", low=1)
    lr: float = option(2e-3, "peak learning rate (AdamW)", low=0.0, open_low=True)
    weight_decay: float = option(0.01, "AdamW weight decay", low=0.0)
    warmup_epochs: int = option(1, "epochs of linear learning-rate warm-up", low=0)
    schedule: str = option("cosine", "learning rate after warm-up", choices=("cosine", "constant"))
    label_smoothing: float = option(0.1, "label smoothing of the decoder's cross-entropy", low=0.0, high=0.99)
    ctc_weight: float = option(2.0, "weight of the CTC gloss loss on the encoder (0: no gloss head)", low=0.0)
    signcl: float = option(0.0, "weight of the SignCL loss on the encoder's frame features (e.g. 0.01)", low=0.0)
    grad_clip: float = option(1.0, "largest gradient norm (0: no clipping)", low=0.0)
    micro_batch: int = option(0, "samples per forward pass: each batch is cut into length-sorted parts of this "
                              "size whose losses add up to the batch's, one optimizer step (less padding; 0: "
                              "the whole batch; with --signcl, short clips' anchors then weigh more)", low=0)
    batching: str = option("pooled", "training batches: pooled (drawn from length-sorted pools of 16 batches, "
                           "little padding) or shuffled (a plain random permutation)", choices=("pooled", "shuffled"))
    select: str = option("bleu4", "validation metric that picks the best checkpoint (ce: the decoder's "
                         "teacher-forced cross-entropy)", choices=METRICS)
    stop_on: str = option("", "validation metric early stopping watches (default: --select's)", choices=METRICS)
    patience: int = option(0, "early stopping after this many epochs without improvement (0: off)", low=0)
    beam: int = option(4, "beam size of the final evaluation (1: greedy)", low=1)
    alpha: float = option(1.0, "length penalty exponent of the beam search", low=0.0)
    seed: int = option(0, "random seed of the initialisation, data order, augmentation and dropout", **SEEDS)


# Each preset names the values that differ from the dataclass defaults (DataConfig, ModelConfig, Recipe).
PRESETS = {
    # The default recipe, about three times faster than "previous" on the synthetic GSL for the same quality:
    # a third fewer frames (one in 3), no dropout (a quarter of a CPU step went to its masks), batches of 16
    # (twice the steps per epoch) at twice the rate, the CTC loss weighted twice, 14 epochs.
    "default": dict(data={}, model={}, train={}),
    # The default recipe before that (30 epochs of batches of 32 at 1e-3, one frame in 2, dropout 0.1):
    "previous": dict(data=dict(subsample=2), model=dict(dropout=0.1, pos_dropout=0.1),
                     train=dict(epochs=30, batch_size=32, lr=1e-3, warmup_epochs=2, ctc_weight=1.0)),
    # Dal Bianco, Stanchi et al. 2024, as pedroodb/sign_attention trains it (src/KeypointsTransformer.py,
    # LightningKeypointsTransformer.py, helpers.py, train.ipynb): nn.Transformer's post-LN layers with final
    # LayerNorms and Xavier initialisation, frames with nothing detected masked, Adam without gradient
    # clipping, the checkpoint of the lowest validation loss, early stopping on validation accuracy (a strict
    # improvement resets the patience), plainly shuffled batches (a DataLoader's shuffle=True: from length-
    # sorted pools this model learns the synthetic GSL to test BLEU-4 6, shuffled to 93), at most 1000 epochs
    # (Lightning's default; the reference sets none).
    # Departure kept: at evaluation a chunk gives its first frame (the reference draws a random one).
    "signattention": dict(
        data=dict(normalise=False, subsample=3, max_frames=220, max_tokens=20, target="gloss", augment=False,
                  mask_empty=True),
        model=dict(d_model=16, heads=8, encoder_layers=1, decoder_layers=1, feedforward=2048, embed_hidden=128,
                   dropout=0.2, pos_dropout=0.1, norm_first=False, final_norm=True, init="xavier"),
        train=dict(epochs=1000, batch_size=64, lr=1e-3, weight_decay=0.0, warmup_epochs=0, schedule="constant",
                   label_smoothing=0.0, ctc_weight=0.0, grad_clip=0.0, batching="shuffled", select="ce",
                   stop_on="accuracy", patience=30, beam=1)),
}
SECTIONS = dict(data=sa.DataConfig, model=sa.ModelConfig, train=Recipe)    # what train's options override


def parse_shard(text):
    """--shard K/N -> (K, N), 1 <= K <= N (a (K, N) pair is checked as its text)."""
    if isinstance(text, (list, tuple)):
        text = "/".join(map(str, text))
    if not isinstance(text, str):
        raise argparse.ArgumentTypeError(f"{text!r} is not K/N with 1 <= K <= N (e.g. 2/8)")
    k, slash, n = text.partition("/")
    if not (slash and k.isdecimal() and n.isdecimal() and 1 <= int(k) <= int(n)):
        raise argparse.ArgumentTypeError(f"{text!r} is not K/N with 1 <= K <= N (e.g. 2/8)")
    return int(k), int(n)


def parse_lengths(text):
    """--lengths 50,100,200 -> (50, 100, 200): video lengths in model frames, each at least 1 (a list or tuple
    of them is checked as its text)."""
    if isinstance(text, (list, tuple)):
        text = ",".join(map(str, text))
    if not isinstance(text, str):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of frame counts (e.g. 50,100,200)")
    parts = text.split(",")
    if not all(p.strip().isdecimal() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of frame counts >= 1 (e.g. 50,100,200)")
    return tuple(int(p) for p in parts)


@dataclass
class PosesConfig:
    """python run.py poses: real recordings into the dataset layout train reads, with MediaPipe Holistic."""
    path: str = option(MISSING, "a GSL or PHOENIX-2014-T tree, a folder of videos, or a folder of frame folders",
                       positional=True)
    out: str | None = option(None, "dataset folder to write (default: data/<name of the source folder>)")
    source: str | None = option(None, "what the folder holds (default: recognised from its files)",
                                choices=("gsl", "phoenix", "videos", "frames"))
    annotations: str | None = option(None, "videos and frame folders: a CSV with id,text,gloss,split (ids: the "
                                     "video file names without extension, or the frame folder names)", metavar="FILE")
    split_files: tuple = option((), "GSL: the split files (default: gsl_split_<protocol>_train/dev/test.csv found "
                                "under the folder)", nargs="+", metavar="FILE")
    text_file: str | None = option(None, "GSL: merged_continuous.csv (default: found under the folder)",
                                   metavar="FILE")
    protocol: str = option("SI", "GSL: signer-independent or signer-dependent split files", choices=("SI", "SD"))
    workers: int = option(CORES, "clips converted in parallel, one process each (default: the cores)", low=1)
    shard: tuple = option((1, 1), "convert only the K-th of N disjoint shards of the clips (N jobs, e.g. a SLURM "
                          "array)", parse=parse_shard, metavar="K/N")
    limit: int | None = option(None, "first K clips of the shard only", low=1)
    model_complexity: int = option(1, "MediaPipe Holistic's model; only 1 ships with mediapipe 0.10.21",
                                   choices=(0, 1, 2))
    skip_bad: bool = option(False, "skip bad annotation rows with a warning instead of stopping")


@dataclass
class TrainConfig:
    """python run.py train: a new run from a preset with some of its values overridden, or --resume of an
    interrupted run. `overrides` holds those values by field name ({"epochs": 5, "d_model": 64}): every field
    of sa.DataConfig, sa.ModelConfig and Recipe that has help is an option of its own (--epochs, --d-model)."""
    data: str = option(SYNTHETIC, f"dataset folder or signjoey prefix (default {SYNTHETIC}; it and {SYNTHETIC_FULL}, "
                       "the synthetic GSL at GSL's size, are generated if missing)")
    format: str = option("gsl", "dataset layout of --data: the GSL folder layout (poses/<id>.npy), the same with "
                         "pose-format .pose files, or signjoey feature pickles (see README)",
                         choices=("gsl", "pose", "signjoey"))
    preset: str = option("default", "configuration to start from; the options below override it (their defaults "
                         "are the default preset's)", choices=tuple(sorted(PRESETS)))
    out: str | None = option(None, "run folder (default: runs/<time>-<data>-<preset>)")
    resume: str | None = option(None, "continue an interrupted run from its last checkpoint (its configuration "
                                "holds; --epochs may extend it)", metavar="RUN")
    device: str = option("auto", "where to compute", choices=DEVICES)
    skip_bad: bool = option(False, "skip bad samples with a warning instead of stopping")
    overrides: dict = field(default_factory=dict)


@dataclass
class RunConfig:
    """What every mode that reads a trained run shares: the run, its data and the split."""
    run: str | None = option(None, "run folder (default: the most recent under runs/)", positional=True)
    data: str | None = option(None, "dataset folder (default: the run's)")
    split: str = option("test", "split to read", choices=sa.SPLITS)
    device: str = option("auto", "where to compute", choices=DEVICES)
    skip_bad: bool = option(False, "skip bad samples with a warning instead of stopping")


@dataclass
class EvalConfig(RunConfig):
    """python run.py eval: decode a split with a checkpoint and print its metrics."""
    checkpoint: str = option("best", "which checkpoint", choices=("best", "last"))
    beam: int | None = option(None, "beam size (default: the run's)", low=1)


@dataclass
class ExtractConfig(RunConfig):
    """python run.py extract: RUN/extract_<split>.pt, every attention map, the CTC posteriors and the relevance
    of every method for each sample."""
    methods: str = option("all", "comma-separated methods, or all")
    batch_size: int = option(16, "samples per batch", low=1)
    limit: int | None = option(None, "first K samples only", low=1)
    beam: int | None = option(None, "beam size of the decoding (default: the run's)", low=1)


@dataclass
class BenchConfig(RunConfig):
    """python run.py bench: batched explanations against the per-token loop, or (one of the flags) the
    perturbation tests, the training step, the cost against the video's length, or the two training recipes."""
    methods: str = option("all", "comma-separated methods, or all")
    batch_size: int = option(16, "samples per batch", low=1)
    limit: int = option(20, "first K samples only", low=1)
    perturb: bool = option(False, "time the token-level perturbation tests instead, against one forward per removal")
    train: bool = option(False, "time our training step against the same model on torch.nn.Transformer's layers")
    lengths: tuple = option((), "each method's seconds per token and peak memory for videos of these model frames "
                            "(given alone: 50,100,200,400,600)", nargs="?", const=(50, 100, 200, 400, 600),
                            parse=parse_lengths, metavar="T,T,...")
    recipes: bool = option(False, "train the default recipe and the previous one (--preset previous) one after the "
                           "other on --data (default: the synthetic GSL) and draw validation BLEU-4 against "
                           "wall-clock seconds")


@dataclass
class PlotConfig(RunConfig):
    """python run.py plot: the figures of one sample, or (all) the global analyses of the split."""
    sample: int = option(0, "index of the sample in the extraction", low=0)
    all: bool = option(False, "the global analyses over the whole split")
    animate: bool = option(False, "also a GIF of the skeleton with attention bars")
    figure_type: str = option("png", "figure file type", choices=("png", "pdf", "svg"))


@dataclass
class ViewConfig(RunConfig):
    """python run.py view: RUN/view_<split>.html, one offline page of every sample, token and method."""
    limit: int | None = option(None, "first K samples only", low=1)


@dataclass
class PerturbConfig(RunConfig):
    """python run.py perturb: perturbation tests (faithfulness) and the pointing game (plausibility)."""
    methods: str = option("all", "comma-separated methods, or all (random is always added)")
    level: str = option("token", "token: is each teacher-forced token still first; sentence: greedy decoding, "
                        "accuracy, BLEU", choices=("token", "sentence"))
    perturb_mode: str = option("mask", "mask: removed frames leave the encoder's key mask; zero: they are replaced "
                               "by zeros", choices=explain.MODES)
    limit: int | None = option(None, "first K samples only (a quick table)", low=1)
    bootstrap: int = option(1000, "bootstrap resamples of the 95% intervals", low=10, high=100000)
    seed: int = option(0, "seed of the tie-breaking and the bootstrap", **SEEDS)
    figure_type: str = option("png", "figure file type", choices=("png", "pdf", "svg"))


@dataclass
class ClaimsConfig:
    """python run.py claims: every claim of the four papers measured on trained models, with 95% intervals and
    a verdict by a rule fixed in explain.CLAIMS: OUT/claims.md and claims.json."""
    data: str = option(SYNTHETIC, f"dataset folder (default {SYNTHETIC}; it and {SYNTHETIC_FULL}, the synthetic GSL "
                       "at GSL's size, are generated if missing)")
    seeds: int = option(3, "trained models per configuration (seeds 0..N-1)", low=1)
    out: str | None = option(None, "folder of the claims' runs and tables (default runs/claims-<data folder name>)")
    only: str | None = option(None, "comma-separated claim keys (see claims.json): measure these, training only "
                              "what they need")
    limit: int | None = option(None, "first K test samples of each extraction and perturbation only", low=1)
    bootstrap: int = option(1000, "bootstrap resamples of the 95% intervals", low=10, high=100000)
    device: str = option("auto", "where to compute", choices=DEVICES)
    overrides: dict = field(default_factory=dict)          # from Python: train options of every run (tests)


def value_kind(f):
    """The Python type of a configuration field's values: int for `int | None`, and so on."""
    if typing.get_origin(f.type) in (typing.Union, types.UnionType):             # X | None, Optional[X]
        return next(t for t in typing.get_args(f.type) if t is not type(None))
    return f.type


def range_text(kind, meta):
    """A field's range in words: "an integer >= 1", "a number > 0.0", "in 10 .. 100000"."""
    if meta.get("high") is not None:
        return f"in {meta.get('low')} .. {meta['high']}"
    low = "" if meta.get("low") is None else f"{'>' if meta.get('open_low') else '>='} {meta['low']}"
    return f"{'an integer' if kind is int else 'a number'} {low}"


def out_of_range(value, kind, meta):
    """Why a numeric value breaks its field's range (low, high, open_low in its metadata), or None."""
    low, high = meta.get("low"), meta.get("high")
    if not math.isfinite(value) or (low is not None and (value <= low if meta.get("open_low") else value < low)) \
            or (high is not None and value > high):
        return f"{value} is not {range_text(kind, meta)}"
    return None


def check_field(f, value, name):
    """Refuse a value that the command line would refuse for field `f` (shown as `name`): DataError."""
    meta, kind = f.metadata, value_kind(f)
    if value is None or "help" not in meta or value == f.default:
        return
    if "parse" in meta:
        try:
            meta["parse"](value)
        except argparse.ArgumentTypeError as e:
            raise sa.DataError(f"{name}: {e}")
        return
    if "choices" in meta and value not in meta["choices"]:
        raise sa.DataError(f"{name} {value!r}: choose from {', '.join(map(str, meta['choices']))}")
    if kind in (int, float) and "choices" not in meta:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise sa.DataError(f"{name} {value!r}: not {'an integer' if kind is int else 'a number'}")
        why = out_of_range(value, kind, meta)
        if why:
            raise sa.DataError(f"{name}: {why}")


def check(cfg):
    """A mode's configuration checked as its command line checks it (choices and ranges), so that a mode called
    from Python refuses what the shell would; train's overrides name fields of its sections."""
    for f in fields(cfg):
        check_field(f, getattr(cfg, f.name), "--" + f.name.replace("_", "-"))
    overridable = {f.name: f for section in SECTIONS.values() for f in fields(section) if "help" in f.metadata}
    for name, value in getattr(cfg, "overrides", {}).items():
        if name not in overridable:
            raise sa.DataError(f"overrides: {name!r} is not an option of train (see python run.py train --help)")
        check_field(overridable[name], value, "--" + name.replace("_", "-"))


# ----------------------------------------------------------------------------------------------------
# What the modes share: progress, processes, devices, files, data, and a trained run opened
# ----------------------------------------------------------------------------------------------------

def log(message):
    """Progress for the user: printed by the first process only when torchrun starts several."""
    if WORLD.main:
        print(message, flush=True)


class World:
    """This process among the ones torchrun started (RANK, WORLD_SIZE, LOCAL_RANK); without torchrun, rank 0
    of 1, and every method below is what one process would do."""

    def __init__(self):
        self.rank, self.size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.local = int(os.environ.get("LOCAL_RANK", 0))
        self.main = self.rank == 0

    def start(self, device):
        """Join the process group (nccl on CUDA, gloo on the CPU) once; returns this process's device."""
        if self.size > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda" and self.size > 1:
            device = torch.device("cuda", self.local)
            torch.cuda.set_device(device)
        return device

    def mine(self, items):
        """This process's share: every size-th item from the rank-th on."""
        return items[self.rank::self.size]

    def gather(self, obj):
        """Every process's `obj`, in rank order, on every process."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def first(self, obj):
        """The first process's `obj` on every process (a run folder named by the clock, say)."""
        return self.gather(obj)[0]

    def wait(self):
        """Until every process has come this far (the first one has written what the others read)."""
        if self.size > 1:
            torch.distributed.barrier()


WORLD = World()


def device_of(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise sa.DataError("--device cuda: no CUDA device is available")
    return WORLD.start(torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                                    ("cpu" if name == "auto" else name)))


def to_device(batch, device):
    """A batch's tensors on the device."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def format_time(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def write_text(path, text):
    """Write a UTF-8 text file atomically: a reader sees the old file or the new one, never a part."""
    sa.atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def csv_text(rows):
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False))


class Ticker:
    """A long loop's progress: `label: N% (note)  ETA`, printed every 10 seconds, and when done if it printed
    before (a short loop stays quiet). Units are whatever the caller counts (tokens, frames, steps); the time
    left assumes the units still to come cost what the done ones did."""

    def __init__(self, label, total):
        self.label, self.total, self.done = label, max(total, 1), 0
        self.start = self.printed = time.time()

    def __call__(self, amount=1, note=""):
        self.done += amount
        now = time.time()
        if (self.done >= self.total and self.printed > self.start) or now - self.printed >= 10:
            eta = (now - self.start) / max(self.done, 1e-9) * max(self.total - self.done, 0)
            log(f"{self.label}: {min(100, 100 * self.done / self.total):3.0f}%" + (f" ({note})" if note else "")
                + f"  ETA {format_time(eta)}")
            self.printed = now


def is_better(metric, value, best):
    """Whether a validation value beats the best so far (None: nothing yet); wer and ce are lower-is-better."""
    return best is None or (value < best if metric in LOWER_IS_BETTER else value > best)


def best_of(metric, values):
    """The best of a metric's values by is_better (None for none)."""
    best = None
    for value in values:
        best = value if is_better(metric, value, best) else best
    return best


def ensure_data(path):
    """The synthetic GSL (SYNTHETIC, or SYNTHETIC_FULL at GSL's size) is generated on first use, when its folder
    does not exist."""
    size = GENERATED.get(os.path.normpath(path)) if path else None
    if size and not os.path.exists(os.path.join(path, "annotations.csv")):
        start = time.time()
        log(f"generating the synthetic GSL{' at GSL size' if size == 'gsl' else ''} into {path} ...")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        sa.generate_synthetic_gsl(path, workers=CORES, **sa.SYNTHETIC_SIZES[size])
        log(f"generated the synthetic GSL in {time.time() - start:.1f}s")
    elif size and os.path.exists(os.path.join(path, "metadata.json")):
        with open(os.path.join(path, "metadata.json"), encoding="utf-8") as f:
            if json.load(f).get("generator") != sa.SYNTHETIC_GENERATOR:
                log(f"warning: {path} was generated by an earlier version of the package (other data than the "
                    f"README's numbers come from): delete the folder to generate it again")


def read_data(path, data_cfg, splits, skip_bad):
    """({split: records}, alignments): the samples of the splits (bad ones skipped with a warning when
    `skip_bad`, else the first stops the command), and the rows of alignments.csv checked against them now,
    before any work ({} without the file)."""
    skipped = []

    def on_bad(message):
        skipped.append(message)
        log(f"warning: skipping bad sample: {message}")

    records = sa.load_records(path, data_cfg, splits, on_bad if skip_bad else None)
    if skipped:
        log(f"warning: skipped {len(skipped)} bad sample(s)")
    alignments = sa.read_alignments(path, data_cfg.format, samples_of(records), log)
    by_split = {s: [r for r in records if r.split == s] for s in splits}
    for s in splits:
        if not by_split[s]:
            raise sa.DataError(f"{path}: no samples in the {s} split")
    return by_split, alignments


def samples_of(records):
    """{id: (glosses, frames)} of the records read, which their rows of alignments.csv are checked against."""
    return {r.id: (r.gloss, len(r.frames)) for r in records}


def sdr_segments(alignments, recipe):
    """Where SDR's frame labels come from: the true gloss segments where alignments.csv gave some, else {} (the
    CTC Viterbi path of the gloss head) when the run trained one, else None (no SDR)."""
    return alignments if alignments else ({} if recipe.ctc_weight > 0 else None)


def latest_run(root="runs"):
    runs = [os.path.join(root, d) for d in os.listdir(root)] if os.path.isdir(root) else []
    runs = [r for r in runs if os.path.exists(os.path.join(r, "best.pt"))]
    if not runs:
        raise sa.DataError(f"{root}/: no trained run found (run `python run.py train` first)")
    return max(runs, key=lambda r: os.path.getmtime(os.path.join(r, "best.pt")))


def run_config(run_dir):
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)


@dataclass
class TrainedRun:
    """A trained run opened by a mode: its folder, a checkpoint, the model on the device, and one split of the
    data (--data, else the run's) with the run's vocabularies and its checked alignments."""
    dir: str
    state: dict                  # the checkpoint: model, optimizer, config, gloss_vocab, text_vocab, epoch, history
    recipe: Recipe
    model: torch.nn.Module
    split: str
    dataset: sa.SignDataset
    alignments: dict             # {id: [(position, gloss, start, end)]} of the split's samples; {} without the file
    device: torch.device
    data_path: str

    @property
    def epoch(self):
        return self.state["epoch"]


def open_run(cfg, checkpoint="best"):
    """The TrainedRun a RunConfig names: cfg.run (default the latest), its `checkpoint`, cfg.split of the data."""
    device = device_of(cfg.device)
    run_dir = cfg.run or latest_run()
    state = sa.load_checkpoint(os.path.join(run_dir, f"{checkpoint}.pt"), device)
    config = state["config"]
    data_path = cfg.data or config["data_path"]
    ensure_data(data_path)
    data_cfg = sa.DataConfig(**config["data"])
    records, alignments = read_data(data_path, data_cfg, (cfg.split,), cfg.skip_bad)
    model = sa.model_from_checkpoint(state, device)
    dataset = sa.SignDataset(records[cfg.split], data_cfg, sa.Vocabulary.from_list(state["gloss_vocab"]),
                             sa.Vocabulary.from_list(state["text_vocab"]))
    return TrainedRun(run_dir, state, Recipe(**config["train"]), model, cfg.split, dataset, alignments, device,
                      data_path)


def method_list(text):
    methods = list(explain.METHODS) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in explain.METHODS]
    if unknown:
        raise sa.DataError(f"--methods: unknown method(s) {', '.join(unknown)} (choose from all, "
                           f"{', '.join(explain.METHODS)})")
    return methods


def segment_sources(data_path, layout, target, alignments=None):
    """(alignments, links): the true gloss segments of the data (alignments.csv, read and checked here unless
    given; {} without the file) and, for a text decoder with segments, the word-gloss links of the data's
    training split that tell which word realises which gloss (else None)."""
    if alignments is None:
        alignments = sa.read_alignments(data_path, layout, log=log)
    links = None
    if alignments and target == "text":
        links = sa.gloss_links([(g, t) for _, split, g, t in sa.read_annotations(data_path) if split == "train"])
    return alignments, links


# ----------------------------------------------------------------------------------------------------
# Poses: real recordings into the SignAttention layout, with MediaPipe Holistic
# ----------------------------------------------------------------------------------------------------

def poses(cfg):
    """Convert a source folder into the dataset layout: metadata.json, poses/<id>.npy per clip (skipping clips
    whose pose file is complete), failures.csv (id, file, reason; one per shard), and annotations.csv of the
    clips converted so far (with shards: by all of them). Returns 1 when a clip could not be read."""
    check(cfg)
    if cfg.model_complexity != 1:
        raise sa.DataError(f"--model-complexity {cfg.model_complexity}: mediapipe 0.10.21 ships only the model of "
                           "complexity 1 (0 and 2 would be downloaded, which this package never does)")
    if importlib.util.find_spec("mediapipe") is None:            # an optional install
        raise sa.DataError(f"python run.py poses needs MediaPipe, an optional install: {sa.POSES_INSTALL}")
    source = cfg.source or sa.detect_source(cfg.path)
    skipped = []

    def on_bad(message):
        skipped.append(message)
        log(f"warning: skipping a bad annotation row: {message}")

    clips = sa.import_clips(cfg.path, source, cfg.annotations, cfg.split_files, cfg.text_file, cfg.protocol,
                            on_bad if cfg.skip_bad else None)
    out = cfg.out or os.path.join("data", os.path.basename(os.path.normpath(cfg.path)))
    os.makedirs(os.path.join(out, "poses"), exist_ok=True)
    sa.remove_stale_temporaries(os.path.join(out, "poses"))
    write_json(os.path.join(out, "metadata.json"), dict(
        name=os.path.basename(os.path.normpath(cfg.path)), source=source, source_path=os.path.abspath(cfg.path),
        keypoints="MediaPipe Holistic: 33 pose, 468 face, 21 left hand, 21 right hand; x, y in image units, z "
                  "as given; NaN where a part was not detected", mediapipe=sa.mediapipe_version(),
        holistic=sa.HOLISTIC, fps={"gsl": 30, "phoenix": 25}.get(source), aspect=frame_aspect(clips)))
    k, n = cfg.shard
    mine = shard_of(clips, cfg.shard)[:cfg.limit]
    todo = [c for c in mine if not sa.pose_file_complete(os.path.join(out, "poses", c.id + ".npy"))]
    log(f"{source} source {cfg.path}: {len(clips)} clips" + (f", shard {k}/{n}: {len(mine)}" if n > 1 else "")
        + f"; {len(mine) - len(todo)} already converted, {len(todo)} to convert with "
        f"{min(cfg.workers, max(1, len(todo)))} worker(s) into {out}")
    failures = convert_clips(todo, out, cfg.workers)
    name = "failures.csv" if n == 1 else f"failures_{k}of{n}.csv"
    write_text(os.path.join(out, name), csv_text([["id", "file", "reason"]] + failures))
    listed = write_annotations(out, clips)
    log(f"{out}/annotations.csv lists the {listed} of {len(clips)} clips converted so far"
        + (f" ({len(skipped)} bad annotation rows skipped)" if skipped else ""))
    if failures:
        log(f"{len(failures)} of {len(todo)} clips failed: see {os.path.join(out, name)}")
        return 1
    return 0


def shard_of(clips, shard):
    """Shard (k, n): every n-th clip of the id-sorted list from the k-th on, so the n shards are disjoint,
    cover every clip once and mix long and short recordings alike on every machine."""
    k, n = shard
    return sorted(clips, key=lambda c: c.id)[k - 1::n]


def frame_aspect(clips):
    """Width / height of the first readable clip's frames (the viewer draws x and y, fractions of the
    image's sides, at this ratio); None if no clip can be read."""
    for clip in clips[:10]:
        try:
            height, width = next(iter(sa.read_frames(clip.path))).shape[:2]
            return round(width / height, 4)
        except (sa.DataError, OSError, StopIteration):
            continue
    return None


def write_annotations(out, clips):
    """annotations.csv of the clips whose pose file is complete, in the source's order; written until it
    lists what is on disk, so that of shards finishing together the last to write lists every clip."""
    written = None
    while True:
        done = [c for c in clips if sa.pose_file_complete(os.path.join(out, "poses", c.id + ".npy"))]
        if done == written:
            return len(done)
        write_text(os.path.join(out, "annotations.csv"), csv_text(
            [["id", "text", "gloss", "split"]] + [[c.id, c.text, c.gloss, c.split] for c in done]))
        written = done


def convert_clips(clips, out, workers):
    """Run sa.convert_clip over the clips, `workers` processes at a time, printing frames per second and the
    time left; returns the failures as [id, file, reason] rows."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    failures, frame_count, start, printed, done = [], 0, time.time(), 0.0, 0
    pool = None
    if workers > 1 and len(clips) > 1:
        pool = ProcessPoolExecutor(min(workers, len(clips)), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=worker_init, initargs=(os.getpid(),))
        results = pool.map(sa.convert_clip, clips, [out] * len(clips))
    else:
        results = (sa.convert_clip(c, out) for c in clips)
    try:
        for sid, count, failure in results:
            done, frame_count = done + 1, frame_count + count
            if failure:
                failures.append([sid, *failure])
                log(f"failed: {sid}: {failure[0]}: {failure[1]}")
            spent = time.time() - start
            if done == len(clips) or time.time() - printed >= 10:
                printed = time.time()
                log(f"poses: {done}/{len(clips)} clips  {frame_count} frames  {frame_count / spent:.1f} frames/s  "
                    f"ETA {format_time(spent / done * (len(clips) - done))}")
    except BrokenProcessPool:                                  # a worker died (out of memory, say)
        failures += [[c.id, c.path, "its worker process died"] for c in clips[done:]]
        log(f"a worker process died: {len(clips) - done} clips not converted (a re-run retries them)")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return failures


def worker_init(parent):
    """In each worker: Ctrl-C is the parent's to handle, and the worker ends when the parent is gone (killed
    with -9, say) instead of converting on for nobody."""
    import signal
    import threading
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


# ----------------------------------------------------------------------------------------------------
# Train
# ----------------------------------------------------------------------------------------------------

def train(cfg):
    """Train a model: a new run from cfg's preset and overrides (or the run cfg.resume names), one epoch after
    another, each checkpointed (last.pt, and best.pt by the recipe's validation metric); then the best
    checkpoint evaluated on val and test (results.json, translations.csv). Under torchrun each process
    takes a share of every batch (see train_epoch)."""
    check(cfg)
    device = device_of(cfg.device)
    run_dir, config, state = run_to_start(cfg, device)
    recipe, data_path = Recipe(**config["train"]), config["data_path"]
    if WORLD.main:
        ensure_data(data_path)
    WORLD.wait()
    start = time.time()
    records, alignments = read_data(data_path, sa.DataConfig(**config["data"]), sa.SPLITS, cfg.skip_bad)
    torch.manual_seed(recipe.seed)
    model, datasets, gloss_vocab, text_vocab = sa.build_model(config, records)
    model.to(device)
    optimizer = optimizer_for(model, recipe)
    history = []
    if state is not None:
        if state["gloss_vocab"] != gloss_vocab.itos or state["text_vocab"] != text_vocab.itos:
            raise sa.DataError(f"{data_path}: the training split changed since {run_dir} began (vocabulary differs)")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = state["history"]
    if WORLD.main:
        os.makedirs(run_dir, exist_ok=True)
        write_json(os.path.join(run_dir, "config.json"), config)
    log(f"run {run_dir}: {sum(len(r) for r in records.values())} samples "
        f"({', '.join(f'{s} {len(r)}' for s, r in records.items())}) read in {time.time() - start:.1f}s, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, device {device}"
        + (f", {WORLD.size} processes" if WORLD.size > 1 else ""))
    fit(run_dir, config, recipe, model, optimizer, datasets, (gloss_vocab, text_vocab), history, device)
    WORLD.wait()                                         # best.pt is written
    report(run_dir, datasets, recipe, device, alignments)
    log(f"done in {format_time(time.time() - start)}; run folder {run_dir}")


def run_to_start(cfg, device):
    """(run folder, configuration, last checkpoint or None): the run cfg.resume names, or a new one from the
    preset and the overrides, in a folder that holds no run yet. The configuration records the processes."""
    if cfg.resume:
        state = sa.load_checkpoint(os.path.join(cfg.resume, "last.pt"), device)
        config = dict(state["config"], world_size=WORLD.size)
        if "epochs" in cfg.overrides:
            config["train"]["epochs"] = cfg.overrides["epochs"]
        log(f"resuming {cfg.resume} after epoch {state['epoch']}")
        return cfg.resume, config, state
    config = dict(resolve_config(cfg), world_size=WORLD.size)
    run_dir = WORLD.first(cfg.out or new_run_dir(config))        # a new run's name has the first process's time
    if os.path.exists(os.path.join(run_dir, "last.pt")):
        raise sa.DataError(f"{run_dir}: already holds a run (continue it with --resume {run_dir}, or pick another --out)")
    return run_dir, config, None


def resolve_config(cfg):
    """The preset's sections, with cfg.overrides on top: {data, model, train, data_path, preset}."""
    preset = PRESETS[cfg.preset]
    sections = {name: replace(kind(), **preset[name]) for name, kind in SECTIONS.items()}
    for section in sections.values():
        for f in fields(section):
            if f.name in cfg.overrides:
                setattr(section, f.name, cfg.overrides[f.name])
    data, model = sections["data"], sections["model"]
    if model.d_model % model.heads:
        raise sa.DataError(f"--d-model {model.d_model}: must be a multiple of the {model.heads} attention heads")
    train = sections["train"]
    if not gloss_predicted(data.target, train.ctc_weight) and "wer" in (train.select, train.stop_on):
        raise sa.DataError("--select/--stop-on wer: a text model trained with --ctc-weight 0 predicts no glosses")
    if cfg.format == "signjoey" and "subsample" not in cfg.overrides:
        data.subsample = 1
    data.format = cfg.format
    return dict({name: asdict(section) for name, section in sections.items()}, data_path=cfg.data or SYNTHETIC,
                preset=cfg.preset)


def gloss_predicted(target, ctc_weight):
    """Whether a run predicts glosses (its decoder writes them, or a CTC head trained on them reads them off the
    encoder): without, its gloss WER is undefined."""
    return target == "gloss" or ctc_weight > 0


def new_run_dir(config):
    name = os.path.basename(os.path.normpath(config["data_path"])) or "data"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join("runs", f"{stamp}-{name}-{config['preset']}")
    suffix = 1
    while os.path.exists(path + ("" if suffix == 1 else f"-{suffix}")):
        suffix += 1
    return path + ("" if suffix == 1 else f"-{suffix}")


def fit(run_dir, config, recipe, model, optimizer, datasets, vocabularies, history, device):
    """The epochs after the history's last: train one, validate (greedy), checkpoint (best.pt when the recipe's
    metric improved, last.pt always), print; until the last epoch or early stopping. Appends to `history`."""
    objective = objective_for(model, recipe, device)
    steps_per_epoch = len(datasets["train"].batches(recipe.batch_size))
    best = best_of(recipe.select, (h[recipe.select] for h in history))
    stop_on = recipe.stop_on or recipe.select
    epoch_times, first = [], history[-1]["epoch"] + 1 if history else 1
    for epoch in range(first, recipe.epochs + 1):
        tic = time.time()
        loss = train_epoch(model, objective, optimizer, datasets["train"], recipe, epoch, steps_per_epoch, device)
        val = evaluate_split(model, datasets["val"], recipe, device, beam=1)
        record = dict(epoch=epoch, loss=loss, **val["metrics"], seconds=time.time() - tic)
        history.append(record)
        improved = is_better(recipe.select, record[recipe.select], best)
        best = record[recipe.select] if improved else best
        if WORLD.main:                                   # every process holds the same model and metrics
            state = sa.training_state(model, optimizer, config, *vocabularies, epoch, history)
            if improved:
                sa.save_checkpoint(os.path.join(run_dir, "best.pt"), state)
            sa.save_checkpoint(os.path.join(run_dir, "last.pt"), state)
            write_metrics(os.path.join(run_dir, "metrics.jsonl"), history)
        epoch_times.append(time.time() - tic)
        eta = sum(epoch_times) / len(epoch_times) * (recipe.epochs - epoch)
        log(f"epoch {epoch:3d}/{recipe.epochs}  loss {record['loss']:.3f}  "
            + progress_metrics(record, config["data"]["target"])
            + f"  {record['seconds']:.1f}s  ETA {format_time(eta)}" + ("  *" if improved else ""))
        if recipe.patience and epochs_since_best(history, stop_on) >= recipe.patience:
            log(f"early stop: no better validation {stop_on} for {recipe.patience} epochs")
            break


def optimizer_for(model, recipe):
    """AdamW at the recipe's peak rate and weight decay (with 0, Adam); train_epoch sets each step's rate. Its
    fused kernel updates every parameter in one pass (with foreach clipping, 4.6 ms a step of the default
    model on 2 CPU cores instead of 13 ms)."""
    return torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, fused=True)


def epochs_since_best(history, metric):
    """How many epochs have passed since `metric` last strictly improved (0: the last epoch improved it); an
    epoch that only equals the best does not count, as in Lightning's EarlyStopping."""
    values = [h[metric] for h in history]
    best = best_of(metric, values)
    return len(values) - 1 - min(i for i, v in enumerate(values) if v == best)


class Objective(torch.nn.Module):
    """sa.training_loss as a module's forward, the call through which DistributedDataParallel averages the
    processes' gradients."""

    def __init__(self, model, recipe):
        super().__init__()
        self.model, self.recipe = model, recipe

    def forward(self, batch, generator, whole=None):
        r = self.recipe
        return sa.training_loss(self.model, batch, r.label_smoothing, r.ctc_weight, r.signcl, generator, whole)


def objective_for(model, recipe, device):
    """The training objective as a module; under torchrun wrapped in DistributedDataParallel (gloo on the
    CPU, nccl on CUDA), which averages the processes' gradients."""
    if WORLD.size == 1:
        return Objective(model, recipe)
    return torch.nn.parallel.DistributedDataParallel(
        Objective(model, recipe), device_ids=[device] if device.type == "cuda" else None,
        find_unused_parameters=recipe.ctc_weight == 0)                      # the gloss head then idles


def train_epoch(model, objective, optimizer, dataset, recipe, epoch, steps_per_epoch, device):
    """One epoch over the training split; its data order, augmentation, dropout and SignCL's sampling are
    drawn from (seed, epoch), so a resumed run draws what an uninterrupted one would. Under torchrun every
    process draws the same global batches and takes its share of each (with its own augmentation and
    dropout). With recipe.micro_batch, a process's share is cut into length-sorted parts (SignDataset.parts)
    whose gradients accumulate before the one step. Under torchrun or with parts, each part's loss is its
    share of the global batch's (training_loss's `whole`), so the summed, averaged gradient is the global
    batch's. Returns the mean loss per sample."""
    seed = recipe.seed * 100003 + epoch
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    batches = dataset.batches(recipe.batch_size, generator, shuffle=True, pooled=recipe.batching == "pooled")
    if WORLD.size > 1:
        torch.manual_seed(seed * 1009 + WORLD.rank)
        generator = torch.Generator().manual_seed(seed * 1009 + WORLD.rank)
    objective.train()
    total, count = 0.0, 0
    for b, indices in enumerate(batches):
        step = (epoch - 1) * steps_per_epoch + b
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * lr_factor(step, steps_per_epoch, recipe)
        share = WORLD.mine(indices)
        parts = dataset.parts(share or indices[:1], recipe.micro_batch)              # a step for every process
        whole = dataset.totals(indices) if WORLD.size > 1 or len(parts) > 1 else None
        optimizer.zero_grad(set_to_none=True)
        for k, part in enumerate(parts):
            batch = to_device(dataset.batch(part, generator), device)
            last = k == len(parts) - 1                                    # DDP averages once, after the last part
            with contextlib.nullcontext() if WORLD.size == 1 or last else objective.no_sync():
                loss, _ = objective(batch, generator, whole)
                if not share:
                    loss = loss * 0.0
                total += loss.item() * (len(share) if whole is None else len(indices))
                (loss * WORLD.size).backward()
        count += len(share)
        if recipe.grad_clip > 0:                                   # clipping at 0 would zero every gradient
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip, foreach=True)
        optimizer.step()
    totals = WORLD.gather((total, count))
    return sum(t for t, _ in totals) / sum(c for _, c in totals)


def lr_factor(step, steps_per_epoch, cfg):
    warm = cfg.warmup_epochs * steps_per_epoch
    if warm and step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, cfg.epochs * steps_per_epoch - warm)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def write_metrics(path, history):
    write_text(path, "".join(json.dumps(h, ensure_ascii=False) + "\n" for h in history))


def progress_metrics(m, target):
    return (f"val {target} BLEU-4 {m['bleu4']:5.2f}  acc {m['accuracy']:5.1f}%  gloss WER {percent(m['wer'], 5, 1)}")


def percent(value, width, digits):
    """A percentage, or '-' where it is undefined (None: a gloss WER without gloss predictions)."""
    return f"{'-':>{width + 1}}" if value is None else f"{value:{width}.{digits}f}%"


# ----------------------------------------------------------------------------------------------------
# Eval
# ----------------------------------------------------------------------------------------------------

def evaluate(cfg):
    """Decode cfg.split with a checkpoint of the run (beam search), and print its metrics."""
    check(cfg)
    run = open_run(cfg, cfg.checkpoint)
    recipe = run.recipe if cfg.beam is None else replace(run.recipe, beam=cfg.beam)
    out = evaluate_split(run.model, run.dataset, recipe, run.device, alignments=sdr_segments(run.alignments, recipe))
    out["metrics"]["samples"] = len(run.dataset)
    log(f"{run.dir} ({cfg.checkpoint} checkpoint, epoch {run.epoch}) on {run.data_path} {cfg.split}:")
    log(results_table({cfg.split: out["metrics"]}, run.dataset.cfg.target, recipe.beam))


@torch.no_grad()
def evaluate_split(model, dataset, recipe, device, beam=None, alignments=None, batch_size=64):
    """Decode a split; metrics of the decoder's target, gloss WER, token accuracy, the decoder's teacher-forced
    cross-entropy per token (ce, with the run's label smoothing), and translation rows.

    Gloss predictions come from the decoder when it writes glosses, otherwise from the CTC head. With
    `alignments` (sdr_segments: true segments, or {} for the CTC Viterbi path), SDR is measured on the encoder
    features at the centre of each gloss occurrence. Under torchrun each process decodes every size-th
    batch (the batches one process would make) and every process gathers the results in batch order, so the
    metrics are a one-process evaluation's.
    """
    model.eval()
    beam = recipe.beam if beam is None else beam
    target = dataset.cfg.target
    mine = [(number, evaluate_batch(model, dataset, indices, recipe, device, beam, alignments))
            for number, indices in WORLD.mine(list(enumerate(dataset.batches(batch_size))))]
    rows, correct, tokens, loss, features, labels = [], 0, 0, 0.0, [], []
    for _, (r, c, n, l, f, g) in sorted((item for part in WORLD.gather(mine) for item in part), key=lambda x: x[0]):
        rows += r
        features += f
        labels += g
        correct, tokens, loss = correct + c, tokens + n, loss + l
    hyps = [r[f"{target}_prediction"] for r in rows]
    refs = [r[f"{target}_reference"] for r in rows]
    metrics = sa.translation_metrics(hyps, refs)
    metrics["wer"] = (sa.wer([r["gloss_prediction"] for r in rows], [r["gloss_reference"] for r in rows])
                      if gloss_predicted(target, recipe.ctc_weight) else None)
    metrics["accuracy"] = 100.0 * correct / max(1, tokens)
    metrics["ce"] = loss / max(1, tokens)
    known = dataset.gloss_vocab.stoi                                  # a gloss unseen in training: its own class
    unseen = {g: len(known) + i for i, g in enumerate(sorted(set(labels) - set(known)))}
    density = sdr(torch.stack(features), [known.get(g, unseen.get(g)) for g in labels]) if features else float("nan")
    if np.isfinite(density):                 # undefined without two glosses, one of them seen twice: left out
        metrics["sdr"] = density
    return dict(metrics=metrics, rows=rows)


def evaluate_batch(model, dataset, indices, recipe, device, beam, alignments):
    """(rows, correct tokens, tokens, summed cross-entropy, SDR features (on the CPU), their labels) of a batch."""
    target = dataset.cfg.target
    batch = to_device(dataset.batch(indices), device)
    memory = model.encode(batch["src"], batch["src_mask"])
    loss, logits = sa.decoder_loss(model, memory, batch, recipe.label_smoothing, reduction="sum")
    real = batch["tgt_out"] != model.pad_id
    correct, tokens = int(((logits.argmax(-1) == batch["tgt_out"]) & real).sum()), int(real.sum())
    out = sa.beam_search(model, batch["src"], batch["src_mask"], beam, recipe.alpha, dataset.cfg.max_tokens + 1,
                         memory)
    predictions = [" ".join(dataset.target_vocab.decode(o)) for o in out.tolist()]
    gloss_logits = model.gloss_logits(memory)
    ctc = [" ".join(dataset.gloss_vocab.decode(g)) for g in sa.ctc_decode(gloss_logits, batch["src_mask"])]
    lengths = sa.frame_lengths(batch["src_mask"]).tolist()
    rows, features, labels = [], [], []
    for b, i in enumerate(indices):
        r = dataset.records[i]
        rows.append(dict(id=r.id, gloss_reference=" ".join(r.gloss),
                         gloss_prediction=predictions[b] if target == "gloss" else
                         ctc[b] if gloss_predicted(target, recipe.ctc_weight) else "",
                         text_reference=" ".join(r.text), text_prediction=predictions[b] if target == "text" else ""))
        if alignments is not None:
            f, l = sdr_features(memory[b], gloss_logits[b], lengths[b], r, dataset, alignments)
            features += f
            labels += l
    return rows, correct, tokens, float(loss), features, labels


def sdr_features(memory, gloss_logits, length, record, dataset, alignments):
    """SDR's labelled features of one sample of `length` frames: the encoder features (memory (T, C)) at the
    centre of each gloss occurrence, from its true segments where `alignments` holds some (sdr_segments),
    else from the CTC Viterbi path of its reference glosses through the gloss head's logits (T, V); each
    labelled with its gloss (a string, so that glosses unseen in training stay apart). The features are
    copies on the CPU: a view would pickle its whole batch under torchrun."""
    vocab = dataset.gloss_vocab
    if alignments:
        centres = sa.segment_centres(alignments.get(record.id, []), dataset.cfg.subsample)
    else:
        centres = sa.viterbi_centres(gloss_logits[:length].log_softmax(-1).cpu(), vocab.encode(record.gloss),
                                     vocab.itos)
    kept = [(c, g) for c, g in centres if c < length]
    return [memory[c].detach().cpu().clone() for c, _ in kept], [g for _, g in kept]


def report(run_dir, datasets, recipe, device, alignments, splits=("val", "test")):
    """Evaluate the best checkpoint, print the table, write translations.csv and results.json. SDR is measured on
    the segments of `alignments` (the data's, read once) that belong to these splits' samples (see sdr_segments)."""
    model, _, _ = sa.load_model(run_dir, device)
    evaluated = {r.id for split in splits for r in datasets[split].records}
    alignments = sdr_segments({i: rows for i, rows in alignments.items() if i in evaluated}, recipe)
    results = {}
    for split in splits:
        start = time.time()
        out = evaluate_split(model, datasets[split], recipe, device, alignments=alignments)
        results[split] = dict(out["metrics"], seconds=time.time() - start, samples=len(datasets[split]))
        if WORLD.main and (split == "test" or len(splits) == 1):
            write_translations(os.path.join(run_dir, "translations.csv" if split == "test"
                                            else f"translations_{split}.csv"), out["rows"])
    log(results_table(results, datasets[splits[0]].cfg.target, recipe.beam))
    _, signature = sa.bleu(["a"], ["a"])
    log(f"sacrebleu: {signature}")
    path = os.path.join(run_dir, "results.json")
    if WORLD.main:
        previous = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                previous = json.load(f)
        write_json(path, {**previous, **results})
    return results


def write_translations(path, rows):
    columns = ["id", "gloss_reference", "gloss_prediction", "text_reference", "text_prediction"]
    write_text(path, csv_text([columns] + [[r[c] for c in columns] for r in rows]))


def results_table(results, target, beam):
    head = ["split", "samples", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "chrF", "ROUGE-L", "gloss WER", "SDR"]
    lines = [f"{target} translation ({'greedy' if beam <= 1 else f'beam {beam}'}), best checkpoint:",
             "  ".join(f"{h:>9}" for h in head)]
    for split, m in results.items():
        cells = [split, str(m["samples"])] + [f"{m[k]:.2f}" for k in ("bleu1", "bleu2", "bleu3", "bleu4", "chrf",
                                                                        "rouge_l")]
        cells += [percent(m["wer"], 0, 2), f"{m['sdr']:.1f}%" if "sdr" in m else "-"]
        lines.append("  ".join(f"{c:>9}" for c in cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Extract
# ----------------------------------------------------------------------------------------------------

def extract(cfg):
    """Decode a split and keep, per sample, every attention map, the CTC posteriors and the relevance of
    every requested method: RUN/extract_<split>.pt, loadable with torch.load(weights_only=True). Returns its
    path and the extraction."""
    check(cfg)
    return write_extraction(open_run(cfg), method_list(cfg.methods), cfg.beam, cfg.batch_size, cfg.limit)


def write_extraction(run, methods, beam=None, batch_size=16, limit=None):
    """Extract the run's split (or its first `limit` samples) and write RUN/extract_<split>.pt; returns its path
    and the extraction, so that a caller need not read back what it just wrote."""
    data = extract_samples(run, methods, beam, batch_size, limit)
    data["samples"] = [s for s in data["samples"] if s is not None]
    path = os.path.join(run.dir, f"extract_{run.split}.pt")
    if WORLD.main:                                               # under torchrun: the one merged file
        sa.save_checkpoint(path, data)
        log("seconds per sample: " + ", ".join(f"{m} {t:.3f}" for m, t in data["meta"]["seconds_per_sample"].items()))
        log(f"wrote {path} ({len(data['samples'])} samples, {os.path.getsize(path) / 1e6:.1f} MB)")
    WORLD.wait()
    return path, data


def extract_samples(run, methods, beam=None, batch_size=16, limit=None, only=None):
    """{'meta': ..., 'samples': [one dict per sample of the split, None where not extracted]} of a TrainedRun:
    the first `limit` samples (default: all), or the sample indices `only`, in length-sorted batches; beam
    None is the run's. Under torchrun each process explains every size-th batch, and every process gathers
    all samples (seconds: the processes' compute time per sample)."""
    dataset, recipe = run.dataset, run.recipe
    beam = recipe.beam if beam is None else beam
    samples = [None] * len(dataset)
    seconds = dict.fromkeys(methods, 0.0)
    if only is None:
        batches = length_sorted_batches(dataset, batch_size, limit)
    else:
        if not all(0 <= i < len(dataset) for i in only):
            raise sa.DataError(f"--sample {', '.join(map(str, only))}: the {run.split} split holds samples "
                               f"0..{len(dataset) - 1}")
        batches = [list(only)]
    total, batches = sum(len(b) for b in batches), WORLD.mine(batches)
    share = sum(len(b) for b in batches)
    work = lambda indices: sum(len(dataset.records[i].frames) for i in indices)     # batches grow longer
    total_work, start, done, done_work = work(sum(batches, [])), time.time(), 0, 0
    for indices in batches:
        for i, sample in zip(indices, explain.extract_batch(run.model, dataset, indices, methods, beam, recipe.alpha,
                                                            run.device, seconds)):
            samples[i] = sample
        done, done_work = done + len(indices), done_work + work(indices)
        spent = time.time() - start
        log(f"extract {run.split}: {done}/{share} samples" + (f" of the first process ({total} in all)"
                                                              if WORLD.size > 1 else "")
            + f"  {done / spent:.2f} samples/s  ETA {format_time(spent * (total_work - done_work) / done_work)}")
    seconds = {m: sum(part[m] for part in WORLD.gather(seconds)) for m in methods}
    for part in WORLD.gather([(i, samples[i]) for indices in batches for i in indices]):
        for i, sample in part:
            samples[i] = sample
    meta = dict(run=run.dir, split=run.split, epoch=run.epoch, methods=methods, beam=beam,
                data_config=asdict(run.model.data_config), gloss_vocab=run.state["gloss_vocab"],
                target=dataset.cfg.target, target_vocab=dataset.target_vocab.itos, ctc_trained=recipe.ctc_weight > 0,
                seconds_per_sample={m: t / total for m, t in seconds.items()})
    return dict(meta=meta, samples=samples)


def length_sorted_batches(dataset, batch_size, limit=None):
    order = list(range(len(dataset)))[:limit]
    order.sort(key=lambda i: len(dataset.records[i].frames))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# ----------------------------------------------------------------------------------------------------
# Bench
# ----------------------------------------------------------------------------------------------------

def bench(cfg):
    """Batched explanations against the per-token loop (each sample alone, one pass per token): seconds
    per sample side by side, the speed-up, and the largest difference between the two. cfg.perturb,
    cfg.train and cfg.lengths time the perturbation tests, the training step, or the cost against the
    video's length instead; cfg.recipes trains the default recipe against the previous one."""
    check(cfg)
    if cfg.recipes:
        return bench_recipes(cfg.data or SYNTHETIC, cfg.device)
    run = open_run(cfg)
    methods = method_list(cfg.methods)
    if cfg.perturb:
        return bench_perturbation(run.model, run.dataset, methods, cfg.limit, run.device)
    if cfg.train:
        return bench_training(run.model.cfg, run.dataset, run.recipe, cfg.batch_size, run.device)
    if cfg.lengths:
        return bench_lengths(run.model, run.dataset, methods, run.device, cfg.lengths)
    bench_explanations(run, methods, cfg.batch_size, cfg.limit)


def bench_recipes(data, device, presets=("previous", "default")):
    """Each preset's whole `train` command, one after the other on the same data and seed (runs/<time>-<data>-
    recipes/<preset>), then one figure and a CSV: validation BLEU-4 (greedy, each epoch) against the seconds
    since the command started, and the test BLEU-4 (the final beam evaluation) where the command ended. The
    first preset runs with the data not yet in the page cache, which costs it a few seconds of reading."""
    device_of(device)                                       # under torchrun: joins the process group
    root = WORLD.first(new_run_dir(dict(data_path=data, preset="recipes")))
    if WORLD.main:
        ensure_data(data)                                   # generated before either clock starts
    WORLD.wait()
    seconds = {}
    for preset in presets:
        log(f"bench --recipes: training the {preset} recipe")
        start = time.time()
        train(TrainConfig(data=data, preset=preset, out=os.path.join(root, preset), device=device))
        seconds[preset] = time.time() - start
    if not WORLD.main:                                      # the first process wrote the runs' files
        return
    curves = {preset: recipe_curve(os.path.join(root, preset), t) for preset, t in seconds.items()}
    rows = [["preset", "epoch", "seconds", "val_bleu4"]] + [
        [preset, epoch, f"{t:.1f}", f"{bleu:.2f}"] for preset, c in curves.items() for epoch, t, bleu in c["epochs"]]
    rows += [[preset, "test", f"{c['seconds']:.1f}", f"{c['test_bleu4']:.2f}"] for preset, c in curves.items()]
    write_text(os.path.join(root, "recipes.csv"), csv_text(rows))
    log(f"{'recipe':>10}  {'seconds':>8}  {'epochs':>6}  {'test BLEU-4':>11}  {'test WER':>8}")
    for preset, c in curves.items():
        log(f"{preset:>10}  {c['seconds']:8.1f}  {len(c['epochs']):6d}  {c['test_bleu4']:11.2f}  {percent(c['test_wer'], 7, 2)}")
    base, new = (curves[p]["seconds"] for p in presets)
    log(f"{presets[1]} / {presets[0]}: {new / base:.2f} of the wall-clock time")
    log(save_figure(figure_recipes(curves, data), os.path.join(root, "recipes.png")))


def recipe_curve(run_dir, seconds):
    """A finished run's validation BLEU-4 per epoch at the seconds since its command started (the epochs end
    where the final evaluation's seconds, counted back from the end, begin), and its test results."""
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        history = [json.loads(line) for line in f]
    with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    final = sum(results[s]["seconds"] for s in ("val", "test"))
    ends = np.cumsum([h["seconds"] for h in history])
    first = seconds - final - ends[-1]                       # starting up, reading the data, building the model
    return dict(epochs=[(h["epoch"], first + t, h["bleu4"]) for h, t in zip(history, ends)], seconds=seconds,
                test_bleu4=results["test"]["bleu4"], test_wer=results["test"]["wer"])


def figure_recipes(curves, data):
    """Validation BLEU-4 against wall-clock seconds, one line per recipe, its test BLEU-4 marked at the end."""
    fig, ax = pyplot().subplots(figsize=(7.5, 4), layout="constrained")
    for preset, c in curves.items():
        t, bleu = [e[1] for e in c["epochs"]], [e[2] for e in c["epochs"]]
        line, = ax.plot(t, bleu, marker="o", markersize=3, label=f"{preset}: validation (greedy, each epoch)")
        ax.plot([c["seconds"]], [c["test_bleu4"]], marker="*", markersize=12, color=line.get_color(),
                label=f"{preset}: test, beam ({c['test_bleu4']:.2f} after {format_time(c['seconds'])})")
    ax.set_xlabel("seconds since the train command started")
    ax.set_ylabel("BLEU-4")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"Training recipes on {data}: BLEU-4 against wall-clock time, one run after the other", fontsize=9)
    return fig


def bench_explanations(run, methods, batch_size, limit):
    """Each method batched over length-sorted batches of the first `limit` samples, then (for the methods of
    explain.PER_TOKEN) one sample and one token per pass; seconds per sample and the largest difference."""
    model, dataset, device = run.model, run.dataset, run.device
    batches = length_sorted_batches(dataset, batch_size, limit)
    inputs = []
    for indices in batches:
        batch = to_device(dataset.batch(indices), device)
        out = sa.greedy_decode(model, batch["src"], batch["src_mask"], dataset.cfg.max_tokens + 1)
        inputs.append((batch["src"], batch["src_mask"], out))
    count = sum(len(b) for b in batches)
    tokens = sum(int((out != model.pad_id).sum()) for _, _, out in inputs)
    ticker = Ticker("bench", len(methods) + tokens * len(set(methods) & set(explain.PER_TOKEN)))
    log(f"{run.dir}: {count} {run.split} samples, batches of {batch_size}, device {device}")
    log(f"{'method':>24}  {'batched s/sample':>16}  {'loop s/sample':>13}  {'speed-up':>8}  {'max |diff|':>10}")
    for method in methods:
        src, mask, out = inputs[0]
        explain.explain(model, src[:2], mask[:2], out[:2], method)                 # warm-up
        tic = time.time()
        fast = [explain.explain(model, src, mask, out, method) for src, mask, out in inputs]
        batched = (time.time() - tic) / count
        ticker(1, f"{method}, batched")
        if method not in explain.PER_TOKEN:
            log(f"{method:>24}  {batched:16.4f}  {'-':>13}  {'-':>8}  {'-':>10}")
            continue
        tic, diff = time.time(), 0.0
        for (src, mask, out), rel in zip(inputs, fast):
            lengths = sa.frame_lengths(mask)
            for b in range(len(src)):
                T, n = int(lengths[b]), int((out[b] != model.pad_id).sum())
                for t in range(n):                           # one token per pass
                    row = torch.zeros(1, n, dtype=torch.bool, device=device)
                    row[0, t] = True
                    one = explain.explain(model, src[b:b + 1, :T], mask[b:b + 1, :T], out[b:b + 1, :n], method,
                                          rows=row)
                    diff = max(diff, float((one[0, t] - rel[b, t, :T]).abs().max()))
                    ticker(1, f"{method}, one token per pass")
        loop = (time.time() - tic) / count
        log(f"{method:>24}  {batched:16.4f}  {loop:13.4f}  {loop / batched:7.1f}x  {diff:10.2e}")


@torch.no_grad()
def perturbation_loop(model, src, mask, out, relevance, tick=lambda: None):
    """The token-level perturbation test written as its definition reads: one forward per sample, token,
    direction and fraction, with the removed frames masked out of the sample's frames. Returns the scores
    and where the decision was a near tie (explain.near_ties); `tick()` after each sample."""
    scores = torch.full(out.shape + (2, len(explain.FRACTIONS)), float("nan"), device=src.device)
    tied = torch.zeros(scores.shape, dtype=torch.bool, device=src.device)
    tgt_in = sa.shift_right(out, model.bos_id)
    for b in range(len(src)):
        T = int(sa.frame_lengths(mask[b:b + 1]))
        for t in range(int((out[b] != model.pad_id).sum())):
            salt = torch.tensor([t], device=src.device)                     # as the batched test salts it
            ranks = explain.removal_ranks(relevance[b:b + 1, t, :T], mask[b:b + 1, :T], salt=salt)
            keep = explain.kept_frames(ranks, mask[b:b + 1, :T])
            for d in range(2):
                for f in range(len(explain.FRACTIONS)):
                    logits = sa.decodable(model(src[b:b + 1, :T], keep[:, d, f], tgt_in[b:b + 1])[0, t], model)
                    scores[b, t, d, f] = float(logits.argmax() == out[b, t])
                    tied[b, t, d, f] = explain.near_ties(logits)
        tick()
    return scores, tied


def bench_perturbation(model, dataset, methods, limit, device):
    """The batched token-level perturbation test of `python run.py perturb` (every removal of every token of
    the samples at once) against the loop of one forward per token, direction and fraction: seconds per
    sample side by side, how many scores differ where the decision is clear, and how many decisions are near
    ties (the two best logits within rounding: either answer is right, and kernels may pick either)."""
    batch = to_device(dataset.batch(list(range(len(dataset)))[:limit]), device)
    src, mask = batch["src"], batch["src_mask"]
    out = sa.greedy_decode(model, src, mask, dataset.cfg.max_tokens + 1)
    count, tokens = len(src), int((out != model.pad_id).sum())
    log(f"token-level perturbation tests: {count} samples, {tokens} tokens, 2 directions x 10 fractions, "
        f"frames removed by the key mask, device {device}")
    log(f"{'method':>24}  {'batched s/sample':>16}  {'loop s/sample':>13}  {'speed-up':>8}  {'scores differ':>13}  "
        f"{'near ties':>9}")
    ticker = Ticker("bench --perturb", len(methods) * (count + 1))
    for method in methods:
        relevance = explain.explain(model, src, mask, out, method)
        tic = time.time()
        fast = explain.token_perturbation(model, src, mask, out, relevance)
        batched = (time.time() - tic) / count
        ticker(1, f"{method}, batched")
        tic = time.time()
        slow, tied = perturbation_loop(model, src, mask, out, relevance, lambda: ticker(1, f"{method}, loop"))
        loop = (time.time() - tic) / count
        differ = int(((fast != slow) & ~fast.isnan() & ~tied).sum())
        log(f"{method:>24}  {batched:16.4f}  {loop:13.4f}  {loop / batched:7.1f}x  {differ:13d}  "
            f"{int((tied & ~fast.isnan()).sum()):9d}")


def bench_training(model_cfg, dataset, recipe, batch_size, device, batches=6, repeats=5):
    """Our training step (the whole objective of the recipe, SignCL included; backward; AdamW) against the
    same translator on torch.nn.Transformer's layers (sa.TorchTransformerTranslator), on the same batches with
    the same loss: interleaved step by step after a warm-up, the median of every step's seconds, and their
    ratio."""
    torch.manual_seed(0)
    models = {"ours": sa.SignTranslator(model_cfg), "nn.Transformer": sa.TorchTransformerTranslator(model_cfg)}
    optimizers = {name: torch.optim.AdamW(m.to(device).train().parameters(), lr=1e-4, fused=True)
                  for name, m in models.items()}
    inputs = [to_device(dataset.batch(indices), device) for indices in dataset.batches(batch_size)[:batches]]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generator = torch.Generator().manual_seed(0)

    def step(name, batch):
        sync()
        tic = time.perf_counter()
        loss, _ = sa.training_loss(models[name], batch, recipe.label_smoothing, recipe.ctc_weight, recipe.signcl,
                                   generator)
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()
        sync()
        return time.perf_counter() - tic
    for batch in inputs[:2]:                                               # warm-up
        for name in models:
            step(name, batch)
    seconds = {name: [] for name in models}
    for _ in range(repeats):
        for batch in inputs:
            for name in models:
                seconds[name].append(step(name, batch))
    ours, theirs = (float(np.median(seconds[name])) for name in models)
    size = sum(p.numel() for p in models["ours"].parameters()) / 1e6
    log(f"training step on {len(inputs)} batches of {batch_size} x {repeats} repeats, {size:.2f}M parameters each, "
        f"device {device}" + (f", SignCL weight {recipe.signcl}" if recipe.signcl else "")
        + ", median seconds per step:")
    log(f"  ours {ours * 1e3:.1f} ms   nn.Transformer {theirs * 1e3:.1f} ms   ours / nn.Transformer {ours / theirs:.2f}")


def peak_memory(device):
    """A function that starts a measurement and returns the peak memory since (MB): CUDA's allocator, or on
    Linux the process's peak resident size, reset through /proc/self/clear_refs after glibc's free memory is
    handed back (and bench_lengths has glibc hand back every block over 64 kB when it is freed, so that the
    resident size follows the tensors alive); None where neither exists."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        return lambda: (torch.cuda.max_memory_allocated(device) - base) / 1e6
    try:
        if sys.platform == "linux":                  # free pages back to the system, so that reuse shows
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                               # the peak starts again from now
        status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
        base = status("VmRSS:")
        return lambda: (status("VmHWM:") - base) / 1e3
    except OSError:
        return lambda: None


def bench_lengths(model, dataset, methods, device, lengths=(50, 100, 200, 400, 600)):
    """Each method's seconds per explained token and peak memory as one sample's video grows (its frames
    stretched to T model frames, its tokens kept), with the exponent of a power law fitted over T; the floor
    is one forward and one backward of the model per token."""
    first = dataset.batch(list(range(min(20, len(dataset)))))          # the sample with the most tokens of 20
    longest = int(sa.greedy_decode(model, first["src"].to(device), first["src_mask"].to(device),
                                   dataset.cfg.max_tokens + 1).ne(model.pad_id).sum(1).argmax())
    batch = to_device(dataset.batch([longest]), device)
    out = sa.greedy_decode(model, batch["src"], batch["src_mask"], dataset.cfg.max_tokens + 1)
    n = int((out != model.pad_id).sum())
    rows = {m: ([], []) for m in ["floor"] + methods}
    ticker = Ticker("bench --lengths", 6 * sum(lengths) * len(rows))        # 3 timed runs and a warm-up, then 2
    for measure in ("seconds", "memory"):                # memory second: its allocator setting slows everything
        if measure == "memory" and device.type == "cpu" and sys.platform == "linux":
            import ctypes
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)              # M_MMAP_THRESHOLD: fixed at 64 kB
        for T in lengths:
            stretched = batch["src"][:, torch.linspace(0, batch["src"].shape[1] - 1, T, device=device).round().long()]
            mask = torch.ones(1, T, dtype=torch.bool, device=device)
            for m in ["floor"] + methods:
                run_once = (lambda: floor_pass(model, stretched, mask, out)) if m == "floor" else \
                    (lambda: explain.explain(model, stretched, mask, out, m))
                run_once()                                                # warm-up
                if measure == "memory":
                    peak = peak_memory(device)
                    run_once()
                    rows[m][1].append(peak())
                    ticker(2 * T, f"memory, {m} at T={T}")
                    continue
                seconds = []
                for _ in range(3):
                    tic = time.perf_counter()
                    run_once()
                    seconds.append(time.perf_counter() - tic)
                rows[m][0].append(float(np.median(seconds)) / n)
                ticker(4 * T, f"seconds, {m} at T={T}")
    def fit(values, least):                        # a power law's exponent, over the values of at least `least`
        keep = [(T, v) for T, v in zip(lengths, values) if v is not None and v >= least]
        if len(keep) < 2:
            return float("nan")
        return float(np.polyfit(np.log([T for T, _ in keep]), np.log([v for _, v in keep]), 1)[0])

    log(f"test sample {longest} ({n} tokens), its frames stretched to T model frames, device {device}: seconds per "
        f"token (median of 3), peak memory above the start (MB), and the exponent of each against T (memory: over "
        f"the values of 1 MB or more):")
    log(f"{'method':>24}  " + "  ".join(f"{f's/tok T={T}':>11}" for T in lengths) + "  time^  "
        + "  ".join(f"{f'MB T={T}':>9}" for T in lengths) + "  mem^  x floor")
    for m, (times, memory) in rows.items():
        known = all(v is not None for v in memory)
        exponent = lambda x, width: f"{x:{width}.2f}" if np.isfinite(x) else f"{'-':>{width}}"   # - : too few values
        log(f"{m:>24}  " + "  ".join(f"{t:11.5f}" for t in times) + f"  {exponent(fit(times, 1e-6), 5)}  "
            + "  ".join(f"{v:9.1f}" if v is not None else f"{'-':>9}" for v in memory)
            + f"  {exponent(fit(memory, 1.0) if known else float('nan'), 4)}"
            + f"  {times[-1] / rows['floor'][0][-1]:7.1f}")


def floor_pass(model, src, mask, out):
    """One forward and one backward per explained token: the least a gradient method costs."""
    tgt_in = sa.shift_right(out, model.bos_id)
    for t in range(int((out != model.pad_id).sum())):
        src = src.detach().requires_grad_(True)
        logits = model(src, mask, tgt_in)
        logits[0, t, out[0, t]].backward()


# ----------------------------------------------------------------------------------------------------
# Plot: the SignAttention figures, of one sample or of the whole split
# ----------------------------------------------------------------------------------------------------

def plot(cfg):
    """The figures of sample cfg.sample (RUN/sample<N>_<name>.<type>), or with cfg.all the global analyses
    of the split, twice: over the samples decoded exactly and over all (RUN/all_<group>_<name>.<type>). They
    are drawn from the run's extraction; where it is missing, the whole split is extracted and saved first
    (all), or the one sample in memory."""
    check(cfg)
    start = time.time()
    only = None if cfg.all else [cfg.sample]
    run_dir, data, data_path = load_extraction(cfg, save=cfg.all, only=only)
    if cfg.all:
        written = plot_all(run_dir, data, data_path, cfg.figure_type)
    else:
        written = plot_sample(run_dir, data, data_path, cfg.sample, cfg.figure_type, cfg.animate)
    for path in written:
        log(path)
    log(f"{len(written)} figures in {time.time() - start:.1f}s")


def load_extraction(cfg, save, only=None, limit=None):
    """(run folder, the run's extraction of cfg.split, data path). Where the extraction is missing it is made
    first: the whole split, saved, when `save`; else in memory only, of the sample indices `only` or of the
    first `limit` samples."""
    run_dir = cfg.run or latest_run()
    path = os.path.join(run_dir, f"extract_{cfg.split}.pt")
    if os.path.exists(path):
        data = torch.load(path, weights_only=True)
    elif save:
        log(f"{path} is missing: extracting the {cfg.split} split first")
        data = write_extraction(open_run(cfg), list(explain.METHODS))[1]
    else:
        log(f"extracting {cfg.split} " + (f"sample {only[0]}" if only else f"samples 0..{limit - 1}")
            + " (`python run.py extract` keeps the whole split)")
        data = extract_samples(open_run(cfg), list(explain.METHODS), limit=None if only else limit, only=only)
    return run_dir, data, cfg.data or run_config(run_dir)["data_path"]


def plot_sample(run_dir, data, data_path, index, figure_type, animate):
    """Every figure of SAMPLE_FIGURES for one extracted sample, as RUN/sample<index>_<name>.<type>; with
    `animate`, also the GIF."""
    layout = data["meta"]["data_config"]["format"]
    d = SampleData(data, data_path, index, sa.read_alignments(data_path, layout))
    written = []
    for name, draw in SAMPLE_FIGURES.items():
        try:
            fig = draw(d)
        except Skip as why:
            log(f"{name} figure skipped: {why}")
            continue
        written.append(save_figure(fig, os.path.join(run_dir, f"sample{index}_{name}.{figure_type}")))
    if animate and d.pose is not None:
        cross = d.sample["attention"]["decoder_cross"].float().mean(1)[-1]
        written.append(animate_sample(pyplot(), d.sample, d.pose, cross, d.k,
                                      os.path.join(run_dir, f"sample{index}_animation.gif")))
    return written


def plot_all(run_dir, data, data_path, figure_type):
    """Every figure of GLOBAL_FIGURES twice, over the samples whose prediction equals the reference
    (RUN/all_correct_<name>) and over all samples (RUN/all_all_<name>)."""
    written, meta = [], data["meta"]
    alignments, links = segment_sources(data_path, meta["data_config"]["format"], meta["target"])
    for correct_only in (True, False):
        group = "correct" if correct_only else "all"
        numbers = explain.global_numbers(data, alignments, links, correct_only)
        if not numbers["count"]:
            log(f"no {meta['split']} sample in the '{group}' group: its figures are skipped")
            continue
        label = (f"{numbers['count']} {meta['split']} samples whose prediction equals the reference" if correct_only
                 else f"all {numbers['count']} {meta['split']} samples")
        for name, draw in GLOBAL_FIGURES.items():
            try:
                fig = draw(numbers, label, meta)
            except Skip as why:
                log(f"{name} figure ({group}) skipped: {why}")
                continue
            written.append(save_figure(fig, os.path.join(run_dir, f"all_{group}_{name}.{figure_type}")))
        scores = numbers["diagonality"]
        log(f"diagonality ({group}): " + (", ".join(f"layer {l + 1} {v:.3f}" for l, v in enumerate(scores))
                                          if all(np.isfinite(scores)) else DIAGONALITY_UNDEFINED))
        if numbers["pointing"]:
            log(f"pointing game ({group}): "
                + ", ".join(f"{m} {100 * np.mean(hits):.1f}%" for m, hits in numbers["pointing"].items()))
    return written


@functools.lru_cache(maxsize=None)
def pyplot():
    """matplotlib's pyplot, headless, set up once for every figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # DejaVu Sans has Greek glyphs; at 160 dpi the tonos of a 7-9 pt ί stays apart from its stem (at 110 dpi
    # "πηγαίνεις" read "πηγα(νεις")
    plt.rcParams.update({"font.family": "DejaVu Sans", "figure.dpi": 160})
    return plt


def save_figure(fig, path):
    """Write a figure atomically (its type from the file name), close it, and return the path."""
    sa.atomic_write(path, lambda f: fig.savefig(f, format=path.rsplit(".", 1)[-1], bbox_inches="tight"))
    pyplot().close(fig)
    return path


class Skip(Exception):
    """A figure that cannot be drawn for this sample or run; the message says why."""


def token_ticks(ax, tokens, axis="y"):
    size = 9 if len(tokens) <= 12 else 8
    ticks = range(len(tokens))
    if axis == "y":
        ax.set_yticks(ticks, tokens, fontsize=size)
    else:
        ax.set_xticks(ticks, tokens, fontsize=size, rotation=90)


def percent_axis(ax, label="video position (% of frames)"):
    ax.set_xlabel(label)
    ax.set_xlim(0, 100)


def wrap(text, width=110):
    import textwrap
    return "\n".join(textwrap.wrap(text, width)) or "(empty)"


def heatmap(ax, values, title, signed=False, label="attention weight"):
    """tokens x video position (%) image with a colour bar; signed values on a diverging map centred on 0."""
    plt = pyplot()
    values = values.float().numpy()
    extent = [0, 100, len(values) - 0.5, -0.5]
    if signed:
        m = max(abs(values.min()), abs(values.max()), 1e-12)
        im = ax.imshow(values, aspect="auto", cmap="RdBu_r", vmin=-m, vmax=m, extent=extent, interpolation="nearest")
    else:
        im = ax.imshow(values, aspect="auto", cmap="viridis", extent=extent, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    plt.colorbar(im, ax=ax, label=label, fraction=0.046, pad=0.02)


class SampleData:
    """What the figures of one extracted sample draw on: the sample, the extraction's meta, its true gloss
    segments (original frames, from `alignments`; [] without) and its pose array (x, y) where the file
    exists."""

    def __init__(self, data, data_path, index, alignments):
        meta = self.meta = data["meta"]
        if not 0 <= index < len(data["samples"]):
            raise sa.DataError(f"--sample {index}: the {meta['split']} extraction holds samples "
                               f"0..{len(data['samples']) - 1}")
        s = self.sample = data["samples"][index]
        self.index, self.k = index, meta["data_config"]["subsample"]
        self.tokens, self.T, self.n = s["tokens"], s["frames"], len(s["tokens"])
        self.alignments = sorted(alignments.get(s["id"], []))
        self.pose = sa.sample_pose(data_path, s["id"], meta["data_config"]["format"])
        if self.pose is not None:          # a .pose file's frames are not read up front: cut its segments here
            F = len(self.pose)
            self.alignments = [(p, g, a, min(b, F)) for p, g, a, b in self.alignments if a < F]
        reference = " ".join(s[f"{meta['target']}_reference"])
        self.header = (f"{s['id']} ({meta['split']} sample {index})\nprediction: {wrap(' '.join(s['prediction']))}\n"
                       f"reference:  {wrap(reference)}")
        self.row_height = 0.26 * self.n + 1.2


def figure_skeleton(d):
    """The signer at the centre frame of each true gloss segment (or six even frames), with the gloss."""
    if d.pose is None:
        raise Skip("no pose file for this sample")
    plt, pose = pyplot(), d.pose
    key = ([(a + b) // 2 for _, _, a, b in d.alignments][:8]
           or np.linspace(0, len(pose) - 1, 6).round().astype(int).tolist())
    names = {(a + b) // 2: gloss for _, gloss, a, b in d.alignments}
    fig, axes = plt.subplots(1, len(key), figsize=(2.3 * len(key), 3.4), squeeze=False, layout="constrained")
    shown = pose[key][:, sa.BODY[:25] + sa.LEFT_HAND + sa.RIGHT_HAND]
    lo, hi = np.nanmin(shown, (0, 1)), np.nanmax(shown, (0, 1))
    for ax, f in zip(axes[0], key):
        draw_skeleton(ax, pose[f])
        ax.set_xlim(lo[0] - 0.05, hi[0] + 0.05)
        ax.set_ylim(hi[1] + 0.05, lo[1] - 0.05)
        ax.set_title(f"frame {f}" + (f"\n{names[f]}" if f in names else ""), fontsize=9)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{d.sample['id']}: key frames (x, y image coordinates; red = right hand, blue = left)", fontsize=10)
    return fig


def figure_cross_attention(d):
    """Decoder cross-attention per layer (mean over heads): predicted tokens x video position."""
    cross = d.sample["attention"]["decoder_cross"].float().mean(1)                   # (L, n, T)
    fig, axes = pyplot().subplots(len(cross), 1, figsize=(10, d.row_height * len(cross) + 1.2), squeeze=False,
                                  layout="constrained")
    for l, ax in enumerate(axes[:, 0]):
        heatmap(ax, cross[l], f"decoder cross-attention, layer {l + 1} (mean over heads)")
        token_ticks(ax, d.tokens)
        ax.set_ylabel("predicted token")
        percent_axis(ax)
    fig.suptitle(d.header, fontsize=9, x=0.02, ha="left")
    return fig


def figure_encoder_attention(d):
    """Encoder self-attention per layer (mean over heads): frames x frames."""
    plt = pyplot()
    enc = d.sample["attention"]["encoder_self"].float().mean(1)
    fig, axes = plt.subplots(1, len(enc), figsize=(4.6 * len(enc), 4.2), squeeze=False, layout="constrained")
    for l, ax in enumerate(axes[0]):
        im = ax.imshow(enc[l].numpy(), cmap="viridis", extent=[0, 100, 100, 0], interpolation="nearest")
        plt.colorbar(im, ax=ax, label="attention weight", fraction=0.046, pad=0.02)
        ax.set_title(f"encoder self-attention, layer {l + 1}", fontsize=10)
        ax.set_xlabel("key frame (% of video)")
        ax.set_ylabel("query frame (% of video)")
    length = f"{d.T} model frame{'s' if d.T > 1 else ''}"
    fig.suptitle(f"{d.sample['id']}: {length} (one in {d.k}), mean over heads", fontsize=10)
    return fig


def figure_decoder_attention(d):
    """Decoder self-attention per layer (mean over heads): predicted tokens x previous tokens."""
    plt, n = pyplot(), d.n
    dec = d.sample["attention"]["decoder_self"].float().mean(1)
    fig, axes = plt.subplots(1, len(dec), figsize=(0.3 * n * len(dec) + 3.5 * len(dec), 0.3 * n + 2.5), squeeze=False,
                             layout="constrained")
    for l, ax in enumerate(axes[0]):
        im = ax.imshow(dec[l].numpy(), cmap="viridis", interpolation="nearest")
        plt.colorbar(im, ax=ax, label="attention weight", fraction=0.046, pad=0.02)
        token_ticks(ax, d.tokens)
        token_ticks(ax, ["<bos>"] + d.tokens[:-1], axis="x")
        ax.set_title(f"decoder self-attention, layer {l + 1}", fontsize=10)
        ax.set_xlabel("decoder input (previous token)")
        ax.set_ylabel("predicted token")
    return fig


def figure_relevance(d):
    """One panel per explanation method: predicted tokens x video position."""
    methods = list(d.sample["relevance"])
    cols = 4
    rows = -(-len(methods) // cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(4.8 * cols, d.row_height * rows + 1.5), squeeze=False,
                                  layout="constrained")
    for ax, method in zip(axes.flat, methods):
        heatmap(ax, d.sample["relevance"][method], method, signed=method in explain.SIGNED, label="relevance")
        token_ticks(ax, d.tokens)
        percent_axis(ax)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    fig.suptitle(d.header + "\nrelevance of each frame for each predicted token (signed methods: red > 0 > blue)",
                 fontsize=9, x=0.02, ha="left")
    return fig


def figure_gloss_posteriors(d):
    """The CTC gloss posteriors over time, on the true gloss segments."""
    if not d.meta.get("ctc_trained", True):
        raise Skip("the run trained no CTC gloss head (ctc_weight 0)")
    s, vocab, segments = d.sample, d.meta["gloss_vocab"], d.alignments
    post = s["gloss_posteriors"].float()
    shown = sorted({vocab.index(g) for g in s["gloss_reference"] + s["gloss_prediction"] if g in vocab})
    fig, ax = pyplot().subplots(figsize=(11, 3.6), layout="constrained")
    frames = np.arange(d.T) * d.k
    dots = dict(marker="o", markersize=4) if d.T <= 20 else {}          # a line of one frame would not show
    ax.plot(frames, post[:, 0].numpy(), color="0.6", linestyle="--", label="blank", **dots)
    for i in shown:
        ax.plot(frames, post[:, i].numpy(), label=vocab[i], **dots)
    for j, (_, gloss, a, b) in enumerate(segments):
        ax.axvspan(a, b, color=("0.85" if j % 2 else "0.93"), zorder=0)
        ax.text((a + b) / 2, 1.02, gloss, ha="center", va="bottom", fontsize=7,
                rotation=90 if len(segments) > 6 else 0, transform=ax.get_xaxis_transform())
    ax.set_xlabel("frame (original frame rate)")
    ax.set_ylabel("CTC posterior")
    ax.set_ylim(0, 1)
    ax.set_xlim(0, max(frames[-1], 1))
    ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(f"{s['id']}: CTC gloss posteriors" + (" over the true gloss segments (grey)" if segments else ""),
                 fontsize=10, pad=40 if segments else 6)
    return fig


def figure_reliance(d):
    """Per decoding step, the norms of the cross-attention (video) and self-attention (previous tokens)
    outputs, and the video's share."""
    n = d.n
    video, prev = d.sample["branch_norms"]["video"].float(), d.sample["branch_norms"]["tokens"].float()
    share = explain.video_share(d.sample["branch_norms"])
    fig, axes = pyplot().subplots(1, 2, figsize=(max(9, 0.45 * n + 6), 3.8), layout="constrained")
    for l in range(len(video)):
        axes[0].plot(range(n), video[l].numpy(), marker="o", label=f"video (cross-attention), layer {l + 1}")
        axes[0].plot(range(n), prev[l].numpy(), marker="s", linestyle="--",
                     label=f"previous tokens (self-attention), layer {l + 1}")
        axes[1].plot(range(n), share[l].numpy(), marker="o",
                     label=f"layer {l + 1}")
    axes[0].set_ylabel("L2 norm of the attention output")
    axes[1].set_ylabel("video share = video / (video + tokens)")
    axes[1].set_ylim(0, 1)
    for ax in axes:
        token_ticks(ax, d.tokens, axis="x")
        ax.set_xlabel("decoding step (predicted token)")
        ax.legend(fontsize=7)
    axes[0].set_title("what each decoding step draws on", fontsize=10)
    axes[1].set_title("reliance on the video", fontsize=10)
    return fig


SAMPLE_FIGURES = dict(skeleton=figure_skeleton, cross_attention=figure_cross_attention,
                      encoder_attention=figure_encoder_attention, decoder_attention=figure_decoder_attention,
                      relevance=figure_relevance, gloss_posteriors=figure_gloss_posteriors, reliance=figure_reliance)


def draw_skeleton(ax, frame, alpha=1.0):
    """One frame of MediaPipe keypoints (543, 2): body lines, hands, and the face as a faint cloud. Returns a
    function that moves every drawn line and point to another frame (an animation's next one); its `artists`
    are what it moves."""
    face = ax.scatter(frame[sa.FACE, 0], frame[sa.FACE, 1], s=0.3, color="0.7", alpha=alpha)
    lines = [((a, b), ax.plot(frame[[a, b], 0], frame[[a, b], 1], color="0.2", linewidth=1.2, alpha=alpha)[0])
             for a, b in sa.BODY_EDGES]
    for ids, color in ((sa.RIGHT_HAND, "tab:red"), (sa.LEFT_HAND, "tab:blue")):
        lines += [((ids[a], ids[b]), ax.plot(frame[[ids[a], ids[b]], 0], frame[[ids[a], ids[b]], 1], color=color,
                                             linewidth=0.8, alpha=alpha)[0]) for a, b in sa.HAND_EDGES]

    def move(other):
        face.set_offsets(other[sa.FACE, :2])
        for (a, b), line in lines:
            line.set_data(other[[a, b], 0], other[[a, b], 1])
    move.artists = [face] + [line for _, line in lines]
    return move


def animate_sample(plt, s, pose, cross, k, path):
    """A GIF (written atomically, 10 frames/s): the skeleton at each model frame, and one bar per
    predicted token with its cross-attention (last layer, mean over heads) at that frame. The figure is laid
    out and drawn once without what moves (the skeleton, the bars, the frame number); each frame then draws
    only those onto a copy of that background."""
    from PIL import Image
    tokens, T = s["tokens"], s["frames"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4.2), gridspec_kw=dict(width_ratios=[1, 1.3]),
                                      layout="constrained")
    pts = pose[:, sa.BODY[:25] + sa.LEFT_HAND + sa.RIGHT_HAND]
    lo, hi = np.nanmin(pts, (0, 1)), np.nanmax(pts, (0, 1))
    move = draw_skeleton(left, pose[0])
    left.set_xlim(lo[0] - 0.05, hi[0] + 0.05)
    left.set_ylim(hi[1] + 0.05, lo[1] - 0.05)
    left.set_aspect("equal")
    left.set_xticks([])
    left.set_yticks([])
    title = left.set_title("frame 0", fontsize=9)
    bars = right.barh(range(len(tokens)), cross[:, 0].numpy(), color="tab:purple")
    right.set_yticks(range(len(tokens)), tokens, fontsize=8)
    right.invert_yaxis()
    right.set_xlim(0, float(cross.max()))
    right.set_xlabel("cross-attention to this frame (last layer)")
    right.set_title(s["id"], fontsize=9)
    fig.canvas.draw()                                   # laid out with everything in place
    fig.set_layout_engine("none")
    moving = move.artists + list(bars) + [title]
    for artist in moving:
        artist.set_animated(True)
    fig.canvas.draw()
    background = fig.canvas.copy_from_bbox(fig.bbox)
    pictures = []
    for t in range(T):
        move(pose[min(t * k, len(pose) - 1)])
        title.set_text(f"frame {t * k}")
        for bar, width in zip(bars, cross[:, t].tolist()):
            bar.set_width(width)
        fig.canvas.restore_region(background)
        for artist in moving:
            artist.axes.draw_artist(artist)
        pictures.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()))
    plt.close(fig)
    # one palette for every frame, from eight of them side by side (a hand missing at the start still has its
    # colour), so each frame is mapped to it rather than searched for its own
    some = pictures[::max(1, -(-len(pictures) // 8))]
    montage = Image.fromarray(np.concatenate([np.asarray(p) for p in some], 1))
    palette = montage.quantize(255, method=Image.Quantize.FASTOCTREE)
    frames = [p.quantize(palette=palette, dither=Image.Dither.NONE) for p in pictures]
    sa.atomic_write(path, lambda f: frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:],
                                                     duration=100, loop=0))
    return path


def length_label(L):
    return f"{L}{'+' if L == 5 else ''} token{'s' if L > 1 else ''}"


def figure_cross_attention_by_length(numbers, label, meta):
    """Decoder cross-attention (last layer) by relative video position, one panel per sentence length."""
    if not numbers["profiles"]:
        raise Skip("no prediction has a token before EOS")
    plt = pyplot()
    lengths = sorted(numbers["profiles"])
    fig, axes = plt.subplots(1, len(lengths), figsize=(3.6 * len(lengths), 3.6), squeeze=False, layout="constrained")
    for ax, L in zip(axes[0], lengths):
        mean = torch.stack(numbers["profiles"][L]).mean(0).numpy()
        im = ax.imshow(mean, aspect="auto", cmap="viridis", extent=[0, 100, len(mean) - 0.5, -0.5])
        plt.colorbar(im, ax=ax, label="attention mass", fraction=0.046, pad=0.02)
        ax.set_yticks(range(len(mean)), [str(i + 1) for i in range(len(mean))])
        ax.set_xlabel("video position (% of frames)")
        ax.set_title(f"{length_label(L)} ({len(numbers['profiles'][L])} samples)" + (", first 5 shown" if L == 5 else ""),
                     fontsize=10)
    fig.supylabel("token position", fontsize=10)        # once: beside each colour bar it met its label
    fig.suptitle(f"Decoder cross-attention (last layer) by relative video position: {label}", fontsize=10)
    return fig


DIAGONALITY_UNDEFINED = "undefined: no prediction of two tokens or more whose cross-attention centroids differ"


def figure_diagonality(numbers, label, meta):
    """Per decoder layer, the Spearman correlation of token position and cross-attention centroid."""
    scores = numbers["diagonality"]
    if not all(np.isfinite(scores)):
        raise Skip(DIAGONALITY_UNDEFINED)
    fig, ax = pyplot().subplots(figsize=(4 + 0.6 * len(scores), 3.4), layout="constrained")
    ax.bar([f"layer {l + 1}" for l in range(len(scores))], scores, color="tab:green")
    for l, value in enumerate(scores):
        ax.text(l, value, f"{value:.2f}", ha="center", va="bottom" if value >= 0 else "top")
    ax.set_ylim(-1, 1.1)
    ax.axhline(0, color="0.5", linewidth=0.8)
    ax.set_ylabel("diagonality (Spearman, token position\nvs cross-attention centroid)")
    ax.set_title(f"Diagonality of the cross-attention: {label}", fontsize=9)
    return fig


def figure_global_reliance(numbers, label, meta):
    """The video share of each decoding step's attention outputs, per sentence length."""
    fig, ax = pyplot().subplots(figsize=(7, 3.8), layout="constrained")
    for L in sorted(numbers["reliance"]):
        rows = numbers["reliance"][L]
        width = max(len(r) for r in rows)
        padded = torch.full((len(rows), width), float("nan"))
        for i, r in enumerate(rows):
            padded[i, :len(r)] = r
        ax.plot(range(1, width + 1), np.nanmean(padded.numpy(), 0), marker="o", label=length_label(L))
    ax.set_xlabel("decoding step (1 = first token; the last step writes EOS)")
    ax.set_ylabel("video share of the attention outputs\n(mean over decoder layers)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"Reliance on the video vs the previous tokens: {label}", fontsize=9)
    return fig


def mean_of_defined(values):
    """The mean over the first axis of the values that are not NaN (NaN where none is, without a warning)."""
    defined = ~np.isnan(values)
    return np.where(defined.any(0), np.where(defined, values, 0).sum(0) / np.maximum(defined.sum(0), 1), np.nan)


def figure_encoder_offsets(numbers, label, meta):
    """Encoder self-attention by relative frame offset, per layer."""
    mean = mean_of_defined(torch.stack(numbers["offsets"]).numpy())                # (L, 21)
    fig, ax = pyplot().subplots(figsize=(7, 3.6), layout="constrained")
    for l, row in enumerate(mean):
        ax.plot(range(-10, 11), row, marker="o", label=f"layer {l + 1}")
    ax.set_xlabel(f"key frame - query frame (model frames, one in {meta['data_config']['subsample']})")
    ax.set_ylabel("mean attention weight")
    ax.legend(fontsize=8)
    ax.set_title(f"Encoder self-attention by relative frame offset: {label}", fontsize=9)
    return fig


def figure_entropy(numbers, label, meta):
    """Normalised attention entropy per layer and head, for each attention group."""
    plt = pyplot()
    groups = list(numbers["entropy"])
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.2), squeeze=False, layout="constrained")
    for ax, group in zip(axes[0], groups):
        values = mean_of_defined(torch.stack(numbers["entropy"][group]).numpy())   # (L, h)
        im = ax.imshow(values, cmap="magma", vmin=0, vmax=1, aspect="auto")
        if np.isnan(values).all():
            ax.text(0.5, 0.5, "undefined: no row sees\ntwo keys or more", transform=ax.transAxes, ha="center",
                    va="center", fontsize=9)
        plt.colorbar(im, ax=ax, label="normalised entropy", fraction=0.046, pad=0.02)
        ax.set_xticks(range(values.shape[1]), [str(h + 1) for h in range(values.shape[1])])
        ax.set_yticks(range(values.shape[0]), [str(l + 1) for l in range(values.shape[0])])
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(group.replace("_", " "), fontsize=10)
    fig.suptitle(f"Attention entropy (0 = one key, 1 = uniform): {label}", fontsize=10)
    return fig


def figure_pointing_game(numbers, label, meta):
    """Each method's pointing-game accuracy and relevance mass in the true gloss segments."""
    if not numbers["pointing"]:
        raise Skip("no predicted token realises a gloss with a true segment" if numbers["aligned"]
                   else "no alignments.csv, so no true gloss segments")
    methods = list(numbers["pointing"])
    accuracy = [100 * np.mean(numbers["pointing"][m]) for m in methods]
    mass = [100 * np.mean(numbers["mass"][m]) for m in methods]
    fig, ax = pyplot().subplots(figsize=(10, 3.8), layout="constrained")
    x = np.arange(len(methods))
    ax.bar(x - 0.2, accuracy, 0.4, label="pointing game (argmax in the segment)")
    ax.bar(x + 0.2, mass, 0.4, label="positive relevance mass in the segment")
    ax.set_xticks(x, methods, rotation=45, ha="right")
    ax.set_ylabel("% (hits, or mean share of mass)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title(f"Plausibility against the true gloss segments ({len(numbers['pointing'][methods[0]])} "
                 f"occurrences): {label}", fontsize=9)
    return fig


GLOBAL_FIGURES = dict(cross_attention_by_length=figure_cross_attention_by_length, diagonality=figure_diagonality,
                      reliance=figure_global_reliance, encoder_offsets=figure_encoder_offsets,
                      entropy=figure_entropy, pointing_game=figure_pointing_game)


# ----------------------------------------------------------------------------------------------------
# View: view.html filled with one extraction, a single file that works offline
# ----------------------------------------------------------------------------------------------------

def view(cfg):
    """RUN/view_<split>.html: view.html with the extraction's samples (the first cfg.limit), the gloss segments
    and pose files of the data, the pointing game and the run's perturb tables. Without an extraction, the
    whole split is extracted and saved first, or with a limit only those samples, in memory."""
    check(cfg)
    start = time.time()
    run_dir, data, data_path = load_extraction(cfg, save=cfg.limit is None, limit=cfg.limit)
    meta, samples = data["meta"], data["samples"][:cfg.limit]
    alignments, links = segment_sources(data_path, meta["data_config"]["format"], meta["target"])
    packed = Packed()
    entries = [view_sample(s, meta, data_path, alignments, packed) for s in samples]
    page = dict(meta=dict(
        title=f"{run_dir}: {meta['split']} split, {len(samples)} samples, checkpoint of epoch {meta['epoch']}",
        methods=meta["methods"], signed=[m for m in meta["methods"] if m in explain.SIGNED],
        **dataset_display(data_path), pose_levels=POSE_LEVELS,
        points={name: [sum(map(len, list(VIEW_PARTS.values())[:i])), len(part)]         # [first, count]
                for i, (name, part) in enumerate(VIEW_PARTS.items())},
        edges=dict(body=sa.BODY_EDGES, hand=sa.HAND_EDGES),
        perturb=perturb_tables(run_dir, meta["split"]),
        pointing=pointing_summary(dict(meta=meta, samples=samples), alignments, links)), samples=entries)
    text = json.dumps(page, ensure_ascii=False, allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")     # cannot close its script
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "view.html"), encoding="utf-8") as f:
        template = f.read()
    path = os.path.join(run_dir, f"view_{meta['split']}.html")
    write_text(path, template.replace("'__SCRIPT_HASHES__'", script_policy(template))
               .replace("__VIEW_BLOB__", packed.encoded())
               .replace("__VIEW_DATA__", text))
    log(f"{len(samples)} samples, {os.path.getsize(path) / 1e6:.1f} MB, in {time.time() - start:.1f}s; open it in "
        "any browser, offline:")
    log(path)


def dataset_display(data_path):
    """The frame rate and the video's aspect ratio recorded by poses in metadata.json (25 and 1 without)."""
    recorded = {}
    if os.path.exists(os.path.join(data_path, "metadata.json")):
        with open(os.path.join(data_path, "metadata.json"), encoding="utf-8") as f:
            recorded = json.load(f)
    return dict(fps=recorded.get("fps") or 25, aspect=recorded.get("aspect") or 1)


def pointing_summary(data, alignments, links):
    """The pointing game and the relevance mass in the true segment of each method, in %, for the page; None
    without a gloss occurrence to point at."""
    methods = data["meta"]["methods"]
    plausible = explain.plausibility(data, alignments, links, methods)
    if not plausible or not len(plausible["sample"]):
        return None
    return dict(occurrences=len(plausible["sample"]), methods={
        m: [100 * float(plausible[m][0].mean()), 100 * float(plausible[m][1].mean())] for m in methods})


VIEW_PARTS = dict(body=sa.BODY[:25], left=sa.LEFT_HAND, right=sa.RIGHT_HAND, face=[sa.FACE[i] for i in sa.FACE_OVAL])
VIEW_POINTS = [p for part in VIEW_PARTS.values() for p in part]                        # what the viewer draws


class Packed:
    """Arrays for the viewer in one byte string: add() keeps an array (little-endian, at an offset that is a
    multiple of 4) and returns [offset, type, shape], from which the page makes a typed array."""
    TYPES = {np.dtype("float32"): "f4", np.dtype("uint8"): "u1", np.dtype("uint16"): "u2"}

    def __init__(self):
        self.parts, self.size = [], 0

    def add(self, array):
        array = np.ascontiguousarray(array)
        entry = [self.size, self.TYPES[array.dtype], list(array.shape)]
        raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        self.parts.append(raw + b"\0" * (-len(raw) % 4))
        self.size += len(self.parts[-1])
        return entry

    def encoded(self):
        """zlib-deflated (what the browser's DecompressionStream("deflate") reads) and base64."""
        return base64.b64encode(zlib.compress(b"".join(self.parts), 9)).decode("ascii")


POSE_LEVELS = 4095                     # codes 0..4094 over a sample's extent (a 300-pixel signer: 0.07 px steps)


def pose_codes(points):
    """(F, P, 2) coordinates -> (codes, lo, hi): uint16 codes 0..4094 over the sample's extent, 4095 where a
    point was not detected, then each frame's codes minus the previous frame's (modulo 2**16), which
    deflate packs far tighter (the page adds them back up)."""
    points = np.where(np.isfinite(points), points, np.nan)                       # inf is no place either
    lo, hi = np.nanmin(points, (0, 1)), np.nanmax(points, (0, 1))
    codes = np.round((points - lo) / np.maximum(hi - lo, 1e-12) * (POSE_LEVELS - 1))
    codes = np.where(np.isnan(codes), POSE_LEVELS, codes).astype(np.int64)
    return (np.diff(codes, axis=0, prepend=0) % 65536).astype(np.uint16), lo, hi


def view_sample(s, meta, data_path, alignments, packed):
    """What the page shows of one extracted sample; its arrays go into `packed`."""
    target, k, layout = meta["target"], meta["data_config"]["subsample"], meta["data_config"]["format"]
    reference = s[f"{target}_reference"]
    entry = dict(id=s["id"], tokens=s["tokens"], prediction=s["prediction"], reference=reference,
                 gloss_reference=s["gloss_reference"], exact=s["prediction"] == reference, frames=s["frames"],
                 subsample=k, pose=None, segments=[[g, a, b] for _, g, a, b in sorted(alignments.get(s["id"], []))])
    pose = sa.sample_pose(data_path, s["id"], layout)
    if pose is not None:
        points = pose[:, VIEW_POINTS]
        if np.isfinite(points).any():
            codes, lo, hi = pose_codes(points)
            entry["pose"] = dict(array=packed.add(codes), lo=lo.tolist(), hi=hi.tolist())
    arrays = {f"rel:{m}": packed.add(s["relevance"][m].float().numpy()) for m in meta["methods"]}
    arrays["cross"] = packed.add(s["attention"]["decoder_cross"].float().mean(1).numpy())           # (L, n, T)
    arrays["share"] = packed.add(explain.video_share(s["branch_norms"]).numpy())                  # (L, n)
    if meta["ctc_trained"]:
        posteriors, vocab = s["gloss_posteriors"].float(), meta["gloss_vocab"]                      # (T, V)
        keep = set((torch.nonzero(posteriors[:, 4:].max(0).values >= 0.1)[:, 0] + 4).tolist())   # not the specials
        keep |= {vocab.index(g) for g in s["gloss_reference"] if g in vocab}
        keep = sorted(keep, key=lambda i: int(posteriors[:, i].argmax()))                # in order of their peaks
        if keep:
            arrays["ctc"] = packed.add(np.round(posteriors[:, keep].numpy() * 255).astype(np.uint8))
            entry["ctc_glosses"] = [vocab[i] for i in keep]
    entry["arrays"] = arrays
    return entry


def perturb_tables(run_dir, split):
    """The perturb tables of the split in the run folder (CSV and curves), as the page shows them."""
    tables = []
    for name in sorted(os.listdir(run_dir)):
        if not (name.startswith(f"perturb_{split}_") and name.endswith(".csv")) or name.endswith("_curves.csv"):
            continue
        with open(os.path.join(run_dir, name), encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        columns = [c for c in rows[0] if f"{c}_low" in rows[0]] if rows else []
        cells = lambda r, c: [float(r[c + suffix]) for suffix in ("", "_low", "_high")]
        table = dict(title=name[:-4].replace("_", " "), columns=columns, curves=None, top=1.0, rows=[
            dict(method=r["method"], beats_random=r["beats_random"],
                 **{c: cells(r, c) for c in columns if all(map(math.isfinite, cells(r, c)))}) for r in rows])
        curves_path = os.path.join(run_dir, name[:-4] + "_curves.csv")
        if os.path.exists(curves_path):
            table["curves"] = {}
            with open(curves_path, encoding="utf-8") as f:
                for r in csv.DictReader(f):
                    score = float(r["score"])
                    table["curves"].setdefault(r["method"], {}).setdefault(r["direction"], []).append(
                        score if math.isfinite(score) else None)
        tables.append(table)
    return tables


def script_policy(template):
    """The Content-Security-Policy's script sources for a page: the SHA-256 hash of every inline script that
    runs (a bare <script>; data blocks have a type and never run), so no other script can."""
    digest = lambda text: base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
    return " ".join(f"'sha256-{digest(text)}'" for text in re.findall(r"<script>(.*?)</script>", template, re.S))


# ----------------------------------------------------------------------------------------------------
# Perturb: faithfulness (perturbation tests) and plausibility
# ----------------------------------------------------------------------------------------------------

def perturb(cfg):
    """Positive/negative perturbation AUC of each method with 95% bootstrap intervals, random as control,
    and the pointing game and relevance mass in the true segments where alignments exist: RUN/perturb_<split>_
    <level>[...].csv, .md, _curves.csv and the curves' figure. Under torchrun the methods are shared."""
    check(cfg)
    start = time.time()
    methods = method_list(cfg.methods)
    methods += [] if "random" in methods else ["random"]
    run = open_run(cfg)
    data, B, curves, stats = perturbation_tests(cfg, run, methods)
    samples = data["samples"]
    skipped = B - len(samples)
    if not WORLD.main:
        return
    alignments, links = segment_sources(run.data_path, run.dataset.cfg.format, run.dataset.cfg.target, run.alignments)
    plausibility = explain.plausibility(data, alignments, links, methods)
    rows = explain.perturb_table(curves, stats, plausibility, cfg.bootstrap, cfg.seed)
    stem = os.path.join(run.dir, f"perturb_{cfg.split}_{cfg.level}" + ("_zero" if cfg.perturb_mode == "zero" else "")
                        + (f"_first{B}" if B < len(run.dataset) else "")
                        + ("_" + "+".join(methods) if cfg.methods != "all" else ""))
    clean = clean_score(curves, stats) + (f"\n\n{skipped} sample(s) of one frame skipped: no frame can be removed"
                                          if skipped else "") + plausibility_note(plausibility)
    means = explain.mean_curves(curves, stats)
    written = write_perturb(stem, rows, means, cfg, len(samples), clean)
    written.append(plot_curves(stem, means, rows, cfg, len(samples)))
    log(markdown_table(rows, cfg.level))
    log(clean)
    log(explain.verdict(rows))
    for path in written:
        log(path)
    log(f"perturbation tests of {len(methods)} methods on {len(samples)} samples in {format_time(time.time() - start)}")


def perturbation_tests(cfg, run, methods):
    """The perturbation tests at cfg.level of the run's split (its first cfg.limit samples): (the extraction of
    the samples tested, the number of samples before those of one frame were skipped, {method: (B, 2, P)
    scores, the mean over tokens}, {method: BLEU statistics} at sentence level). Under torchrun each process
    tests every size-th method and every process gets them all."""
    data = perturb_samples(cfg, run, methods)
    samples = data["samples"]
    B = len(samples)
    batch = to_device(run.dataset.batch(list(range(B))), run.device)
    src, mask = batch["src"], batch["src_mask"]
    keep = perturbable(run.dir, cfg.split, samples, mask, methods)
    if len(keep) < B:
        samples, src, mask = [samples[b] for b in keep], src[keep], mask[keep]
        data = dict(data, samples=samples)
    out = explain.token_ids(samples, run.dataset.target_vocab, run.device)
    log(f"{run.dir}: {len(samples)} {cfg.split} samples, {len(methods)} methods, {cfg.level} level, frames removed by "
        f"{removal(cfg)}, fractions 0..0.9" + (f", methods shared among {WORLD.size} processes" if WORLD.size > 1 else ""))
    curves, stats = {}, {}
    for part in WORLD.gather(perturb_methods(cfg, run, samples, WORLD.mine(methods), src, mask, out)):
        curves.update(part[0])
        stats.update(part[1])
    return data, B, {m: curves[m] for m in methods}, {m: stats[m] for m in methods if m in stats}


def removal(cfg):
    """How the perturbation removes frames, in words."""
    return "the key mask" if cfg.perturb_mode == "mask" else "zeroing"


def perturb_samples(cfg, run, methods):
    """The extraction samples (tokens, relevance) of the first cfg.limit samples of the split: from the run's
    extraction where it holds them for this checkpoint, else explained now (and saved as the extraction when
    that is the whole split with every method and no extraction file exists yet)."""
    dataset = run.dataset
    count = len(dataset) if cfg.limit is None else min(cfg.limit, len(dataset))
    path = os.path.join(run.dir, f"extract_{cfg.split}.pt")
    if os.path.exists(path):
        data = torch.load(path, weights_only=True)
        meta, samples = data["meta"], data["samples"]
        held = [s["id"] for s in samples[:count]] == [r.id for r in dataset.records[:count]]
        if meta["epoch"] == run.epoch and set(methods) <= set(meta["methods"]) and held:
            log(f"relevance from {path}")
            data["samples"] = samples[:count]
            return data
        why = ("an earlier checkpoint" if meta["epoch"] != run.epoch else
               "other methods" if not set(methods) <= set(meta["methods"]) else "other samples")
        log(f"{path} holds {why}: explaining {count} samples now")
    data = extract_samples(run, methods, limit=count)
    data["samples"] = data["samples"][:count]
    if WORLD.main and count == len(dataset) and set(methods) >= set(explain.METHODS) and not os.path.exists(path):
        sa.save_checkpoint(path, data)
        log(f"wrote {path} (`python run.py plot` reads it)")
    return data


def perturbable(run_dir, split, samples, mask, methods):
    """The indices of the samples to perturb: every sample must match the data and hold finite relevance, and
    a sample of one real frame (mask (B, T)), of which no frame can be removed, is skipped with a warning."""
    lengths, real = sa.frame_lengths(mask), mask.sum(1)
    for b, s in enumerate(samples):
        if s["frames"] != int(lengths[b]):
            raise sa.DataError(f"{run_dir}/extract_{split}.pt: sample {s['id']} has {s['frames']} frames, the data "
                               f"{int(lengths[b])} (extracted from other data? run `python run.py extract` again)")
        for m in methods:
            if not torch.isfinite(s["relevance"][m]).all():
                raise sa.DataError(f"{run_dir}: the {m} relevance of sample {s['id']} holds NaN or infinite values")
    keep = [b for b in range(len(samples)) if real[b] >= 2]
    if not keep:
        raise sa.DataError(f"{run_dir}: every {split} sample has one frame, from which no frame can be removed: "
                           "nothing to perturb")
    if len(keep) < len(samples):
        log(f"warning: skipped {len(samples) - len(keep)} sample(s) of one frame, from which no frame can be "
            "removed: " + ", ".join(samples[b]["id"] for b in range(len(samples)) if real[b] < 2))
    return keep


def plausibility_note(plausibility):
    """A line where the plausibility columns are missing: without segments for these samples (no alignments.csv,
    or none of its rows for this split), or without an occurrence."""
    if not plausibility:
        return "\n\nno alignments.csv rows for these samples: no pointing game or mass in the segment"
    if not len(plausibility["sample"]):
        return "\n\nno predicted token realises a gloss with a true segment: no pointing game or mass in the segment"
    return ""


def perturb_methods(cfg, run, samples, methods, src, mask, out):
    """({method: (B, 2, P) scores, the mean over tokens}, {method: BLEU statistics} at sentence level)."""
    model, dataset, curves, stats = run.model, run.dataset, {}, {}
    references = [" ".join(s[f"{dataset.cfg.target}_reference"]) for s in samples]
    progress = Progress(methods, cfg.level)
    for method in methods:
        R = explain.padded_relevance(samples, method, out.shape[1], src.shape[1], src.device)
        progress.begin(method)
        if cfg.level == "token":
            scores = explain.token_perturbation(model, src, mask, out, R, mode=cfg.perturb_mode, seed=cfg.seed,
                                                progress=progress)
            curves[method] = scores.nanmean(1).double().cpu()                # (B, 2, P): mean over tokens
        else:
            decoded = explain.sentence_perturbation(model, src, mask, R, out != dataset.target_vocab.pad_id,
                                                    dataset.cfg.max_tokens + 1, mode=cfg.perturb_mode, seed=cfg.seed,
                                                    progress=progress)
            curves[method], stats[method] = explain.sentence_scores(decoded.cpu(), references, dataset.target_vocab)
    return curves, stats


class Progress:
    """Method, fraction and how long the rest should take: one line rewritten in place on a terminal, else a
    line every 10 seconds and at the end of each method."""

    def __init__(self, methods, level):
        self.methods, self.level = methods, level
        self.start, self.method_start, self.index = time.time(), None, -1
        self.tty, self.printed = sys.stdout.isatty(), 0.0

    def begin(self, method):
        self.index += 1
        self.method, self.method_start = method, time.time()

    def __call__(self, f, done, total):
        """After each batch: fraction index f, and frames forwarded so far and in all for this method."""
        share = done / total
        spent = time.time() - self.method_start
        per_method = (time.time() - self.start) / (self.index + share)
        eta = spent / share * (1 - share) + per_method * (len(self.methods) - self.index - 1)
        line = (f"perturb {self.level}  {self.method:<24} ({self.index + 1}/{len(self.methods)})  fraction "
                f"{explain.FRACTIONS[f]:.1f}  {100 * share:3.0f}% of the method  ETA {format_time(eta)}")
        if self.tty and WORLD.main:
            print("\r" + line.ljust(100), end="\n" if done == total else "", flush=True)
        elif done == total or time.time() - self.printed >= 10:
            log(line)
            self.printed = time.time()


def clean_score(curves, stats):
    """What the unperturbed input scores (fraction 0, the same for every method)."""
    c = next(iter(curves.values()))
    if not stats:
        return (f"clean input: {100 * float(c[:, 0, 0].mean()):.2f}% of the explained tokens are the teacher-forced "
                f"model's first choice (mean over samples)")
    bleu = float(sa.bleu_from_statistics(next(iter(stats.values()))[:, 0, 0].sum(0).numpy()))
    return f"clean input: greedy decoding BLEU-4 {bleu:.2f} against the reference"


MEASURES = dict(token=[("positive", "positive AUC (lower is better)"), ("negative", "negative AUC (higher is better)")],
                sentence=[("positive", "positive AUC, token accuracy (lower is better)"),
                          ("negative", "negative AUC, token accuracy (higher is better)"),
                          ("bleu_positive", "positive AUC, BLEU-4 / 100 (lower is better)"),
                          ("bleu_negative", "negative AUC, BLEU-4 / 100 (higher is better)")])
PLAUSIBILITY = [("pointing", "pointing game % (higher is better)"), ("mass", "mass in the segment % (higher is better)")]


def table_columns(rows, level):
    return MEASURES[level] + ([c for c in PLAUSIBILITY if c[0] in rows[0]] if rows else [])


def markdown_table(rows, level):
    columns = table_columns(rows, level)
    cell = lambda v: f"{v[0]:.1f} [{v[1]:.1f}, {v[2]:.1f}]"
    lines = ["| method | " + " | ".join(title for _, title in columns) + " | beats random on |",
             "|---|" + "---|" * (len(columns) + 1)]
    for r in rows:
        beats = "(control)" if r["beats_random"] is None else ", ".join(r["beats_random"]) or "none"
        lines.append(f"| {r['method']} | " + " | ".join(cell(r[k]) if k in r else "-" for k, _ in columns)
                     + f" | {beats} |")
    return "\n".join(lines)


def write_perturb(stem, rows, means, cfg, count, clean):
    """The table as CSV and Markdown, and the mean curves as CSV."""
    columns = table_columns(rows, cfg.level)
    header = ["method"] + [f"{k}{suffix}" for k, _ in columns for suffix in ("", "_low", "_high")]
    occurrences = ["occurrences"] if "occurrences" in rows[0] else []
    header += occurrences + ["beats_random"]

    def table(f):
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for r in rows:
            values = [f"{v:.4f}" for k, _ in columns for v in r.get(k, (float("nan"),) * 3)]
            w.writerow([r["method"]] + values + [r[k] for k in occurrences]
                       + ["control" if r["beats_random"] is None else ";".join(r["beats_random"])])

    def markdown(f):
        f.write(f"# Perturbation tests: {cfg.level} level, {count} {cfg.split} samples, frames removed by "
                f"{removal(cfg)}\n\n"
                "AUC of the score against the fraction of frames removed (0 to 0.9, x 100, so 90 at most), the "
                "mean over samples (BLEU: of the corpus score); plausibility over gloss occurrences. Brackets: 95% "
                f"bootstrap interval over the {count} samples.\n\n")
        f.write(markdown_table(rows, cfg.level) + "\n\n" + clean + "\n\n" + explain.verdict(rows) + "\n")

    def curves(f):
        w = csv.writer(f, lineterminator="\n")
        measures = list(next(iter(means.values())))                      # score (and bleu4)
        w.writerow(["method", "direction", "fraction"] + measures)
        for m, mean in means.items():
            for d, direction in enumerate(explain.DIRECTIONS):
                for f_, p in enumerate(explain.FRACTIONS):
                    w.writerow([m, direction, p] + [f"{mean[k][d, f_]:.{4 if k == 'score' else 2}f}" for k in measures])

    written = []
    for suffix, write in ((".csv", table), (".md", markdown), ("_curves.csv", curves)):
        buffer = io.StringIO()
        write(buffer)
        path = stem + suffix
        write_text(path, buffer.getvalue())
        written.append(path)
    return written


def plot_curves(stem, means, rows, cfg, count):
    """Score against the fraction of frames removed, one line per method, the random control dashed."""
    plt = pyplot()
    panels = [(what, d) for what in next(iter(means.values())) for d in range(2)]          # score (and bleu4)
    fig, axes = plt.subplots(len(panels) // 2, 2, figsize=(15, 4.4 * len(panels) // 2), squeeze=False,
                             layout="constrained")
    x = 100 * np.array(explain.FRACTIONS)
    colors = plt.get_cmap("tab20")
    by_method = {r["method"]: r for r in rows}
    for ax, (what, d) in zip(axes.flat, panels):
        direction = explain.DIRECTIONS[d]
        key = direction if what == "score" else f"bleu_{direction}"
        for m, mean in means.items():
            y = mean[what][d]
            style = dict(color="black", linestyle="--", linewidth=1.8) if m == "random" else dict(
                color=colors(explain.METHODS.index(m) % 20), linewidth=1.3)
            ax.plot(x, y, marker="o", markersize=3, label=f"{m} ({by_method[m][key][0]:.1f})", **style)
        ylabel = ("token still ranked first" if cfg.level == "token" else "token accuracy vs clean decoding")
        ax.set_ylabel(ylabel if what == "score" else "BLEU-4 vs reference")
        ax.set_xlabel(f"frames removed ({'most' if d == 0 else 'least'} relevant first), %")
        ax.set_xlim(0, 90)
        ax.set_ylim(0, 1.02 if what == "score" else 100)
        ax.set_title(f"{direction} perturbation ({'lower' if d == 0 else 'higher'} AUC is better)", fontsize=10)
        ax.legend(fontsize=7, title="method (AUC)", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(f"Perturbation tests, {cfg.level} level: {count} {cfg.split} samples, frames removed by "
                 f"{removal(cfg)}", fontsize=11)
    return save_figure(fig, f"{stem}.{cfg.figure_type}")


# ----------------------------------------------------------------------------------------------------
# Claims
# ----------------------------------------------------------------------------------------------------

PRESET_EXACT = 70.0       # % exact test sentences the signattention preset needs for the SignAttention rows
CLAIM_RUNS = dict(        # each configuration's train options, seed k added
    gloss=dict(target="gloss"),
    text={},
    base=dict(ctc_weight=0.0, signcl=0.0),
    signcl=dict(ctc_weight=0.0, signcl=0.01),
)
RUNS_OF = dict(gloss=("gloss",), text=("text",), signcl=("base", "signcl"))


def claims(cfg):
    """Train the runs the claims need (reusing finished ones, resuming interrupted ones), extract and perturb
    them, measure each claim of explain.CLAIMS with its interval and verdict, and write claims.md and
    claims.json. Runs: `gloss` (SignAttention's analyses on a model that writes glosses: the default recipe
    with --target gloss, or the signattention preset's run in OUT/signattention when it decodes at least
    PRESET_EXACT % of the test sentences exactly), `text` (the default model, for the perturbation tests),
    and `base`/`signcl` (gloss-free training, CTC weight 0, without and with SignCL), one per seed. The preset's
    run (seed 0, as its paper reports one model) is trained first when a SignAttention claim is selected."""
    check(cfg)
    selected = claim_selection(cfg.only)
    out = cfg.out or os.path.join("runs", "claims-" + (os.path.basename(os.path.normpath(cfg.data)) or "data"))
    os.makedirs(out, exist_ok=True)
    ensure_data(cfg.data)
    if any(c.runs == "gloss" for c in selected):
        preset = os.path.join(out, "signattention")
        log(f"claims: the signattention preset, seed 0: {preset} (the SignAttention rows use it if it decodes "
            f"{PRESET_EXACT:g}% of the test sentences exactly)")
        train_claim_run(preset, cfg, {}, preset="signattention")
    gloss_note, preset_dir = signattention_choice(out)
    log(f"SignAttention rows: {gloss_note}")
    families = sorted({kind for c in selected for kind in RUNS_OF[c.runs]})
    if preset_dir:
        families = [f for f in families if f != "gloss"]
    stages = [(kind, seed) for kind in families for seed in range(cfg.seeds)]
    start = time.time()
    inputs = dict(gloss=[], text=[], signcl=[])
    pairs = {}
    for done, (kind, seed) in enumerate(stages):
        run_dir = os.path.join(out, f"{kind}-s{seed}")
        log(f"claims: stage {done + 1}/{len(stages)}: {run_dir}" + (
            f"  ETA {format_time((time.time() - start) / done * (len(stages) - done))}" if done else ""))
        train_claim_run(run_dir, cfg, dict(CLAIM_RUNS[kind], seed=seed))
        if kind == "gloss":
            inputs["gloss"].append(claim_extraction(run_dir, cfg, "attention"))
        elif kind == "text":
            inputs["text"].append(claim_aucs(run_dir, cfg))
        else:
            pairs.setdefault(seed, {})[kind] = claim_translations(run_dir)
    if preset_dir:
        inputs["gloss"].append(claim_extraction(preset_dir, cfg, "attention"))
    inputs["signcl"] = [pairs[k] for k in sorted(pairs) if len(pairs[k]) == 2]
    rows = [claim_row(c, inputs, cfg, gloss_note) for c in selected]
    written = write_claims(out, rows, cfg, gloss_note)
    log(claims_table(rows))
    for path in written:
        log(path)
    log(f"{len(rows)} claims in {format_time(time.time() - start)}")
    return rows


def claim_selection(only):
    """The claims of explain.CLAIMS named by --only (all without it)."""
    if only is None:
        return list(explain.CLAIMS)
    keys = [k.strip() for k in only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in {c.key for c in explain.CLAIMS}]
    if unknown or not keys:
        raise sa.DataError(f"--only: unknown claim(s) {', '.join(unknown) or '(none given)'}; the claims are "
                           + ", ".join(c.key for c in explain.CLAIMS))
    return [c for c in explain.CLAIMS if c.key in keys]


def signattention_choice(out):
    """(why the SignAttention rows use the model they use, the preset's run folder or None): the signattention
    preset's run in OUT/signattention when it finished and decodes at least PRESET_EXACT % of the test
    sentences exactly, else the default recipe with --target gloss."""
    preset = os.path.join(out, "signattention")
    if not os.path.exists(os.path.join(preset, "results.json")):
        return (f"default recipe with --target gloss: no finished signattention preset run in {preset} (train one "
                f"with `python run.py train --preset signattention --out {preset}`)"), None
    exact = exact_share(preset)
    if exact < PRESET_EXACT:
        return (f"default recipe with --target gloss: the signattention preset ({preset}) decodes {exact:.1f}% of "
                f"the test sentences exactly, under {PRESET_EXACT:g}%"), None
    return f"signattention preset ({preset}): {exact:.1f}% exact test sentences", preset


def exact_share(run_dir):
    """% of test sentences a finished run decodes exactly (its target: glosses or text), from translations.csv."""
    target = run_config(run_dir)["data"]["target"]
    with open(os.path.join(run_dir, "translations.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return 100.0 * sum(r[f"{target}_prediction"] == r[f"{target}_reference"] for r in rows) / max(len(rows), 1)


def train_claim_run(run_dir, cfg, options, preset="default"):
    """Train a claims run in run_dir unless it finished (results.json); resume it if it was interrupted."""
    if os.path.exists(os.path.join(run_dir, "results.json")):
        log(f"{run_dir}: finished, reused")
    elif os.path.exists(os.path.join(run_dir, "last.pt")):
        train(TrainConfig(resume=run_dir, device=cfg.device))
    else:
        train(TrainConfig(data=cfg.data, out=run_dir, device=cfg.device, preset=preset,
                          overrides=dict(cfg.overrides, **options)))


def claim_extraction(run_dir, cfg, methods):
    """The run's test extraction holding `methods` (made if missing or older than the checkpoint)."""
    run = open_run(RunConfig(run=run_dir, device=cfg.device))
    path = os.path.join(run_dir, "extract_test.pt")
    if os.path.exists(path):
        data = torch.load(path, weights_only=True)
        count = len(run.dataset) if cfg.limit is None else min(cfg.limit, len(run.dataset))
        if data["meta"]["epoch"] == run.epoch and set(method_list(methods)) <= set(data["meta"]["methods"]) \
                and len(data["samples"]) == count:
            return data
    return write_extraction(run, method_list(methods), limit=cfg.limit)[1]


def claim_aucs(run_dir, cfg):
    """{method: (B, 2) positive and negative token-level AUC per test sample} of explain.CLAIM_METHODS, from
    RUN/claims_auc.pt or measured now (and saved there)."""
    path = os.path.join(run_dir, "claims_auc.pt")
    methods = list(explain.CLAIM_METHODS)
    run = open_run(RunConfig(run=run_dir, device=cfg.device))
    if os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        if saved["epoch"] == run.epoch and saved["limit"] == cfg.limit and set(methods) <= set(saved["auc"]):
            return saved["auc"]
    claim_extraction(run_dir, cfg, ",".join(methods))
    perturb_cfg = PerturbConfig(run=run_dir, limit=cfg.limit, device=cfg.device)
    _, _, curves, _ = perturbation_tests(perturb_cfg, run, methods)
    aucs = {m: explain.auc(c).float() for m, c in curves.items()}
    sa.save_checkpoint(path, dict(epoch=run.epoch, limit=cfg.limit, auc=aucs))
    return aucs


def claim_translations(run_dir):
    """A finished run's test SDR, BLEU-4 and per-sentence BLEU statistics (from results.json and
    translations.csv)."""
    with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as f:
        test = json.load(f)["test"]
    target = run_config(run_dir)["data"]["target"]
    with open(os.path.join(run_dir, "translations.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    stats = [sa.bleu_statistics(r[f"{target}_prediction"], r[f"{target}_reference"]) for r in rows]
    return dict(sdr=test.get("sdr", float("nan")), bleu4=test["bleu4"], bleu_statistics=stats)


def claim_row(claim, inputs, cfg, gloss_note):
    """One row of claims.json: the keys the issue of record names, and the data and models it ran on."""
    value, low, high, verdict = explain.measure_claim(claim, inputs, cfg.bootstrap)
    models = dict(gloss=gloss_note, text=f"default recipe, {cfg.seeds} seed(s)",
                  signcl=f"default recipe with CTC weight 0, lambda 0 and 0.01, {cfg.seeds} seed(s) each")[claim.runs]
    command = f"python run.py claims --data {cfg.data} --seeds {cfg.seeds} --only {claim.key}"
    return dict(key=claim.key, paper=claim.paper, source=claim.source, claim=claim.claim, measure=claim.measure,
                unit=claim.unit.strip(), paper_value=claim.paper_value, value=value, low=low, high=high,
                verdict=verdict, rule=claim.rule.text(claim.unit), data=cfg.data, models=models, command=command)


def number(x):
    return "undefined" if not math.isfinite(x) else f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"


def claims_table(rows):
    """The claims as a markdown table."""
    lines = ["| paper | claim | measure | paper's figure | ours [95% interval] | verdict |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['paper']} | {r['claim']} ({r['source']}) | {r['measure']} | {r['paper_value'] or '—'} | "
                     f"{number(r['value'])} [{number(r['low'])}, {number(r['high'])}]{' ' + r['unit'] if r['unit'] else ''} "
                     f"| **{r['verdict']}** |")
    return "\n".join(lines)


def write_claims(out, rows, cfg, gloss_note):
    """claims.md (the table, the rules, the models and the commands) and claims.json (the rows)."""
    md = [f"# Claims on {cfg.data}", "", claims_table(rows), "", "## Rules (fixed before any number was seen)", ""]
    md += [f"- `{r['key']}`: {r['rule']}" for r in rows]
    md += ["", "## Models", "", f"- SignAttention rows: {gloss_note}",
           f"- seeds: {cfg.seeds}; intervals: 95% bootstrap over the trained models and, within each, over the test "
           f"samples ({cfg.bootstrap} resamples)", "", "## One row alone", ""]
    md += [f"- `{r['key']}`: `{r['command']}`" for r in rows]
    md_path, json_path = os.path.join(out, "claims.md"), os.path.join(out, "claims.json")
    write_text(md_path, "\n".join(md) + "\n")
    finite = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v      # JSON has no NaN
    write_json(json_path, [{k: finite(v) for k, v in r.items()} for r in rows])
    return [md_path, json_path]


# ----------------------------------------------------------------------------------------------------
# Command line: the parser, built from the configurations above
# ----------------------------------------------------------------------------------------------------

MODES = dict(
    poses=(poses, PosesConfig, "MediaPipe Holistic keypoints of real recordings, in the dataset layout train reads "
                               "(needs the optional requirements-poses.txt)"),
    train=(train, TrainConfig, "train a model (default: synthetic GSL)"),
    eval=(evaluate, EvalConfig, "evaluate a trained run on a split"),
    extract=(extract, ExtractConfig, "decode a split and save attention, CTC posteriors and relevance"),
    bench=(bench, BenchConfig, "time batched explanations against the per-token loop (or the perturbation tests, "
                               "the training step, long videos, the training recipes)"),
    view=(view, ViewConfig, "one HTML file to explore every sample, token and method (from the extraction, made "
                            "if missing)"),
    plot=(plot, PlotConfig, "draw the SignAttention figures from the extraction (made if missing)"),
    perturb=(perturb, PerturbConfig, "perturbation tests (faithfulness) and pointing game (plausibility)"),
    claims=(claims, ClaimsConfig, "every claim of the four papers, measured with seeds and 95% intervals"),
)


class Number:
    """An argparse type for a numeric option: `kind` (int or float), finite and within the range of its
    field's metadata (low, high, open_low); a value out of range is refused before any work is done."""

    def __init__(self, kind, meta):
        self.kind, self.meta = kind, meta
        self.__name__ = kind.__name__                      # argparse names the type in its messages

    def __call__(self, text):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if self.kind is int else 'a number'}")
        why = out_of_range(value, self.kind, self.meta)
        if why:
            raise argparse.ArgumentTypeError(f"{text} is not {range_text(self.kind, self.meta)}")
        return value


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block): `run.py train: error: argument --epochs: ...`."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_options(parser, config, override=False):
    """One argument per field of a configuration dataclass that carries help (see signattention.option): a
    positional where the metadata says so, a number range-checked, a choice among its values, a flag for a
    boolean. With `override` (train's sections) every option defaults to None, so that the preset's value
    holds unless it is given, and a boolean is a pair --x / --no-x."""
    for f in fields(config):
        meta = f.metadata
        if "help" not in meta:
            continue
        kind = value_kind(f)
        shown = ("on" if f.default else "off") if override and kind is bool else f.default
        hidden = shown is None or shown is False or shown is MISSING or shown in ("", ()) or "parse" in meta \
            or "(default" in meta["help"]
        shown = "" if hidden else f" (default {shown})"
        spec = dict(help=(meta["help"] + shown).replace("%", "%%"))
        if not override:
            spec["default"] = None if f.default is MISSING else f.default
        if kind is bool:
            assert override or f.default is False, f"{f.name}: a flag that is on by default could not be turned off"
            spec["action"] = argparse.BooleanOptionalAction if override else "store_true"
        elif "parse" in meta:
            spec["type"] = meta["parse"]
        elif "choices" in meta:
            spec.update(type=kind, choices=meta["choices"])
        elif kind in (int, float):
            spec["type"] = Number(kind, meta)
        spec.update({key: meta[key] for key in ("metavar", "nargs", "const") if key in meta})
        if meta.get("positional"):
            if f.default is not MISSING:
                spec["nargs"] = "?"
            spec.pop("metavar", None)
            parser.add_argument(f.name, **spec)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **spec)


def parser():
    """The command line: one sub-command per mode of MODES, its options those of the mode's configuration
    (and for train, of every section a preset sets)."""
    p = Parser(description="Interpretable sign language translation: train, evaluate, explain.")
    sub = p.add_subparsers(dest="mode", required=True)
    for name, (_, config, helptext) in MODES.items():
        mode = sub.add_parser(name, help=helptext.replace("%", "%%"))
        add_options(mode, config)
        if config is TrainConfig:
            for section, title in zip(SECTIONS.values(), ("data", "model", "training recipe")):
                add_options(mode.add_argument_group(f"{title} (the preset's values unless given)"), section,
                            override=True)
    return p


def configuration(args):
    """The mode's configuration from parsed arguments: its fields, and for train the options given of its
    sections as overrides."""
    config = MODES[args.mode][1]
    values = {f.name: getattr(args, f.name) for f in fields(config) if "help" in f.metadata}
    if config is TrainConfig:
        values["overrides"] = {f.name: getattr(args, f.name) for section in SECTIONS.values()
                               for f in fields(section) if "help" in f.metadata and getattr(args, f.name) is not None}
    return config(**values)


def main(argv=None):
    """Run one mode from command-line arguments; the exit code: 0, 1 when poses could not read a clip, 2 on bad
    input (one line on stderr, `error: ...`), 130 when interrupted."""
    args = parser().parse_args(argv)
    try:
        status = MODES[args.mode][0](configuration(args))
    except sa.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return status if args.mode == "poses" else 0


if __name__ == "__main__":
    sys.exit(main())
