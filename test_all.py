"""Tests: the maths pinned on small inputs, bad input refused clearly, and the commands run as a user runs them.

    pytest test_all.py
"""
import argparse
import concurrent.futures
import contextlib
import csv
from dataclasses import fields
import gzip
from html import unescape
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

os.environ["OMP_NUM_THREADS"] = "1"       # one torch thread here and in every run.py started here: see UserRuns
import numpy as np
import pytest
import torch

torch.set_num_threads(1)                                  # (if a plugin imported torch before the line above)
import signattention as sa
import sign_cl
from sign_cl import SignCL, sdr, signcl_margin

HERE = os.path.dirname(os.path.abspath(__file__))
RUN = [sys.executable, os.path.join(HERE, "run.py")]
TINY_MODEL = ["--d-model", "32", "--encoder-layers", "1", "--decoder-layers", "1", "--batch-size", "8"]


# ----------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_gsl(tmp_path_factory):
    """A small synthetic GSL: 16 sentences x 3 signers (train, val, test)."""
    return sa.generate_synthetic_gsl(str(tmp_path_factory.mktemp("data") / "gsl"), n_sentences=16, n_signers=3,
                                     seed=1)


def run_folder_copy(cwd, name):
    """A new run folder `name` holding only the tiny run's best checkpoint and configuration."""
    os.makedirs(cwd / name, exist_ok=True)
    for file in ("best.pt", "config.json"):
        shutil.copy(cwd / "r" / file, cwd / name / file)


class UserRuns:
    """Commands run as a user runs them (run.py in a new interpreter), started before the tests that check
    them and run one after another on a thread of this process while the tests go on here: the suite's two
    lanes on a 2-core machine. Each lane uses one torch thread (OMP_NUM_THREADS=1, which every run.py started
    here inherits), so that neither slows the other (two pools of 2 threads on 2 cores would slow each other
    several-fold), and float sums come out the same in a subprocess as here. A command started here trains
    nothing and works in a folder of its own. While a test here runs several processes itself (held), no
    command starts and the one running is paused (SIGSTOP, then SIGCONT)."""

    def __init__(self):
        self.pool, self.started = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="user-runs"), {}
        self.holds, self.free = 0, threading.Condition()
        self.process, self.paused = None, []

    def start(self, request, reader, name, command, *args):
        """Queue command(*args) under `name` if a test of this session reads it: `reader` is that test's name
        (with its parameters where it has some) or a fixture of the tests that do."""
        self.started[name] = self.pool.submit(self.when_free, command, args) if selected(request, reader) else None, \
            command, args

    def when_free(self, command, args):
        """command(*args) on the lane's thread, once no held block is open."""
        with self.free:
            self.free.wait_for(lambda: self.holds == 0)
        return command(*args)

    def result(self, name):
        """What the command queued under `name` returned, once it has ended. One not queued, or still waiting its
        turn (tests picked with -k, or the lane behind), runs now, here, rather than after the others."""
        assert self.holds == 0, "a user run's result read inside a held block would wait for the block's end"
        future, command, args = self.started[name]
        return command(*args) if future is None or future.cancel() else future.result()

    @staticmethod
    def on_lane():
        """Whether the caller runs on the lane's thread (rather than the tests')."""
        return threading.current_thread().name.startswith("user-runs")

    def running(self, process):
        """completed() gives the process it has started (None once it has ended): on the lane's thread, that is
        the process a held block pauses, and it is paused at once when a block is open."""
        if self.on_lane():
            with self.free:
                self.process = process
                if process is not None and self.holds:
                    self.pause()

    def pause(self):
        """Stop the lane's running process and every process it started (SIGSTOP), noted for SIGCONT."""
        if self.process is not None and hasattr(signal, "SIGSTOP"):
            self.paused += signal_tree(self.process.pid, signal.SIGSTOP)

    @contextlib.contextmanager
    def held(self):
        """A block of the tests that runs several processes itself (pose workers, torchrun, Chromium): no
        command of the lane starts inside it, and the one running is paused until the block ends. On the
        lane's own thread (its torchrun) it holds nothing."""
        if self.on_lane():
            yield
            return
        with self.free:
            self.holds += 1
            if self.holds == 1:
                self.pause()
        try:
            yield
        finally:
            with self.free:
                self.holds -= 1
                if self.holds == 0:
                    for pid in self.paused:
                        signal_pid(pid, signal.SIGCONT)
                    self.paused = []
                    self.free.notify_all()

    def close(self):
        """At the end of the session: drop the queued commands, end the running one (no test will read it:
        those picked with -k) with every process it started, and wait for the thread."""
        for future, *_ in self.started.values():
            if future is not None:
                future.cancel()
        with self.free:
            if self.process is not None:
                signal_tree(self.process.pid, signal.SIGKILL)
        self.pool.shutdown(wait=True)


USER_RUNS = UserRuns()


def selected(request, name):
    """Whether a test of this session is `name` (as pytest names it, parameters included, or its function's
    name) or uses the fixture `name`."""
    return any(name in (item.name, getattr(item, "originalname", None), *getattr(item, "fixturenames", ()))
               for item in request.session.items)


@pytest.fixture
def held():
    """The test runs several processes itself: the lane of user runs is paused meanwhile (UserRuns.held)."""
    with USER_RUNS.held():
        yield


@pytest.fixture(scope="session", autouse=True)
def user_runs(request):
    """The user runs (UserRuns) start with the session: the trained runs they read are made first, when a test
    of the session uses them (a failure is reported by those tests, not by every test). At the end, queued
    runs that no test read are dropped, not waited for."""
    try:
        for fixture in ("tiny_run", "awkward"):
            if selected(request, fixture):
                try:
                    request.getfixturevalue(fixture)
                except (Exception, pytest.skip.Exception, pytest.fail.Exception):
                    pass
        yield
    finally:
        USER_RUNS.close()


@pytest.fixture(scope="session")
def tiny_run(tiny_gsl, tmp_path_factory, request):
    """One tiny trained run (2 epochs, SignCL on), shared by the tests that read a run folder. Once it is
    trained, the user runs on copies of it start (UserRuns), in the order the tests read them."""
    import run as cli
    cwd = tmp_path_factory.mktemp("runs")
    _, printed = call(cli.train, cli.TrainConfig(data=tiny_gsl, out="r", overrides=tiny(epochs=2, signcl=0.01)), cwd)
    for reader, args in (("test_train_then_eval_as_a_user", ["eval", "e", "--split", "test"]),
                         ("test_bench_reports_the_same_numbers",
                          ["bench", "b", "--perturb", "--limit", "2", "--methods", "generic,random"]),
                         ("test_plot_as_a_user", ["plot", "fresh", "--sample", "1", "--animate"]),
                         ("viewed_run", ["view", "v"]),
                         ("test_perturb_as_a_user", ["perturb", "p", "--bootstrap", "200"])):
        run_folder_copy(cwd, args[1])                                   # each in a folder of its own
        USER_RUNS.start(request, reader, args[0], run, args, str(cwd))
    run_folder_copy(cwd, "two")
    USER_RUNS.start(request, "test_torchrun_extract_and_perturb_equal_one_process", "torchrun",
                    torchrun_extract_then_perturb, cwd)
    return cwd, printed


def copy_gsl(src, dst, rows=None):
    """A copy of a GSL folder (poses linked), optionally with the annotations rows replaced."""
    os.makedirs(os.path.join(dst, "poses"))
    for f in os.listdir(os.path.join(src, "poses")):
        os.symlink(os.path.join(src, "poses", f), os.path.join(dst, "poses", f))
    with open(os.path.join(src, "annotations.csv"), encoding="utf-8") as f:
        original = list(csv.reader(f))
    with open(os.path.join(dst, "annotations.csv"), "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(original if rows is None else rows(original))
    return dst


def small_model(n_gloss=12, n_out=15, **kw):
    torch.manual_seed(0)
    cfg = sa.ModelConfig(in_features=6, n_gloss=n_gloss, n_out=n_out, d_model=16, heads=4, encoder_layers=2,
                         decoder_layers=2, feedforward=32, embed_hidden=16, **kw)
    return sa.SignTranslator(cfg).eval()


def random_batch(B=3, T=11, n=5, F=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(B, T, F, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    for b in range(1, B):
        mask[b, T - 3 * b:] = False
    tgt = torch.randint(4, 15, (B, n), generator=g)
    tgt[:, 0] = sa.SignTranslator.bos_id
    return src, mask, tgt


def run(args, cwd, timeout=300):
    """run.py in a new interpreter, as a user starts it (where a fresh process matters: exit codes, stderr,
    signals, torchrun)."""
    return completed(RUN + args, cwd, timeout)


def completed(argv, cwd, timeout):
    """subprocess.run(argv) capturing its text output; UserRuns knows the process when it runs on its thread."""
    with subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        USER_RUNS.running(process)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            signal_tree(process.pid, signal.SIGKILL)                   # torchrun's workers too
            raise
        finally:
            USER_RUNS.running(None)
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


def signal_pid(pid, sig):
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:                                     # it has just ended
        return False


def signal_tree(pid, sig):
    """Send sig to pid, then to every process descended from it, read from /proc where there is one (again
    until no new one appears: one started meanwhile is signalled too); the pids signalled."""
    tried, signalled, todo = set(), [], [pid]
    while todo:
        tried.update(todo)
        signalled += [p for p in todo if signal_pid(p, sig)]
        if not os.path.isdir("/proc"):
            break
        children = {}
        for p in map(int, filter(str.isdigit, os.listdir("/proc"))):
            children.setdefault(parent_of(p), []).append(p)
        tree = [pid]
        for p in tree:
            tree += children.get(p, [])
        todo = [p for p in tree if p not in tried]
    return signalled


def call(mode, config, cwd):
    """A mode of run.py called from Python with its configuration, in cwd: (what it returns, what it printed).
    Bad input raises sa.DataError."""
    import contextlib
    import io
    printed, previous = io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            value = mode(config)
    finally:
        os.chdir(previous)
    return value, printed.getvalue()


def tiny(**overrides):
    """TINY_MODEL's values as train's overrides, with `overrides`."""
    return dict(d_model=32, encoder_layers=1, decoder_layers=1, batch_size=8, **overrides)


def run_here(args, cwd):
    """run.py's main in this process (no new interpreter to start), in cwd: (exit code, what it printed)."""
    import run as cli
    return call(cli.main, [str(a) for a in args], cwd)


def run_there(commands, cwd):
    """run_here for each command line of `commands`, one after another in one new interpreter when UserRuns
    runs it beside the tests (in this process when a test needs it before its turn): [(exit code, printed)]."""
    if not USER_RUNS.on_lane():
        return [run_here(args, cwd) for args in commands]
    script = (f"import json, sys; sys.path.insert(0, {HERE!r}); import test_all; "
              "print(json.dumps([test_all.run_here(args, '.') for args in json.loads(sys.argv[1])]))")
    result = completed([sys.executable, "-c", script, json.dumps(commands)], cwd, 600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [tuple(pair) for pair in json.loads(result.stdout)]


# ----------------------------------------------------------------------------------------------------
# synthetic GSL
# ----------------------------------------------------------------------------------------------------

def test_synthetic_gsl_layout_and_ground_truth(tiny_gsl):
    rows = list(csv.DictReader(open(os.path.join(tiny_gsl, "annotations.csv"), encoding="utf-8")))
    assert len(rows) == 48 and {r["split"] for r in rows} == {"train", "val", "test"}
    # signer-independent: each split is one signer's set
    signers = {s: {r["id"].split("_")[1] for r in rows if r["split"] == s} for s in sa.SPLITS}
    assert signers["test"] == {"signer3"} and signers["val"] == {"signer2"} and signers["train"] == {"signer1"}
    segments = sa.read_alignments(tiny_gsl)
    for r in rows:
        pose = np.load(os.path.join(tiny_gsl, "poses", r["id"] + ".npy"))
        assert pose.dtype == np.float32 and pose.shape[1:] == (1, 543, 3)
        assert np.isfinite(pose[:, 0, sa.BODY]).all() and np.isfinite(pose[:, 0, sa.FACE]).all()
        gloss = r["gloss"].split()
        seg = sorted(segments[r["id"]])
        assert [g for _, g, _, _ in seg] == gloss
        assert all(8 <= b - a <= 25 and 0 <= a < b <= len(pose) for _, _, a, b in seg)
        assert all(seg[i][3] <= seg[i + 1][2] for i in range(len(seg) - 1))
        assert 1 <= len(gloss) <= 8
    assert {g for r in rows for g in r["gloss"].split()} <= set(sa.SYNTHETIC_GLOSSES)
    assert len(set(sa.SYNTHETIC_GLOSSES)) == len(sa.SYNTHETIC_GLOSSES)             # each gloss signed one way
    with open(os.path.join(tiny_gsl, "metadata.json"), encoding="utf-8") as f:
        assert json.load(f)["test_signer"] == 3


def test_synthetic_gsl_is_deterministic_and_not_word_for_word(tmp_path, held):
    a = sa.generate_synthetic_gsl(str(tmp_path / "a"), n_sentences=24, n_signers=2, seed=5)
    b = sa.generate_synthetic_gsl(str(tmp_path / "b"), n_sentences=24, n_signers=2, seed=5, workers=2)
    for name in ("annotations.csv", "alignments.csv"):                     # one process or two: the same data
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read()
    for f in os.listdir(os.path.join(a, "poses")):
        np.testing.assert_array_equal(np.load(os.path.join(a, "poses", f)), np.load(os.path.join(b, "poses", f)))
    rows = list(csv.DictReader(open(os.path.join(a, "annotations.csv"), encoding="utf-8")))
    # function words without a gloss, and text longer or reordered with respect to the glosses
    assert any(w in {"το", "την", "τον", "θα", "δεν", "και"} for r in rows for w in r["text"].split())
    assert any(r["gloss"].split()[-1] in ("ΟΧΙ", "ΠΟΥ;", "ΠΟΤΕ", "ΠΟΣΟ") for r in rows)
    assert not os.path.exists(str(tmp_path / "a") + ".partial")


def test_synthetic_gsl_grows_to_gsl_size(tmp_path):
    """The grown lexicon (GSL's 310 glosses in SYNTHETIC_SIZES['gsl']; 70 here): every noun and verb signed in
    some sentence, each gloss with its own motion, Greek-looking words; slow sentences draw the same glosses out, never
    past about 600 frames; the default lexicon is the hand-written one."""
    default = sa.synthetic_grammar(len(sa.SYNTHETIC_GLOSSES), 0)
    assert default.glosses == sa.SYNTHETIC_GLOSSES and not default.unused
    grown = sa.synthetic_grammar(70, 0)
    assert len(grown.glosses) == len(set(grown.glosses)) == 70
    lexicon = sa._gloss_lexicon(np.random.default_rng(0), grown.glosses)
    motions = {(s["movement"], s["location"], s["shapes"][0]) for s in lexicon.values()}
    assert len(motions) == 70
    path = sa.generate_synthetic_gsl(str(tmp_path / "grown"), n_sentences=70, n_signers=2, vocabulary=70, slow=0.3)
    rows = list(csv.DictReader(open(os.path.join(path, "annotations.csv"), encoding="utf-8")))
    signed = {g for r in rows for g in r["gloss"].split()}
    assert set(grown.nouns) | set(grown.verbs) <= signed <= set(grown.glosses)      # every noun and verb somewhere
    greek = re.compile(r"^[α-ωάέήίόύώ]+$")
    assert all(greek.match(w) for r in rows for w in r["text"].split())
    assert json.load(open(os.path.join(path, "metadata.json")))["glosses"] == 70
    frames = [len(np.load(os.path.join(path, "poses", r["id"] + ".npy"), mmap_mode="r")) for r in rows]
    plain = sa.generate_synthetic_gsl(str(tmp_path / "plain"), n_sentences=70, n_signers=2, vocabulary=70)
    usual = [len(np.load(os.path.join(plain, "poses", r["id"] + ".npy"), mmap_mode="r")) for r in rows]
    assert max(frames) > 2 * max(usual) and max(frames) <= 650 and np.median(frames) < 1.5 * np.median(usual)


def test_the_gsl_sized_folder_is_generated_on_first_use(tmp_path, monkeypatch):
    """data/synthetic_gsl_full is generated with SYNTHETIC_SIZES['gsl'] (made small here) when first named."""
    import run as cli
    monkeypatch.setitem(sa.SYNTHETIC_SIZES, "gsl", dict(n_sentences=12, n_signers=3, vocabulary=60, slow=0.5))
    _, printed = call(cli.ensure_data, cli.SYNTHETIC_FULL, tmp_path)
    assert "generating the synthetic GSL at GSL size" in printed
    metadata = json.load(open(tmp_path / cli.SYNTHETIC_FULL / "metadata.json"))
    assert (metadata["glosses"], metadata["sentences"], metadata["slow"]) == (60, 12, 0.5)
    _, printed = call(cli.ensure_data, cli.SYNTHETIC_FULL, tmp_path)                 # once only
    assert printed == ""


def test_gloss_motions_differ_between_glosses():
    """Every gloss has its own (location, movement) pair, so a model must look at the motion."""
    for seed in range(3):
        lexicon = sa._gloss_lexicon(np.random.default_rng(seed))
        assert len(lexicon) == len(sa.SYNTHETIC_GLOSSES) <= len(sa.LOCATIONS) * len(sa.MOVEMENTS)
        assert len({(spec["movement"], spec["location"]) for spec in lexicon.values()}) == len(lexicon)
        for spec in lexicon.values():          # each starts at its place, with a little jitter
            assert np.abs(spec["start"] - sa.LOCATIONS[spec["location"]]).max() < 0.25


# ----------------------------------------------------------------------------------------------------
# readers and bad input
# ----------------------------------------------------------------------------------------------------

def test_reader_selects_150_features_and_normalises(tiny_gsl):
    cfg = sa.DataConfig()
    records = sa.load_records(tiny_gsl, cfg, ("train",))
    assert len(records) == 16 and records[0].frames.shape[1] == 150
    x = records[0].frames.reshape(len(records[0].frames), 75, 2)
    shoulders = x[:, [sa.L_SHOULDER, sa.R_SHOULDER]]
    assert abs(np.nanmean(shoulders[:, :, 0].mean(1))) < 0.05          # centred between the shoulders
    assert abs(np.nanmean(np.linalg.norm(shoulders[:, 0] - shoulders[:, 1], axis=1)) - 1) < 0.05


def write_pose(folder, sample_id, array):
    np.save(os.path.join(folder, "poses", sample_id + ".npy"), array)


BAD_POSES = {
    "rank": (np.zeros((5, 543, 3), np.float32), "rank 3"),
    "keypoints": (np.zeros((5, 1, 500, 3), np.float32), "shape (5, 1, 500, 3)"),
    "all_nan": (np.full((5, 1, 543, 3), np.nan, np.float32), "NaN"),
    "zero_frames": (np.zeros((0, 1, 543, 3), np.float32), "zero frames"),
}


@pytest.mark.parametrize("kind", sorted(BAD_POSES))
def test_bad_pose_arrays_name_file_and_problem(tiny_gsl, tmp_path, kind):
    array, words = BAD_POSES[kind]
    folder = copy_gsl(tiny_gsl, str(tmp_path / "d"), lambda rows: rows + [["bad_sample", "α", "Α", "train"]])
    write_pose(folder, "bad_sample", array)
    with pytest.raises(sa.DataError) as e:
        sa.read_gsl(folder)
    assert "bad_sample.npy" in str(e.value) and words in str(e.value) and "\n" not in str(e.value)
    skipped = []
    records = sa.read_gsl(folder, on_bad=skipped.append)
    assert len(skipped) == 1 and len(records) == 48


@pytest.mark.parametrize("content,words", [
    (None, "file not found"), ("", "empty file"), ("id,text,split\nx,a,train\n", "missing column(s) gloss"),
    ("id,text,gloss,split\n", "no rows"),
])
def test_bad_annotation_files(tmp_path, content, words):
    os.makedirs(tmp_path / "poses")
    if content is not None:
        (tmp_path / "annotations.csv").write_text(content, encoding="utf-8")
    with pytest.raises(sa.DataError) as e:
        sa.read_gsl(str(tmp_path))
    assert "annotations.csv" in str(e.value) and words in str(e.value)


@pytest.mark.parametrize("row,words", [
    (["x", "α", "Α", "validation"], "unknown split 'validation'"),
    (["synth_signer1_rep1_sentences0000", "α", "Α", "train"], "was given before, on line 2"),
    (["x", "α, β", "Α", "train", "extra"], "5 fields where the header has 4"),
    (["../escape", "α", "Α", "train"], "not a plain file name"),
    (["/etc/passwd", "α", "Α", "train"], "not a plain file name"),
    (["absent", "α", "Α", "train"], "pose file not found"),
    (["garbage", "α", "Α", "train"], "unreadable pose file"),
])
def test_bad_rows_name_line_and_problem(tiny_gsl, tmp_path, row, words):
    folder = copy_gsl(tiny_gsl, str(tmp_path / "d"), lambda rows: rows[:3] + [row])
    (tmp_path / "d" / "poses" / "garbage.npy").write_bytes(b"not a numpy file")
    with pytest.raises(sa.DataError) as e:
        sa.read_gsl(folder)
    assert "line 4" in str(e.value) or row[0] in str(e.value)
    assert words in str(e.value)


def test_cli_bad_input_is_one_line_and_nonzero(tiny_gsl, tmp_path):
    folder = copy_gsl(tiny_gsl, str(tmp_path / "d"), lambda rows: rows + [["../../x", "α", "Α", "train"]])
    code, printed = run_here(["train", "--data", folder, "--epochs", "1"], tmp_path)   # in process: the range test
    lines = printed.strip().splitlines()                                             # runs train as a user does
    assert code == 2 and len(lines) == 1 and "annotations.csv: line 50" in lines[0] and "Traceback" not in printed
    import run as cli
    _, printed = call(cli.train, cli.TrainConfig(data=folder, skip_bad=True, out="r", overrides=tiny(epochs=1)),
                      tmp_path)
    assert "skipped 1 bad sample(s)" in printed


# every numeric option of every mode, with values out of its range (the table must name them all)
OUT_OF_RANGE = {
    "train": {"--seed": ["-1", "9223372036854775808", "x"], "--epochs": ["0", "-2"], "--batch-size": ["0"],
              "--lr": ["0", "-0.1", "nan", "inf"], "--signcl": ["-0.01", "nan"], "--ctc-weight": ["-1", "inf"],
              "--subsample": ["0"], "--d-model": ["0"], "--encoder-layers": ["0"], "--decoder-layers": ["0"],
              "--patience": ["-1"], "--micro-batch": ["-1"], "--beam": ["0"], "--max-frames": ["0"],
              "--max-tokens": ["0"],
              "--heads": ["0"], "--feedforward": ["0"], "--embed-hidden": ["0"], "--dropout": ["-0.1", "1"],
              "--pos-dropout": ["1.5"], "--weight-decay": ["-0.001"], "--warmup-epochs": ["-1"],
              "--label-smoothing": ["-0.1", "1"], "--grad-clip": ["-1"], "--alpha": ["-0.5"]},
    "eval": {"--beam": ["0", "1.5"]},
    "extract": {"--batch-size": ["0"], "--limit": ["0"], "--beam": ["0"]},
    "bench": {"--batch-size": ["0"], "--limit": ["-5"]},
    "plot": {"--sample": ["-1"]},
    "poses": {"--workers": ["0"], "--limit": ["0", "-1"]},
    "view": {"--limit": ["0"]},
    "perturb": {"--seed": ["-1"], "--limit": ["0"], "--bootstrap": ["5", "100001"]},
    "claims": {"--seeds": ["0"], "--limit": ["0"], "--bootstrap": ["5", "100001"]},
}


def test_every_numeric_option_is_range_checked(tmp_path, monkeypatch, capsys):
    """An out-of-range value for any numeric option of any mode: one line naming the option, exit code 2,
    no traceback, and nothing written (no run folder, no data generated)."""
    import run as cli
    modes = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    numeric = {mode: {a.option_strings[0] for a in sub._actions if isinstance(a.type, cli.Number)}
               for mode, sub in modes.items()}
    for sub in modes.values():                 # every number goes through a range-checked type or its choices
        assert not [a.dest for a in sub._actions if a.type in (int, float) and not a.choices]
    assert numeric == {mode: set(options) for mode, options in OUT_OF_RANGE.items()}
    for sub in [cli.parser()] + list(modes.values()):          # --help of the program and of every mode
        assert sub.format_help().count("\n") > 3
    monkeypatch.chdir(tmp_path)
    for mode, options in OUT_OF_RANGE.items():
        for option, values in options.items():
            for value in values:
                with pytest.raises(SystemExit) as exit:
                    cli.main([mode, option, value])
                err = capsys.readouterr().err
                assert exit.value.code == 2 and "Traceback" not in err, (mode, option, value, err)
                assert err.count("\n") == 1 and f"argument {option}:" in err and value in err, err
                check_config_refuses(cli, mode, option, value)
    assert cli.main(["train", "--preset", "signattention", "--d-model", "12"]) == 2      # 8 heads
    assert err_line(capsys) == "error: --d-model 12: must be a multiple of the 8 attention heads"
    assert os.listdir(tmp_path) == []
    # as a user runs it: an out-of-range count that would make a run folder if it got through
    result = run(["train", "--batch-size", "0"], str(tmp_path))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and not result.stdout
    assert result.stderr.startswith("run.py train: error: argument --batch-size: 0 is not an integer >= 1")
    assert os.listdir(tmp_path) == []


def check_config_refuses(cli, mode, option, text):
    """The mode's configuration, called from Python with the same out-of-range number, is refused by the same
    range (sa.DataError naming the option) before any work."""
    config, name = cli.MODES[mode][1], option[2:].replace("-", "_")
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            return                                                  # not a number: the shell's case only
    required = dict(path="x") if mode == "poses" else {}
    given = {name: value} if name in {f.name for f in fields(config)} else dict(overrides={name: value})
    made = config(**required, **given)
    with pytest.raises(sa.DataError, match=option):
        cli.check(made)


def test_bench_lengths_recipes_and_their_curve(tmp_path, capsys):
    """--lengths alone is the five default lengths, or takes its own list; a bad list is refused from the shell
    and from Python; bench --recipes places each epoch at the seconds since its command started."""
    import run as cli
    parsed = lambda *a: cli.configuration(cli.parser().parse_args(["bench", *a]))
    assert parsed().lengths == () and parsed("--lengths").lengths == (50, 100, 200, 400, 600)
    assert parsed("--lengths", "30,60").lengths == (30, 60) and parsed("--recipes").recipes
    for bad in ("0,5", "a", "²"):
        with pytest.raises(SystemExit):
            cli.main(["bench", "--lengths", bad])
        assert "argument --lengths:" in err_line(capsys)
    for bad in ([0], "x", 5):
        with pytest.raises(sa.DataError, match="--lengths"):
            cli.check(cli.BenchConfig(lengths=bad))
    cli.check(cli.BenchConfig(lengths=[20, 40]))
    os.makedirs(tmp_path / "p")
    with open(tmp_path / "p" / "metrics.jsonl", "w") as f:
        f.write("".join(json.dumps(dict(epoch=e, seconds=t, bleu4=b)) + "\n" for e, t, b in ((1, 2.0, 10.0), (2, 3.0, 50.0))))
    with open(tmp_path / "p" / "results.json", "w") as f:
        json.dump(dict(val=dict(seconds=1.5), test=dict(seconds=0.5, bleu4=60.0, wer=9.0)), f)
    curve = cli.recipe_curve(str(tmp_path / "p"), 10.0)     # 10 s in all: 2 s of final evaluation, 5 of epochs
    assert curve["epochs"] == [(1, 5.0, 10.0), (2, 8.0, 50.0)] and curve["test_bleu4"] == 60.0


def err_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()

def write_signjoey(prefix, n=6, feat=8):
    g = torch.Generator().manual_seed(0)
    words = ["hallo", "regen", "morgen", "sonne", "wind"]
    for suffix in ("train", "dev", "test"):
        items = [dict(name=f"{suffix}/s{i}", signer="Signer01", gloss=" ".join(w.upper() for w in words[i % 3:i % 3 + 2]),
                      text=" ".join(words[i % 3:i % 3 + 2]) + " .", sign=torch.randn(10 + i, feat, generator=g))
                 for i in range(n)]
        with gzip.open(f"{prefix}.{suffix}", "wb") as f:
            pickle.dump(items, f)


def test_signjoey_reader_and_training(tmp_path):
    os.makedirs(tmp_path / "phoenix")
    write_signjoey(str(tmp_path / "phoenix" / "p14t.pami0"))
    records = sa.read_signjoey(str(tmp_path / "phoenix"))
    assert len(records) == 18 and records[0].frames.shape == (10, 8)
    assert {r.split for r in records} == set(sa.SPLITS) and records[0].text[-1] == "."
    assert len(sa.read_signjoey(str(tmp_path / "phoenix" / "p14t.pami0"), ("test",))) == 6
    import run as cli
    call(cli.train, cli.TrainConfig(data=str(tmp_path / "phoenix"), format="signjoey", out="r",
                                    overrides=tiny(epochs=1)), tmp_path)
    assert os.path.exists(tmp_path / "r" / "translations.csv")
    assert json.load(open(tmp_path / "r" / "config.json"))["data"]["subsample"] == 1    # features, not frames


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_signjoey_pickle_cannot_run_code(tmp_path):
    write_signjoey(str(tmp_path / "s"))
    with gzip.open(str(tmp_path / "s.train"), "wb") as f:
        pickle.dump([dict(name="x", gloss="A", text="a", sign=_Exploit())], f)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(sa.DataError) as e:
            sa.read_signjoey(str(tmp_path / "s"))
    finally:
        os.chdir(cwd)
    assert "refused" in str(e.value) and "system" in str(e.value) and "s.train" in str(e.value)
    assert not os.path.exists(tmp_path / "pwned")


# ----------------------------------------------------------------------------------------------------
# poses: real recordings through MediaPipe Holistic (the optional requirements-poses.txt)
# ----------------------------------------------------------------------------------------------------

import importlib.util

POSES_MISSING = next((f"{m} is not installed ({sa.POSES_INSTALL})" for m in ("mediapipe", "cv2", "pose_format", "skimage")
                      if importlib.util.find_spec(m) is None), None)
needs_poses = pytest.mark.skipif(POSES_MISSING is not None, reason=POSES_MISSING or "")


def astronaut():
    """scikit-image's astronaut (a public-domain photograph, 512 x 512), RGB, read from the installed package
    without importing it: an upper body whose pose and face MediaPipe finds, and no hands."""
    from PIL import Image
    folder = importlib.util.find_spec("skimage").submodule_search_locations[0]
    return np.asarray(Image.open(os.path.join(folder, "data", "astronaut.png")).convert("RGB"))


def write_frames(folder, frames, suffix=".jpg"):
    """frame_0000, frame_0001, ... written last first, so that only their names give their order."""
    from PIL import Image
    os.makedirs(folder)
    for i, frame in reversed(list(enumerate(frames))):
        Image.fromarray(frame).save(os.path.join(folder, f"frame_{i:04d}{suffix}"), quality=95)


def write_video(path, frames, fps=25):
    """A lossless video (FFV1), so that its frames are the frame folder's pixels."""
    import cv2
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"FFV1"), fps, frames[0].shape[1::-1])
    assert writer.isOpened()
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    writer.release()


def shifted(image, dx, dy):
    """The photograph moved by (dx, dy) pixels on a grey canvas of the same size."""
    out = np.full_like(image, 128)
    h, w = image.shape[:2]
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = image[max(-dy, 0):h - max(dy, 0),
                                                                       max(-dx, 0):w - max(dx, 0)]
    return out


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """A folder of recordings converted by `python run.py poses` as two shards running at once: the
    photograph moving 12 pixels right per frame as a 4-frame video and as a folder of PNG frames, four
    folders of 3 shifted JPEG frames, a corrupt video and a frame folder with a truncated JPEG. Returns (cwd,
    source, out, the shard runs)."""
    cwd = tmp_path_factory.mktemp("poses")
    src, image = cwd / "recordings", astronaut()
    os.makedirs(src)
    moving = [shifted(image, 12 * i, 0) for i in range(4)]
    write_video(str(src / "astronaut_video.mkv"), moving)
    write_frames(str(src / "astronaut"), moving, ".png")
    for k, (dx, dy) in enumerate([(-40, 10), (30, -20), (20, 25), (-25, -10)]):
        write_frames(str(src / f"shifted{k}"), [shifted(image, dx + 3 * i, dy) for i in range(3)])
    (src / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    write_frames(str(src / "truncated"), [image] * 2)
    jpeg = src / "truncated" / "frame_0001.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:-3000])
    rows = [("astronaut", "η αστροναύτης", "ΑΣΤΡΟΝΑΥΤΗΣ", "train"), ("shifted0", "γεια σας", "ΓΕΙΑ", "train"),
            ("shifted1", "ευχαριστώ πολύ", "ΕΥΧΑΡΙΣΤΩ", "train"), ("astronaut_video", "x", "X", "train"),
            ("shifted2", "γεια σας", "ΓΕΙΑ", "dev"), ("shifted3", "ευχαριστώ πολύ", "ΕΥΧΑΡΙΣΤΩ", "test"),
            ("corrupt", "γεια σας", "ΓΕΙΑ", "test"), ("truncated", "γεια σας", "ΓΕΙΑ", "test")]
    with open(cwd / "annotations.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("id", "text", "gloss", "split")] + rows)
    with USER_RUNS.held():
        shards = [subprocess.Popen(RUN + ["poses", "recordings", "--annotations", "annotations.csv", "--out", "out",
                                          "--workers", "1", "--shard", f"{k}/2"], cwd=cwd, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for k in (1, 2)]
        done = [subprocess.CompletedProcess(p.args, p.wait(300), *p.communicate()) for p in shards]
    return cwd, src, cwd / "out", done


@needs_poses
def test_poses_keypoints_are_mediapipe_holistic_in_our_order(converted):
    """Shape (frames, 1, 543, 3); the nose and the shoulders where they are on the photograph, frame after
    frame in order; pose and face found and both hands NaN (the photograph shows none); the video and the
    frame folder of the same pixels give the same keypoints."""
    cwd, src, out, _ = converted
    frames, video = np.load(out / "poses" / "astronaut.npy"), np.load(out / "poses" / "astronaut_video.npy")
    assert frames.shape == video.shape == (4, 1, 543, 3) and frames.dtype == np.float32
    for pose in (frames, video):
        p = pose[:, 0] * np.array([512, 512, 1])                         # pixels
        assert np.isnan(p[:, sa.LEFT_HAND + sa.RIGHT_HAND]).all()
        assert np.isfinite(p[:, sa.BODY]).all() and np.isfinite(p[:, sa.FACE]).all()
        moved = p - np.array([12, 0, 0]) * np.arange(4)[:, None, None]      # each frame 12 px further right
        nose, left, right = moved[:, 0, :2], moved[:, sa.L_SHOULDER, :2], moved[:, sa.R_SHOULDER, :2]
        assert ((nose > [200, 105]) & (nose < [250, 150])).all()           # the tip of her nose: about (224, 127)
        assert ((left > [270, 215]) & (left < [345, 290])).all()           # her left shoulder is the image's right
        assert ((right > [75, 200]) & (right < [150, 275])).all()
        face = moved[:, sa.FACE, :2]
        assert ((face > [160, 40]) & (face < [290, 200])).all()             # the whole face mesh on her face
        steps = np.diff(p[:, 0, 0])          # the nose follows the frames' order (tracking smooths the first step)
        assert (steps > 3).all() and 24 < steps.sum() < 44, steps
    assert (np.isnan(frames) == np.isnan(video)).all()
    np.testing.assert_allclose(frames, video, atol=1e-4)                    # the same pixels, in the same order


@needs_poses
def test_poses_shards_failures_and_a_second_run(converted):
    """The two shards are disjoint and cover every clip; the corrupt video and the truncated JPEG land in
    the failures (id, file, reason) while the others convert, with a non-zero exit; a second run (in this
    process: the shards were the subprocesses) converts nothing again."""
    cwd, src, out, shards = converted
    ids = {"astronaut", "astronaut_video", "shifted0", "shifted1", "shifted2", "shifted3", "corrupt", "truncated"}
    taken = []
    for k, result in enumerate(shards, 1):
        assert "Traceback" not in result.stderr and "W0000" not in result.stderr, result.stderr
        assert "0 already converted" in result.stdout, result.stdout       # no shard redoes another's clip
        assert " frames/s  ETA " in result.stdout
        with open(out / f"failures_{k}of2.csv", encoding="utf-8") as f:
            failed = list(csv.DictReader(f))
        assert result.returncode == (1 if failed else 0), (result.stdout, result.stderr)
        taken.append(failed)
    failures = {r["id"]: r for rows in taken for r in rows}
    assert set(failures) == {"corrupt", "truncated"}
    assert failures["corrupt"]["file"] == os.path.join("recordings", "corrupt.mp4")
    assert "video" in failures["corrupt"]["reason"]
    assert failures["truncated"]["file"].endswith("frame_0001.jpg") and "truncated" in failures["truncated"]["reason"]
    converted_ids = {f[:-4] for f in os.listdir(out / "poses") if f.endswith(".npy")}
    assert converted_ids == ids - set(failures)
    counts = [int(r.stdout.split("shard ")[1].split(": ")[1].split(";")[0]) for r in shards]
    assert sum(counts) == len(ids) and all(counts)                         # each clip in exactly one shard
    with open(out / "annotations.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["id"] for r in rows} == converted_ids and {r["split"] for r in rows} == {"train", "val", "test"}
    # the shards ran at once: whichever finished last listed every clip the two converted
    assert next(r for r in rows if r["id"] == "astronaut")["text"] == "η αστροναύτης"
    metadata = json.loads((out / "metadata.json").read_text(encoding="utf-8"))
    assert metadata["mediapipe"] == "0.10.21" and metadata["holistic"]["model_complexity"] == 1
    assert metadata["holistic"]["static_image_mode"] is False and metadata["source"] == "videos"
    stamps = {f: os.stat(out / "poses" / f).st_mtime_ns for f in os.listdir(out / "poses")}
    code, printed = run_here(["poses", "recordings", "--annotations", "annotations.csv", "--out", "out",
                              "--workers", "1"], cwd)
    assert code == 1 and "6 already converted, 2 to convert" in printed, printed
    assert {f: os.stat(out / "poses" / f).st_mtime_ns for f in os.listdir(out / "poses")} == stamps


def parent_of(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


@needs_poses
def test_poses_resumes_after_kill_9(converted, tmp_path, held):
    """A conversion with two worker processes killed with SIGKILL leaves only complete pose files, its workers
    stop too, and the next run converts the rest."""
    cwd, src, _, _ = converted
    args = RUN + ["poses", str(src), "--annotations", str(cwd / "annotations.csv"), "--out", "out", "--workers", "2"]
    process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    poses, deadline, children = tmp_path / "out" / "poses", time.time() + 120, []
    while time.time() < deadline and not (poses.exists() and any(f.endswith(".npy") for f in os.listdir(poses))):
        children = [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))   # known before the kill:
                    if parent_of(p) == process.pid] or children                     # it comes right after a file
        time.sleep(0.02)
    process.kill()
    process.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(os.path.exists(f"/proc/{c}") for c in children):
        time.sleep(0.2)
    assert children and not any(os.path.exists(f"/proc/{c}") for c in children)     # the workers ended too
    before = sorted(f for f in os.listdir(poses) if f.endswith(".npy"))
    assert 1 <= len(before) < 6, before                               # killed part-way
    assert not [f for f in os.listdir(poses) if not f.endswith(".npy")]
    assert all(sa.pose_file_complete(str(poses / f)) for f in before)
    code, printed = run_here(args[2:-2] + ["--workers", "1"], tmp_path)               # the rest, in this process
    assert f"{len(before)} already converted, {8 - len(before)} to convert" in printed, printed
    assert sorted(f for f in os.listdir(poses) if f.endswith(".npy")) == sorted(
        f"{i}.npy" for i in ("astronaut", "astronaut_video", "shifted0", "shifted1", "shifted2", "shifted3"))


@needs_poses
def test_poses_on_awkward_recordings(tmp_path, held):
    """What cameras, phones and file systems hand over: a 1-frame phone video (IMG_0001.MOV, upper-case
    extension) and a folder of one image with a Greek name and a space; a frame folder mixing a greyscale PNG,
    an RGBA PNG, JPEGs (.jpg, .JPG, .jpeg, one stored sideways with an EXIF orientation) at two resolutions,
    beside Thumbs.db, .DS_Store, desc.txt and a macOS ._ companion; frames numbered 1.jpg ... 11.jpg without
    zero padding; all annotated by a spreadsheet's "CSV UTF-8" (a byte-order mark, CRLF, a quoted comma).
    Every clip converts, one row per image frame, junk ignored, frames in their natural (numeric) order."""
    if POSES_MISSING:
        pytest.skip(POSES_MISSING)
    from PIL import Image
    small = np.asarray(Image.fromarray(astronaut()).resize((240, 240), Image.LANCZOS))
    base = np.full((240, 320, 3), 128, np.uint8)                   # 320 x 240: the photograph, nose near x 0.45
    base[:, 40:280] = small

    def frame(dx, size=(320, 240)):
        image = Image.fromarray(shifted(base, dx, 0))
        return image if size == (320, 240) else image.resize(size, Image.LANCZOS)

    src = tmp_path / "recordings"
    os.makedirs(src)
    for junk in ("Thumbs.db", ".DS_Store", "desc.txt"):            # left by Windows, macOS, a user
        (src / junk).write_bytes(b"\0junk\xff" * 100)

    # a phone's 1-frame video (a lossless mkv, named as an iPhone names it) and a folder of a single image
    write_video(str(src / "one.mkv"), [np.asarray(frame(0))])
    os.rename(src / "one.mkv", src / "IMG_0001.MOV")
    os.makedirs(src / "κλιπ 1")
    frame(0).save(src / "κλιπ 1" / "IMG_0002.JPG", quality=95)

    # greyscale PNG, RGBA PNG, JPEGs of three spellings, the camera switching 320x240 -> 640x480, an EXIF-rotated
    # JPEG (stored sideways, displayed upright), junk; each frame 12 px (of 320) further right
    mixed = src / "mixed"
    os.makedirs(mixed)
    frame(0).convert("L").save(mixed / "frame_0000.png")
    frame(12).convert("RGBA").save(mixed / "frame_0001.png")
    frame(24).save(mixed / "frame_0002.jpg", quality=95)
    frame(36, (640, 480)).save(mixed / "frame_0003.JPG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6                                               # Orientation: rotate 90 CW to display
    frame(48, (640, 480)).transpose(Image.Transpose.ROTATE_90).save(mixed / "frame_0004.jpeg", quality=95,
                                                                    exif=exif.tobytes())
    frame(60, (640, 480)).save(mixed / "frame_0005.jpg", quality=95)
    for junk in ("Thumbs.db", ".DS_Store", "desc.txt", "._frame_0002.jpg"):
        (mixed / junk).write_bytes(b"\0\x05\x16\x07junk" * 500)

    # 1.jpg ... 11.jpg (a camera's or a script's numbering, no zero padding), written in a shuffled order
    numbered = src / "numbered"
    os.makedirs(numbered)
    for i in np.random.default_rng(0).permutation(np.arange(1, 12)):
        frame(6 * (i - 1)).save(numbered / f"{i}.jpg", quality=95)

    # the annotations as Excel's / LibreOffice's "CSV UTF-8" saves them: a BOM, CRLF, a quoted comma
    rows = [("id", "text", "gloss", "split"), ("IMG_0001", "γεια, σας", "ΓΕΙΑ", "train"),
            ("κλιπ 1", "ευχαριστώ πολύ", "ΕΥΧΑΡΙΣΤΩ", "train"), ("mixed", "γεια σας", "ΓΕΙΑ", "dev"),
            ("numbered", "ευχαριστώ", "ΕΥΧΑΡΙΣΤΩ", "test")]
    with open(tmp_path / "ann.csv", "w", newline="", encoding="utf-8-sig") as f:
        csv.writer(f, lineterminator="\r\n").writerows(rows)
    assert (tmp_path / "ann.csv").read_bytes().startswith(b"\xef\xbb\xbfid,text,gloss,split\r\n")

    result = run(["poses", "recordings", "--annotations", "ann.csv", "--out", "out", "--workers", "1"], str(tmp_path))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "4 clips; 0 already converted, 4 to convert" in result.stdout, result.stdout
    out = tmp_path / "out"
    with open(out / "failures.csv", encoding="utf-8") as f:
        assert list(csv.reader(f)) == [["id", "file", "reason"]]

    def nose_x(sid, frames):
        pose = np.load(out / "poses" / f"{sid}.npy")
        assert pose.shape == (frames, 1, 543, 3) and pose.dtype == np.float32, (sid, pose.shape, pose.dtype)
        assert np.isfinite(pose[:, 0, sa.BODY]).all() and np.isfinite(pose[:, 0, sa.FACE]).all(), sid
        return pose[:, 0, 0, 0]                                     # the nose's x, in image widths

    # one frame each, the nose where it is on the 320 x 240 picture (about x 0.45)
    for sid in ("IMG_0001", "κλιπ 1"):
        assert 0.38 < nose_x(sid, 1)[0] < 0.52, (sid, nose_x(sid, 1))
    np.testing.assert_allclose(nose_x("IMG_0001", 1), nose_x("κλιπ 1", 1), atol=0.01)   # same picture

    # one row per image (not the 4 junk files), whatever the mode, spelling, size or orientation, in order
    x = nose_x("mixed", 6)
    assert 0.38 < x[0] < 0.52 and (np.diff(x) > 0.01).all() and 0.12 < x[-1] - x[0] < 0.25, x

    # 11 rows, read 1, 2, ..., 9, 10, 11 (not 1, 10, 11, 2, ...): the nose moves right at every step
    x = nose_x("numbered", 11)
    assert (np.diff(x) > 0.005).all() and 0.12 < x[-1] - x[0] < 0.25, (
        "frames not in numeric order: nose x " + " ".join(f"{v:.3f}" for v in x))

    # the annotations came through whole: the BOM not in the first column's name, no \r in a field
    with open(out / "annotations.csv", encoding="utf-8") as f:
        written = list(csv.DictReader(f))
    assert [(r["id"], r["text"], r["gloss"], r["split"]) for r in written] == [
        ("IMG_0001", "γεια, σας", "ΓΕΙΑ", "train"), ("κλιπ 1", "ευχαριστώ πολύ", "ΕΥΧΑΡΙΣΤΩ", "train"),
        ("mixed", "γεια σας", "ΓΕΙΑ", "val"), ("numbered", "ευχαριστώ", "ΕΥΧΑΡΙΣΤΩ", "test")]


def test_converted_recordings_train_extract_and_plot(converted, tmp_path):
    """The converted folder is a dataset like any other: train one epoch, extract two samples, plot one."""
    import run as cli
    cwd, _, out, _ = converted
    _, printed = call(cli.train, cli.TrainConfig(data=str(out), out="r", overrides=tiny(epochs=1)), tmp_path)
    assert "6 samples (train 4, val 1, test 1)" in printed            # not the corrupt nor the truncated clip
    call(cli.extract, cli.ExtractConfig(run="r", limit=2), tmp_path)
    call(cli.plot, cli.PlotConfig(run="r", sample=0), tmp_path)
    assert os.path.exists(tmp_path / "r" / "extract_test.pt") and drawn(tmp_path / "r" / "sample0_skeleton.png")


def pose_format_file(path, ours, points=None, width=512, height=384):
    """Write our (F, 543, 3) keypoints as a pose-format file laid out as pose-format's own MediaPipe Holistic
    files are: named body and hand points, the face's by index with a refined face's 10 iris points, world
    landmarks after them, pixels, masked where not detected, the body's confidence its visibility. `points`
    keeps only some points of each component by name (as pose-format's reduce_holistic does)."""
    from pose_format import Pose
    from pose_format.numpy.pose_body import NumPyPoseBody
    from pose_format.pose_header import PoseHeader, PoseHeaderComponent, PoseHeaderDimensions
    face = np.concatenate([ours[:, sa.FACE], np.full((len(ours), 10, 3), 0.5, np.float32)], 1)       # + iris
    parts = [("POSE_LANDMARKS", sa.POSE_NAMES, ours[:, sa.BODY]), ("FACE_LANDMARKS", [str(i) for i in range(478)], face),
             ("LEFT_HAND_LANDMARKS", sa.HAND_NAMES, ours[:, sa.LEFT_HAND]),
             ("RIGHT_HAND_LANDMARKS", sa.HAND_NAMES, ours[:, sa.RIGHT_HAND]),
             ("POSE_WORLD_LANDMARKS", sa.POSE_NAMES, ours[:, sa.BODY] * 0.1)]
    if points:
        parts = [(c, [n for n in names if n in points.get(c, names)],
                  values[:, [i for i, n in enumerate(names) if n in points.get(c, names)]]) for c, names, values in parts]
    header = PoseHeader(0.1, PoseHeaderDimensions(width=width, height=height, depth=1000),
                        [PoseHeaderComponent(c, names, [], [(255, 0, 0)], "XYZC") for c, names, _ in parts])
    data = np.concatenate([values for _, _, values in parts], 1) * np.array([width, height, 1], np.float32)
    found = np.isfinite(data).all(-1)
    visibility = np.where(found, 0.2 + 0.8 * np.random.default_rng(0).random(found.shape), 0).astype(np.float32)
    masked = np.ma.masked_array(np.nan_to_num(data)[:, None], mask=~np.repeat(found[:, None, :, None], 3, -1))
    with open(path, "wb") as f:
        Pose(header, NumPyPoseBody(25, masked, visibility[:, None])).write(f)


@needs_poses
def test_pose_format_files_load_equal_to_the_npy(converted, tmp_path):
    """A .pose file laid out as pose-format writes MediaPipe Holistic (named points, a 478-point refined face,
    world landmarks) loads equal to the converter's .npy, and `--format pose` reads a folder of them; a
    reduced file puts each of its points at its name's place and leaves the others NaN."""
    _, _, out, _ = converted
    os.makedirs(tmp_path / "poses")
    rows = [("id", "text", "gloss", "split")]
    for sid, split in (("astronaut", "train"), ("shifted2", "val"), ("shifted3", "test")):
        ours = np.load(out / "poses" / f"{sid}.npy")[:, 0]                            # (F, 543, 3)
        pose_format_file(tmp_path / "poses" / f"{sid}.pose", ours)
        loaded = sa.read_pose_array(str(tmp_path / "poses" / f"{sid}.pose"))
        assert loaded.shape == ours[:, None].shape
        assert (np.isnan(loaded) == np.isnan(ours[:, None])).all()
        np.testing.assert_allclose(loaded, ours[:, None], rtol=1e-5, atol=1e-6)
        rows.append((sid, "γεια σας", "ΓΕΙΑ", split))
    with open(tmp_path / "annotations.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    pose_records = sa.load_records(str(tmp_path), sa.DataConfig(format="pose"))
    npy_records = {r.id: r for r in sa.load_records(str(out), sa.DataConfig())}
    assert len(pose_records) == 3
    for r in pose_records:
        np.testing.assert_allclose(r.frames, npy_records[r.id].frames, rtol=1e-4, atol=1e-5)
    ours = np.load(out / "poses" / "astronaut.npy")[:, 0]
    keep = {"POSE_LANDMARKS": ["LEFT_SHOULDER", "RIGHT_SHOULDER", "LEFT_ELBOW", "RIGHT_ELBOW", "LEFT_WRIST",
                               "RIGHT_WRIST", "LEFT_HIP", "RIGHT_HIP"], "FACE_LANDMARKS": ["10", "152", "234"]}
    pose_format_file(tmp_path / "reduced.pose", ours, keep)
    reduced = sa.read_pose_array(str(tmp_path / "reduced.pose"))[:, 0]
    kept = [11, 12, 13, 14, 15, 16, 23, 24] + [sa.FACE[i] for i in (10, 152, 234)]
    np.testing.assert_allclose(reduced[:, kept], ours[:, kept], rtol=1e-5, atol=1e-6)
    others = [i for i in sa.BODY + sa.FACE if i not in kept]
    assert np.isnan(reduced[:, others]).all()


def gsl_tree(root, image):
    """A raw GSL copy in miniature: frame folders, split files in one folder, the Greek text in another."""
    paths = {"police1/police1_signer1_rep1_sentences/sentences0000": ("ΓΕΙΑ ΕΓΩ(1) ΜΠΟΡΩ ΒΟΗΘΩ", "train"),
             "health2/health2_signer3_rep1_sentences/sentences0011": ("ΜΩΡΟ  ΓΕΝΝΩ ΝΩΡΙΣ", "dev"),
             "kep4/kep4_signer3_rep3_sentences/sentences0011": ("ΕΓΩ(1) ΠΟΥ;", "test")}
    texts = {"ΓΕΙΑ ΕΓΩ(1) ΜΠΟΡΩ ΒΟΗΘΩ": "γεια σας πώς μπορώ να βοηθήσω", "ΜΩΡΟ  ΓΕΝΝΩ ΝΩΡΙΣ": "το μωρό γεννήθηκε πρόωρα",
             "ΕΓΩ(1) ΠΟΥ;": "πού είμαι"}
    for path in paths:
        write_frames(os.path.join(root, "GSL_continuous", path), [image])
    os.makedirs(os.path.join(root, "GSL_split"))
    os.makedirs(os.path.join(root, "supplementary"))
    for split in ("train", "dev", "test"):
        with open(os.path.join(root, "GSL_split", f"gsl_split_SI_{split}.csv"), "w", encoding="utf-8") as f:
            f.writelines(f"{p}|{g}\n" for p, (g, s) in paths.items() if s == split)
    with open(os.path.join(root, "supplementary", "merged_continuous.csv"), "w", encoding="utf-8") as f:
        f.writelines(f"{p.split('/', 1)[1]}|{texts[g]}|{g}\n" for p, (g, _) in paths.items())
    return paths, texts


def phoenix_tree(root, image):
    release = os.path.join(root, "PHOENIX-2014-T-release-v3", "PHOENIX-2014-T")
    os.makedirs(os.path.join(release, "annotations", "manual"))
    rows = {"train": ("01April_2010_Thursday_heute-6694", "REGEN SCHNEE", "regen und schnee ."),
            "dev": ("11August_2010_Wednesday_tagesschau-1", "JETZT WETTER", "und nun die wettervorhersage ."),
            "test": ("25October_2010_Monday_tagesschau-17", "MORGEN SONNE", "morgen scheint die sonne .")}
    for split, (name, orth, translation) in rows.items():
        with open(os.path.join(release, "annotations", "manual", f"PHOENIX-2014-T.{split}.corpus.csv"), "w",
                  encoding="utf-8") as f:
            f.write(f"name|video|start|end|speaker|orth|translation\n{name}|{name}/1/*.png|-1|-1|Signer08|{orth}|"
                    f"{translation}\n")
        folder = os.path.join(release, "features", "fullFrame-210x260px", split, name)
        os.makedirs(folder)
        from PIL import Image
        Image.fromarray(image).resize((210, 260)).save(os.path.join(folder, "images0001.png"))
    return rows


@needs_poses
def test_poses_imports_gsl_and_phoenix_trees(tmp_path):
    """The GSL importer joins split files and the Greek text found anywhere under the root (ids: the path
    with / as _, dev as val, glosses as they are); the PHOENIX-2014-T importer reads the corpus files."""
    image = astronaut()
    paths, texts = gsl_tree(tmp_path / "GSL", image)
    rows = phoenix_tree(tmp_path / "PHX", image)
    import run as cli
    for source, out in (("GSL", "gsl"), ("PHX", "phx")):
        status, printed = call(cli.poses, cli.PosesConfig(path=source, out=out, workers=1), tmp_path)
        assert status == 0, printed
        assert len(os.listdir(tmp_path / out / "poses")) == 3
    with open(tmp_path / "gsl" / "annotations.csv", encoding="utf-8") as f:
        gsl = {r["id"]: r for r in csv.DictReader(f)}
    ids = {p: p.split("/", 1)[1].replace("/", "_") for p in paths}     # kep4_signer3_rep3_sentences_sentences0011
    assert gsl == {ids[p]: dict(id=ids[p], text=texts[g], gloss=" ".join(g.split()), split=sa.SPLIT_NAMES[s])
                   for p, (g, s) in paths.items()}
    assert json.loads((tmp_path / "gsl" / "metadata.json").read_text(encoding="utf-8"))["source"] == "gsl"
    with open(tmp_path / "phx" / "annotations.csv", encoding="utf-8") as f:
        phx = {r["id"]: r for r in csv.DictReader(f)}
    assert phx == {name: dict(id=name, text=text, gloss=orth, split=sa.SPLIT_NAMES[split])
                   for split, (name, orth, text) in rows.items()}
    records = sa.load_records(str(tmp_path / "gsl"), sa.DataConfig())
    assert sorted(r.split for r in records) == ["test", "train", "val"]


def test_poses_bad_sources_get_one_line_errors(tmp_path, monkeypatch, capsys):
    """Bad split files, a missing text, a PHOENIX file without its columns, an annotation naming no clip, an
    unknown split: one line naming the file and line; --skip-bad goes on without the row. Without MediaPipe,
    or with a model complexity that would download its model, the command says so in one line."""
    image = np.zeros((8, 8, 3), np.uint8)
    paths, _ = gsl_tree(tmp_path / "GSL", image)
    split = tmp_path / "GSL" / "GSL_split" / "gsl_split_SI_dev.csv"
    split.write_text(split.read_text(encoding="utf-8") + "kep1/kep1_signer1_rep1_sentences/sentences0001|Α|Β\n",
                     encoding="utf-8")
    with pytest.raises(sa.DataError, match=r"gsl_split_SI_dev.csv: line 2: expected 2 fields separated by \|, "
                                           r"found 3$"):
        sa.import_gsl(str(tmp_path / "GSL"))
    split.write_text(split.read_text(encoding="utf-8").replace("|Α|Β", "|ΓΕΙΑ"), encoding="utf-8")
    with pytest.raises(sa.DataError, match=r"gsl_split_SI_dev.csv: line 2: no text for kep1/kep1_signer1_rep1_"
                                           r"sentences/sentences0001 in .*merged_continuous.csv$"):
        sa.import_gsl(str(tmp_path / "GSL"))
    skipped = []
    assert len(sa.import_gsl(str(tmp_path / "GSL"), on_bad=skipped.append)) == 3 and len(skipped) == 1
    phoenix_tree(tmp_path / "PHX", image)
    corpus = next(p for p in (tmp_path / "PHX").rglob("*.dev.corpus.csv"))
    corpus.write_text("name|video|speaker|orth\nx|x|Signer01|A\n", encoding="utf-8")
    with pytest.raises(sa.DataError, match=r"dev.corpus.csv: line 1: missing column\(s\) translation"):
        sa.import_phoenix(str(tmp_path / "PHX"))
    folder = tmp_path / "videos"
    write_frames(str(folder / "a"), [image])
    (tmp_path / "ann.csv").write_text("id,text,gloss,split\na,α,Α,train\nb,β,Β,train\n", encoding="utf-8")
    with pytest.raises(sa.DataError, match=r"ann.csv: line 3: no video or frame folder named 'b' in .*videos$"):
        sa.import_folder(str(folder), str(tmp_path / "ann.csv"))
    (tmp_path / "ann.csv").write_text("id,text,gloss,split\na,α,Α,holdout\n", encoding="utf-8")
    with pytest.raises(sa.DataError, match=r"ann.csv: line 2: unknown split 'holdout'"):
        sa.import_folder(str(folder), str(tmp_path / "ann.csv"))
    assert sa.detect_source(str(tmp_path / "GSL")) == "gsl" and sa.detect_source(str(folder)) == "frames"
    import run as cli
    monkeypatch.chdir(tmp_path)
    assert cli.main(["poses", "videos", "--model-complexity", "2"]) == 2
    assert err_line(capsys).startswith("error: --model-complexity 2: mediapipe 0.10.21 ships only")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mediapipe" else real(name, *a))
    assert cli.main(["poses", "videos", "--annotations", "ann.csv"]) == 2
    assert err_line(capsys) == ("error: python run.py poses needs MediaPipe, an optional install: "
                                "pip install --no-deps -r requirements-poses.txt")
    assert not os.path.exists(tmp_path / "data")
    for bad in ("3/2", "0/2", "a/b", "2"):
        with pytest.raises(SystemExit) as exit:
            cli.main(["poses", "videos", "--shard", bad])
        assert exit.value.code == 2 and f"argument --shard: '{bad}' is not K/N with 1 <= K <= N" in err_line(capsys)
    with pytest.raises(sa.DataError, match="--shard: '0/2' is not K/N"):     # from Python, the same check
        cli.poses(cli.PosesConfig(path="videos", shard=(0, 2)))


# ----------------------------------------------------------------------------------------------------
# vocabulary, batches, model
# ----------------------------------------------------------------------------------------------------

def test_vocabulary_and_batches(tiny_gsl):
    cfg = sa.DataConfig(subsample=2)
    records = sa.load_records(tiny_gsl, cfg, ("train",))
    gloss = sa.Vocabulary(w for r in records for w in r.gloss)
    text = sa.Vocabulary(w for r in records for w in r.text)
    assert gloss.itos[:4] == [sa.PAD, sa.UNK, sa.BOS, sa.EOS]
    assert text.encode(["never-seen"]) == [text.unk_id]
    ds = sa.SignDataset(records, cfg, gloss, text)
    batch = ds.batch([0, 1, 2])
    lengths = [(len(r.frames) + 1) // 2 for r in records[:3]]                # subsample 2
    assert batch["src_mask"].sum(1).tolist() == lengths
    assert (batch["src"][~batch["src_mask"]] == 0).all() and torch.isfinite(batch["src"]).all()
    assert (batch["tgt_in"][:, 0] == text.bos_id).all()
    for b in range(3):
        n = len(records[b].text)
        assert batch["tgt_out"][b, n] == text.eos_id and text.decode(batch["tgt_out"][b].tolist()) == records[b].text
    # evaluation takes each chunk's first frame; training a random frame of the chunk
    np.testing.assert_array_equal(ds.frames(0), np.nan_to_num(records[0].frames[::2]))
    train_ds = sa.SignDataset(records, cfg, gloss, text, train=True)
    a = train_ds.frames(0, torch.Generator().manual_seed(3))
    assert a.shape == ds.frames(0).shape and not np.allclose(a, ds.frames(0))
    np.testing.assert_array_equal(a, train_ds.frames(0, torch.Generator().manual_seed(3)))


def test_training_batches_pooled_and_shuffled(tiny_gsl):
    """Pooled batches come from length-sorted pools (little padding); shuffled ones are a plain random permutation
    cut into batches, as a DataLoader with shuffle=True draws them (the signattention preset's)."""
    cfg = sa.DataConfig()
    records = sa.load_records(tiny_gsl, cfg, ("train",))
    vocab = sa.Vocabulary(w for r in records for w in r.gloss)
    ds = sa.SignDataset(records, cfg, vocab, vocab, train=True)
    draw = lambda pooled: ds.batches(3, torch.Generator().manual_seed(5), shuffle=True, pooled=pooled)
    pooled, shuffled = draw(True), draw(False)
    for batches in (pooled, shuffled):
        assert sorted(i for b in batches for i in b) == list(range(len(ds))) and len(batches) == 6
    assert [i for b in shuffled for i in b] == torch.randperm(len(ds), generator=torch.Generator().manual_seed(5)).tolist()
    assert shuffled == draw(False) and pooled == draw(True)
    span = lambda batches: sum(max(len(records[i].frames) for i in b) - min(len(records[i].frames) for i in b)
                               for b in batches)
    assert span(pooled) < span(shuffled)
    lengths = sorted(len(r.frames) for r in records)                            # one pool: sorted, then cut
    assert sorted(sorted(len(records[i].frames) for i in b) for b in pooled) == [lengths[k:k + 3] for k in range(0, 16, 3)]
    import run as cli
    assert cli.PRESETS["signattention"]["train"]["batching"] == "shuffled" and cli.Recipe().batching == "pooled"


def test_fast_and_explicit_attention_give_the_same_logits():
    for norm_first in (True, False):
        model = small_model(norm_first=norm_first)
        src, mask, tgt = random_batch()
        fast = model(src, mask, tgt)
        explicit = model.keep_attention(True)(src, mask, tgt)
        torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)
        model.keep_attention(False)


def test_kept_attention_maps_have_shapes_masks_and_gradients():
    model = small_model().keep_attention(True)
    src, mask, tgt = random_batch()
    logits = model(src, mask, tgt)
    logits[:, 2, 5].sum().backward()
    maps = model.attention_modules()
    enc, dself, cross = maps["encoder_self"][0].attention, maps["decoder_self"][0].attention, maps["decoder_cross"][1].attention
    assert enc.shape == (3, 4, 11, 11) and dself.shape == (3, 4, 5, 5) and cross.shape == (3, 4, 5, 11)
    torch.testing.assert_close(cross.sum(-1), torch.ones(3, 4, 5))
    assert (cross[2, :, :, 5:] == 0).all() and (dself[0].triu(1) == 0).all()
    assert cross.grad is not None and cross.grad[:, :, 3:].abs().sum() == 0 and cross.grad[:, :, 2].abs().sum() > 0
    assert len(model.decoder[0].branches) == 2


def test_padding_does_not_change_the_output():
    model = small_model()
    src, mask, tgt = random_batch()
    logits = model(src, mask, tgt)
    alone = model(src[2:, :5], mask[2:, :5], tgt[2:])
    torch.testing.assert_close(logits[2], alone[0], atol=1e-5, rtol=1e-5)
    noisy = src.clone()
    noisy[~mask] = 100.0
    torch.testing.assert_close(model(noisy, mask, tgt), logits, atol=1e-5, rtol=1e-5)


def test_greedy_and_beam_search_are_batch_consistent():
    model = small_model()
    src, mask, _ = random_batch(B=4, T=9)
    greedy = sa.greedy_decode(model, src, mask, max_len=8)
    beam = sa.beam_search(model, src, mask, beam=3, max_len=8)
    for b in range(4):
        n = int(mask[b].sum())
        one = sa.greedy_decode(model, src[b:b + 1, :n], mask[b:b + 1, :n], max_len=8)
        assert one[0].tolist() == greedy[b, :one.shape[1]].tolist()
        one = sa.beam_search(model, src[b:b + 1, :n], mask[b:b + 1, :n], beam=3, max_len=8)
        assert one[0].tolist() == beam[b, :one.shape[1]].tolist()
    assert torch.equal(sa.beam_search(model, src, mask, beam=1, max_len=8), greedy)


@torch.no_grad()
def test_beam_search_finds_the_best_scoring_sequence():
    """On a tiny vocabulary, an exhaustive search of all sequences up to the length limit agrees with
    a beam as wide as the vocabulary (length-normalised log-probability)."""
    model = small_model(n_out=6)
    src, mask, _ = random_batch(B=2, T=7)
    max_len, alpha = 3, 1.0
    beam = sa.beam_search(model, src, mask, beam=6 * 6 * 6, alpha=alpha, max_len=max_len)
    for b in range(2):
        best, best_seq = -float("inf"), None
        stack = [[]]
        while stack:
            prefix = stack.pop()
            tgt = torch.tensor([[model.bos_id] + prefix])
            logp = model(src[b:b + 1], mask[b:b + 1], tgt)[0, -1].log_softmax(-1)
            score_prefix = sum(model(src[b:b + 1], mask[b:b + 1], torch.tensor([[model.bos_id] + prefix[:i]]))[0, -1]
                               .log_softmax(-1)[prefix[i]] for i in range(len(prefix))) if prefix else 0.0
            for v in range(6):
                seq, score = prefix + [v], float(score_prefix + logp[v])
                if v == model.eos_id or len(seq) == max_len:
                    norm = score / ((5 + len(seq)) / 6) ** alpha
                    if norm > best:
                        best, best_seq = norm, seq
                else:
                    stack.append(seq)
        assert beam[b, :len(best_seq)].tolist() == best_seq


def test_ctc_decode_merges_repeats_and_drops_blanks():
    logits = torch.full((1, 8, 5), -5.0)
    for t, c in enumerate([0, 4, 4, 0, 4, 2, 2, 3]):
        logits[0, t, c] = 5.0
    mask = torch.ones(1, 8, dtype=torch.bool)
    mask[0, 7] = False
    assert sa.ctc_decode(logits, mask) == [[4, 4, 2]]


# ----------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------

def test_metrics_on_known_values():
    assert sa.wer(["a b c"], ["a x c d"]) == pytest.approx(50.0)          # 1 substitution + 1 deletion / 4
    assert sa.wer(["a b", "c"], ["a b", "d e"]) == pytest.approx(100.0 * 2 / 4)
    scores, signature = sa.bleu(["το μωρό γεννήθηκε πρόωρα"] * 2, ["το μωρό γεννήθηκε πρόωρα"] * 2)
    assert scores["bleu4"] == pytest.approx(100.0) and "tok:none" in signature
    scores, _ = sa.bleu(["a b c d"], ["a b c e"])
    assert scores["bleu1"] == pytest.approx(75.0) and scores["bleu2"] == pytest.approx(100 * (0.75 * 2 / 3) ** 0.5)
    # ROUGE-L: LCS 3 of hypothesis 4 and reference 5 words, beta 1.2
    p, r = 3 / 4, 3 / 5
    assert sa.rouge_l(["a b c x"], ["a y b c z"]) == pytest.approx(100 * 2.44 * p * r / (r + 1.44 * p))
    # chrF (sacrebleu: character 1- to 6-grams without spaces, beta 2): "abcdef" and "abcdex" share 5 of 6
    # 1-grams, 4 of 5 2-grams, ... 0 of 1 6-gram each way, so precision = recall = their mean = F
    assert sa.chrf(["abc def"], ["abc dex"]) == pytest.approx(100 * (5 / 6 + 4 / 5 + 3 / 4 + 2 / 3 + 1 / 2 + 0) / 6)
    assert sa.chrf(["ab"], ["ac"]) == pytest.approx(100 * (1 / 2 + 0) / 2)    # orders 3..6 exist in neither


# ----------------------------------------------------------------------------------------------------
# SignCL and SDR
# ----------------------------------------------------------------------------------------------------

def signcl_loop(features, margin, lengths, max_distance=32.0):
    """The reference's plain loop over anchors (positives i +- 1), using every allowed negative."""
    total, anchors = 0.0, 0
    for b in range(features.shape[0]):
        L = lengths[b]
        for i in range(1, L - 2):
            pos = [j for j in (i - 1, i + 1) if 0 <= j < L]
            neg = [j for j in range(2, L - 2) if abs(j - i) > margin]
            if not neg:
                continue
            d_pos = (features[b, i] - features[b, pos]).abs().sum(-1)
            d_neg = (features[b, i] - features[b, neg]).abs().sum(-1)
            total = total + torch.nn.functional.softplus(d_pos - max_distance).mean() \
                + torch.nn.functional.softplus(max_distance - d_neg).mean()
            anchors += 1
    return total / anchors


def test_signcl_equals_the_loop_over_anchors():
    torch.manual_seed(0)
    features = torch.randn(3, 14, 5) * 8
    lengths = [14, 11, 7]
    mask = torch.arange(14)[None] < torch.tensor(lengths)[:, None]
    loss = SignCL(neg_samples=14)(features, 3, sa.frame_lengths(mask), torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, signcl_loop(features, 3, lengths), rtol=1e-5, atol=1e-5)   # other sum order


def test_signcl_padding_seed_and_no_negatives():
    torch.manual_seed(1)
    features = torch.randn(2, 30, 4) * 10
    lengths = torch.tensor([30, 20])
    cl = SignCL()
    a = cl(features, 5, lengths, torch.Generator().manual_seed(7))
    b = cl(features, 5, lengths, torch.Generator().manual_seed(7))
    assert a == b                                                        # same seed, same loss
    padded = features.clone()
    padded[1, 20:] = 1e3
    assert cl(padded, 5, lengths, torch.Generator().manual_seed(7)) == a   # padding ignored
    assert cl(features, 5, lengths, torch.Generator().manual_seed(8)) != a  # sampling does vary with the seed
    short = torch.randn(2, 6, 4, requires_grad=True)                     # no frame further than the margin
    loss = cl(short, 20)                                                 # lengths default to every frame
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(short.grad).all()


def test_signcl_margin_follows_the_paper_and_the_scripts():
    # 2 x max(10, T / L x 2.3), capped at (T - 30) / 2 so that short clips keep negatives
    assert signcl_margin(150, 10) == 60          # 2 x 34 = 68, capped at 60 (the SignCL repository README's formula gives 20)
    assert signcl_margin(400, 10) == 2 * 92      # no cap: (400 - 30) // 2 = 185
    assert signcl_margin(300, 30) == 2 * 23      # frames per word x 2.3 = 23
    assert signcl_margin(100, 20) == 2 * 11 and signcl_margin(120, 60) == 2 * 10    # at least 2 x 10
    assert signcl_margin(80, 10) == 25 and signcl_margin(20, 5) == 1                # capped; never below 1


@pytest.mark.parametrize("pos_samples", [1, 2, 3, 5])
def test_signcl_never_samples_negatives_within_the_margin_nor_positives_past_one(pos_samples):
    cl = SignCL(pos_samples=pos_samples, neg_samples=6)
    lengths, T = torch.tensor([40, 33, 12, 3]), 40
    margin = torch.tensor([signcl_margin(int(L), 2) for L in lengths])              # 5, 1, 1, 1
    for seed in range(5):
        anchor, pos, pos_ok, neg, neg_ok = cl.sample(lengths, margin, T, torch.Generator().manual_seed(seed))
        i = torch.arange(T)[None, :, None]
        L = lengths[:, None, None]
        assert ((pos - i).abs()[pos_ok] == 1).all() and (pos[pos_ok] < L.expand_as(pos)[pos_ok]).all()
        assert (pos_ok.sum(-1)[anchor] == min(pos_samples, 2)).all()             # i +- 1 both exist for anchors
        assert ((neg - i).abs()[neg_ok] > margin[:, None, None].expand_as(neg)[neg_ok]).all()
        assert (neg[neg_ok] >= 2).all() and (neg[neg_ok] <= (L - 3).expand_as(neg)[neg_ok]).all()
        assert not anchor[3].any() and anchor[0, 1:38].all() and not anchor[0, 38:].any()


def training_split_and_model(tiny_gsl):
    """The tiny set's training split as a SignDataset (default DataConfig, no augmentation drawn) and a small
    model for it (no dropout)."""
    cfg = sa.DataConfig()
    records = sa.load_records(tiny_gsl, cfg, ("train",))
    gloss = sa.Vocabulary(w for r in records for w in r.gloss)
    text = sa.Vocabulary(w for r in records for w in r.text)
    model = sa.SignTranslator(sa.ModelConfig(n_gloss=len(gloss), n_out=len(text), d_model=32, encoder_layers=1,
                                             decoder_layers=1, feedforward=64))
    return sa.SignDataset(records, cfg, gloss, text), model


def test_the_objective_adds_signcl_and_it_reaches_the_encoder_gradient(tiny_gsl):
    """sa.training_loss is the whole objective: cross-entropy + CTC + weight x SignCL of the encoder's memory,
    with each sample's margin and negatives drawn from the generator; the SignCL term changes the encoder's
    gradient."""
    ds, model = training_split_and_model(tiny_gsl)
    model.eval()
    batch = ds.batch(list(range(8)))
    grads = []
    for weight in (0.0, 0.01):
        model.zero_grad()
        loss, memory = sa.training_loss(model, batch, 0.1, 1.0, weight, torch.Generator().manual_seed(0))
        loss.backward()
        grads.append(model.encoder[0].self_attention.query.weight.grad.clone())
        base, _ = sa.training_loss(model, batch, 0.1, 1.0)
        lengths = sa.frame_lengths(batch["src_mask"])
        margin = sign_cl.batch_margins(lengths, batch["tgt_out"], model.pad_id)
        by_hand = base + weight * SignCL()(memory, margin, lengths, torch.Generator().manual_seed(0))
        torch.testing.assert_close(loss, by_hand)
    assert not torch.allclose(grads[0], grads[1])


def test_length_sorted_parts_add_up_to_the_batch(tiny_gsl):
    """A batch cut into parts (SignDataset.parts, --micro-batch): the parts cover the batch, each sorted by
    length; their losses with `whole` (cross-entropy with label smoothing, CTC) add up to the batch's loss,
    and their accumulated gradients to its gradient. SignCL's share is weighted by samples."""
    ds, model = training_split_and_model(tiny_gsl)
    model.train()                                                            # no dropout: 0 by default
    indices = torch.randperm(len(ds), generator=torch.Generator().manual_seed(2)).tolist()[:11]
    parts = ds.parts(indices, 4)
    assert [len(p) for p in parts] == [4, 4, 3] and sorted(sum(parts, [])) == sorted(indices)
    lengths = [len(ds.records[i].frames) for p in parts for i in p]
    assert lengths == sorted(lengths) and ds.parts(indices, 0) == ds.parts(indices, 11) == [indices]
    assert ds.totals(indices) == (sum(len(ds.tokens(i)) + 1 for i in indices), 11)

    def loss_and_gradient(batches, whole):
        model.zero_grad()
        total = 0.0
        for b in batches:
            loss, _ = sa.training_loss(model, ds.batch(b), 0.1, 2.0, whole=whole)
            loss.backward()
            total += loss.item()
        return total, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    loss, grad = loss_and_gradient([indices], None)
    summed, accumulated = loss_and_gradient(parts, ds.totals(indices))
    assert summed == pytest.approx(loss, rel=1e-5)
    cross_entropy = lambda batch, whole: sa.training_loss(model, ds.batch(batch), 0.1, whole=whole)[0].item()
    assert sum(cross_entropy(p, ds.totals(indices)) for p in parts) == pytest.approx(cross_entropy(indices, None),
                                                                                      rel=1e-5)
    assert ((accumulated - grad).norm() / grad.norm()).item() < 1e-5        # float32 sums in another order
    one, _ = sa.training_loss(model, ds.batch(parts[0]), 0.1, 2.0, 0.01, torch.Generator().manual_seed(0))
    share, _ = sa.training_loss(model, ds.batch(parts[0]), 0.1, 2.0, 0.01, torch.Generator().manual_seed(0),
                                whole=ds.totals(indices))
    plain, _ = sa.training_loss(model, ds.batch(parts[0]), 0.1, 2.0, 0.0, whole=ds.totals(indices))
    base, _ = sa.training_loss(model, ds.batch(parts[0]), 0.1, 2.0)
    assert (share - plain).item() == pytest.approx(4 / 11 * (one - base).item(), rel=1e-4)   # 4 samples of 11


def test_training_with_parts_takes_the_whole_batches_steps(tiny_gsl, tmp_path):
    """train with --micro-batch 3 (batches of 8 in parts of at most 3): with nothing drawn at random inside
    a batch (every frame kept, no augmentation, no dropout), an epoch reaches the weights and the mean loss
    that whole batches reach, to float rounding."""
    import run as cli
    runs = {}
    for name, parts in (("whole", 0), ("parts", 3)):
        call(cli.train, cli.TrainConfig(data=tiny_gsl, out=name, overrides=tiny(
            epochs=1, subsample=1, augment=False, micro_batch=parts)), tmp_path)
        runs[name] = (json.loads(open(tmp_path / name / "metrics.jsonl").readline())["loss"],
                      torch.load(tmp_path / name / "last.pt", weights_only=True)["model"])
    (loss, whole), (parted_loss, parted) = runs["whole"], runs["parts"]
    assert parted_loss == pytest.approx(loss, rel=1e-5)
    for key, value in whole.items():          # a key's bias shifts a softmax row alike: its gradient is 0 but
        if not key.endswith("key.bias"):      # for rounding, which Adam scales up to whole steps
            assert (parted[key] - value).norm() <= 1e-4 * value.norm(), key


def test_sdr_on_constructed_clusters():
    tight = torch.tensor([[0.0, 0], [0, 1], [10, 0], [10, 1]])
    # intra distance 1, inter distances to the other class: 10, sqrt(101), sqrt(101), 10 -> mean
    inter = (10 + 101 ** 0.5) / 2
    assert sdr(tight, [0, 0, 1, 1]) == pytest.approx(100 / inter)
    mixed = sdr(torch.randn(200, 4, generator=torch.Generator().manual_seed(0)), [0, 1] * 100)
    assert 90 < mixed < 110                                                 # no structure: ratio near 1


def test_sdr_averages_the_other_classes_not_their_instances():
    """Three classes on a line, of sizes 2, 1 and 3: the denominator of class c is the mean over the other
    classes of the mean cross distance (each class counts once), written out by hand."""
    x = torch.tensor([[0.0], [1.0],                  # class a: D(a) = 1
                      [10.0],                        # class b: one instance, no D(b)
                      [20.0], [22.0], [24.0]])       # class c: D(c) = (2 + 4 + 2) / 3
    labels = ["a", "a", "b", "c", "c", "c"]
    D_ab = (10 + 9) / 2
    D_ac = (20 + 22 + 24 + 19 + 21 + 23) / 6
    D_cb = (10 + 12 + 14) / 3
    ratio_a = 1 / ((D_ab + D_ac) / 2)
    ratio_c = (8 / 3) / ((D_ac + D_cb) / 2)
    assert sdr(x, [{"a": 0, "b": 1, "c": 2}[l] for l in labels]) == pytest.approx(100 * (ratio_a + ratio_c) / 2)
    # averaging over the other instances instead would weigh c's three against b's one
    by_instance = 1 / ((10 + 9 + 3 * D_ac * 2) / (2 * 4))
    assert abs(100 * (by_instance + ratio_c) / 2 - sdr(x, [0, 0, 1, 2, 2, 2])) > 0.5


def test_ctc_viterbi_follows_the_best_path():
    lp = torch.full((7, 4), -10.0)
    for t, c in enumerate([0, 2, 2, 0, 2, 3, 0]):
        lp[t, c] = 0.0
    assert sa.ctc_viterbi(lp.log_softmax(-1), [2, 2, 3]) == [0, 2, 2, 0, 2, 3, 0]
    # a repeated label needs a blank between its two occurrences even where the frame prefers the label
    lp = torch.full((3, 3), -10.0)
    lp[:, 1] = 0.0
    assert sa.ctc_viterbi(lp.log_softmax(-1), [1, 1]) == [1, 0, 1]


def test_sdr_centres_of_segments_and_of_the_viterbi_path():
    """SDR's frames: the centre of each true segment in model frames (one in 2), a segment between two model
    frames left out; or the centre of each run of a gloss on the Viterbi path."""
    segments = [(0, "A", 0, 4), (1, "B", 5, 6), (2, "C", 6, 11)]
    assert sa.segment_centres(segments, 2) == [(1, "A"), (4, "C")]      # B holds no even frame
    lp = torch.full((7, 4), -10.0)
    for t, c in enumerate([0, 2, 2, 0, 2, 3, 3]):
        lp[t, c] = 0.0
    assert sa.viterbi_centres(lp.log_softmax(-1), [2, 2, 3], ["-", "x", "A", "B"]) == [(1, "A"), (4, "A"), (5, "B")]


# ----------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------

def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = str(tmp_path / "last.pt")
    sa.save_checkpoint(path, {"epoch": 1, "w": torch.ones(2)})

    def crash(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        sa.atomic_write(path, crash)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


# ----------------------------------------------------------------------------------------------------
# the commands, run as a user runs them
# ----------------------------------------------------------------------------------------------------

def history_without_time(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]


def test_train_then_eval_as_a_user(tiny_gsl, tiny_run):
    tmp_path, out = tiny_run
    assert "epoch   1/2" in out and "ETA" in out and "BLEU-4" in out and "sacrebleu: nrefs:1" in out
    run_dir = tmp_path / "r"
    assert {"config.json", "best.pt", "last.pt", "metrics.jsonl", "translations.csv", "results.json"} <= set(os.listdir(run_dir))
    state = torch.load(run_dir / "best.pt", weights_only=True)
    assert state["config"]["train"]["signcl"] == 0.01 and state["gloss_vocab"][:4] == [sa.PAD, sa.UNK, sa.BOS, sa.EOS]
    assert len(history_without_time(run_dir)) == 2
    with open(run_dir / "translations.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "gloss_reference", "gloss_prediction", "text_reference", "text_prediction"]
    assert len(rows) == 16 and all(r["id"].startswith("synth_signer3") for r in rows)
    model, gloss, text = sa.load_model(str(run_dir))
    assert not model.training and model.eos_id == text.eos_id == 3
    results = json.load(open(run_dir / "results.json"))
    result = USER_RUNS.result("eval")                                    # `eval e --split test`, e a copy of r
    assert result.returncode == 0, result.stderr
    assert f"{results['test']['bleu4']:.2f}" in result.stdout
    import run as cli
    with pytest.raises(sa.DataError, match="--resume r"):                  # never overwrites a run
        call(cli.train, cli.TrainConfig(data=tiny_gsl, out="r", overrides=tiny(epochs=1)), tmp_path)


def test_kill_9_then_resume_reaches_the_same_result(tiny_gsl, tmp_path):
    """A run killed with -9 between epochs and resumed (in this process) reaches what an uninterrupted run
    reaches, epoch by epoch."""
    import run as cli
    args = ["train", "--data", tiny_gsl, "--epochs", "3", "--seed", "3", "--dropout", "0.1"] + TINY_MODEL
    call(cli.train, cli.TrainConfig(data=tiny_gsl, out="full", overrides=tiny(epochs=3, seed=3, dropout=0.1)), tmp_path)
    proc = subprocess.Popen(RUN + args + ["--out", "cut"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.exists(tmp_path / "cut" / "last.pt") and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert state["epoch"] < 3, "the run finished before it was killed"
    call(cli.train, cli.TrainConfig(resume="cut"), tmp_path)
    assert history_without_time(tmp_path / "cut") == history_without_time(tmp_path / "full")
    full, cut = (json.load(open(tmp_path / d / "results.json")) for d in ("full", "cut"))
    assert {k: v for k, v in full["test"].items() if k != "seconds"} == {k: v for k, v in cut["test"].items() if k != "seconds"}


class ReferenceKeypointsTransformer(torch.nn.Module):
    """pedroodb/sign_attention's KeypointsTransformer written out with its parts: a Conv1d embedder (two
    1x1 convolutions with ReLU), sinusoidal positions, nn.Transformer (post-LN, final LayerNorms, 8 heads,
    Xavier-initialised), token embedding x sqrt(d), a linear generator; a frame whose features sum to 0 is
    masked (helpers.create_src_mask)."""

    def __init__(self, in_features, vocab, d_model=16, feedforward=2048, dropout=0.2):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv1d(in_features, 128, 1), torch.nn.Conv1d(128, d_model, 1)
        self.transformer = torch.nn.Transformer(d_model, 8, 1, 1, feedforward, dropout=dropout, batch_first=True)
        self.tok, self.generator = torch.nn.Embedding(vocab, d_model), torch.nn.Linear(d_model, vocab)
        self.d_model = d_model

    def forward(self, src, tgt):
        relu = torch.nn.functional.relu
        x = relu(self.conv2(relu(self.conv1(src.permute(0, 2, 1))))).permute(0, 2, 1)
        x = x + sa.sinusoid(src.shape[1], self.d_model)
        y = self.tok(tgt) * self.d_model ** 0.5 + sa.sinusoid(tgt.shape[1], self.d_model)
        padding = src.sum(-1) == 0
        causal = torch.nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        out = self.transformer(x, y, tgt_mask=causal, src_key_padding_mask=padding,
                               memory_key_padding_mask=padding)
        return self.generator(out)

    def copy_from(self, model):
        """The same weights as one of our models."""
        with torch.no_grad():
            self.conv1.weight.copy_(model.embed[0].weight[..., None]), self.conv1.bias.copy_(model.embed[0].bias)
            self.conv2.weight.copy_(model.embed[2].weight[..., None]), self.conv2.bias.copy_(model.embed[2].bias)
            self.tok.weight.copy_(model.token_embed.weight)
            self.generator.load_state_dict(model.head.state_dict())
            pairs = [(self.transformer.encoder.layers[0], model.encoder[0], ("self_attn",)),
                     (self.transformer.decoder.layers[0], model.decoder[0], ("self_attn", "multihead_attn"))]
            for theirs, ours, attentions in pairs:
                for name, mine in zip(attentions, (ours.self_attention, getattr(ours, "cross_attention", None))):
                    mha = getattr(theirs, name)
                    mha.in_proj_weight.copy_(torch.cat([mine.query.weight, mine.key.weight, mine.value.weight]))
                    mha.in_proj_bias.copy_(torch.cat([mine.query.bias, mine.key.bias, mine.value.bias]))
                    mha.out_proj.load_state_dict(mine.proj.state_dict())
                theirs.linear1.load_state_dict(ours.feedforward[0].state_dict())
                theirs.linear2.load_state_dict(ours.feedforward[3].state_dict())
                for k in ("norm1", "norm2", "norm3"):
                    if hasattr(ours, k):
                        getattr(theirs, k).load_state_dict(getattr(ours, k).state_dict())
            self.transformer.encoder.norm.load_state_dict(model.encoder_norm.state_dict())
            self.transformer.decoder.norm.load_state_dict(model.decoder_norm.state_dict())


def preset_model(vocab=12, **changes):
    import run as cli
    config = cli.resolve_config(cli.TrainConfig(preset="signattention"))
    torch.manual_seed(0)
    cfg = sa.ModelConfig(**{**config["model"], "in_features": 150, "n_gloss": 5, "n_out": vocab, **changes})
    return sa.SignTranslator(cfg).eval(), config


def test_signattention_preset_equals_the_reference_transformer():
    """With the same weights, the preset's logits equal those of the reference's nn.Transformer model, frames
    with nothing detected masked as the reference masks them."""
    model, config = preset_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():                                     # trained-looking norms: the final ones matter
        for norm in (m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)):
            norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))
            norm.bias.copy_(0.5 * torch.randn(norm.bias.shape, generator=g))
    reference = ReferenceKeypointsTransformer(150, 12).eval()
    reference.copy_from(model)
    frames = [torch.rand(n, 150, generator=g).numpy() for n in (9, 6, 8)]
    frames[2][[2, 5]] = 0.0                                   # nothing detected in two frames of sample 2
    records = [sa.Record(f"s{b}", "test", ["A"], ["a"], x) for b, x in enumerate(frames)]
    data_cfg = sa.DataConfig(**config["data"])
    assert data_cfg.mask_empty and data_cfg.subsample == 3
    dataset = sa.SignDataset(records, replace_dataclass(data_cfg, subsample=1), sa.Vocabulary(["A"]),
                             sa.Vocabulary(["a"]))
    batch = dataset.batch([0, 1, 2])
    assert batch["src_mask"].tolist()[2] == [True, True, False, True, True, False, True, True, False]
    assert sa.frame_lengths(batch["src_mask"]).tolist() == [9, 6, 8]
    tgt = torch.tensor([[2, 5, 7, 3], [2, 4, 9, 11], [2, 8, 3, 0]])
    with torch.no_grad():
        ours = model(batch["src"], batch["src_mask"], tgt)
        theirs = reference(batch["src"], tgt)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)
    # without the empty-frame mask, or without the final LayerNorms, the two differ
    lengths = torch.arange(9)[None] < sa.frame_lengths(batch["src_mask"])[:, None]
    with torch.no_grad():
        assert (model(batch["src"], lengths, tgt) - theirs)[2].abs().max() > 1e-2
        model.encoder_norm = model.decoder_norm = torch.nn.Identity()
        assert (model(batch["src"], batch["src_mask"], tgt) - theirs).abs().max() > 1e-1


def replace_dataclass(obj, **changes):
    from dataclasses import replace
    return replace(obj, **changes)


def test_signattention_preset_initialises_as_the_reference():
    """Xavier-uniform weights and zero biases in every attention and feed-forward layer, as nn.Transformer's."""
    model, config = preset_model()
    d, ff = 16, 2048
    reference = torch.nn.Transformer(d, 8, 1, 1, ff, batch_first=True)
    for layer, theirs in ((model.encoder[0], reference.encoder.layers[0]), (model.decoder[0], reference.decoder.layers[0])):
        attentions = [m for m in layer.modules() if isinstance(m, sa.Attention)]
        for mine, mha in zip(attentions, [m for m in theirs.modules() if isinstance(m, torch.nn.MultiheadAttention)]):
            qkv = torch.cat([mine.query.weight, mine.key.weight, mine.value.weight])
            for ours_w, their_w in ((qkv, mha.in_proj_weight), (mine.proj.weight, mha.out_proj.weight)):
                bound = their_w.abs().max()                     # Xavier-uniform: both reach the same bound
                assert 0.97 * bound < ours_w.abs().max() <= 1.03 * bound
            for linear in (mine.query, mine.key, mine.value, mine.proj):
                assert (linear.bias == 0).all()
        bound = (6 / (d + ff)) ** 0.5
        for linear in (layer.feedforward[0], layer.feedforward[3]):
            assert 0.97 * bound < linear.weight.abs().max() <= bound


def preset_training(recipe_changes):
    """One epoch of train_epoch with the signattention preset's recipe (and `recipe_changes`) on 8 samples,
    batches of 4, and the same steps replayed on the reference model with Adam (lr 1e-3) and the plain
    cross-entropy; dropout off and one frame per chunk, so that both see the same numbers. Returns both
    models' logits afterwards."""
    import run as cli
    vocab = sa.Vocabulary(["A", "B", "C"])
    model, config = preset_model(vocab=len(vocab), dropout=0.0, pos_dropout=0.0)
    reference = ReferenceKeypointsTransformer(150, len(vocab), dropout=0.0)
    reference.copy_from(model)
    g = torch.Generator().manual_seed(1)
    frames = [torch.rand(n, 150, generator=g).numpy() for n in (9, 6, 8, 7, 9, 5, 8, 6)]
    frames[2][[2, 5]] = 0.0                                   # nothing detected in two frames
    records = [sa.Record(f"s{b}", "train", [["A", "B", "C"][i % 3] for i in range(b % 3 + 1)], ["a"], x)
               for b, x in enumerate(frames)]
    data_cfg = replace_dataclass(sa.DataConfig(**config["data"]), subsample=1)
    dataset = sa.SignDataset(records, data_cfg, vocab, sa.Vocabulary(["a"]))
    recipe = replace_dataclass(cli.Recipe(**config["train"]), batch_size=4, **recipe_changes)
    batches, batch_of = [], dataset.batch
    dataset.batch = lambda indices, generator=None: batches.append(list(indices)) or batch_of(indices, generator)
    cli.train_epoch(model, cli.Objective(model, recipe), cli.optimizer_for(model, recipe), dataset, recipe, 1, 2,
                    torch.device("cpu"))
    adam = torch.optim.Adam(reference.parameters(), lr=1e-3)
    for indices in batches:
        batch = batch_of(indices)
        logits = reference(batch["src"], batch["tgt_in"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["tgt_out"].flatten(), ignore_index=0)
        adam.zero_grad()
        loss.backward()
        adam.step()
    batch = batch_of(list(range(8)))
    with torch.no_grad():
        return model.eval()(batch["src"], batch["src_mask"], batch["tgt_in"]), reference.eval()(batch["src"],
                                                                                                batch["tgt_in"])


def test_signattention_preset_trains_as_the_reference():
    """The preset's recipe through the package's training loop (AdamW without weight decay, a constant rate,
    no clipping, no label smoothing, no CTC) moves the model as Adam moves the reference; with label smoothing
    it would not."""
    ours, theirs = preset_training({})
    assert len(ours) == 8
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    smoothed, theirs = preset_training(dict(label_smoothing=0.1))
    assert (smoothed - theirs).abs().max() > 1e-3


def test_checkpoint_selection_and_early_stopping_watch_their_own_metrics(tiny_gsl, tmp_path):
    """best.pt holds the epoch of the best validation value of --select; training stops once --stop-on has
    not improved for --patience epochs."""
    import run as cli
    history = [dict(ce=2.0, accuracy=50.0), dict(ce=1.5, accuracy=49.0), dict(ce=1.7, accuracy=55.0),
               dict(ce=1.8, accuracy=54.0)]
    assert cli.epochs_since_best(history, "ce") == 2 and cli.epochs_since_best(history, "accuracy") == 1
    tied = history + [dict(ce=1.5, accuracy=55.0)]                        # equal to the best: not an improvement
    assert cli.epochs_since_best(tied, "ce") == 3 and cli.epochs_since_best(tied, "accuracy") == 2
    assert cli.best_of("ce", [h["ce"] for h in history]) == 1.5 and cli.best_of("wer", []) is None
    assert cli.is_better("ce", 1.4, 1.5) and not cli.is_better("ce", 1.6, 1.5)
    assert cli.is_better("accuracy", 56.0, 55.0) and cli.is_better("wer", 4.0, 5.0)
    code, out = run_here(["train", "--data", tiny_gsl, "--epochs", "12", "--out", "r", "--select", "wer", "--stop-on",
                          "bleu4", "--patience", "2", "--lr", "3e-3"] + TINY_MODEL, tmp_path)
    assert code == 0, out
    history = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl", encoding="utf-8")]
    best = min(history, key=lambda h: (h["wer"], h["epoch"]))             # the first epoch of the lowest WER
    assert torch.load(tmp_path / "r" / "best.pt", weights_only=True)["epoch"] == best["epoch"]
    bleu = [h["bleu4"] for h in history]
    peak = min(i for i, v in enumerate(bleu) if v == max(bleu))          # the first epoch that reached it
    if "early stop" in out:                                # stopped: the last 2 epochs did not beat the peak
        assert "early stop: no better validation bleu4 for 2 epochs" in out and len(history) == peak + 3
    else:
        assert len(history) == 12 and peak >= 12 - 2


# ----------------------------------------------------------------------------------------------------
# explain.py: every method against a slow, obvious reference
# ----------------------------------------------------------------------------------------------------

import explain as ex


def explain_inputs(seed=0, B=3, T=11, n=5):
    model = small_model()
    src, mask, _ = random_batch(B=B, T=T, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    out = torch.randint(4, 15, (B, n), generator=g)
    out[0, n - 1] = model.eos_id
    out[1, 3:] = model.pad_id                       # a shorter output: rows 3.. are padding
    out[1, 2] = model.eos_id
    return model, src, mask, out


def per_token_reference(model, src, mask, out, formula):
    """For each sample (unpadded) and each of its tokens: one forward, one backward of s_t (the logit),
    then `formula(maps, grads, x, t)` on that single pass."""
    B, n = out.shape
    R = torch.zeros(B, n, src.shape[1])
    model.keep_attention(True)
    for b in range(B):
        L = int(mask[b].sum())
        tokens = out[b][out[b] != model.pad_id]
        tgt_in = torch.cat([torch.tensor([model.bos_id]), tokens[:-1]])[None]
        for t in range(len(tokens)):
            x = src[b:b + 1, :L].clone().requires_grad_(True)
            logits = model(x, mask[b:b + 1, :L], tgt_in)
            logits[0, t, tokens[t]].backward()
            groups = model.attention_modules()
            maps = {k: [m.attention[0].detach() for m in v] for k, v in groups.items()}
            grads = {k: [m.attention.grad[0] for m in v] for k, v in groups.items()}
            R[b, t, :L] = formula(maps, grads, x[0].detach(), x.grad[0], t, b, L)
    model.keep_attention(False)
    model.zero_grad()
    return R


def generic_formula(maps, grads, x, g, t, b, L, transpose=True):
    agg = lambda a, d: (d * a).clamp(min=0).mean(0)
    R_ee = torch.eye(L)
    for a, d in zip(maps["encoder_self"], grads["encoder_self"]):
        R_ee = R_ee + agg(a, d) @ R_ee
    n = maps["decoder_self"][0].shape[-1]
    R_dd, R_de = torch.eye(n), torch.zeros(n, L)

    def norm(R):
        D = R - torch.eye(len(R))
        out = torch.eye(len(R)).clone()
        for i in range(len(R)):
            if D[i].sum() != 0:
                out[i] += D[i] / D[i].sum()
        return out

    for sa_, sd, ca, cd in zip(maps["decoder_self"], grads["decoder_self"], maps["decoder_cross"], grads["decoder_cross"]):
        S = agg(sa_, sd)
        R_dd = R_dd + S @ R_dd
        R_de = R_de + S @ R_de
        R_de = R_de + (norm(R_dd).T if transpose else norm(R_dd)) @ agg(ca, cd) @ norm(R_ee)
    return R_de[t]


FORMULAS = {
    "attention": lambda maps, grads, x, g, t, b, L: maps["decoder_cross"][-1].mean(0)[t],
    "gradcam": lambda maps, grads, x, g, t, b, L: (grads["decoder_cross"][-1][:, t].mean(-1, keepdim=True)
                                                   * maps["decoder_cross"][-1][:, t]).mean(0).clamp(min=0),
    "saliency": lambda maps, grads, x, g, t, b, L: g.abs().sum(-1),
    "input_x_gradient": lambda maps, grads, x, g, t, b, L: (x * g).sum(-1),
    "generic": generic_formula,
}


def rollout_formula(maps, grads, x, g, t, b, L):
    E = torch.eye(L)
    for a in maps["encoder_self"]:
        a = a.mean(0) + torch.eye(L)
        E = (a / a.sum(-1, keepdim=True)) @ E
    return maps["decoder_cross"][-1].mean(0)[t] @ E


FORMULAS["rollout"] = rollout_formula


@pytest.mark.parametrize("method", sorted(FORMULAS))
def test_method_equals_the_per_token_reference(method):
    model, src, mask, out = explain_inputs()
    fast = ex.explain(model, src, mask, out, method, chunk=4)            # several chunks, mixed samples
    slow = per_token_reference(model, src, mask, out, FORMULAS[method])
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert fast.abs().sum() > 0


def test_generic_without_transpose_and_logprob_score():
    model, src, mask, out = explain_inputs(seed=2)
    fast = ex.explain(model, src, mask, out, "generic", transpose=False)
    slow = per_token_reference(model, src, mask, out,
                               lambda *a: generic_formula(*a, transpose=False))
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    logit = ex.explain(model, src, mask, out, "saliency")
    logprob = ex.explain(model, src, mask, out, "saliency", score="logprob")
    assert not torch.allclose(logit, logprob)


def test_integrated_gradients_equals_reference_and_is_complete():
    model, src, mask, out = explain_inputs(seed=3)
    steps = 16
    nodes, weights = np.polynomial.legendre.leggauss(steps)

    def ig(maps, grads, x, g, t, b, L):
        tokens = out[b][out[b] != model.pad_id]
        tgt_in = torch.cat([torch.tensor([model.bos_id]), tokens[:-1]])[None]
        total = torch.zeros_like(x)
        for alpha, w in zip((nodes + 1) / 2, weights / 2):
            xa = (x * float(alpha)).clone()[None].requires_grad_(True)
            model(xa, mask[b:b + 1, :L], tgt_in)[0, t, tokens[t]].backward()
            total += w * xa.grad[0]
        return (x * total).sum(-1)

    fast = ex.explain(model, src, mask, out, "integrated_gradients", steps=steps)
    slow = per_token_reference(model, src, mask, out, ig)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    # completeness at the default steps: sum over frames = s_t(x) - s_t(0)
    R = ex.explain(model, src, mask, out, "integrated_gradients")
    tgt_in = sa.shift_right(out, model.bos_id)
    with torch.no_grad():
        s = model(src, mask, tgt_in).gather(2, out[..., None])[..., 0]
        s0 = model(torch.zeros_like(src), mask, tgt_in).gather(2, out[..., None])[..., 0]
    valid = out != model.pad_id
    gap = (s - s0)[valid]
    error = (R.sum(-1)[valid] - gap).abs()
    assert error.sum() <= 0.01 * gap.abs().sum()                  # within 1% of the score changes
    assert error.median() <= 0.01 * gap.abs().median()


def test_rollout_equals_a_hand_computation():
    # two layers, one head, two frames: A1 = [[1, 0], [.5, .5]], A2 = [[.5, .5], [0, 1]], cross row [.6, .4]
    model = small_model()
    ctx = ex._Context(model, torch.zeros(1, 2, 6), torch.ones(1, 2, dtype=torch.bool), torch.full((1, 1), 2),
                      torch.full((1, 1), 5), torch.tensor([0]), torch.tensor([0]), ex.DEFAULTS)

    class Maps:
        maps = {"encoder_self": [torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]]), torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]]])],
                "decoder_cross": [torch.tensor([[[[0.6, 0.4]]]])]}

    ctx.run = lambda **kw: Maps
    R, _ = ex.rollout(ctx)
    # rownorm(A1 + I) = [[1, 0], [.25, .75]]; rownorm(A2 + I) = [[.75, .25], [0, 1]]; E = [[.8125, .1875], [.25, .75]]
    torch.testing.assert_close(R, torch.tensor([[0.6 * 0.8125 + 0.4 * 0.25, 0.6 * 0.1875 + 0.4 * 0.75]]))
    assert R.sum() == pytest.approx(1.0)


def numpy_fiedler(features):
    """|v| of the random-walk Fiedler vector, written out in numpy: (L, C) real frames -> (L,)."""
    f = features.double().numpy()
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    W = np.clip(f @ f.T, 0, None)
    W = W / W.max()
    d = W.sum(1)
    d[d < 1e-12] = 1
    L = np.eye(len(f)) - W / np.sqrt(d)[:, None] / np.sqrt(d)[None]
    _, vec = np.linalg.eigh(L)
    return np.abs(vec[:, 1] / np.sqrt(d))


def encoder_layer_features(model, src, mask):
    """Each encoder layer's output as the model reads it next, by hand: through the next layer's first
    LayerNorm (pre-LN; post-LN layers read it as it is), the last layer's through the final encoder norm."""
    with torch.no_grad():
        x = model.embed(src) + sa.sinusoid(src.shape[1], model.cfg.d_model)
        outputs = []
        for layer in model.encoder:
            x = layer(x, mask[:, None, :])
            outputs.append(x)
        feats = [model.encoder[l + 1].norm1(o) if model.cfg.norm_first else o for l, o in enumerate(outputs[:-1])]
        return feats + [model.encoder_norm(outputs[-1])]


@pytest.mark.parametrize("norm_first", [True, False])
def test_spectral_methods_match_numpy(norm_first):
    """DSMI on the encoder output; DSMI+Grad(+Attn) weight layer l's attention gradient by the Fiedler vector
    of layer l's own output (the reference's get_grad_eigs(feats_list[i], ...)), summed over the layers."""
    model, src, mask, out = explain_inputs(seed=4)
    if not norm_first:
        model = small_model(norm_first=False)
    with torch.no_grad():
        memory = model.encode(src, mask)
    feats = encoder_layer_features(model, src, mask)
    torch.testing.assert_close(feats[-1], memory)
    v = ex.fiedler(memory, mask)
    for b in range(3):
        L = int(mask[b].sum())
        np.testing.assert_allclose(v[b, :L].numpy(), numpy_fiedler(memory[b, :L]), rtol=1e-4, atol=1e-6)
        assert (v[b, L:] == 0).all()
    fast = ex.explain(model, src, mask, out, "dsmi")
    valid = out != model.pad_id
    # memory came from the fused attention kernel, `fast` from the written-out one: rounding differs
    torch.testing.assert_close(fast, v[:, None].expand_as(fast) * valid[..., None], atol=1e-5, rtol=1e-5)
    per_layer = [[torch.from_numpy(numpy_fiedler(f[b, :int(mask[b].sum())])).float() for b in range(3)]
                 for f in feats]
    assert not torch.allclose(per_layer[0][0], per_layer[-1][0], atol=1e-3)      # the layers' vectors differ
    for method, weight in (("dsmi_grad", lambda a, g: g.clamp(min=0).mean(0)),
                           ("dsmi_grad_attn", lambda a, g: (g * a).clamp(min=0).mean(0))):
        formula = lambda maps, grads, x, g, t, b, L: sum(
            weight(a, d) @ per_layer[l][b]
            for l, (a, d) in enumerate(zip(maps["encoder_self"], grads["encoder_self"])))
        torch.testing.assert_close(ex.explain(model, src, mask, out, method),
                                   per_token_reference(model, src, mask, out, formula), atol=1e-5, rtol=1e-4)
    # fewer than 3 real frames: a uniform map, no NaN
    short = torch.zeros(1, 4, dtype=torch.bool)
    short[0, :2] = True
    torch.testing.assert_close(ex.fiedler(torch.randn(1, 4, 8), short), torch.tensor([[0.5, 0.5, 0.0, 0.0]]))


def test_lrp_rules_equal_loops_and_conserve():
    torch.manual_seed(0)
    ctx = type("C", (), {"opts": ex.DEFAULTS})()
    rel = ex._Relprop(ctx, type("P", (), {"tape": {}, "copy": staticmethod(lambda t: t)})(), trace=[])
    x, w, R = torch.randn(2, 3), torch.randn(4, 3), torch.randn(2, 4)
    linear = torch.nn.Linear(3, 4)
    linear.weight.data = w
    rel.tape = {linear: ((x,), None)}
    out = rel.linear(linear, R)
    loop = torch.zeros(2, 3)
    for i in range(2):
        for k in range(4):
            z = [max(float(x[i, j] * w[k, j]), 0.0) for j in range(3)]
            for j in range(3):
                loop[i, j] += z[j] / sum(z) * R[i, k] if sum(z) else 0.0
    torch.testing.assert_close(out, loop)
    a, b, R = torch.randn(2, 3, 4), torch.randn(2, 4, 5), torch.randn(2, 3, 5)
    ra, rb = rel.matmul(a, b, R)
    Z = a @ b
    loop_a, loop_b = torch.zeros_like(a), torch.zeros_like(b)
    for n in range(2):
        for i in range(3):
            for k in range(5):
                for j in range(4):
                    share = a[n, i, j] * b[n, j, k] / Z[n, i, k] * R[n, i, k] / 2
                    loop_a[n, i, j] += share
                    loop_b[n, j, k] += share
    torch.testing.assert_close(ra, loop_a)
    torch.testing.assert_close(rb, loop_b)
    a, b, R = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    ra, rb = rel.add(a, b, R)
    for n in range(2):
        share_a, share_b = (a[n] / (a[n] + b[n]) * R[n]).sum(), (b[n] / (a[n] + b[n]) * R[n]).sum()
        assert ra[n].sum() == pytest.approx(float(abs(share_a) / (abs(share_a) + abs(share_b)) * R[n].sum()), rel=1e-4)
        torch.testing.assert_close(ra[n] / ra[n].sum(), (a[n] / (a[n] + b[n]) * R[n]) / share_a)
    for rule, r_in, r_out in rel.trace:
        torch.testing.assert_close(r_out, r_in, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("norm_first", [True, False])
def test_lrp_conserves_relevance_through_every_rule(norm_first):
    """In float64: the totals entering a rule can be ~1e-4 built from ~1e-2 parts, below float32's reach."""
    model = small_model(norm_first=norm_first).double()
    _, src, mask, out = explain_inputs(seed=5)
    src = src.double()
    valid = out != model.pad_id
    b, t = valid.nonzero(as_tuple=True)
    tgt_in = sa.shift_right(out, model.bos_id)
    ctx = ex._Context(model, src, mask, tgt_in, out, b, t, ex.DEFAULTS)
    trace = []
    rel = ex._Relprop(ctx, ctx.run(tape=True), trace=trace)
    R_src, R_tokens = rel.run()
    assert {r for r, _, _ in trace} == {"linear", "matmul", "add"} and len(trace) > 40
    for rule, r_in, r_out in trace:
        err = (r_out - r_in).abs() / r_in.abs().clamp(min=1e-6)
        assert err.max() <= 1e-4, (rule, err.max())
    model.keep_attention(False)


@pytest.mark.parametrize("method", ["lrp", "partial_lrp", "transformer_attribution", "dsmi_grad"])
def test_batched_methods_equal_one_token_at_a_time(method):
    """Batching, padding and chunking change nothing: each sample alone, unpadded, one token per pass."""
    model, src, mask, out = explain_inputs(seed=6)
    fast, fast_tokens = ex.explain(model, src, mask, out, method, return_tokens=True)
    for b in range(3):
        L, n = int(mask[b].sum()), int((out[b] != model.pad_id).sum())
        for t in range(n):
            row = torch.zeros(1, n, dtype=torch.bool)
            row[0, t] = True
            one = ex.explain(model, src[b:b + 1, :L], mask[b:b + 1, :L], out[b:b + 1, :n], method, rows=row)
            torch.testing.assert_close(fast[b, t, :L], one[0, t], atol=1e-5, rtol=1e-5)
            assert (one[0, :t] == 0).all() and (one[0, t + 1:] == 0).all()
        assert (fast[b, n:] == 0).all() and (fast[b, :, L:] == 0).all()


def test_random_control_is_seeded_and_masked():
    model, src, mask, out = explain_inputs()
    a, b = (ex.explain(model, src, mask, out, "random", seed=1) for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, ex.explain(model, src, mask, out, "random", seed=2))
    assert (a[2, :, 5:] == 0).all() and (a[1, 3:] == 0).all() and (a[0] > 0).any()


@pytest.mark.parametrize("method", ex.METHODS)
def test_no_nan_on_edge_inputs(method):
    """One real frame, two frames, one output token, fully masked tail, zero frames' features."""
    model = small_model()
    src = torch.randn(4, 6, 6)
    src[3] = 0.0
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[0, :1], mask[1, :2], mask[2, :6], mask[3, :3] = True, True, True, True
    out = torch.tensor([[model.eos_id, 0, 0], [5, model.eos_id, 0], [6, 7, model.eos_id], [model.eos_id, 0, 0]])
    R, tokens = ex.explain(model, src, mask, out, method, return_tokens=True)
    assert torch.isfinite(R).all() and R.shape == (4, 3, 6)
    assert (R[0, :, 1:] == 0).all() and (R[0, 1:] == 0).all()
    if tokens is not None:
        assert torch.isfinite(tokens).all()


def test_explain_rejects_unknown_names():
    model, src, mask, out = explain_inputs()
    with pytest.raises(ValueError):
        ex.explain(model, src, mask, out, "grad_cam")
    with pytest.raises(TypeError):
        ex.explain(model, src, mask, out, "generic", steps_=3)


def test_extract_writes_every_map_and_method(tiny_run):
    import run as cli
    cwd, _ = tiny_run
    (path, returned), printed = call(cli.extract, cli.ExtractConfig(run="r", limit=5, batch_size=2), cwd)
    assert "extract test: 5/5 samples" in printed and "samples/s" in printed and "ETA" in printed
    data = torch.load(cwd / path, weights_only=True)
    assert [s["id"] for s in data["samples"]] == [s["id"] for s in returned["samples"]]
    meta, samples = data["meta"], data["samples"]
    assert meta["methods"] == list(ex.METHODS) and len(samples) == 5 and meta["split"] == "test"
    config = json.load(open(cwd / "r" / "config.json"))["model"]
    for s in samples:
        n, T = len(s["tokens"]), s["frames"]
        assert s["tokens"][-1] == sa.EOS or n == 21
        att = s["attention"]
        assert att["encoder_self"].shape == (config["encoder_layers"], config["heads"], T, T)
        assert att["decoder_cross"].shape == (config["decoder_layers"], config["heads"], n, T)
        assert att["decoder_self"].shape == (config["decoder_layers"], config["heads"], n, n)
        torch.testing.assert_close(att["decoder_cross"].float().sum(-1), torch.ones(config["decoder_layers"], config["heads"], n),
                                   atol=3e-3, rtol=0)
        assert s["gloss_posteriors"].shape[0] == T and s["branch_norms"]["video"].shape == (config["decoder_layers"], n)
        assert set(s["relevance"]) == set(ex.METHODS)
        assert all(r.shape == (n, T) and torch.isfinite(r).all() for r in s["relevance"].values())
        assert set(s["token_relevance"]) == set(ex.TOKEN_RELEVANCE)
    assert all(s["id"].startswith("synth_signer3") for s in samples)


def test_bench_reports_the_same_numbers(tiny_run):
    import run as cli
    cwd, _ = tiny_run
    _, printed = call(cli.bench, cli.BenchConfig(run="r", limit=3, methods="saliency,generic,lrp,attention"), cwd)
    rows = {line.split()[0]: line.split() for line in printed.splitlines()[2:] if not line.startswith("bench")}
    assert set(rows) == {"saliency", "generic", "lrp", "attention"}
    for method in ("saliency", "generic", "lrp"):
        assert float(rows[method][-1]) <= 1e-5 and rows[method][-2].endswith("x")
    with pytest.raises(sa.DataError, match=r"unknown method\(s\) nope"):
        call(cli.bench, cli.BenchConfig(run="r", methods="gradcam,nope"), cwd)
    result = USER_RUNS.result("bench")                   # as a user: bench b --perturb --limit 2 --methods generic,random
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:]
            if not line.startswith("bench")}
    assert set(rows) == {"generic", "random"} and all(r[-2] == "0" and r[-3].endswith("x") for r in rows.values())


# ----------------------------------------------------------------------------------------------------
# plot: the numbers behind the global figures, and the figures themselves
# ----------------------------------------------------------------------------------------------------

def test_diagonality_and_profiles_on_constructed_attention():
    diagonal = torch.zeros(4, 40)
    for t in range(4):
        diagonal[t, 10 * t:10 * t + 10] = 0.1                     # token t attends to its quarter
    assert ex.diagonality(diagonal) == pytest.approx(1.0)
    assert ex.diagonality(diagonal.flip(0)) == pytest.approx(-1.0)
    torch.testing.assert_close(ex.centroids(diagonal), torch.tensor([4.5, 14.5, 24.5, 34.5]) / 39)
    profile = ex.relative_profile(diagonal, bins=4)
    torch.testing.assert_close(profile, torch.eye(4))
    assert ex.spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 2, 2, 3])) == pytest.approx(1.0)
    assert np.isnan(ex.spearman(torch.tensor([1.0, 1, 1]), torch.tensor([1.0, 2, 3])))
    offsets = ex.offset_profile(torch.eye(6), 2)
    torch.testing.assert_close(offsets, torch.tensor([0.0, 0, 1, 0, 0], dtype=torch.float64))
    uniform, one_hot = torch.full((2, 3, 8), 1 / 8), torch.eye(8)[None, :3].repeat(2, 1, 1)
    torch.testing.assert_close(ex.entropy(uniform), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(ex.entropy(one_hot), torch.zeros(2, dtype=torch.float64))
    relevance = torch.tensor([[0.0, 3, 1, -2], [1, 0, 0, 2]])
    assert ex.pointing_game(relevance, [(0, 1, 2), (1, 0, 2)]) == [True, False]
    assert ex.segment_mass(relevance, [(0, 1, 3), (1, 3, 4)]) == pytest.approx([1.0, 2 / 3])


def test_word_gloss_links_and_token_segments(held):
    pronouns, verbs = ["ΕΓΩ(1)", "ΕΣΥ", "ΑΥΤΟΣ"], ["ΧΑΝΩ", "ΒΡΙΣΚΩ", "ΘΕΛΩ"]
    nouns = {"ΚΛΕΙΔΙ": "κλειδί", "ΔΙΠΛΩΜΑ": "δίπλωμα", "ΦΑΡΜΑΚΟ": "φάρμακο", "ΡΑΝΤΕΒΟΥ": "ραντεβού",
             "ΤΗΛΕΦΩΝΟ": "τηλέφωνο", "ΠΟΡΤΟΦΟΛΙ": "πορτοφόλι"}
    pairs = [([pronouns[i % 3], noun, verbs[(i // 4) % 3]], [f"v{i % 3}{(i // 4) % 3}", "το", word])
             for i, (noun, word) in enumerate(list(nouns.items()) * 2)]
    links = sa.gloss_links(pairs)
    assert all(links[word] == noun for noun, word in nouns.items())
    assert "το" not in links                      # with every pronoun and verb alike: Dice 0.5
    tied = [(["Α", "Β"], ["x"]), (["Α", "Β"], ["x"]), (["Γ"], ["y"])]           # x: Α and Β tie at Dice 1
    # two processes whose string hashes put Α and Β in a set in opposite orders (checked, not assumed)
    script = f"import signattention as sa; print(list({{'Α', 'Β'}}), sorted(sa.gloss_links({tied!r}).items()))"
    started = [subprocess.Popen([sys.executable, "-c", script], cwd=HERE, stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONHASHSEED=str(seed))) for seed in (0, 2)]
    orders, seen = zip(*(p.communicate()[0].split("] ", 1) for p in started))
    assert len(set(orders)) == 2, orders
    assert set(seen) == {"[('x', 'Α'), ('y', 'Γ')]\n"}            # a tie goes the same way in every process
    alignments = [(0, "ΕΓΩ(1)", 4, 20), (1, "ΚΛΕΙΔΙ", 24, 40), (2, "ΧΑΝΩ", 43, 60)]
    sample = dict(tokens=["έχασα", "το", "κλειδί", sa.EOS], gloss_reference=["ΕΓΩ(1)", "ΚΛΕΙΔΙ", "ΧΑΝΩ"], frames=30)
    # subsample 2: original [24, 40) holds model frames 12..19, [43, 60) frames 22..29
    links = {"έχασα": "ΧΑΝΩ", "κλειδί": "ΚΛΕΙΔΙ"}
    assert ex.token_segments(sample, alignments, 2, "text", links) == [(0, 22, 30), (2, 12, 20)]
    glosses = dict(tokens=["ΕΓΩ(1)", "ΚΛΕΙΔΙ", "ΒΡΙΣΚΩ", sa.EOS], gloss_reference=["ΕΓΩ(1)", "ΚΛΕΙΔΙ", "ΧΑΝΩ"], frames=30)
    assert ex.token_segments(glosses, alignments, 2, "gloss", None) == [(0, 2, 10), (1, 12, 20)]
    cut = dict(sample, frames=16)                 # the clip cut at max_frames: [43, 60) is past it, [24, 40) cut
    assert ex.token_segments(cut, alignments, 2, "text", links) == [(2, 12, 16)]


def no_overlapping_labels(fig):
    """Tick labels of each axis, and the titles and axis labels of all axes, do not overlap."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()

    def boxes(texts):
        return [t.get_window_extent(renderer) for t in texts if t.get_visible() and t.get_text()]

    def disjoint(bs):
        return all(not a.overlaps(b) for i, a in enumerate(bs) for b in bs[i + 1:])

    for ax in fig.axes:
        assert disjoint(boxes(ax.get_yticklabels())) and disjoint(boxes(ax.get_xticklabels()))
    labels = [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label)]
    assert disjoint(boxes(labels))


def test_sample_figures_are_legible_for_20_tokens_and_600_frames(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.figure
    import run as cli
    n, T, L, h = 20, 300, 2, 4                       # 600 original frames, one in 2
    g = torch.Generator().manual_seed(0)
    att = lambda *shape: torch.softmax(torch.randn(*shape, generator=g), -1).half()
    words = ["αστυνομία", "πιστοποιητικό", "χρειάστηκες", "ασθενοφόρο", "δημαρχείο"]
    tokens = [words[i % 5] for i in range(n - 1)] + [sa.EOS]
    sample = dict(id="long", gloss_reference=["ΑΣΤΥΝΟΜΙΑ"] * 8, text_reference=tokens[:-1], prediction=tokens[:-1],
                  gloss_prediction=["ΑΣΤΥΝΟΜΙΑ"], tokens=tokens, frames=T,
                  attention=dict(encoder_self=att(3, h, T, T), decoder_self=att(L, h, n, n), decoder_cross=att(L, h, n, T)),
                  gloss_posteriors=att(T, 6).float(),
                  branch_norms=dict(tokens=torch.rand(L, n, generator=g), video=torch.rand(L, n, generator=g)),
                  relevance={m: torch.randn(n, T, generator=g) for m in ex.METHODS}, token_relevance={})
    meta = dict(split="test", target="text", methods=list(ex.METHODS), gloss_vocab=[sa.PAD, sa.UNK, sa.BOS, sa.EOS, "ΑΣΤΥΝΟΜΙΑ", "ΧΑΝΩ"],
                data_config=asdict_data(subsample=2, format="signjoey"))
    checked = []

    def checking_savefig(fig, *args, **kwargs):          # laid out and drawn as saved, but not encoded: the
        no_overlapping_labels(fig)                       # files' pictures are test_plot_as_a_user's
        checked.append(args[0])

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", checking_savefig)
    written = cli.plot_sample(str(tmp_path), dict(meta=meta, samples=[sample]), str(tmp_path), 0, "png", False)
    assert len(written) == 6 and len(checked) == 6


def test_sample_figures_draw_what_the_extraction_holds(tmp_path):
    """Each sample figure shows the extraction's numbers: the heatmaps are the maps (mean over heads), one
    relevance panel per method, the posteriors and video shares as lines, and the skeleton at the centre
    frame of each true segment, titled with its gloss."""
    import run as cli
    n, T, L, h, V = 4, 10, 2, 2, 6
    g = torch.Generator().manual_seed(0)
    att = lambda *shape: torch.softmax(torch.randn(*shape, generator=g), -1).half()
    tokens = ["α", "β", "γ", sa.EOS]
    sample = dict(id="s", gloss_reference=["ΓΕΙΑ", "ΝΑΙ"], text_reference=tokens[:-1], prediction=tokens[:-1],
                  gloss_prediction=["ΓΕΙΑ"], tokens=tokens, frames=T,
                  attention=dict(encoder_self=att(L, h, T, T), decoder_self=att(L, h, n, n), decoder_cross=att(L, h, n, T)),
                  gloss_posteriors=att(T, V), branch_norms=dict(tokens=torch.rand(L, n, generator=g),
                                                                  video=torch.rand(L, n, generator=g)),
                  relevance={m: torch.randn(n, T, generator=g) for m in ("generic", "lrp", "random")})
    meta = dict(split="test", target="text", methods=["generic", "lrp", "random"], ctc_trained=True,
                gloss_vocab=[sa.PAD, sa.UNK, sa.BOS, sa.EOS, "ΓΕΙΑ", "ΝΑΙ"], data_config=asdict_data(subsample=2))
    os.makedirs(tmp_path / "poses")
    np.save(tmp_path / "poses" / "s.npy", np.random.default_rng(0).random((2 * T, 1, 543, 3), dtype=np.float32))
    d = cli.SampleData(dict(meta=meta, samples=[sample]), str(tmp_path), 0, {"s": [(1, "ΝΑΙ", 10, 16), (0, "ΓΕΙΑ", 2, 8)]})
    image = lambda ax: torch.tensor(np.asarray(ax.images[0].get_array()), dtype=torch.float32)
    maps = lambda fig: [ax for ax in fig.axes if ax.images]                     # not the colour bars
    close = lambda a, b: torch.testing.assert_close(a, b.float(), atol=1e-6, rtol=1e-6)
    fig = cli.figure_cross_attention(d)
    for l in range(L):
        close(image(maps(fig)[l]), sample["attention"]["decoder_cross"].float().mean(1)[l])
    fig = cli.figure_encoder_attention(d)
    close(image(maps(fig)[0]), sample["attention"]["encoder_self"].float().mean(1)[0])
    fig = cli.figure_decoder_attention(d)
    close(image(maps(fig)[1]), sample["attention"]["decoder_self"].float().mean(1)[1])
    fig = cli.figure_relevance(d)
    panels = maps(fig)
    assert [ax.get_title() for ax in panels] == meta["methods"]
    for ax in panels:
        close(image(ax), sample["relevance"][ax.get_title()])
    fig = cli.figure_gloss_posteriors(d)
    lines = {line.get_label(): line.get_ydata() for line in fig.axes[0].lines}
    close(torch.tensor(lines["blank"]), sample["gloss_posteriors"][:, 0])
    close(torch.tensor(lines["ΝΑΙ"]), sample["gloss_posteriors"][:, 5])
    fig = cli.figure_reliance(d)
    for l in range(L):
        close(torch.tensor(fig.axes[1].lines[l].get_ydata()), ex.video_share(sample["branch_norms"])[l])
    fig = cli.figure_skeleton(d)
    assert [ax.get_title() for ax in fig.axes] == ["frame 5\nΓΕΙΑ", "frame 13\nΝΑΙ"]


def asdict_data(**kw):
    from dataclasses import asdict
    return asdict(sa.DataConfig(**kw))


def drawn(path):
    """Whether a figure file decodes as an image with something drawn on it (many colours, not a flat page)."""
    from PIL import Image                                          # matplotlib's own image library
    with Image.open(path) as image:
        return min(image.size) > 100 and len(image.convert("RGB").getcolors(1 << 24)) > 20


def test_plot_as_a_user(tiny_run):
    """plot --sample 1 --animate right after training: without an extraction, the sample is extracted alone in
    memory (seconds, and nothing is written but the figures)."""
    import run as cli
    cwd, _ = tiny_run
    result = USER_RUNS.result("plot")                       # plot fresh --sample 1 --animate, fresh a copy of r
    assert result.returncode == 0, result.stderr
    assert "extracting test sample 1" in result.stdout and not (cwd / "fresh" / "extract_test.pt").exists()
    for name in cli.SAMPLE_FIGURES:
        assert drawn(cwd / "fresh" / f"sample1_{name}.png") and f"sample1_{name}.png" in result.stdout
    from PIL import Image
    with Image.open(cwd / "fresh" / "sample1_animation.gif") as gif:            # one frame per model frame
        assert gif.format == "GIF" and gif.n_frames > 10 and gif.size[0] > 1000
    with pytest.raises(sa.DataError, match=r"holds samples 0\.\.15"):
        call(cli.plot, cli.PlotConfig(run="fresh", sample=16), cwd)
    _, printed = call(cli.plot, cli.PlotConfig(run="r", all=True, figure_type="svg"), cwd)
    for name in cli.GLOBAL_FIGURES:
        assert (cwd / "r" / f"all_all_{name}.svg").read_text().count("<path") > 10
    assert "diagonality (all): layer 1" in printed and "pointing game (all): attention" in printed
    code, printed = run_here(["plot", "r", "--sample", "999"], cwd)
    assert code == 2 and "--sample 999" in printed and len(printed.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------
# view: one offline HTML file (Python checks; a real browser where Chromium is installed)
# ----------------------------------------------------------------------------------------------------

import base64
import hashlib
import re
import shutil
import zlib

CHROMIUM = next((shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="session")
def viewed_run(tiny_run):
    """The tiny run's view, made as a user makes it: `view` (which extracts the split first), `perturb`
    on the extraction, then `view` again, which now shows the perturbation table."""
    cwd, _ = tiny_run
    first = USER_RUNS.result("view")                                # view v, v a copy of the tiny run
    assert first.returncode == 0, first.stderr
    assert "extracting the test split first" in first.stdout and "view_test.html" in first.stdout
    import run as cli
    call(cli.perturb, cli.PerturbConfig(run="v", limit=6, bootstrap=100), cwd)
    call(cli.view, cli.ViewConfig(run="v"), cwd)
    return cwd, cwd / "v" / "view_test.html"


def read_view(path):
    """(the page's JSON, its arrays as numpy) from a view file, decoded as the page decodes them."""
    html = open(path, encoding="utf-8").read()
    page = json.loads(re.search(r'<script id="view-data" type="application/json">(.*?)</script>', html, re.S).group(1))
    blob = zlib.decompress(base64.b64decode(re.search(r'<script id="view-blob" type="text/plain">(.*?)</script>',
                                                      html, re.S).group(1).strip()))
    types = {"f4": "<f4", "u1": "u1", "u2": "<u2"}

    def array(entry):
        offset, kind, shape = entry
        return np.frombuffer(blob, types[kind], int(np.prod(shape)), offset).reshape(shape)
    return html, page, array


def test_view_file_holds_the_extraction(viewed_run):
    """Every array decoded back from the file equals the extraction: relevance and cross-attention exactly,
    CTC posteriors to 1/255, the pose to its 12-bit quantisation; the gloss segments are the data's."""
    cwd, path = viewed_run
    html, page, array = read_view(path)
    data = torch.load(cwd / "v" / "extract_test.pt", weights_only=True)
    meta, samples = data["meta"], data["samples"]
    assert page["meta"]["methods"] == list(ex.METHODS) and len(page["samples"]) == len(samples) == 16
    assert set(page["meta"]["signed"]) == ex.SIGNED and page["meta"]["pointing"]["occurrences"] > 0
    assert [t["title"] for t in page["meta"]["perturb"]] == ["perturb test token first6"]
    assert set(page["meta"]["perturb"][0]["curves"]) == set(ex.METHODS)
    alignments = sa.read_alignments(json.load(open(cwd / "v" / "config.json"))["data_path"])
    for s, v in zip(samples, page["samples"]):
        assert (v["id"], v["tokens"], v["prediction"], v["frames"]) == (s["id"], s["tokens"], s["prediction"], s["frames"])
        for m in ex.METHODS:
            np.testing.assert_array_equal(array(v["arrays"][f"rel:{m}"]), s["relevance"][m].numpy())
        np.testing.assert_array_equal(array(v["arrays"]["cross"]), s["attention"]["decoder_cross"].float().mean(1).numpy())
        video, tokens = s["branch_norms"]["video"], s["branch_norms"]["tokens"]
        np.testing.assert_allclose(array(v["arrays"]["share"]), (video / (video + tokens)).numpy(), rtol=1e-6)
        columns = [meta["gloss_vocab"].index(g) for g in v["ctc_glosses"]]
        assert set(s["gloss_reference"]) <= set(v["ctc_glosses"])
        np.testing.assert_allclose(array(v["arrays"]["ctc"]) / 255, s["gloss_posteriors"].float()[:, columns].numpy(),
                                   atol=0.5 / 255 + 1e-3)
        assert v["segments"] == [[g, a, b] for _, g, a, b in sorted(alignments[s["id"]])]
        pose = np.load(os.path.join(json.load(open(cwd / "v" / "config.json"))["data_path"], "poses", s["id"] + ".npy"))
        points = pose[:, 0, [*sa.BODY[:25], *sa.LEFT_HAND, *sa.RIGHT_HAND, *[sa.FACE[i] for i in sa.FACE_OVAL]], :2]
        codes = np.cumsum(array(v["pose"]["array"]).astype(np.int64), 0) % 65536           # frames were differences
        levels = page["meta"]["pose_levels"]
        assert ((codes == levels) == np.isnan(points)).all()
        lo, hi = np.array(v["pose"]["lo"]), np.array(v["pose"]["hi"])
        decoded = lo + codes / (levels - 1) * (hi - lo)
        step = (hi - lo) / (levels - 1)                                      # per coordinate
        assert (np.isnan(points) | (np.abs(decoded - points) <= step / 2 + 1e-6)).all()


def test_view_is_one_offline_file_that_escapes_its_text(viewed_run):
    """No address of any kind, a Content-Security-Policy that forbids every request, every byte inline; text
    from the data cannot close the script that holds it."""
    cwd, path = viewed_run
    html = open(path, encoding="utf-8").read()
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    assert re.search(r'<meta http-equiv="Content-Security-Policy"\s+content="default-src \'none\'', html)
    assert not re.search(r"<(link|iframe|img|object|embed)\b|\bsrc=|@import|url\(", html)
    assert html.count("<script") == 4                              # the data, the arrays, the report, the page
    policy = re.search(r"script-src ([^;]*);", html).group(1).split()
    running = re.findall(r"<script>(.*?)</script>", html, re.S)            # the scripts a browser runs
    digest = lambda text: f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"
    assert policy == [digest(text) for text in running] and len(running) == 1
    import run as cli                                              # a second script would be allowed by its own hash
    two = '<script>a = 1;</script><script type="application/json">{}</script><script>b = 2;</script>'
    assert cli.script_policy(two) == f"{digest('a = 1;')} {digest('b = 2;')}"
    run_folder_copy(cwd, "x")
    data = torch.load(cwd / "v" / "extract_test.pt", weights_only=True)
    evil = "</script><script>alert(1)</script><!--&amp;"
    data["samples"][0]["tokens"][0] = data["samples"][0]["prediction"][0] = evil
    data["samples"][0]["id"] = data["samples"][0]["id"] + "&<b>"
    torch.save(data, cwd / "x" / "extract_test.pt")
    call(cli.view, cli.ViewConfig(run="x", limit=2), cwd)
    html, page, _ = read_view(cwd / "x" / "view_test.html")
    assert "<script>alert" not in html and html.count("</script>") == html.count("<script") == 4
    assert page["samples"][0]["tokens"][0] == evil and page["samples"][0]["id"].endswith("&<b>")
    assert len(page["samples"]) == 2


def test_view_of_300_samples_and_14_methods_stays_under_20_mb(tiny_gsl, tmp_path):
    """The synthetic test split's size (300 samples of the default model's shapes, 14 methods), with the
    data's real pose files and incompressible random relevance: under 20 MB."""
    data_path = tmp_path / "data"
    os.makedirs(data_path / "poses")
    poses = sorted(os.listdir(os.path.join(tiny_gsl, "poses")))
    g, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    vocab = [sa.PAD, sa.UNK, sa.BOS, sa.EOS] + sa.SYNTHETIC_GLOSSES[:47]
    samples = []
    for i in range(300):
        sid = f"s{i:03d}"
        os.symlink(os.path.join(tiny_gsl, "poses", poses[i % len(poses)]), data_path / "poses" / f"{sid}.npy")
        T = (len(np.load(data_path / "poses" / f"{sid}.npy", mmap_mode="r")) + 1) // 2
        n = int(rng.integers(2, 14))
        words = [f"λέξη{j}" for j in range(n - 1)] + [sa.EOS]
        samples.append(dict(
            id=sid, tokens=words, prediction=words[:-1], text_reference=words[:-1], gloss_reference=vocab[4:8],
            gloss_prediction=vocab[4:8], frames=T,
            relevance={m: torch.randn(n, T, generator=g) for m in ex.METHODS},
            attention=dict(decoder_cross=torch.softmax(torch.randn(2, 4, n, T, generator=g), -1).half()),
            gloss_posteriors=torch.softmax(4 * torch.randn(T, len(vocab), generator=g), -1).half(),
            branch_norms=dict(video=torch.rand(2, n, generator=g), tokens=torch.rand(2, n, generator=g))))
    meta = dict(split="test", target="text", methods=list(ex.METHODS), epoch=30, gloss_vocab=vocab, ctc_trained=True,
                data_config=asdict_data(subsample=2))
    os.makedirs(tmp_path / "r")
    torch.save(dict(meta=meta, samples=samples), tmp_path / "r" / "extract_test.pt")
    with open(tmp_path / "r" / "config.json", "w") as f:
        json.dump(dict(data_path=str(data_path)), f)
    import run as cli
    call(cli.view, cli.ViewConfig(run="r"), tmp_path)
    size = os.path.getsize(tmp_path / "r" / "view_test.html")
    assert 5e6 < size < 20e6, size


def chromium(url, user_data, *flags):
    """Headless Chromium on a file URL with the flags that keep it off the network; virtual time lets the
    page finish its start-up before the DOM is dumped or the screenshot taken."""
    with USER_RUNS.held():
        return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               "--disable-extensions", f"--user-data-dir={user_data}", "--virtual-time-budget=30000",
                               *flags, url], capture_output=True, text=True, timeout=180)


def chromium_states(path, hashes, user_data):
    """Several states of one view file in one headless Chromium: a page beside it holds a frame per hash and,
    late in virtual time, copies each frame's self-report and DOM into itself. Returns [(report, DOM)]."""
    frames = "".join(f'<iframe src="{os.path.basename(path)}#{h}" width="1400" height="900"></iframe>' for h in hashes)
    holder = os.path.join(os.path.dirname(path), "states.html")
    with open(holder, "w", encoding="utf-8") as f:
        f.write(f"""<!doctype html><meta charset="utf-8"><pre id="states"></pre>{frames}<script>
addEventListener("load", () => setTimeout(() => {{
  const states = [...document.querySelectorAll("iframe")].map(frame => {{
    const page = frame.contentDocument, report = page && page.getElementById("self-report");
    return [report ? JSON.parse(report.textContent) : null, page ? page.documentElement.outerHTML : ""];
  }});
  document.getElementById("states").textContent = JSON.stringify(states);
}}, 20000));
</script>""")
    dom = chromium(f"file://{holder}", user_data, "--allow-file-access-from-files", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    states = json.loads(unescape(re.search(r'<pre id="states">(.*?)</pre>', dom.stdout, re.S).group(1)))
    assert len(states) == len(hashes), states
    return states


@needs_chromium
def test_view_in_a_real_browser(viewed_run, tmp_path):
    """Headless Chromium opens the file at a linked state: no script error, no blocked request, and the page
    reports the hash's sample, token, method and frame; screenshots of two frames are not blank and differ."""
    from PIL import Image
    cwd, path = viewed_run
    _, page, _ = read_view(path)
    frames = len(np.load(os.path.join(json.load(open(cwd / "v" / "config.json"))["data_path"], "poses",
                                      page["samples"][3]["id"] + ".npy"), mmap_mode="r"))
    url = f"file://{path}#sample=3&token=2&method=generic&frame=40"
    dom = chromium(url, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    report = json.loads(re.search(r'<script id="self-report" type="application/json">(.*?)</script>', dom.stdout,
                                  re.S).group(1))
    assert report["ready"] and report["errors"] == [] and report["blocked"] == [], report
    assert (report["sample"], report["token"], report["method"]) == (3, 2, "generic")
    assert report["frame"] == min(40, frames - 1) and report["id"] == page["samples"][3]["id"]
    assert report["token_text"] == page["samples"][3]["tokens"][2] and report["samples"] == 16
    holder, shot = path.parent / "two_frames.html", tmp_path / "frames.png"    # one screenshot, a frame above another
    holder.write_text('<!doctype html><body style="margin:0">' + "".join(
        f'<iframe src="{path.name}#sample=3&token=2&method=generic&frame={frame}" width="1400" height="1000" '
        'style="border:0;display:block"></iframe>' for frame in (5, min(40, frames - 1))), encoding="utf-8")
    result = chromium(f"file://{holder}", tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,2000",
                      "--hide-scrollbars")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (2000, 1400, 3), pixels.shape
    shots = [pixels[:1000], pixels[1000:]]
    for pixels in shots:
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200         # text, heatmaps, a signer: not blank
    changed = np.abs(shots[0] - shots[1]).sum(-1) > 30
    assert 200 < changed.sum() < 0.5 * changed.size                          # the signer and the playheads moved


@needs_chromium
def test_view_in_a_real_browser_with_awkward_samples(tiny_gsl, tmp_path):
    """Samples the page must survive: a flat relevance row, one token and no pose file, a CTC head that puts
    no gloss above 10%, and text that tries to be markup; each opens with no script error, and the markup
    stays text."""
    g = torch.Generator().manual_seed(0)
    vocab = [sa.PAD, sa.UNK, sa.BOS, sa.EOS, "ΓΕΙΑ", "ΝΑΙ"]
    pose_id = sorted(os.listdir(os.path.join(tiny_gsl, "poses")))[0][:-4]
    T = (len(np.load(os.path.join(tiny_gsl, "poses", pose_id + ".npy"), mmap_mode="r")) + 1) // 2

    def sample(sid, words, frames, blank=False):
        n = len(words)
        posteriors = torch.softmax(torch.randn(frames, len(vocab), generator=g), -1)
        if blank:
            posteriors = torch.zeros(frames, len(vocab))
            posteriors[:, 0] = 1.0
        return dict(id=sid, tokens=words, prediction=words[:-1], text_reference=words[:-1], frames=frames,
                    gloss_reference=["ΑΓΝΩΣΤΟ"] if blank else ["ΓΕΙΑ"], gloss_prediction=["ΓΕΙΑ"],
                    relevance={m: torch.randn(n, frames, generator=g) for m in ex.METHODS},
                    attention=dict(decoder_cross=torch.softmax(torch.randn(2, 4, n, frames, generator=g), -1).half()),
                    gloss_posteriors=posteriors.half(),
                    branch_norms=dict(video=torch.rand(2, n, generator=g), tokens=torch.rand(2, n, generator=g)))
    hostile = "</script><b>x</b>"
    samples = [sample(pose_id, ["γεια", "σας", sa.EOS], T), sample("nopose", [sa.EOS], 7),
               sample("blank", ["ναι", sa.EOS], 9, blank=True), sample("evil&<i>", [hostile, sa.EOS], 5)]
    samples[0]["relevance"]["generic"][0] = 0.0                                    # a flat row
    meta = dict(split="test", target="text", methods=list(ex.METHODS), epoch=1, gloss_vocab=vocab, ctc_trained=True,
                data_config=asdict_data(subsample=2))
    os.makedirs(tmp_path / "r")
    torch.save(dict(meta=meta, samples=samples), tmp_path / "r" / "extract_test.pt")
    with open(tmp_path / "r" / "config.json", "w") as f:
        json.dump(dict(data_path=tiny_gsl), f)
    code, printed = run_here(["view", "r"], tmp_path)              # viewed_run runs view as a user
    assert code == 0, printed
    _, page, _ = read_view(tmp_path / "r" / "view_test.html")
    assert page["samples"][1]["pose"] is None and "ctc" not in page["samples"][2]["arrays"]
    states = chromium_states(tmp_path / "r" / "view_test.html",
                             [f"sample={index}&token=0&method=generic&frame=3" for index in range(4)], tmp_path / "profile")
    for index, (report, dom) in enumerate(states):
        assert report["ready"] and report["errors"] == [] and report["sample"] == index, (index, report)
        if index == 0:
            assert "generic · flat" in dom
        if index == 3:
            assert report["token_text"] == hostile and "<b>x</b>" not in dom
            assert "&lt;/script&gt;&lt;b&gt;x&lt;/b&gt;" in dom


# ----------------------------------------------------------------------------------------------------
# torchrun: two processes on the CPU (gloo)
# ----------------------------------------------------------------------------------------------------

def torchrun(args, cwd, processes=2):
    with USER_RUNS.held():                                      # several processes: the lane waits
        return completed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          str(processes), os.path.join(HERE, "run.py")] + args, cwd, 600)


def torchrun_extract_then_perturb(cwd):
    """As a user runs them, on the tiny run's copy `two`: extract of the first 4 samples in 2 batches (one a
    process), then perturb, which reads that extraction."""
    return (torchrun(["extract", "two", "--limit", "4", "--batch-size", "2"], cwd),
            torchrun(["perturb", "two", "--limit", "4", "--bootstrap", "100"], cwd))


def table_row(output, split):
    return next(line.split() for line in output.splitlines() if line.split()[:1] == [split])


def test_torchrun_trains_once_with_two_processes_and_resumes(tiny_gsl, tmp_path):
    """Two processes: the loss falls, one process prints and writes (one set of files, the world size in
    config.json), the printed test metrics are a one-process evaluation's of the same checkpoint, and the
    run resumes under torchrun from its last checkpoint."""
    result = torchrun(["train", "--data", tiny_gsl, "--epochs", "2", "--out", "d", "--dropout", "0.1"] + TINY_MODEL,
                      tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("epoch")] == ["1/2", "2/2"]
    assert "2 processes" in result.stdout and result.stdout.count("sacrebleu:") == 1
    history = [json.loads(line) for line in open(tmp_path / "d" / "metrics.jsonl")]
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["loss"] < history[0]["loss"]
    assert sorted(os.listdir(tmp_path / "d")) == ["best.pt", "config.json", "last.pt", "metrics.jsonl", "results.json",
                                                  "translations.csv"]
    assert json.load(open(tmp_path / "d" / "config.json"))["world_size"] == 2
    import run as cli
    _, printed = call(cli.evaluate, cli.EvalConfig(run="d"), tmp_path)
    assert table_row(printed, "test") == table_row(result.stdout, "test")
    resumed = torchrun(["train", "--resume", "d", "--epochs", "3"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming d after epoch 2" in resumed.stdout and "epoch   3/3" in resumed.stdout
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "d" / "metrics.jsonl")] == [1, 2, 3]


def test_torchrun_extract_and_perturb_equal_one_process(tiny_run):
    """Sharded over two processes, extract writes one file equal to the one-process file (to 1e-5 of each
    row's scale) and perturb the same table."""
    cwd, _ = tiny_run
    run_folder_copy(cwd, "one")
    import run as cli
    call(cli.extract, cli.ExtractConfig(run="one", limit=4, batch_size=2), cwd)      # 2 batches: 1 a process
    result, perturbed = USER_RUNS.result("torchrun")                            # torchrun_extract_then_perturb
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (torch.load(cwd / name / "extract_test.pt", weights_only=True) for name in ("one", "two"))
    assert [s["id"] for s in one["samples"]] == [s["id"] for s in two["samples"]] and len(one["samples"]) == 4

    def same(a, b):
        if isinstance(a, dict):
            assert set(a) == set(b)
            for k in a:
                same(a[k], b[k])
        elif torch.is_tensor(a):
            assert a.shape == b.shape and a.dtype == b.dtype
            scale = a.float().abs().amax(-1, keepdim=True).clamp(min=1e-12)
            assert ((a.float() - b.float()).abs() <= 1e-5 * scale + 1e-3 * (a.dtype == torch.float16)).all()
        else:
            assert a == b
    for a, b in zip(one["samples"], two["samples"]):
        same(a, b)
    tables = []
    _, printed = call(cli.perturb, cli.PerturbConfig(run="one", limit=4, bootstrap=100), cwd)
    assert perturbed.returncode == 0, perturbed.stderr[-3000:]
    assert "relevance from" in printed and "relevance from" in perturbed.stdout
    for name in ("one", "two"):
        tables.append([open(cwd / name / f"perturb_test_token_first4{suffix}", encoding="utf-8").read()
                       for suffix in (".csv", "_curves.csv")])
    assert tables[0] == tables[1]


# ----------------------------------------------------------------------------------------------------
# edge cases: masks with holes, the caller's model left as it was, decoding, gloss-target runs
# ----------------------------------------------------------------------------------------------------

def test_explain_keeps_frames_after_a_hole_in_the_mask():
    model, src, mask, out = explain_inputs()
    holed = mask.clone()
    holed[0, 2] = False                                   # a removed frame, real frames after it
    fast = ex.explain(model, src, holed, out, "saliency")
    tgt_in = sa.shift_right(out, model.bos_id)
    x = src[:1].clone().requires_grad_(True)
    logits = model(x, holed[:1], tgt_in[:1])
    for t in range(out.shape[1]):
        g, = torch.autograd.grad(logits[0, t, out[0, t]], x, retain_graph=True)
        expected = g[0].abs().sum(-1) * holed[0]
        torch.testing.assert_close(fast[0, t], expected, atol=1e-5, rtol=1e-5)
    assert fast[0, :, 10].abs().sum() > 0 and (fast[0, :, 2] == 0).all()


def test_explain_leaves_the_model_and_the_random_state_as_they_were():
    model, src, mask, out = explain_inputs()
    model.keep_attention(True)
    tgt_in = sa.shift_right(out, model.bos_id)
    model(src, mask, tgt_in)
    before = [m.attention for g in model.attention_modules().values() for m in g]
    branches = [layer.branches for layer in model.decoder]
    state = torch.get_rng_state()
    for method in ("generic", "lrp", "transformer_attribution"):
        ex.explain(model, src, mask, out, method)
    assert torch.equal(torch.get_rng_state(), state)
    after = [m.attention for g in model.attention_modules().values() for m in g]
    assert all(a is b for a, b in zip(before, after)) and all(m.keep for g in model.attention_modules().values() for m in g)
    assert all(a is b for a, b in zip(branches, [layer.branches for layer in model.decoder]))
    assert not model.training


def test_decoding_never_writes_pad_or_bos():
    model = small_model()
    with torch.no_grad():
        model.head.bias[model.pad_id] = 50.0
        model.head.bias[model.bos_id] = 50.0
    src, mask, _ = random_batch(B=3, T=9)
    for out in (sa.greedy_decode(model, src, mask, max_len=6), sa.beam_search(model, src, mask, beam=3, max_len=6)):
        for row in out.tolist():
            body = row[:row.index(model.eos_id)] if model.eos_id in row else row
            assert model.pad_id not in body and model.bos_id not in body


def test_causal_entropy_and_constant_rows():
    causal = torch.tril(torch.ones(4, 4))
    causal = (causal / causal.sum(-1, keepdim=True))[None]
    torch.testing.assert_close(ex.entropy(causal, causal=True), torch.ones(1, dtype=torch.float64))
    assert ex.pointing_game(torch.zeros(1, 5), [(0, 0, 2)]) == [False]


def test_gloss_target_run_without_a_ctc_head(tiny_gsl, tmp_path):
    import run as cli
    call(cli.train, cli.TrainConfig(data=tiny_gsl, out="g", overrides=tiny(epochs=1, target="gloss", ctc_weight=0.0)),
         tmp_path)
    (_, data), _ = call(cli.extract, cli.ExtractConfig(run="g", limit=2), tmp_path)
    assert all(s["gloss_prediction"] == s["prediction"] for s in data["samples"])
    _, printed = call(cli.plot, cli.PlotConfig(run="g", sample=0), tmp_path)
    assert "gloss_posteriors figure skipped" in printed and not (tmp_path / "g" / "sample0_gloss_posteriors.png").exists()


# ----------------------------------------------------------------------------------------------------
# perturb: faithfulness and plausibility
# ----------------------------------------------------------------------------------------------------

class EvidenceModel(torch.nn.Module):
    """A constructed model whose output depends only on known frames: every position's logits are the
    class evidence (one-hot features) summed over the frames left, plus 0.5 for a fallback token, so it
    writes the evidence's class while one evidence frame remains and the fallback once all are gone."""
    pad_id, bos_id, eos_id, fallback = 0, 2, 3, 4

    def encode(self, src, src_mask, positions=None):
        return src * src_mask[..., None]

    def decode(self, memory, src_mask, tgt_in):
        evidence = (memory * src_mask[..., None]).sum(1)                     # (B, V)
        logits = evidence[:, None, :].repeat(1, tgt_in.shape[1], 1)
        logits[..., self.fallback] += 0.5
        return logits


def evidence_batch(B=24, T=40, V=8, seed=0):
    """Each sample: 3 evidence frames of class 6 at random places among T; outputs [6, 6]."""
    g = torch.Generator().manual_seed(seed)
    src, evidence = torch.zeros(B, T, V), torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        where = torch.randperm(T, generator=g)[:3]
        src[b, where, 6] = 1.0
        evidence[b, where] = True
    mask = torch.ones(B, T, dtype=torch.bool)
    return src, mask, torch.full((B, 2), 6), evidence


@pytest.mark.parametrize("mode", ex.MODES)
def test_relevance_on_the_evidence_beats_random(mode):
    model = EvidenceModel()
    src, mask, out, evidence = evidence_batch()
    on_evidence = evidence[:, None].float().expand(-1, 2, -1)
    random = torch.rand(out.shape + (40,), generator=torch.Generator().manual_seed(1))
    auc = {}
    for name, R in (("evidence", on_evidence), ("random", random)):
        scores = ex.token_perturbation(model, src, mask, out, R, mode=mode)
        assert (scores[..., 0] == 1).all()                                    # the clean input is right
        auc[name] = ex.auc(scores.mean(1))                                    # (B, 2) per sample
    # 4 of 40 frames removed at p = 0.1 take all 3 evidence frames: 1 at p = 0, then 0 -> AUC 5
    assert torch.allclose(auc["evidence"][:, 0], torch.full((24,), 5.0, dtype=torch.float64))
    # removing the least relevant first leaves the evidence to the end (4 frames remain at 0.9): AUC 90
    assert torch.allclose(auc["evidence"][:, 1], torch.full((24,), 90.0, dtype=torch.float64))
    # random removal takes all three only late (expected AUC 74.0 both ways)
    assert auc["evidence"][:, 0].mean() < auc["random"][:, 0].mean() - 10
    assert auc["evidence"][:, 1].mean() > auc["random"][:, 1].mean() + 10


def test_auc_convention_and_bootstrap():
    P = len(ex.FRACTIONS)
    assert ex.FRACTIONS[0] == 0 and abs(ex.FRACTIONS[-1] - 0.9) < 1e-12
    assert float(ex.auc(torch.ones(P))) == pytest.approx(90.0)                    # the maximum
    assert float(ex.auc(torch.tensor([1.0] + [0.0] * (P - 1)))) == pytest.approx(5.0)   # the clean score counts
    assert float(ex.auc(1 - torch.tensor(ex.FRACTIONS))) == pytest.approx(100 * (0.9 - 0.9 ** 2 / 2))
    values = torch.tensor(np.random.default_rng(0).exponential(10.0, 200))
    mean = lambda w: w @ values / len(values)
    estimate, low, high = ex.bootstrap(mean, len(values), resamples=2000)
    assert estimate == pytest.approx(float(values.mean()), rel=1e-12)
    assert low < estimate < high and high - low < 0.5 * float(values.std())
    assert ex.bootstrap(mean, len(values), resamples=2000) == (estimate, low, high)  # seeded
    _, *wide = ex.bootstrap(lambda w: w @ values[:20] / 20, 20, resamples=2000)
    assert wide[1] - wide[0] > high - low                                          # fewer samples, wider


def test_bootstrap_interval_contains_its_estimate_on_any_cpu():
    """Constant resamples (every sample the same value) and resamples equal but for rounding: sums over other
    weights land an ulp beside the estimate, above or below depending on the kernels, and the interval must
    still contain the estimate (a percentile of sums in another order can miss it by an ulp)."""
    P = len(ex.FRACTIONS)
    rng = np.random.default_rng(0)
    for B in (3, 7, 10, 25, 40, 100, 300):
        for c in (1.0, 0.9, 0.7, 0.3, 0.1, 1 / 3):
            constant = torch.full((B, 2, P), c, dtype=torch.float64)
            # one ulp of noise per value: resamples that differ only in rounding
            ulps = torch.tensor(np.nextafter(np.full((B, 2, P), c), rng.choice([-1.0, 2.0], (B, 2, P))))
            for curves in (constant, ulps):
                row = ex.perturb_table(dict(random=curves), {}, {}, 200, 0)[0]
                for key in ("positive", "negative"):
                    value, low, high = row[key]
                    assert low <= value <= high, (B, c, key, value, low, high)
            values = torch.full((B,), c, dtype=torch.float64)
            for statistic in (lambda w: w @ values / B, lambda w: (w * values).sum(-1) / w.sum(-1)):
                estimate, low, high = ex.bootstrap(statistic, B, 200, seed=int(B))
                assert low <= estimate <= high
                assert estimate == pytest.approx(c, rel=1e-12) and high - low <= 1e-12


def test_kept_frames_and_tie_breaking():
    mask = torch.zeros(5, 12, dtype=torch.bool)
    for b, T in enumerate((1, 2, 3, 10, 12)):
        mask[b, :T] = True
    relevance = torch.arange(12, 0, -1).float().expand(5, 12)                  # frame 0 most relevant
    keep = ex.kept_frames(ex.removal_ranks(relevance, mask), mask)              # (5, 2, P, 12)
    real = mask.sum(-1)
    for b in range(5):
        for f, p in enumerate(ex.FRACTIONS):
            removed = min(int(np.floor(p * int(real[b]) + 1e-9)), int(real[b]) - 1)
            for d in range(2):
                kept = keep[b, d, f]
                assert int(kept.sum()) == int(real[b]) - removed >= 1 and not (kept & ~mask[b]).any()
            assert keep[b, 0, f, :int(real[b])].tolist() == [i >= removed for i in range(int(real[b]))]
            assert keep[b, 1, f, :int(real[b])].tolist() == [i < int(real[b]) - removed for i in range(int(real[b]))]
    flat = ex.removal_ranks(torch.zeros(1, 100), torch.ones(1, 100, dtype=torch.bool))
    assert sorted(flat[0].tolist()) == list(range(100)) and flat[0].tolist() != list(range(100))
    assert torch.equal(flat, ex.removal_ranks(torch.zeros(1, 100), torch.ones(1, 100, dtype=torch.bool)))
    # every frame is first among 9 tied frames about as often (2000 rows, salts 0..1999), for any seed
    for seed in (0, 2 ** 63 - 1):
        first = ex.removal_ranks(torch.zeros(2000, 9), torch.ones(2000, 9, dtype=torch.bool), seed, torch.arange(2000))
        counts = torch.bincount(first.argmin(-1), minlength=9)
        assert counts.min() > 150 and counts.max() < 300
    for bad in (float("nan"), float("-inf")):
        with pytest.raises(ValueError, match="NaN or infinite"):
            ex.removal_ranks(torch.tensor([[0.0, bad]]), torch.ones(1, 2, dtype=torch.bool))
    # ties break the same way whatever else is in the batch: a row's ranks depend on its salt only
    rows = torch.randint(0, 3, (6, 30)).float()
    salt = torch.arange(6)
    together = ex.removal_ranks(rows, torch.ones(6, 30, dtype=torch.bool), salt=salt)
    for i in range(6):
        alone = ex.removal_ranks(rows[i:i + 1], torch.ones(1, 30, dtype=torch.bool), salt=salt[i:i + 1])
        assert torch.equal(alone[0], together[i])


def removed_by_hand(relevance, real, p, direction):
    """The frames that the definition removes: floor(p T) of the real frames (T - 1 at most), by relevance."""
    order = real[relevance[real].argsort(descending=True)]
    k = min(int(np.floor(p * len(real) + 1e-9)), len(real) - 1)
    return order[:k] if direction == 0 else order[len(real) - k:]


@pytest.mark.parametrize("mode", ex.MODES)
def test_batched_perturbation_equals_one_forward_per_copy(mode):
    """Every token, direction and fraction by itself, frames removed through the key mask (or zeroed) of the
    full-length input, against the deduplicated, shortened, batched runs."""
    model = small_model()
    with torch.no_grad():                           # make the random model's output depend on the frames
        model.embed[2].weight.mul_(10)
        for layer in model.decoder:
            layer.cross_attention.value.weight.mul_(10)
        model.head.bias[model.eos_id] -= 3
    src, mask, _ = random_batch(B=3, T=11)
    mask[0, 4] = False                                                       # a hole
    out = sa.greedy_decode(model, src, mask, 6)
    R = torch.rand(out.shape + (11,), generator=torch.Generator().manual_seed(3))
    scores = ex.token_perturbation(model, src, mask, out, R, mode=mode, budget=40)
    rows = out != model.pad_id
    decoded = ex.sentence_perturbation(model, src, mask, R, rows, 6, mode=mode, budget=40)
    tgt_in = sa.shift_right(out, model.bos_id)
    flips, checked, near_ties = 0, 0, 0
    for b in range(3):
        real = mask[b].nonzero().flatten()
        Rs = R[b] * rows[b, :, None]
        sentence = (Rs / Rs.abs().sum(-1, keepdim=True).clamp(min=1e-12)).sum(0)
        for f, p in enumerate(ex.FRACTIONS):
            for d in range(2):
                def inputs(removed):
                    if mode == "mask":
                        keep = mask[b].clone()
                        keep[removed] = False
                        return src[b:b + 1], keep[None]
                    x = src[b:b + 1].clone()
                    x[0, removed] = 0
                    return x, mask[b:b + 1]
                for t in range(int(rows[b].sum())):
                    x, m = inputs(removed_by_hand(R[b, t], real, p, d))
                    logits = model(x, m, tgt_in[b:b + 1])[0, t]
                    logits[[model.pad_id, model.bos_id]] = float("-inf")
                    checked += 1
                    if ex.near_ties(logits):            # either answer is right up to the kernels' rounding
                        near_ties += 1
                        continue
                    assert scores[b, t, d, f] == float(logits.argmax() == out[b, t])
                    flips += int(logits.argmax() != out[b, t])
                x, m = inputs(removed_by_hand(sentence, real, p, d))
                greedy, tied = greedy_with_ties(model, x, m, 6)
                checked += 1
                if tied:
                    near_ties += 1
                    continue
                assert decoded[b, d, f, :len(greedy)].tolist() == greedy.tolist()
                assert (decoded[b, d, f, len(greedy):] == model.pad_id).all()
        assert torch.isnan(scores[b, int(rows[b].sum()):]).all()
    assert flips > 20 and (decoded != decoded[:, :1, :1]).any(-1).sum() > 10     # the removals change outputs
    assert near_ties <= 0.02 * checked


def greedy_with_ties(model, src, mask, max_len):
    """Greedy decoding of one sample, and whether any step was a near tie (explain.near_ties)."""
    seq, tied = [model.bos_id], False
    with torch.no_grad():
        memory = model.encode(src, mask)
        for _ in range(max_len):
            logits = sa.decodable(model.decode(memory, mask, torch.tensor([seq]))[0, -1], model)
            tied |= bool(ex.near_ties(logits))
            seq.append(int(logits.argmax()))
            if seq[-1] == model.eos_id:
                break
    return torch.tensor(seq[1:]), tied


def test_bleu_statistics_equal_sacrebleu():
    from sacrebleu.metrics import BLEU
    rng = np.random.default_rng(0)
    words = "a b c d e f".split()
    sentence = lambda lo: " ".join(rng.choice(words, rng.integers(lo, 7)))
    for _ in range(200):
        N = int(rng.integers(1, 6))
        refs, hyps = [sentence(1) for _ in range(N)], [sentence(0) for _ in range(N)]
        stats = np.sum([sa.bleu_statistics(h, r) for h, r in zip(hyps, refs)], 0)
        expected = BLEU(tokenize="none").corpus_score(hyps, [refs]).score
        assert float(sa.bleu_from_statistics(stats)) == pytest.approx(expected, abs=1e-9)


def test_perturb_table_beats_random_and_cluster_bootstrap():
    B, P = 40, len(ex.FRACTIONS)
    g = torch.Generator().manual_seed(0)
    base = 0.5 + 0.5 * torch.rand(B, 2, P, generator=g, dtype=torch.float64)
    base[..., 0] = 1.0
    good = base.clone()
    good[:, 0, 1:] -= 0.3                                 # drops faster when the most relevant go first
    good[:, 1, 1:] = 1.0                                  # and not at all when the least relevant go first
    curves = dict(good=good, same=base.clone(), random=base)
    sample = torch.arange(B).repeat_interleave(3)         # 3 occurrences per sample
    hits = lambda p: (torch.rand(3 * B, generator=g) < p).double()
    plausibility = dict(good=(hits(0.9), torch.rand(3 * B, generator=g, dtype=torch.float64)),
                        same=(hits(0.15), torch.zeros(3 * B, dtype=torch.float64)),
                        random=(hits(0.15), torch.zeros(3 * B, dtype=torch.float64)), sample=sample)
    rows = {r["method"]: r for r in ex.perturb_table(curves, {}, plausibility, 500, 0)}
    assert rows["good"]["beats_random"] == ["positive", "negative", "pointing"]
    assert rows["same"]["beats_random"] == [] and rows["random"]["beats_random"] is None
    for r in rows.values():
        for key in ("positive", "negative", "pointing", "mass"):
            value, low, high = r[key]
            assert low <= value <= high
    assert rows["good"]["positive"][0] == pytest.approx(float(ex.auc(good[:, 0]).mean()))
    # samples are resampled, not occurrences: hits that agree within each sample carry the information of 40
    # occurrences, not 120, and get a wider interval than independent hits (an occurrence bootstrap would not see it)
    value = 100 * plausibility["good"][0]
    by_sample = value.view(B, 3)[:, :1].repeat(1, 3).flatten()     # every occurrence of a sample alike
    one = dict(plausibility, good=(by_sample / 100, value), random=(by_sample / 100, value))
    wide = ex.perturb_table(dict(good=good, random=base), {}, one, 500, 0)[0]["pointing"]
    flat = dict(one, good=(value / 100, value), random=(value / 100, value))
    narrow = ex.perturb_table(dict(good=good, random=base), {}, flat, 500, 0)[0]["pointing"]
    assert wide[2] - wide[1] > narrow[2] - narrow[1]


def test_sentence_scores_accuracy_and_bleu():
    vocab = sa.Vocabulary(["a", "b", "c"])
    a, b, c = (vocab.stoi[w] for w in "abc")
    P, E = len(ex.FRACTIONS), vocab.eos_id
    decoded = torch.zeros(1, 2, P, 4, dtype=torch.long)
    decoded[...] = torch.tensor([a, b, E, 0])             # the clean decoding everywhere
    decoded[0, 0, 1] = torch.tensor([a, c, E, 0])         # one of three tokens changed
    decoded[0, 0, 2] = torch.tensor([E, 0, 0, 0])         # EOS at once: no position right
    accuracy, stats = ex.sentence_scores(decoded, ["a b"], vocab)
    assert accuracy[0, 0, :3].tolist() == pytest.approx([1.0, 2 / 3, 0.0])
    assert stats.shape == (1, 2, P, 10) and stats[0, 0, 0].tolist() == sa.bleu_statistics("a b", "a b")
    assert stats[0, 0, 2, 0] == 0 and float(sa.bleu_from_statistics(stats[0, 0, 2].numpy())) == 0.0


def test_perturb_as_a_user(tiny_run):
    cwd, _ = tiny_run
    result = USER_RUNS.result("perturb")                          # perturb p --bootstrap 200, p a copy of r
    assert result.returncode == 0, result.stderr
    assert "fraction 0.9" in result.stdout and "ETA" in result.stdout and "beat random" in result.stdout
    assert "clean input:" in result.stdout
    assert (cwd / "p" / "extract_test.pt").exists()                     # the whole split: kept for plot
    stem = cwd / "p" / "perturb_test_token"
    rows = list(csv.DictReader(open(f"{stem}.csv", encoding="utf-8")))
    assert [r["method"] for r in rows] == list(ex.METHODS)
    for r in rows:
        for key in ("positive", "negative", "pointing", "mass"):
            low, value, high = float(r[f"{key}_low"]), float(r[key]), float(r[f"{key}_high"])
            assert low <= value <= high and 0 <= value <= (90 if key in ("positive", "negative") else 100)
    curves = list(csv.DictReader(open(f"{stem}_curves.csv", encoding="utf-8")))
    assert len(curves) == len(ex.METHODS) * 2 * 10
    assert len({r["score"] for r in curves if float(r["fraction"]) == 0}) == 1        # one clean score
    assert "| random |" in open(f"{stem}.md", encoding="utf-8").read()
    assert drawn(f"{stem}.png")

    import run as cli
    _, printed = call(cli.perturb, cli.PerturbConfig(run="p", limit=4, methods="saliency,generic", level="sentence",
                                                     perturb_mode="zero", bootstrap=100), cwd)
    assert "relevance from" in printed                                  # read from the extraction
    rows = list(csv.DictReader(open(cwd / "p" / "perturb_test_sentence_zero_first4_saliency+generic+random.csv",
                                    encoding="utf-8")))
    assert [r["method"] for r in rows] == ["saliency", "generic", "random"] and "bleu_negative_high" in rows[0]
    for r in rows:
        for key in ("positive", "negative", "bleu_positive", "bleu_negative"):
            assert float(r[f"{key}_low"]) <= float(r[key]) <= float(r[f"{key}_high"]) and 0 <= float(r[key]) <= 90
    code, printed = run_here(["perturb", "p", "--methods", "nope"], cwd)      # ranges: in the table of every option
    assert code == 2 and "unknown method(s) nope" in printed and len(printed.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------
# awkward data: what real recordings, spreadsheets and hand-edited files bring, through every mode
# ----------------------------------------------------------------------------------------------------

GREEK_QUESTION_MARK = "\u037e"


def make_awkward_gsl(base, out):
    """The tiny synthetic GSL plus awkward clips, all first in the test split (a few also in train): 1, 2 and 3
    frames, no hand ever detected, every other frame empty, 615 frames (GSL's longest), one frame repeated,
    one gloss and one word (its segment between two frames the model reads), a 20-word text ending in the
    Greek question mark, x and y only in float16, four coordinates in float64, a gloss never seen in
    training, an id in Greek with a space and a comma, two people. Both CSV files are saved as a spreadsheet
    saves "CSV UTF-8" (a byte-order mark, CRLF); the annotations have columns in another order, an extra
    column, padded fields, split names in capitals, dev for val, a blank line and an empty row. The
    alignments cut a segment at the clip's end and name an id that is not annotated. Three ordinary samples
    complete the test split. Returns (folder, the awkward test ids in order)."""
    rows = list(csv.DictReader(open(os.path.join(base, "annotations.csv"), encoding="utf-8")))
    os.makedirs(os.path.join(out, "poses"))
    for r in rows:
        os.symlink(os.path.join(base, "poses", r["id"] + ".npy"), os.path.join(out, "poses", r["id"] + ".npy"))
    test = [r for r in rows if r["split"] == "test"]
    donor = np.load(os.path.join(base, "poses", test[0]["id"] + ".npy"))
    every_other, no_hands = donor.copy(), donor.copy()
    every_other[0::2] = np.nan
    no_hands[:, :, sa.LEFT_HAND + sa.RIGHT_HAND] = np.nan
    like = lambda k: (test[k]["gloss"], test[k]["text"])
    clips = {
        "one frame": (donor[:1], *like(1)), "two_frames": (donor[:2], *like(2)), "three_frames": (donor[:3], *like(3)),
        "no_hands": (no_hands, *like(0)), "every_other_empty": (every_other, *like(0)),
        "long615": (np.concatenate([donor] * (615 // len(donor) + 1))[:615], *like(0)),
        "frozen": (np.repeat(donor[:1], 40, 0), *like(4)), "one_gloss": (donor[:30], "ΓΕΙΑ", "γεια"),
        "twenty_words": (donor, test[0]["gloss"], " ".join([f"λέξη{i}" for i in range(19)] + ["πού" + GREEK_QUESTION_MARK])),
        "xy_float16": (donor[..., :2].astype(np.float16), *like(5)),
        "xyzv_float64": (np.concatenate([donor, np.ones_like(donor[..., :1])], -1).astype(np.float64), *like(6)),
        "unseen_gloss": (donor, test[7]["gloss"] + " ΑΓΝΩΣΤΟ", test[7]["text"] + " άγνωστο"),
        "Ελληνικό όνομα, με κόμμα": (donor, *like(8)),
        "two_people": (np.concatenate([donor, donor[:, :1] + 0.3], 1), *like(9)),   # the first is read
    }
    for sid, (array, _, _) in clips.items():
        np.save(os.path.join(out, "poses", sid + ".npy"), array)
    table = [["TEST", sid, f" {gloss} ", text, "x"] for sid, (_, gloss, text) in clips.items()]
    for sid in ("one frame", "two_frames", "no_hands", "one_gloss"):
        np.save(os.path.join(out, "poses", sid + " train.npy"), clips[sid][0])
        table.append(["Train", sid + " train", clips[sid][1], clips[sid][2], "x"])
    table += [[{"val": "dev"}.get(r["split"], r["split"]), r["id"], r["gloss"], r["text"], "x"] for r in rows
              if r["split"] != "test" or r in test[:3]]                  # three ordinary test samples
    with open(os.path.join(out, "annotations.csv"), "w", newline="", encoding="utf-8-sig") as f:
        csv.writer(f, lineterminator="\r\n").writerows([["split", "id", "gloss", "text", "signer"]] + table + [[]]
                                                       + [["", "", "", "", ""]])          # a spreadsheet's ",,,,"
    kept = {row[1] for row in table}
    with open(os.path.join(base, "alignments.csv"), encoding="utf-8") as f:
        segments = [s for n, s in enumerate(csv.reader(f)) if n == 0 or s[0] in kept]
    donor_segments = [s[1:] for s in segments if s[0] == test[0]["id"]]
    segments += [[sid] + s for sid in ("no_hands", "every_other_empty", "long615", "twenty_words") for s in donor_segments]
    segments += [["one frame", 0, test[1]["gloss"].split()[0], 0, 1], ["one_gloss", 0, "ΓΕΙΑ", 5, 6],
                 ["two_frames", 0, test[2]["gloss"].split()[0], 0, 50],                   # past the clip's end
                 ["renamed_since", 0, "ΓΕΙΑ", 0, 9]]                                      # not in annotations.csv
    with open(os.path.join(out, "alignments.csv"), "w", newline="", encoding="utf-8-sig") as f:
        csv.writer(f, lineterminator="\r\n").writerows(segments)
    return out, list(clips)


@pytest.fixture(scope="session")
def awkward(tiny_gsl, tmp_path_factory, request):
    """The awkward dataset and a run trained on it for 2 epochs with SignCL, as a user trains it; then every
    mode on it starts, one after another in one new interpreter (UserRuns, run_there: awkward_modes), and the
    modes that draw and tabulate on two copies of it whose every output is empty or wrong (constant_modes)."""
    root = tmp_path_factory.mktemp("awkward")
    data, ids = make_awkward_gsl(tiny_gsl, str(root / "data"))
    import run as cli
    _, printed = call(cli.train, cli.TrainConfig(data=data, out="r", overrides=tiny(epochs=2, signcl=0.01, subsample=2)),
                      root)                                      # one frame in 2: the shapes the tests name
    text_vocab = torch.load(os.path.join(root, "r", "best.pt"), weights_only=True)["text_vocab"]
    tokens = {"EOS": sa.Vocabulary.eos_id, "wrong": text_vocab.index("γεια")}
    for token, index in tokens.items():                                 # copied before the modes write in r
        constant_output_checkpoint(os.path.join(root, "r"), index, f"constant_{token}")
    USER_RUNS.start(request, "test_every_mode_on_awkward_data", "awkward", run_there, awkward_modes(ids), str(root))
    for token in tokens:
        USER_RUNS.start(request, f"test_global_figures_and_tables_when_every_output_is_empty_or_wrong[{token}]",
                        f"constant_{token}", run_there, constant_modes(f"constant_{token}"), str(root))
    return root, data, ids, printed


# every method but integrated gradients (64 passes a token: minutes at 308 frames; the test of every method runs
# it at 1 and 2 frames)
AWKWARD_METHODS = ",".join(m for m in ex.METHODS if m != "integrated_gradients")


def awkward_modes(ids):
    """Every mode on the awkward run r, in the order a user runs them: plot --sample for the samples of one
    model frame, "one frame" and "two_frames" (a segment cut at its end)."""
    return [["eval", "r"], ["extract", "r", "--methods", AWKWARD_METHODS],
            ["bench", "r", "--limit", "13", "--methods", "dsmi,generic,attention"],
            ["bench", "r", "--perturb", "--limit", "3", "--methods", "dsmi"], ["plot", "r", "--all"],
            ["perturb", "r", "--methods", AWKWARD_METHODS],
            ["perturb", "r", "--level", "sentence", "--methods", "generic,dsmi", "--limit", str(len(ids))],
            ["view", "r"]] + [["plot", "r", "--sample", str(ids.index(sid))] for sid in ("one frame", "two_frames")]


def no_nan_written(folder, suffixes=(".csv", ".md", ".json")):
    for name in os.listdir(folder):
        if name.endswith(suffixes):
            text = open(os.path.join(folder, name), encoding="utf-8").read()
            assert not re.search(r"\bnan\b", text, re.IGNORECASE), (name, text[:2000])


def test_awkward_annotations_are_read_as_written(awkward):
    _, data, ids, printed = awkward
    records = {r.id: r for r in sa.load_records(data, sa.DataConfig())}
    assert set(ids) <= set(records) and len(records) == 35 + len(ids) + 4
    assert np.array_equal(records["two_people"].frames, records["twenty_words"].frames, equal_nan=True)   # the first
    assert records["twenty_words"].text[-1] == "πού" + GREEK_QUESTION_MARK and len(records["twenty_words"].text) == 20
    assert records["one frame"].split == "test" and records["one frame train"].split == "train"
    assert {r.split for r in records.values()} == set(sa.SPLITS)                         # dev is val
    assert records["one_gloss"].gloss == ["ΓΕΙΑ"] and records["frozen"].frames.shape == (40, 150)
    assert "53 samples (train 20, val 16, test 17)" in printed
    assert "alignments.csv: rows of 1 id(s) not in annotations.csv left out: renamed_since" in printed
    segments = sa.read_alignments(data)
    assert segments["two_frames"] == [(0, records["two_frames"].gloss[0], 0, 2)]      # cut at the clip's end
    assert "renamed_since" not in segments and segments["one_gloss"] == [(0, "ΓΕΙΑ", 5, 6)]
    one_gloss = dict(tokens=["ΓΕΙΑ", sa.EOS], gloss_reference=["ΓΕΙΑ"], frames=15)
    assert ex.token_segments(one_gloss, segments["one_gloss"], 2, "gloss", None) == []   # no frame read in [5, 6)


def test_every_mode_on_awkward_data(awkward):
    """train (in the fixture), eval, extract, bench, plot --sample, plot --all, perturb at both levels and view,
    on the awkward data (awkward_modes, run beside the tests by run_there): each exits 0, and no table holds
    NaN. plot --sample draws each awkward shape: 1 and 1 (a segment cut at its end) model frame (a long
    sample's figures are test_sample_figures_are_legible_for_20_tokens_and_600_frames'; the other awkward
    samples have an ordinary sample's frames and tokens)."""
    root, data, ids, _ = awkward
    r = os.path.join(root, "r")
    for args, (code, printed) in zip(awkward_modes(ids), USER_RUNS.result("awkward"), strict=True):  # run_there
        assert code == 0, (args, printed[-3000:])
        if args[-2] == "--sample":
            assert f"sample{args[-1]}_relevance.png" in printed, printed
    extraction = torch.load(os.path.join(r, "extract_test.pt"), weights_only=True)
    samples = extraction["samples"]
    assert [s["id"] for s in samples[:len(ids)]] == ids
    assert [s["frames"] for s in samples[:3]] == [1, 1, 2] and samples[ids.index("long615")]["frames"] == 308
    for s in samples:
        for m, rel in s["relevance"].items():
            assert torch.isfinite(rel).all() and rel.shape == (len(s["tokens"]), s["frames"]), (s["id"], m)
        for m in ("attention", "rollout", "dsmi"):                # normalised: one frame holds all of it
            if s["frames"] == 1:
                assert torch.allclose(s["relevance"][m], torch.ones(len(s["tokens"]), 1)), (s["id"], m)
    table = open(os.path.join(r, f"perturb_test_token_{AWKWARD_METHODS.replace(',', '+')}.md"), encoding="utf-8").read()
    assert "2 sample(s) of one frame skipped" in table and "| random |" in table
    no_nan_written(r)
    if CHROMIUM:                                                                        # the page draws them
        shown = [ids.index(sid) for sid in ("one frame", "long615")]
        states = chromium_states(os.path.join(r, "view_test.html"),
                                 [f"sample={i}&token=0&method=generic&frame=0" for i in shown], os.path.join(root, "profile"))
        for index, (report, _) in zip(shown, states):
            assert report["ready"] and report["errors"] == [] and report["sample"] == index, (index, report)


def constant_output_checkpoint(run_dir, token, name):
    """A copy of the run whose decoder writes `token` whatever it sees (its output bias made overwhelming):
    a model whose every output is empty (EOS) or wrong."""
    state = torch.load(os.path.join(run_dir, "best.pt"), weights_only=True)
    bias = state["model"]["head.bias"]
    bias[:] = -1e4
    bias[token] = 1e4
    copy = os.path.join(os.path.dirname(run_dir), name)
    os.makedirs(copy)
    for f in os.listdir(run_dir):
        if f in ("config.json", "results.json"):
            shutil.copy(os.path.join(run_dir, f), copy)
    torch.save(state, os.path.join(copy, "best.pt"))
    return copy


def constant_modes(name):
    """The modes that draw and tabulate, on the run folder `name`: extract, plot --all, perturb at both levels
    (a wrong model decodes to the length limit: 4 samples at sentence level), view."""
    return [["extract", name, "--methods", "attention,generic,dsmi"], ["plot", name, "--all"],
            ["perturb", name, "--level", "token", "--methods", "attention,generic"],
            ["perturb", name, "--level", "sentence", "--methods", "attention,generic", "--limit", "4"], ["view", name]]


@pytest.mark.parametrize("token", ["EOS", "wrong"])
def test_global_figures_and_tables_when_every_output_is_empty_or_wrong(awkward, token):
    """The awkward fixture made the copies and started constant_modes on them (UserRuns, run_there)."""
    root, data, _, _ = awkward
    run_dir = os.path.join(root, f"constant_{token}")
    modes = USER_RUNS.result(f"constant_{token}")
    for args, (code, printed) in zip(constant_modes(f"constant_{token}"), modes, strict=True):
        assert code == 0, (args, printed[-3000:])
    printed = modes[1][1]                                                                   # plot --all
    assert "no test sample in the 'correct' group" in printed
    if token == "EOS":
        assert "cross_attention_by_length figure (all) skipped: no prediction has a token before EOS" in printed
        assert "diagonality (all): undefined" in printed and "pointing_game figure (all) skipped" in printed
    assert os.path.exists(os.path.join(run_dir, "all_all_entropy.png"))
    table = open(os.path.join(run_dir, "perturb_test_token_attention+generic+random.md"), encoding="utf-8").read()
    if token == "EOS":
        assert "no predicted token realises a gloss with a true segment" in table
    no_nan_written(run_dir)


@pytest.mark.parametrize("row,words", [
    (["synth_signer1_rep1_sentences0000", "0", "ΕΣΥ", "x", "9"], "position, start and end must be integers"),
    (["synth_signer1_rep1_sentences0000", "0", "ΕΣΥ", "5", "5"], "segment [5, 5) of synth_signer1_rep1_sentences0000 is empty"),
    (["synth_signer1_rep1_sentences0000", "0", "ΕΣΥ", "9", "3"], "is empty or reversed"),
    (["synth_signer1_rep1_sentences0000", "1", "ΕΣΥ", "0", "3"], "has no gloss 'ΕΣΥ' at position 1"),
    (["synth_signer1_rep1_sentences0000", "7", "ΕΣΥ", "0", "3"], "has no gloss 'ΕΣΥ' at position 7"),
    (["synth_signer1_rep1_sentences0000", "0", "ΕΣΥ", "0", "3"], "position 0 of synth_signer1_rep1_sentences0000 was given before"),
    (["synth_signer1_rep1_sentences0000", "2", "ΠΗΓΑΙΝΩ", "5000", "5100"], "starts after its clip's"),
])
def test_bad_alignment_rows_name_line_and_problem(tiny_gsl, tmp_path, row, words):
    folder = copy_gsl(tiny_gsl, str(tmp_path / "d"))
    with open(os.path.join(tiny_gsl, "alignments.csv"), encoding="utf-8") as f:
        rows = list(csv.reader(f))
    rows = [r for r in rows if r[0] != row[0] or r[1] != row[1] or "given before" in words] + [row]
    with open(os.path.join(folder, "alignments.csv"), "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(sa.DataError) as e:
        sa.read_alignments(folder)
    assert f"alignments.csv: line {len(rows)}" in str(e.value) and words in str(e.value), str(e.value)
    code, printed = run_here(["train", "--data", folder, "--epochs", "1"], str(tmp_path))      # before training
    assert code == 2 and printed.strip().splitlines() == [f"error: {e.value}"]


def test_a_segment_past_the_clip_is_cut_and_rows_of_unknown_ids_ignored(tiny_gsl, tmp_path):
    folder = copy_gsl(tiny_gsl, str(tmp_path / "d"))
    sid = "synth_signer1_rep1_sentences0000"
    frames = len(np.load(os.path.join(tiny_gsl, "poses", sid + ".npy")))
    with open(os.path.join(tiny_gsl, "alignments.csv"), encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if not (r[0] == sid and r[1] == "2")]
    rows += [[sid, "2", "ΠΗΓΑΙΝΩ", str(frames - 4), str(frames + 30)], ["not_in_the_data", "0", "Χ", "9", "3"]]
    with open(os.path.join(folder, "alignments.csv"), "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    segments = sa.read_alignments(folder)
    assert segments[sid][-1] == (2, "ΠΗΓΑΙΝΩ", frames - 4, frames) and "not_in_the_data" not in segments


@pytest.mark.parametrize("kind,words", [
    ("no_shoulders", "no frame has both shoulders detected apart"),
    ("one_point_shoulders", "no frame has both shoulders detected apart"),
    ("infinite", "frame 3: infinite coordinates"),
])
def test_pose_files_that_cannot_be_normalised_or_hold_infinities(tiny_gsl, tmp_path, kind, words):
    folder = copy_gsl(tiny_gsl, str(tmp_path / "d"), lambda rows: rows + [["odd", "α", "Α", "train"]])
    pose = np.load(os.path.join(tiny_gsl, "poses", "synth_signer1_rep1_sentences0000.npy"))
    if kind == "no_shoulders":                     # the signer's shoulders outside the picture, the hands seen
        pose[:, :, [sa.L_SHOULDER, sa.R_SHOULDER]] = np.nan
    elif kind == "one_point_shoulders":
        pose[:, :, sa.R_SHOULDER] = pose[:, :, sa.L_SHOULDER]
    else:
        pose[3, 0, 530, 1] = np.inf
    write_pose(folder, "odd", pose)
    with pytest.raises(sa.DataError) as e:
        sa.load_records(folder, sa.DataConfig())
    assert "odd.npy" in str(e.value) and words in str(e.value) and "\n" not in str(e.value)
    skipped = []
    assert len(sa.load_records(folder, sa.DataConfig(), on_bad=skipped.append)) == 48 and len(skipped) == 1
    if kind != "infinite":                         # without normalisation the image coordinates are the input
        assert len(sa.load_records(folder, sa.DataConfig(normalise=False))) == 49


def test_fiedler_at_one_and_two_frames():
    """A graph of one frame has no Fiedler vector and one of two frames a uniform one: both get the uniform map
    (also when the whole batch is that short), as every sample of fewer than 3 frames does."""
    g = torch.Generator().manual_seed(0)
    for T in (1, 2):
        features = torch.randn(3, T, 8, generator=g)
        mask = torch.ones(3, T, dtype=torch.bool)
        mask[2, 1:] = False
        expected = mask.float() / mask.sum(1, keepdim=True)
        assert torch.equal(ex.fiedler(features, mask), expected)
    mask = torch.tensor([[True] * 6, [True, False, False, False, False, False]])
    v = ex.fiedler(torch.randn(2, 6, 8, generator=g), mask)
    assert torch.equal(v[1], torch.tensor([1.0, 0, 0, 0, 0, 0])) and (v[0] > 0).any()


@pytest.mark.parametrize("method", ex.METHODS)
def test_every_method_on_batches_of_one_and_two_frames(method):
    """A batch whose every sample has one frame (and then two at most): finite relevance of the right shape;
    the normalised methods give a one-frame sample relevance 1 on its frame."""
    model = small_model()
    for T in (1, 2):
        src = torch.randn(2, T, 6, generator=torch.Generator().manual_seed(T))
        mask = torch.ones(2, T, dtype=torch.bool)
        mask[1, 1:] = False
        out = torch.tensor([[5, 6, model.eos_id], [model.eos_id, 0, 0]])
        R = ex.explain(model, src, mask, out, method)
        assert R.shape == (2, 3, T) and torch.isfinite(R).all()
        assert (R[1, 1:] == 0).all() and (R[1, :, 1:] == 0).all()
        if method in ("attention", "rollout", "dsmi"):
            assert torch.allclose(R[1, 0], torch.ones(T).where(mask[1], torch.zeros(T)))
            if T == 1:
                assert torch.allclose(R[0], torch.ones(3, 1))


def test_signcl_and_sdr_at_one_frame_and_one_gloss():
    """SignCL on a sample of one frame (or fewer than 4: no anchor) is 0 with a gradient, never NaN; SDR is
    undefined (NaN, left out of the table) with one gloss, with single features, or with every class at
    distance 0, and defined as soon as one class of two has two features apart."""
    loss_fn = SignCL()
    for T in (1, 2, 3):
        features = torch.randn(2, T, 4, requires_grad=True)
        lengths = torch.tensor([T, T])
        margin = sign_cl.batch_margins(lengths, torch.tensor([[5, 3], [5, 3]]), 0)
        loss = loss_fn(features, margin, lengths, generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(features.grad).all()
    assert signcl_margin(1, 1) == 1 and signcl_margin(1, 0) == 1
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    assert np.isnan(sdr(x, [4, 4, 4]))                        # one gloss
    assert np.isnan(sdr(x, [4, 5, 6]))                        # no gloss seen twice
    assert np.isnan(sdr(torch.zeros(4, 2), [4, 4, 5, 5]))     # every feature the same
    assert sdr(x, [4, 4, 5]) == pytest.approx(100 * 1 / ((3 + 10 ** 0.5) / 2))


def test_plausibility_and_pointing_game_without_an_occurrence(tmp_path):
    """No predicted token realises a gloss (an empty prediction): no occurrence, so no pointing-game or mass
    column and a note instead; without alignments likewise; the table files are written either way."""
    import run as cli
    sample = dict(id="a", tokens=[sa.EOS], gloss_reference=["ΓΕΙΑ"], frames=4, relevance={"generic": torch.ones(1, 4),
                                                                                  "random": torch.rand(1, 4)})
    data = dict(meta=dict(data_config=dict(subsample=1), target="gloss"), samples=[sample])
    plausible = ex.plausibility(data, {"a": [(0, "ΓΕΙΑ", 0, 2)]}, None, ["generic", "random"])
    assert len(plausible["sample"]) == 0 and len(plausible["generic"][0]) == 0
    assert ex.pointing_game(torch.ones(1, 4), []) == [] and ex.segment_mass(torch.ones(1, 4), []) == []
    curves = {m: torch.rand(3, 2, 10, dtype=torch.float64) for m in ("generic", "random")}
    args = argparse.Namespace(level="token", split="test", perturb_mode="mask")
    for name, plaus, note in (("none", plausible, "no predicted token realises a gloss"), ("absent", {}, "no alignments.csv rows")):
        rows = ex.perturb_table(curves, {}, plaus, 50, 0)
        assert all("pointing" not in r for r in rows) and ("occurrences" in rows[0]) == bool(plaus)
        clean = "clean" + cli.plausibility_note(plaus)
        written = cli.write_perturb(str(tmp_path / name), rows, ex.mean_curves(curves, {}), args, 3, clean)
        table = open(written[1], encoding="utf-8").read()
        assert note in table and "pointing game %" not in table and "nan" not in table.lower()
        with open(written[0], encoding="utf-8") as f:
            header = next(csv.reader(f))
        assert ("occurrences" in header) == bool(plaus) and "pointing" not in header


def test_perturbation_with_fewer_frames_than_steps():
    """At 2 and 3 frames floor(p * T) removes 0 or 1 frame (one always remains): the scores are finite, the
    clean step equals the unperturbed prediction, and each step removes min(floor(p * T), T - 1) frames."""
    model = small_model()
    src = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[True, True, True], [True, True, False]])
    out = sa.greedy_decode(model, src, mask, 4)
    scores = ex.token_perturbation(model, src, mask, out, torch.rand(2, out.shape[1], 3))
    real = out != model.pad_id
    assert torch.isfinite(scores[real]).all() and (scores[real][:, :, 0] == 1).all()
    kept = ex.kept_frames(torch.arange(3).expand(2, 3), mask)                      # (B, 2, P, T)
    removed = (mask[:, None, None] & ~kept).sum(-1)
    assert removed[0, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]                # 3 frames: 0.4 * 3 >= 1
    assert removed[1, 0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]                # 2 frames: never both
    assert torch.equal(removed[:, 0], removed[:, 1])


def test_skipped_samples_leave_their_alignment_rows_out(tiny_run, tiny_gsl, tmp_path):
    """--skip-bad skips a clip of zero frames and a second row of an id; their alignments.csv rows are not
    checked against them, the count is printed, and the command goes on."""
    cwd, _ = tiny_run
    folder = copy_gsl(tiny_gsl, str(tmp_path / "d"), lambda rows: rows + [[rows[1][0], "β", "Β Β", "train"]])
    shutil.copy(os.path.join(tiny_gsl, "alignments.csv"), folder)
    test_id = sorted(f for f in os.listdir(os.path.join(folder, "poses")) if "signer3" in f)[0]
    os.remove(os.path.join(folder, "poses", test_id))
    write_pose(folder, test_id[:-4], np.zeros((0, 1, 543, 3), np.float32))
    code, printed = run_here(["eval", "r", "--data", folder], cwd)
    assert code == 2 and "zero frames" in printed and len(printed.strip().splitlines()) == 1
    code, printed = run_here(["eval", "r", "--data", folder, "--skip-bad"], cwd)
    assert code == 0 and "skipped 2 bad sample(s)" in printed and re.search(r"test +15 ", printed), printed
    records = sa.load_records(folder, sa.DataConfig(), ("train",), on_bad=lambda message: None)
    import run as cli
    segments = sa.read_alignments(folder, samples=cli.samples_of(records))
    assert len(segments) == 16 and all("signer1" in sid for sid in segments)


def test_perturb_skips_samples_with_one_real_frame_behind_masked_ones():
    """With --mask-empty a sample's only detected frame may come after empty ones: one real frame still."""
    import run as cli
    mask = torch.tensor([[False, False, False, True], [True, True, True, True], [True, False, False, False]])
    samples = [dict(id=str(b), frames=int(sa.frame_lengths(mask)[b]), relevance={"x": torch.zeros(1, 4)})
               for b in range(3)]
    assert cli.perturbable("r", "test", samples, mask, ["x"]) == [1]
    with pytest.raises(sa.DataError, match="every test sample has one frame"):
        cli.perturbable("r", "test", [samples[0], samples[2]], mask[[0, 2]], ["x"])


def test_entropy_figure_names_what_no_row_defines():
    import run as cli
    numbers = dict(entropy={"encoder_self": [torch.rand(1, 4, dtype=torch.float64)],
                            "decoder_self": [torch.full((1, 4), float("nan"), dtype=torch.float64)]})
    fig = cli.figure_entropy(numbers, "test", {})
    texts = [[t.get_text() for t in ax.texts] for ax in fig.axes if ax.get_title()]
    assert texts == [[], ["undefined: no row sees\ntwo keys or more"]]
    cli.pyplot().close(fig)


# ----------------------------------------------------------------------------------------------------
# claims: each measure on inputs whose answer is known, each rule at its edges, the command end to end
# ----------------------------------------------------------------------------------------------------

def test_claim_measures_on_inputs_whose_answer_is_known():
    T = 30
    diagonal = torch.zeros(4, T)
    for t in range(4):
        diagonal[t, 7 * t:7 * t + 7] = 1 / 7                   # token t on frames 7t..7t+6: a walk through the video
    assert ex.diagonality(diagonal) == pytest.approx(1.0) and ex.diagonality(diagonal.flip(0)) == pytest.approx(-1.0)
    assert ex.contiguity(diagonal) > 0.8                       # each row one run of consecutive frames
    g = torch.Generator().manual_seed(0)
    scattered = torch.zeros(4, T)
    for t in range(4):
        scattered[t, torch.randperm(T, generator=g)[:5]] = 0.2   # five single frames anywhere
    assert abs(ex.contiguity(scattered)) < 0.25
    assert math.isnan(ex.contiguity(torch.full((3, T), 1 / T)))                # a flat row has no order to judge
    assert math.isnan(ex.contiguity(torch.ones(2, 2)))                          # too short
    falling, rising = torch.tensor([[3.0, 2.0, 1.5, 1.0]]), torch.tensor([[1.0, 1.2, 2.0, 3.0]])
    assert ex.reliance_trend(dict(video=falling, tokens=rising)) == pytest.approx(-1.0)    # video first, tokens later
    assert ex.reliance_trend(dict(video=rising, tokens=falling)) == pytest.approx(1.0)
    assert math.isnan(ex.reliance_trend(dict(video=falling[:, :2], tokens=rising[:, :2])))
    auc = {m: torch.tensor([[50.0, 40.0]] * 8) for m in ex.CLAIM_METHODS}      # per sample: positive, negative
    auc["transformer_attribution"] = torch.tensor([[40.0, 50.0]] * 8)          # 10 points better on both tests
    claim = {c.key: c for c in ex.CLAIMS}
    assert ex.measure_claim(claim["ta_beats_rollout"], dict(text=[auc, auc]), 100) == pytest.approx((10, 10, 10, "holds"))
    auc["transformer_attribution"] = torch.tensor([[40.0, 30.0]] * 8)          # better on one test only: the worse counts
    assert ex.measure_claim(claim["ta_beats_rollout"], dict(text=[auc]), 100)[3] == "fails"
    references = ["εγώ πηγαίνω στην εφορία σήμερα", "θέλω το διαβατήριο παρακαλώ"] * 4
    wrong = ["εγώ το σήμερα", "θέλω παρακαλώ"] * 4
    stats = lambda hyps: [sa.bleu_statistics(h, r) for h, r in zip(hyps, references)]
    pair = dict(base=dict(bleu_statistics=stats(wrong), sdr=60.0, bleu4=10.0),
                signcl=dict(bleu_statistics=stats(references), sdr=50.0, bleu4=100.0))
    value, low, high, verdict = ex.measure_claim(claim["signcl_bleu"], dict(signcl=[pair]), 100)
    assert value == pytest.approx(100.0 - sa.bleu_from_statistics(np.sum(stats(wrong), 0))) and verdict == "holds"
    assert ex.measure_claim(claim["signcl_sdr"], dict(signcl=[pair, pair]), 100) == pytest.approx((-10, -10, -10, "holds"))
    w = torch.ones(1, 5, dtype=torch.float64)
    x = torch.arange(5.0)
    assert float(ex.weighted_slope(x, 3 - 0.5 * x)(w)[0]) == pytest.approx(-0.5)
    assert float(ex.weighted_correlation(x, 2 * x + 1)(w)[0]) == pytest.approx(1.0)
    assert math.isnan(float(ex.weighted_slope(torch.ones(5), x)(w)[0]))       # one value of x: no slope


@pytest.mark.parametrize("side,threshold,low,high,verdict", [
    (">", 0.0, 0.01, 1.0, "holds"), (">", 0.0, 0.0, 1.0, "inconclusive"), (">", 0.0, -1.0, 0.0, "fails"),
    (">", 0.0, -1.0, 0.01, "inconclusive"), (">", -1.0, -0.99, 0.5, "holds"), (">", -1.0, -2.0, -1.0, "fails"),
    ("<", 0.0, -1.0, -0.01, "holds"), ("<", 0.0, -1.0, 0.0, "inconclusive"), ("<", 0.0, 0.0, 1.0, "fails"),
    ("<", 0.5, float("nan"), float("nan"), "inconclusive")])
def test_claim_rules_at_their_edges(side, threshold, low, high, verdict):
    rule = ex.Rule(side, threshold)
    assert rule.verdict(low, high) == verdict
    assert f"{side} {threshold:g}" in rule.text()


def test_seed_bootstrap_over_models_and_samples():
    values = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 2.5, 3.0]), torch.tensor([0.0, 4.0])]
    per_seed = [(len(v), ex.weighted_mean(v)) for v in values]
    estimate, low, high = ex.seed_bootstrap(per_seed, 500)
    assert estimate == pytest.approx(np.mean([2.5, 2.5, 2.0])) and low <= estimate <= high and high - low > 0.3
    one = ex.seed_bootstrap(per_seed[:1], 500)
    assert one == pytest.approx(ex.bootstrap(ex.weighted_mean(values[0]), 4, 500))          # one model: over samples
    constant = ex.seed_bootstrap([(3, ex.weighted_mean(torch.full((3,), 0.1)))] * 3, 200)
    assert constant[1] <= constant[0] <= constant[2] and constant[0] == pytest.approx(0.1)
    assert all(math.isnan(v) for v in ex.seed_bootstrap([(0, None)]))


def test_every_claim_has_a_paper_a_source_a_rule_and_runs():
    keys = [c.key for c in ex.CLAIMS]
    assert len(keys) == len(set(keys)) >= 14
    for c in ex.CLAIMS:
        assert c.paper and c.source and c.claim and c.measure and c.rule.side in "<>" and c.runs in ("gloss", "text", "signcl")
    papers = {c.paper for c in ex.CLAIMS}
    assert papers == {ex.SIGNATTENTION, ex.SIGNCL, ex.CHEFER, ex.SPECTRAL}


def test_signattention_rows_use_the_preset_from_70_percent_exact(tmp_path):
    import run as cli
    run_dir = tmp_path / "signattention"
    os.makedirs(run_dir)
    (run_dir / "config.json").write_text(json.dumps(dict(data=dict(target="gloss"))))
    for exact, chosen in ((2, False), (3, True)):                                        # of 4: 50%, 75%
        with open(run_dir / "translations.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "gloss_reference", "gloss_prediction", "text_reference", "text_prediction"])
            for i in range(4):
                w.writerow([i, "Α Β", "Α Β" if i < exact else "Α", "", ""])
        assert cli.signattention_choice(str(tmp_path))[1] is None                        # not finished yet
        (run_dir / "results.json").write_text("{}")
        note, chosen_dir = cli.signattention_choice(str(tmp_path))
        assert (chosen_dir == str(run_dir)) == chosen and f"{25.0 * exact:.1f}%" in note, note
        os.remove(run_dir / "results.json")


def test_claims_end_to_end_on_a_tiny_configuration(tiny_gsl, tmp_path):
    """Every claim measured on one tiny model per configuration: claims.json holds the issue's keys, each
    interval contains its value, and a second call reuses every run and writes the same numbers."""
    import run as cli
    cfg = cli.ClaimsConfig(data=tiny_gsl, seeds=1, out="c", bootstrap=100, overrides=tiny(epochs=2))
    rows, printed = call(cli.claims, cfg, tmp_path)
    assert "claims: stage 4/4" in printed and "ETA" in printed and "default recipe with --target gloss" in printed
    preset = json.load(open(tmp_path / "c" / "signattention" / "config.json"))          # trained first, to be judged
    assert preset["preset"] == "signattention" and preset["train"]["batching"] == "shuffled"
    assert "the signattention preset (c/signattention) decodes" in printed
    table = json.load(open(tmp_path / "c" / "claims.json", encoding="utf-8"))
    assert [r["key"] for r in table] == [c.key for c in ex.CLAIMS]
    for r in table:
        assert {"paper", "claim", "measure", "paper_value", "value", "low", "high", "verdict", "rule", "command"} <= set(r)
        assert r["verdict"] in ("holds", "fails", "inconclusive") and f"--only {r['key']}" in r["command"]
        if r["value"] is not None and r["low"] is not None:
            assert r["low"] <= r["value"] <= r["high"], r
    gloss_free = json.load(open(tmp_path / "c" / "base-s0" / "results.json"))["test"]
    assert gloss_free["wer"] is None and "sdr" in gloss_free                # no gloss head trained: no gloss WER
    assert "gloss WER      -" in printed                                        # the epochs' lines, and the table
    assert any(line.split()[:1] == ["test"] and line.split()[-2] == "-" for line in printed.splitlines())
    md = open(tmp_path / "c" / "claims.md", encoding="utf-8").read()
    assert "| paper | claim |" in md and "fixed before any number was seen" in md
    again, printed = call(cli.claims, cfg, tmp_path)
    assert printed.count("finished, reused") == 5 and "epoch" not in printed.split("claims: stage 1/4")[1][:200]
    assert json.load(open(tmp_path / "c" / "claims.json", encoding="utf-8")) == table
    with pytest.raises(sa.DataError, match="unknown claim"):
        call(cli.claims, cli.ClaimsConfig(data=tiny_gsl, out="c", only="nope"), tmp_path)
