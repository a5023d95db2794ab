"""Command line of the signattention package: train, eval (and, built on them, the explanation modes).

    python run.py train                      # synthetic GSL, default model, about 4 minutes on 2 CPU cores
    python run.py train --preset signattention
    python run.py train --data PATH [--format gsl|signjoey] [--signcl 0.01]
    python run.py train --resume runs/<name>
    python run.py eval runs/<name> [--split test]
    python run.py extract [RUN] [--methods all]   # attention maps, CTC posteriors and every relevance method
    python run.py bench [RUN] [--limit 20]        # batched explanations vs the per-token loop
    python run.py plot [RUN] --sample N | --all   # the SignAttention figures
    python run.py perturb [RUN] [--level token|sentence] [--perturb-mode mask|zero] [--limit K]

This is the only module that parses arguments, lays out run folders and prints progress.
"""
import argparse
import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

import explain
import signattention as sa
from sign_cl import SignCL, ctc_viterbi, sdr, signcl_margin

SYNTHETIC = os.path.join("data", "synthetic_gsl")


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_epochs: int = 2
    schedule: str = "cosine"            # cosine decay after warm-up, or constant
    label_smoothing: float = 0.1
    ctc_weight: float = 1.0             # weight of the CTC gloss loss on the encoder (0: head untrained)
    signcl: float = 0.0                 # weight of the SignCL loss on the encoder's frame features
    grad_clip: float = 1.0              # largest gradient norm (0: no clipping)
    select: str = "bleu4"               # validation metric that picks the best checkpoint: bleu4, accuracy, wer,
                                        # ce (teacher-forced cross-entropy of the decoder)
    stop_on: str = ""                   # validation metric that early stopping watches ("": the `select` one)
    patience: int = 0                   # early stopping after this many epochs without improvement (0: off)
    beam: int = 4                       # beam size for the final evaluation (1: greedy)
    alpha: float = 1.0                  # length penalty exponent of the beam search
    seed: int = 0


# Each preset names the values that differ from the dataclass defaults above.
PRESETS = {
    "default": dict(data={}, model={}, train={}),
    # Dal Bianco, Stanchi et al. 2024, as pedroodb/sign_attention trains it (src/KeypointsTransformer.py,
    # LightningKeypointsTransformer.py, helpers.py, train.ipynb): nn.Transformer's post-LN layers with final
    # LayerNorms and Xavier initialisation, frames with nothing detected masked, Adam without gradient
    # clipping, the checkpoint of the lowest validation loss, early stopping on validation accuracy.
    # Departure kept: at evaluation a chunk gives its first frame (the reference draws a random one).
    "signattention": dict(
        data=dict(normalise=False, subsample=3, max_frames=220, max_tokens=20, target="gloss", augment=False,
                  mask_empty=True),
        model=dict(d_model=16, heads=8, encoder_layers=1, decoder_layers=1, feedforward=2048, embed_hidden=128,
                   dropout=0.2, pos_dropout=0.1, norm_first=False, final_norm=True, init="xavier"),
        train=dict(epochs=300, batch_size=64, lr=1e-3, weight_decay=0.0, warmup_epochs=0, schedule="constant",
                   label_smoothing=0.0, ctc_weight=0.0, grad_clip=0.0, select="ce", stop_on="accuracy",
                   patience=30, beam=1)),
}


# ----------------------------------------------------------------------------------------------------
# Configuration and data
# ----------------------------------------------------------------------------------------------------

def resolve_config(args):
    """Preset values, overridden by the flags a user gave."""
    preset = PRESETS[args.preset]
    data = replace(sa.DataConfig(), **preset["data"])
    model = replace(sa.ModelConfig(), **preset["model"])
    train = replace(TrainConfig(), **preset["train"])
    for section in (data, model, train):
        for f in fields(section):
            value = getattr(args, f.name, None)
            if value is not None:
                setattr(section, f.name, value)
    if model.d_model % model.heads:
        raise sa.DataError(f"--d-model {model.d_model}: must be a multiple of the {model.heads} attention heads")
    if args.format == "signjoey" and getattr(args, "subsample", None) is None:
        data.subsample = 1
    data.format = args.format
    return dict(data=asdict(data), model=asdict(model), train=asdict(train),
                data_path=args.data or SYNTHETIC, preset=args.preset)


def ensure_data(path, log):
    """The synthetic GSL is generated on first use when the default data folder does not exist."""
    if path == SYNTHETIC and not os.path.exists(os.path.join(path, "annotations.csv")):
        start = time.time()
        log(f"generating the synthetic GSL into {path} ...")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        sa.generate_synthetic_gsl(path)
        log(f"generated the synthetic GSL in {time.time() - start:.1f}s")


def read_data(path, data_cfg, splits, skip_bad, log):
    skipped = []

    def on_bad(message):
        skipped.append(message)
        log(f"warning: skipping bad sample: {message}")

    records = sa.load_records(path, data_cfg, splits, on_bad if skip_bad else None)
    if skipped:
        log(f"warning: skipped {len(skipped)} bad sample(s)")
    by_split = {s: [r for r in records if r.split == s] for s in splits}
    for s in splits:
        if not by_split[s]:
            raise sa.DataError(f"{path}: no samples in the {s} split")
    return by_split


def device_of(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise sa.DataError("--device cuda: no CUDA device is available")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                        ("cpu" if name == "auto" else name))


def to(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------

def losses(model, batch, train_cfg, signcl, generator):
    memory = model.encode(batch["src"], batch["src_mask"])
    logits = model.decode(memory, batch["src_mask"], batch["tgt_in"])
    pad = model.pad_id
    total = ce = F.cross_entropy(logits.flatten(0, 1), batch["tgt_out"].flatten(), ignore_index=pad,
                                 label_smoothing=train_cfg.label_smoothing)
    frames = sa.frame_lengths(batch["src_mask"])
    if train_cfg.ctc_weight > 0:
        log_probs = model.gloss_logits(memory).log_softmax(-1).transpose(0, 1)          # (T, B, V)
        ctc = F.ctc_loss(log_probs, batch["gloss"], frames, batch["gloss_lengths"], blank=pad,
                         zero_infinity=True)
        total = total + train_cfg.ctc_weight * ctc
    if train_cfg.signcl > 0:
        words = (batch["tgt_out"] != pad).sum(1) - 1                                    # without EOS
        margin = torch.tensor([signcl_margin(int(f), int(n)) for f, n in zip(frames, words)])
        total = total + train_cfg.signcl * signcl(memory, margin, batch["src_mask"], generator)
    correct = ((logits.argmax(-1) == batch["tgt_out"]) & (batch["tgt_out"] != pad)).sum()
    return total, ce, correct, (batch["tgt_out"] != pad).sum()


def lr_factor(step, steps_per_epoch, cfg):
    warm = cfg.warmup_epochs * steps_per_epoch
    if warm and step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, cfg.epochs * steps_per_epoch - warm)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build(config, records, device):
    data_cfg = sa.DataConfig(**config["data"])
    gloss_vocab = sa.Vocabulary(w for r in records["train"] for w in r.gloss)
    text_vocab = sa.Vocabulary(w for r in records["train"] for w in r.text)
    target_vocab = gloss_vocab if data_cfg.target == "gloss" else text_vocab
    model_cfg = sa.ModelConfig(**{**config["model"], "in_features": records["train"][0].frames.shape[1],
                                  "n_gloss": len(gloss_vocab), "n_out": len(target_vocab)})
    config["model"] = asdict(model_cfg)
    model = sa.SignTranslator(model_cfg).to(device)
    model.data_config = data_cfg
    datasets = {s: sa.SignDataset(r, data_cfg, gloss_vocab, text_vocab, train=(s == "train"))
                for s, r in records.items()}
    return model, datasets, gloss_vocab, text_vocab


def checkpoint_state(model, optimizer, config, gloss_vocab, text_vocab, epoch, history):
    return dict(model=model.state_dict(), optimizer=optimizer.state_dict(), config=config,
                model_config=config["model"], data_config=config["data"], gloss_vocab=gloss_vocab.itos,
                text_vocab=text_vocab.itos, epoch=epoch, history=history)


def write_json(path, obj):
    sa.atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, ensure_ascii=False).encode()))


def write_metrics(path, history):
    text = "".join(json.dumps(h, ensure_ascii=False) + "\n" for h in history)
    sa.atomic_write(path, lambda f: f.write(text.encode()))


LOWER_IS_BETTER = ("wer", "ce")


def is_better(metric, value, best):
    return best is None or (value < best if metric in LOWER_IS_BETTER else value > best)


def epochs_since_best(history, metric):
    """How many epochs have passed since the best value of `metric` (0: the last epoch is the best)."""
    values = [h[metric] for h in history]
    best = (min if metric in LOWER_IS_BETTER else max)(values)
    return len(values) - 1 - max(i for i, v in enumerate(values) if v == best)


def train(args):
    log = lambda msg: print(msg, flush=True)
    device = device_of(args.device)
    if args.resume:
        run_dir = args.resume
        state = sa.load_checkpoint(os.path.join(run_dir, "last.pt"), device)
        config = state["config"]
        if args.epochs is not None:
            config["train"]["epochs"] = args.epochs
        log(f"resuming {run_dir} after epoch {state['epoch']}")
    else:
        config = resolve_config(args)
        run_dir = args.out or new_run_dir(config)
        if os.path.exists(os.path.join(run_dir, "last.pt")):
            raise sa.DataError(f"{run_dir}: already holds a run (continue it with --resume {run_dir}, "
                               "or pick another --out)")
        state = None
    train_cfg = TrainConfig(**config["train"])
    data_path = config["data_path"]
    ensure_data(data_path, log)
    start = time.time()
    records = read_data(data_path, sa.DataConfig(**config["data"]), sa.SPLITS, args.skip_bad, log)
    torch.manual_seed(train_cfg.seed)
    model, datasets, gloss_vocab, text_vocab = build(config, records, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    steps_per_epoch = len(datasets["train"].batches(train_cfg.batch_size))
    history, first_epoch = [], 1
    if state is not None:
        if state["gloss_vocab"] != gloss_vocab.itos or state["text_vocab"] != text_vocab.itos:
            raise sa.DataError(f"{data_path}: the training split changed since {run_dir} began (vocabulary differs)")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, first_epoch = state["history"], state["epoch"] + 1
    os.makedirs(run_dir, exist_ok=True)
    write_json(os.path.join(run_dir, "config.json"), config)
    log(f"run {run_dir}: {sum(len(r) for r in records.values())} samples "
        f"({', '.join(f'{s} {len(r)}' for s, r in records.items())}) read in {time.time() - start:.1f}s, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, device {device}")
    signcl = SignCL()
    best = (min if train_cfg.select in LOWER_IS_BETTER else max)(
        (h[train_cfg.select] for h in history), default=None)
    stop_on = train_cfg.stop_on or train_cfg.select
    epoch_times = []
    for epoch in range(first_epoch, train_cfg.epochs + 1):
        tic = time.time()
        torch.manual_seed(train_cfg.seed * 100003 + epoch)          # dropout: same draws on resume
        generator = torch.Generator().manual_seed(train_cfg.seed * 100003 + epoch)
        model.train()
        total = count = 0.0
        for b, indices in enumerate(datasets["train"].batches(train_cfg.batch_size, generator, shuffle=True)):
            step = (epoch - 1) * steps_per_epoch + b
            for group in optimizer.param_groups:
                group["lr"] = train_cfg.lr * lr_factor(step, steps_per_epoch, train_cfg)
            batch = to(datasets["train"].batch(indices, generator), device)
            loss, ce, _, _ = losses(model, batch, train_cfg, signcl, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if train_cfg.grad_clip > 0:                                # clipping at 0 would zero every gradient
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            optimizer.step()
            total, count = total + loss.item() * len(indices), count + len(indices)
        val = evaluate(model, datasets["val"], train_cfg, device, beam=1)
        record = dict(epoch=epoch, loss=total / count, **val["metrics"], seconds=time.time() - tic)
        history.append(record)
        improved = is_better(train_cfg.select, record[train_cfg.select], best)
        state = checkpoint_state(model, optimizer, config, gloss_vocab, text_vocab, epoch, history)
        if improved:
            best = record[train_cfg.select]
            sa.save_checkpoint(os.path.join(run_dir, "best.pt"), state)
        sa.save_checkpoint(os.path.join(run_dir, "last.pt"), state)
        write_metrics(os.path.join(run_dir, "metrics.jsonl"), history)
        epoch_times.append(time.time() - tic)
        eta = sum(epoch_times) / len(epoch_times) * (train_cfg.epochs - epoch)
        log(f"epoch {epoch:3d}/{train_cfg.epochs}  loss {record['loss']:.3f}  "
            + progress_metrics(record, config["data"]["target"])
            + f"  {record['seconds']:.1f}s  ETA {format_time(eta)}" + ("  *" if improved else ""))
        if train_cfg.patience and epochs_since_best(history, stop_on) >= train_cfg.patience:
            log(f"early stop: no better validation {stop_on} for {train_cfg.patience} epochs")
            break
    report(run_dir, datasets, train_cfg, device, log, data_path)
    log(f"done in {format_time(time.time() - start)}; run folder {run_dir}")


def new_run_dir(config):
    name = os.path.basename(os.path.normpath(config["data_path"])) or "data"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join("runs", f"{stamp}-{name}-{config['preset']}")
    suffix = 1
    while os.path.exists(path + ("" if suffix == 1 else f"-{suffix}")):
        suffix += 1
    return path + ("" if suffix == 1 else f"-{suffix}")


def format_time(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_metrics(m, target):
    return (f"val {target} BLEU-4 {m['bleu4']:5.2f}  acc {m['accuracy']:5.1f}%  gloss WER {m['wer']:5.1f}%")


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, dataset, train_cfg, device, beam=None, alignments=None, batch_size=64):
    """Decode a split; metrics of the decoder's target, gloss WER, token accuracy, the decoder's teacher-forced
    cross-entropy per token (ce, with the run's label smoothing), and translation rows.

    Gloss predictions come from the decoder when it writes glosses, otherwise from the CTC head. With
    `alignments` ({id: segments}), SDR is measured on the encoder features at the gloss segment centres.
    """
    model.eval()
    beam = train_cfg.beam if beam is None else beam
    target = dataset.cfg.target
    rows, correct, tokens, loss, features, labels = [], 0, 0, 0.0, [], []
    for indices in dataset.batches(batch_size):
        batch = to(dataset.batch(indices), device)
        memory = model.encode(batch["src"], batch["src_mask"])
        logits = model.decode(memory, batch["src_mask"], batch["tgt_in"])
        real = batch["tgt_out"] != model.pad_id
        correct += int(((logits.argmax(-1) == batch["tgt_out"]) & real).sum())
        tokens += int(real.sum())
        loss += float(F.cross_entropy(logits.flatten(0, 1), batch["tgt_out"].flatten(), ignore_index=model.pad_id,
                                      label_smoothing=train_cfg.label_smoothing, reduction="sum"))
        out = sa.beam_search(model, batch["src"], batch["src_mask"], beam, train_cfg.alpha,
                             dataset.cfg.max_tokens + 1, memory)
        predictions = [" ".join(dataset.target_vocab.decode(o)) for o in out.tolist()]
        gloss_logits = model.gloss_logits(memory)
        ctc = [" ".join(dataset.gloss_vocab.decode(g)) for g in sa.ctc_decode(gloss_logits, batch["src_mask"])]
        for b, i in enumerate(indices):
            r = dataset.records[i]
            rows.append(dict(id=r.id, gloss_reference=" ".join(r.gloss),
                             gloss_prediction=predictions[b] if target == "gloss" else ctc[b],
                             text_reference=" ".join(r.text),
                             text_prediction=predictions[b] if target == "text" else ""))
            if alignments is not None:
                f, l = frame_labels(memory[b], gloss_logits[b], batch["src_mask"][b], r, dataset, alignments)
                features += f
                labels += l
    hyps = [r[f"{target}_prediction"] for r in rows]
    refs = [r[f"{target}_reference"] for r in rows]
    metrics = sa.translation_metrics(hyps, refs)
    metrics["wer"] = sa.wer([r["gloss_prediction"] for r in rows], [r["gloss_reference"] for r in rows])
    metrics["accuracy"] = 100.0 * correct / max(1, tokens)
    metrics["ce"] = loss / max(1, tokens)
    if features:
        metrics["sdr"] = sdr(torch.stack(features).cpu(), labels)
    return dict(metrics=metrics, rows=rows)


def frame_labels(memory, gloss_logits, mask, record, dataset, alignments):
    """Encoder features at the centre of each gloss occurrence, labelled with the gloss: from the true
    segments when alignments exist, else from the CTC Viterbi path of the reference glosses."""
    n = int(sa.frame_lengths(mask[None]))
    k = dataset.cfg.subsample
    if alignments:
        centres = [((a + b) // 2 // k, g) for _, g, a, b in alignments.get(record.id, [])]
    else:
        ids = dataset.gloss_vocab.encode(record.gloss)
        path = ctc_viterbi(gloss_logits[:n].log_softmax(-1).cpu(), ids, blank=0)
        centres, t = [], 0
        while t < n:
            end = t
            while end + 1 < n and path[end + 1] == path[t]:
                end += 1
            if path[t] != 0:
                centres.append(((t + end) // 2, dataset.gloss_vocab.itos[path[t]]))
            t = end + 1
    kept = [(c, g) for c, g in centres if c < n]
    return [memory[c] for c, _ in kept], [dataset.gloss_vocab.stoi.get(g, 1) for _, g in kept]


def sdr_segments(data_path, data_cfg, train_cfg):
    """Gloss segments for SDR: alignments.csv where it exists, else {} (a CTC Viterbi path) when the gloss
    head was trained, else None (no SDR)."""
    alignments = sa.read_alignments(data_path) if data_cfg.format == "gsl" else {}
    return alignments if alignments else ({} if train_cfg.ctc_weight > 0 else None)


def report(run_dir, datasets, train_cfg, device, log, data_path, splits=("val", "test")):
    """Evaluate the best checkpoint, print the table, write translations.csv and results.json."""
    model, _, _ = sa.load_model(run_dir, device)
    segments = sdr_segments(data_path, model.data_config, train_cfg)
    results = {}
    for split in splits:
        start = time.time()
        out = evaluate(model, datasets[split], train_cfg, device, alignments=segments)
        results[split] = dict(out["metrics"], seconds=time.time() - start, samples=len(datasets[split]))
        if split == "test" or len(splits) == 1:
            write_translations(os.path.join(run_dir, "translations.csv" if split == "test"
                                            else f"translations_{split}.csv"), out["rows"])
    log(results_table(results, datasets[splits[0]].cfg.target, train_cfg.beam))
    _, signature = sa.bleu(["a"], ["a"])
    log(f"sacrebleu: {signature}")
    previous = {}
    path = os.path.join(run_dir, "results.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
    write_json(path, {**previous, **results})
    return results


def write_translations(path, rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["id", "gloss_reference", "gloss_prediction", "text_reference",
                                     "text_prediction"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    sa.atomic_write(path, lambda f: f.write(buffer.getvalue().encode("utf-8")))


def results_table(results, target, beam):
    head = ["split", "samples", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "chrF", "ROUGE-L", "gloss WER", "SDR"]
    lines = [f"{target} translation ({'greedy' if beam <= 1 else f'beam {beam}'}), best checkpoint:",
             "  ".join(f"{h:>9}" for h in head)]
    for split, m in results.items():
        cells = [split, str(m["samples"])] + [f"{m[k]:.2f}" for k in ("bleu1", "bleu2", "bleu3", "bleu4", "chrf",
                                                                        "rouge_l")]
        cells += [f"{m['wer']:.2f}%", f"{m['sdr']:.1f}%" if "sdr" in m else "-"]
        lines.append("  ".join(f"{c:>9}" for c in cells))
    return "\n".join(lines)


def eval_mode(args):
    log = lambda msg: print(msg, flush=True)
    run_dir, model, dataset, train_cfg, state, device = open_run(args, log, args.checkpoint)
    if args.beam is not None:
        train_cfg.beam = args.beam
    data_path = args.data or state["config"]["data_path"]
    out = evaluate(model, dataset, train_cfg, device, alignments=sdr_segments(data_path, dataset.cfg, train_cfg))
    out["metrics"]["samples"] = len(dataset)
    log(f"{run_dir} ({args.checkpoint} checkpoint, epoch {state['epoch']}) on {data_path} {args.split}:")
    log(results_table({args.split: out["metrics"]}, dataset.cfg.target, train_cfg.beam))


def latest_run(root="runs"):
    runs = [os.path.join(root, d) for d in os.listdir(root)] if os.path.isdir(root) else []
    runs = [r for r in runs if os.path.exists(os.path.join(r, "best.pt"))]
    if not runs:
        raise sa.DataError(f"{root}/: no trained run found (run `python run.py train` first)")
    return max(runs, key=lambda r: os.path.getmtime(os.path.join(r, "best.pt")))


# ----------------------------------------------------------------------------------------------------
# Explanations
# ----------------------------------------------------------------------------------------------------

def open_run(args, log, checkpoint="best"):
    """A run's model (best checkpoint by default), its configuration and the requested split as a dataset."""
    device = device_of(args.device)
    run_dir = args.run or latest_run()
    state = sa.load_checkpoint(os.path.join(run_dir, f"{checkpoint}.pt"), device)
    config = state["config"]
    data_path = args.data or config["data_path"]
    ensure_data(data_path, log)
    data_cfg = sa.DataConfig(**config["data"])
    records = read_data(data_path, data_cfg, (args.split,), args.skip_bad, log)[args.split]
    model = sa.model_from_checkpoint(state, device)
    dataset = sa.SignDataset(records, data_cfg, sa.Vocabulary.from_list(state["gloss_vocab"]),
                             sa.Vocabulary.from_list(state["text_vocab"]))
    return run_dir, model, dataset, TrainConfig(**config["train"]), state, device


def method_list(text):
    methods = list(explain.METHODS) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in explain.METHODS]
    if unknown:
        raise sa.DataError(f"--methods: unknown method(s) {', '.join(unknown)} (choose from all, "
                           f"{', '.join(explain.METHODS)})")
    return methods


def length_sorted_batches(dataset, batch_size, limit=None):
    order = list(range(len(dataset)))[:limit]
    order.sort(key=lambda i: len(dataset.records[i].frames))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def extract(args):
    """Decode a split and keep, per sample, every attention map, the CTC posteriors and the relevance of
    every requested method; one file per split, loadable with torch.load(weights_only=True)."""
    log = lambda msg: print(msg, flush=True)
    data = extract_samples(args, log)
    data["samples"] = [s for s in data["samples"] if s is not None]
    path = os.path.join(data["meta"]["run"], f"extract_{args.split}.pt")
    sa.save_checkpoint(path, data)
    log("seconds per sample: " + ", ".join(f"{m} {t:.3f}" for m, t in data["meta"]["seconds_per_sample"].items()))
    log(f"wrote {path} ({len(data['samples'])} samples, {os.path.getsize(path) / 1e6:.1f} MB)")
    return path


def extract_samples(args, log, only=None, opened=None):
    """{'meta': ..., 'samples': [one dict per sample of the split, None where not extracted]}; `only` names
    the sample indices to extract (default: all, or the first --limit); `opened` is open_run's result when
    the caller has it."""
    run_dir, model, dataset, train_cfg, state, device = opened or open_run(args, log)
    methods = method_list(args.methods)
    beam = train_cfg.beam if args.beam is None else args.beam
    target = dataset.target_vocab
    samples = [None] * len(dataset)
    seconds = dict.fromkeys(methods, 0.0)
    if only is None:
        batches = length_sorted_batches(dataset, args.batch_size, args.limit)
    else:
        if not all(0 <= i < len(dataset) for i in only):
            raise sa.DataError(f"--sample {', '.join(map(str, only))}: the {args.split} split holds samples "
                               f"0..{len(dataset) - 1}")
        batches = [list(only)]
    total = sum(len(b) for b in batches)
    work = lambda indices: sum(len(dataset.records[i].frames) for i in indices)     # batches grow longer
    total_work, start, done, done_work = work(sum(batches, [])), time.time(), 0, 0
    for indices in batches:
        batch = to(dataset.batch(indices), device)
        src, mask = batch["src"], batch["src_mask"]
        with torch.no_grad():
            memory = model.encode(src, mask)
            out = sa.beam_search(model, src, mask, beam, train_cfg.alpha, dataset.cfg.max_tokens + 1, memory)
            posteriors = model.gloss_logits(memory).softmax(-1)
            model.keep_attention(True)
            tgt_in = torch.cat([torch.full_like(out[:, :1], model.bos_id), out[:, :-1]], 1)
            model(src, mask, tgt_in)
            maps = {k: torch.stack([m.attention for m in v], 1) for k, v in model.attention_modules().items()}
            branches = [layer.branches for layer in model.decoder]
            model.keep_attention(False)
        relevance = {}
        for method in methods:
            tic = time.time()
            relevance[method] = explain.explain(model, src, mask, out, method, return_tokens=True)
            seconds[method] += time.time() - tic
        ctc = sa.ctc_decode(posteriors.log(), mask)
        lengths = sa.frame_lengths(mask)
        for b, i in enumerate(indices):
            r = dataset.records[i]
            T, n = int(lengths[b]), int((out[b] != model.pad_id).sum())
            half = lambda x: x.detach().to("cpu", torch.float16).clone()
            samples[i] = dict(
                id=r.id, gloss_reference=r.gloss, text_reference=r.text,
                prediction=target.decode(out[b].tolist()),
                gloss_prediction=(target.decode(out[b].tolist()) if dataset.cfg.target == "gloss"
                                  else dataset.gloss_vocab.decode(ctc[b])),
                tokens=[target.itos[t] for t in out[b, :n].tolist()], frames=T,
                attention=dict(encoder_self=half(maps["encoder_self"][b, :, :, :T, :T]),
                               decoder_self=half(maps["decoder_self"][b, :, :, :n, :n]),
                               decoder_cross=half(maps["decoder_cross"][b, :, :, :n, :T])),
                gloss_posteriors=half(posteriors[b, :T]),
                branch_norms=dict(tokens=torch.stack([s[b, :n].norm(dim=-1) for s, _ in branches]).cpu(),
                                  video=torch.stack([c[b, :n].norm(dim=-1) for _, c in branches]).cpu()),
                relevance={m: rel[b, :n, :T].cpu().clone() for m, (rel, _) in relevance.items()},
                token_relevance={m: tok[b, :n, :n].cpu().clone() for m, (_, tok) in relevance.items()
                                 if tok is not None})
        done, done_work = done + len(indices), done_work + work(indices)
        spent = time.time() - start
        log(f"extract {args.split}: {done}/{total} samples  {done / spent:.2f} samples/s  "
            f"ETA {format_time(spent * (total_work - done_work) / done_work)}")
    meta = dict(run=run_dir, split=args.split, epoch=state["epoch"], methods=methods, beam=beam,
                data_config=state["data_config"], gloss_vocab=state["gloss_vocab"], target=dataset.cfg.target,
                target_vocab=target.itos, ctc_trained=train_cfg.ctc_weight > 0,
                seconds_per_sample={m: t / total for m, t in seconds.items()})
    return dict(meta=meta, samples=samples)


def bench(args):
    """Batched explanations against the per-token loop (each sample alone, one pass per token): seconds
    per sample side by side, the speed-up, and the largest difference between the two."""
    log = lambda msg: print(msg, flush=True)
    run_dir, model, dataset, train_cfg, _, device = open_run(args, log)
    methods = method_list(args.methods)
    if args.perturb:
        return bench_perturbation(model, dataset, methods, args.limit, device, log)
    batches = length_sorted_batches(dataset, args.batch_size, args.limit)
    inputs = []
    for indices in batches:
        batch = to(dataset.batch(indices), device)
        out = sa.greedy_decode(model, batch["src"], batch["src_mask"], dataset.cfg.max_tokens + 1)
        inputs.append((batch["src"], batch["src_mask"], out))
    count = sum(len(b) for b in batches)
    log(f"{run_dir}: {count} {args.split} samples, batches of {args.batch_size}, device {device}")
    log(f"{'method':>24}  {'batched s/sample':>16}  {'loop s/sample':>13}  {'speed-up':>8}  {'max |diff|':>10}")
    for method in methods:
        src, mask, out = inputs[0]
        explain.explain(model, src[:2], mask[:2], out[:2], method)                 # warm-up
        tic = time.time()
        fast = [explain.explain(model, src, mask, out, method) for src, mask, out in inputs]
        batched = (time.time() - tic) / count
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
        loop = (time.time() - tic) / count
        log(f"{method:>24}  {batched:16.4f}  {loop:13.4f}  {loop / batched:7.1f}x  {diff:10.2e}")


@torch.no_grad()
def perturbation_loop(model, src, mask, out, relevance):
    """The token-level perturbation test written as its definition reads: one forward per sample, token,
    direction and fraction, with the removed frames masked out of the sample's frames. Returns the scores
    and where the decision was a near tie (explain.near_ties)."""
    scores = torch.full(out.shape + (2, len(explain.FRACTIONS)), float("nan"), device=src.device)
    tied = torch.zeros(scores.shape, dtype=torch.bool, device=src.device)
    tgt_in = torch.cat([torch.full_like(out[:, :1], model.bos_id), out[:, :-1]], 1)
    for b in range(len(src)):
        T = int(sa.frame_lengths(mask[b:b + 1]))
        for t in range(int((out[b] != model.pad_id).sum())):
            salt = torch.tensor([t], device=src.device)                     # as the batched test salts it
            ranks = explain.removal_ranks(relevance[b:b + 1, t, :T], mask[b:b + 1, :T], salt=salt)
            keep = explain.kept_frames(ranks, mask[b:b + 1, :T])
            for d in range(2):
                for f in range(len(explain.FRACTIONS)):
                    logits = sa._decodable(model(src[b:b + 1, :T], keep[:, d, f], tgt_in[b:b + 1])[0, t], model)
                    scores[b, t, d, f] = float(logits.argmax() == out[b, t])
                    tied[b, t, d, f] = explain.near_ties(logits)
    return scores, tied


def bench_perturbation(model, dataset, methods, limit, device, log):
    """The batched token-level perturbation test of `python run.py perturb` (every removal of every token of
    the samples at once) against the loop of one forward per token, direction and fraction: seconds per
    sample side by side, how many scores differ where the decision is clear, and how many decisions are near
    ties (the two best logits within rounding: either answer is right, and kernels may pick either)."""
    batch = to(dataset.batch(list(range(len(dataset)))[:limit]), device)
    src, mask = batch["src"], batch["src_mask"]
    out = sa.greedy_decode(model, src, mask, dataset.cfg.max_tokens + 1)
    count, tokens = len(src), int((out != model.pad_id).sum())
    log(f"token-level perturbation tests: {count} samples, {tokens} tokens, 2 directions x 10 fractions, "
        f"frames removed by the key mask, device {device}")
    log(f"{'method':>24}  {'batched s/sample':>16}  {'loop s/sample':>13}  {'speed-up':>8}  {'scores differ':>13}  "
        f"{'near ties':>9}")
    for method in methods:
        relevance = explain.explain(model, src, mask, out, method)
        tic = time.time()
        fast = explain.token_perturbation(model, src, mask, out, relevance)
        batched = (time.time() - tic) / count
        tic = time.time()
        slow, tied = perturbation_loop(model, src, mask, out, relevance)
        loop = (time.time() - tic) / count
        differ = int(((fast != slow) & ~fast.isnan() & ~tied).sum())
        log(f"{method:>24}  {batched:16.4f}  {loop:13.4f}  {loop / batched:7.1f}x  {differ:13d}  "
            f"{int((tied & ~fast.isnan()).sum()):9d}")


# ----------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------

HAND_EDGES = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (5, 9), (9, 10), (10, 11), (11, 12),
              (9, 13), (13, 14), (14, 15), (15, 16), (13, 17), (17, 18), (18, 19), (19, 20), (0, 17)]
BODY_EDGES = [(11, 12), (11, 13), (13, 15), (12, 14), (14, 16), (11, 23), (12, 24), (23, 24), (9, 10), (7, 8)]


def load_extract(args, log):
    """The run's extraction of the split. Where it is missing, --all makes and saves it first; one sample
    is extracted alone, in memory."""
    run_dir = args.run or latest_run()
    path = os.path.join(run_dir, f"extract_{args.split}.pt")
    options = argparse.Namespace(**{**vars(args), "run": run_dir, "methods": "all", "batch_size": 16,
                                    "limit": None, "beam": None})
    if os.path.exists(path):
        data = torch.load(path, weights_only=True)
    elif args.all:
        log(f"{path} is missing: extracting the {args.split} split first")
        data = torch.load(extract(options), weights_only=True)
    else:
        log(f"extracting {args.split} sample {args.sample} (`python run.py extract` keeps the whole split)")
        data = extract_samples(options, log, only=[args.sample])
    return run_dir, data, args.data or run_config(run_dir)["data_path"]


def run_config(run_dir):
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # DejaVu Sans has Greek glyphs; at 160 dpi the tonos of a 7-9 pt ί stays apart from its stem (at 110 dpi
    # "πηγαίνεις" read "πηγα(νεις")
    plt.rcParams.update({"font.family": "DejaVu Sans", "figure.dpi": 160})
    return plt


def model_segments(segments, k):
    """Original-frame segments [start, end) -> model frames (frame t is original frame t * k)."""
    return [(p, g, -(-a // k), -(-b // k)) for p, g, a, b in segments]


def token_ticks(ax, tokens, axis="y"):
    size = 9 if len(tokens) <= 12 else 8
    ticks = range(len(tokens))
    if axis == "y":
        ax.set_yticks(ticks, tokens, fontsize=size)
    else:
        ax.set_xticks(ticks, tokens, fontsize=size, rotation=90)


def percent_axis(ax, T, label="video position (% of frames)"):
    ax.set_xlabel(label)
    ax.set_xlim(0, 100)


def wrap(text, width=110):
    import textwrap
    return "\n".join(textwrap.wrap(text, width)) or "(empty)"


def plot_sample(run_dir, data, data_path, index, fmt, animate, log):
    plt = pyplot()
    meta = data["meta"]
    if not 0 <= index < len(data["samples"]):
        raise sa.DataError(f"--sample {index}: the {meta['split']} extraction holds samples 0..{len(data['samples']) - 1}")
    s = data["samples"][index]
    k = meta["data_config"]["subsample"]
    tokens, T, n = s["tokens"], s["frames"], len(s["tokens"])
    reference = " ".join(s[f"{meta['target']}_reference"])
    header = (f"{s['id']} ({meta['split']} sample {index})\nprediction: {wrap(' '.join(s['prediction']))}\n"
              f"reference:  {wrap(reference)}")
    stem = os.path.join(run_dir, f"sample{index}_")
    written = []
    extent = [0, 100, n - 0.5, -0.5]
    alignments = sa.read_alignments(data_path).get(s["id"], []) if meta["data_config"]["format"] == "gsl" else []

    def save(fig, name):
        path = f"{stem}{name}.{fmt}"
        sa.atomic_write(path, lambda f: fig.savefig(f, format=fmt, bbox_inches="tight"))
        plt.close(fig)
        written.append(path)

    def image(ax, values, title, signed=False, label="attention weight"):
        values = values.float().numpy()
        if signed:
            m = max(abs(values.min()), abs(values.max()), 1e-12)
            im = ax.imshow(values, aspect="auto", cmap="RdBu_r", vmin=-m, vmax=m, extent=extent, interpolation="nearest")
        else:
            im = ax.imshow(values, aspect="auto", cmap="viridis", extent=extent, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        plt.colorbar(im, ax=ax, label=label, fraction=0.046, pad=0.02)
        return im

    row_height = 0.26 * n + 1.2
    # skeleton at key frames
    pose_path = sa._safe_pose_path(data_path, s["id"]) if meta["data_config"]["format"] == "gsl" else None
    if pose_path and os.path.exists(pose_path):
        pose = np.load(pose_path)[:, 0, :, :2]
        key = [(a + b) // 2 for _, _, a, b in sorted(alignments)][:8] or \
            np.linspace(0, len(pose) - 1, 6).round().astype(int).tolist()
        names = {(a + b) // 2: g for _, g, a, b in alignments}
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
        fig.suptitle(f"{s['id']}: key frames (x, y image coordinates; red = right hand, blue = left)", fontsize=10)
        save(fig, "skeleton")
    else:
        log("no pose file for this sample: skeleton figures skipped")
    # decoder cross-attention per layer
    cross = s["attention"]["decoder_cross"].float().mean(1)                   # (L, n, T)
    fig, axes = plt.subplots(len(cross), 1, figsize=(10, row_height * len(cross) + 1.2), squeeze=False, layout="constrained")
    for l, ax in enumerate(axes[:, 0]):
        image(ax, cross[l], f"decoder cross-attention, layer {l + 1} (mean over heads)")
        token_ticks(ax, tokens)
        ax.set_ylabel("predicted token")
        percent_axis(ax, T)
    fig.suptitle(header, fontsize=9, x=0.02, ha="left")
    save(fig, "cross_attention")
    # encoder and decoder self-attention per layer
    enc = s["attention"]["encoder_self"].float().mean(1)
    fig, axes = plt.subplots(1, len(enc), figsize=(4.6 * len(enc), 4.2), squeeze=False, layout="constrained")
    for l, ax in enumerate(axes[0]):
        im = ax.imshow(enc[l].numpy(), cmap="viridis", extent=[0, 100, 100, 0], interpolation="nearest")
        plt.colorbar(im, ax=ax, label="attention weight", fraction=0.046, pad=0.02)
        ax.set_title(f"encoder self-attention, layer {l + 1}", fontsize=10)
        ax.set_xlabel("key frame (% of video)")
        ax.set_ylabel("query frame (% of video)")
    fig.suptitle(f"{s['id']}: {T} model frames (one in {k}), mean over heads", fontsize=10)
    save(fig, "encoder_attention")
    dec = s["attention"]["decoder_self"].float().mean(1)
    inputs = ["<bos>"] + tokens[:-1]
    fig, axes = plt.subplots(1, len(dec), figsize=(0.3 * n * len(dec) + 3.5 * len(dec), 0.3 * n + 2.5), squeeze=False, layout="constrained")
    for l, ax in enumerate(axes[0]):
        im = ax.imshow(dec[l].numpy(), cmap="viridis", interpolation="nearest")
        plt.colorbar(im, ax=ax, label="attention weight", fraction=0.046, pad=0.02)
        token_ticks(ax, tokens)
        token_ticks(ax, inputs, axis="x")
        ax.set_title(f"decoder self-attention, layer {l + 1}", fontsize=10)
        ax.set_xlabel("decoder input (previous token)")
        ax.set_ylabel("predicted token")
    save(fig, "decoder_attention")
    # one panel per explanation method
    methods = list(s["relevance"])
    cols = 4
    rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, row_height * rows + 1.5), squeeze=False, layout="constrained")
    for ax, method in zip(axes.flat, methods):
        image(ax, s["relevance"][method], method, signed=method in explain.SIGNED, label="relevance")
        token_ticks(ax, tokens)
        percent_axis(ax, T)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    fig.suptitle(header + "\nrelevance of each frame for each predicted token (signed methods: red > 0 > blue)",
                 fontsize=9, x=0.02, ha="left")
    save(fig, "relevance")
    # CTC gloss posteriors and the true gloss segments (only where the gloss head was trained)
    if not meta.get("ctc_trained", True):
        log("the run trained no CTC gloss head (ctc_weight 0): gloss posterior figure skipped")
    else:
        post = s["gloss_posteriors"].float()
        vocab = meta["gloss_vocab"]
        shown = sorted({vocab.index(g) for g in s["gloss_reference"] + s["gloss_prediction"] if g in vocab})
        fig, ax = plt.subplots(figsize=(11, 3.6), layout="constrained")
        frames = np.arange(T) * k
        ax.plot(frames, post[:, 0].numpy(), color="0.6", linestyle="--", label="blank")
        for i in shown:
            ax.plot(frames, post[:, i].numpy(), label=vocab[i])
        for j, (_, g, a, b) in enumerate(sorted(alignments)):
            ax.axvspan(a, b, color=("0.85" if j % 2 else "0.93"), zorder=0)
            ax.text((a + b) / 2, 1.02, g, ha="center", va="bottom", fontsize=7, rotation=90 if len(alignments) > 6 else 0,
                    transform=ax.get_xaxis_transform())
        ax.set_xlabel("frame (original frame rate)")
        ax.set_ylabel("CTC posterior")
        ax.set_ylim(0, 1)
        ax.set_xlim(0, max(frames[-1], 1))
        ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1))
        ax.set_title(f"{s['id']}: CTC gloss posteriors" + (" over the true gloss segments (grey)" if alignments else ""),
                     fontsize=10, pad=40 if alignments else 6)
        save(fig, "gloss_posteriors")
    # reliance on the video versus the previous tokens
    video, prev = s["branch_norms"]["video"].float(), s["branch_norms"]["tokens"].float()
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 0.45 * n + 6), 3.8), layout="constrained")
    for l in range(len(video)):
        axes[0].plot(range(n), video[l].numpy(), marker="o", label=f"video (cross-attention), layer {l + 1}")
        axes[0].plot(range(n), prev[l].numpy(), marker="s", linestyle="--", label=f"previous tokens (self-attention), layer {l + 1}")
        axes[1].plot(range(n), (video[l] / (video[l] + prev[l]).clamp(min=1e-12)).numpy(), marker="o", label=f"layer {l + 1}")
    axes[0].set_ylabel("L2 norm of the attention output")
    axes[1].set_ylabel("video share = video / (video + tokens)")
    axes[1].set_ylim(0, 1)
    for ax in axes:
        token_ticks(ax, tokens, axis="x")
        ax.set_xlabel("decoding step (predicted token)")
        ax.legend(fontsize=7)
    axes[0].set_title("what each decoding step draws on", fontsize=10)
    axes[1].set_title("reliance on the video", fontsize=10)
    save(fig, "reliance")
    if animate and pose_path and os.path.exists(pose_path):
        written.append(animate_sample(plt, s, pose, cross[-1], k, f"{stem}animation.gif"))
    return written


def draw_skeleton(ax, frame, alpha=1.0):
    """One frame of MediaPipe keypoints (543, 2): body lines, hands, and the face as a faint cloud."""
    ax.scatter(frame[sa.FACE, 0], frame[sa.FACE, 1], s=0.3, color="0.7", alpha=alpha)
    for a, b in BODY_EDGES:
        ax.plot(frame[[a, b], 0], frame[[a, b], 1], color="0.2", linewidth=1.2, alpha=alpha)
    for ids, color in ((sa.RIGHT_HAND, "tab:red"), (sa.LEFT_HAND, "tab:blue")):
        hand = frame[ids]
        for a, b in HAND_EDGES:
            ax.plot(hand[[a, b], 0], hand[[a, b], 1], color=color, linewidth=0.8, alpha=alpha)


def animate_sample(plt, s, pose, cross, k, path):
    """A GIF: the skeleton at each model frame, and one bar per predicted token with its cross-attention
    (last layer, mean over heads) at that frame."""
    from matplotlib.animation import FuncAnimation, PillowWriter
    tokens, T = s["tokens"], s["frames"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4.2), gridspec_kw=dict(width_ratios=[1, 1.3]), layout="constrained")
    pts = pose[:, sa.BODY[:25] + sa.LEFT_HAND + sa.RIGHT_HAND]
    lo, hi = np.nanmin(pts, (0, 1)), np.nanmax(pts, (0, 1))
    top = float(cross.max())

    def draw(t):
        left.clear()
        right.clear()
        draw_skeleton(left, pose[min(t * k, len(pose) - 1)])
        left.set_xlim(lo[0] - 0.05, hi[0] + 0.05)
        left.set_ylim(hi[1] + 0.05, lo[1] - 0.05)
        left.set_aspect("equal")
        left.set_xticks([])
        left.set_yticks([])
        left.set_title(f"frame {t * k}", fontsize=9)
        right.barh(range(len(tokens)), cross[:, t].numpy(), color="tab:purple")
        right.set_yticks(range(len(tokens)), tokens, fontsize=8)
        right.invert_yaxis()
        right.set_xlim(0, top)
        right.set_xlabel("cross-attention to this frame (last layer)")
        right.set_title(s["id"], fontsize=9)

    animation = FuncAnimation(fig, draw, frames=T)
    animation.save(path, writer=PillowWriter(fps=10))
    plt.close(fig)
    return path


def segment_sources(data, data_path):
    """alignments.csv of the data (or {}) and, for text decoders, the word-gloss links of its training split."""
    meta = data["meta"]
    alignments = sa.read_alignments(data_path) if meta["data_config"]["format"] == "gsl" else {}
    links = None
    if alignments and meta["target"] == "text":
        links = sa.gloss_links([(g, t) for _, split, g, t in sa.read_annotations(data_path) if split == "train"])
    return alignments, links


def global_numbers(data, alignments, links, correct_only):
    """The numbers behind the global figures, over the samples whose prediction equals the reference
    (correct_only) or over all samples."""
    meta = data["meta"]
    k = meta["data_config"]["subsample"]
    target = meta["target"]
    samples = [s for s in data["samples"] if not correct_only or s["prediction"] == s[f"{target}_reference"]]
    layers = len(samples[0]["attention"]["decoder_cross"]) if samples else 0
    bins = 20
    out = dict(count=len(samples), profiles={}, diagonality=[[] for _ in range(layers)], reliance={},
               offsets=[], entropy={}, pointing={}, mass={})
    for s in samples:
        cross = s["attention"]["decoder_cross"].float().mean(1)             # (L, n, T)
        words = len(s["tokens"]) - (s["tokens"][-1] == sa.EOS)                # tokens before EOS
        length = min(words, 5)
        if words >= 1:
            profile = explain.relative_profile(cross[-1, :words], bins)
            out["profiles"].setdefault(length, []).append(profile if length < 5 else profile[:5])
        for l in range(layers):
            if words >= 2:
                out["diagonality"][l].append(explain.diagonality(cross[l, :words]))
        video, prev = s["branch_norms"]["video"].float(), s["branch_norms"]["tokens"].float()
        share = (video / (video + prev).clamp(min=1e-12)).mean(0)
        out["reliance"].setdefault(length, []).append(share)
        enc = s["attention"]["encoder_self"].float().mean(1)
        out["offsets"].append(torch.stack([explain.offset_profile(a, 10) for a in enc]))
        for group, maps in s["attention"].items():
            out["entropy"].setdefault(group, []).append(
                torch.stack([explain.entropy(a.float(), causal=group == "decoder_self") for a in maps]))
        segments = token_segments(s, alignments.get(s["id"], []), k, target, links)
        for method, rel in s["relevance"].items():
            if segments:
                out["pointing"].setdefault(method, []).extend(explain.pointing_game(rel, segments))
                out["mass"].setdefault(method, []).extend(explain.segment_mass(rel, segments))
    return out


def token_segments(sample, alignments, k, target, links):
    """(token row, start, end) in model frames for predicted tokens that realise a gloss with a known segment:
    glosses by position where the decoder writes the reference glosses; text words through `links` where
    the linked gloss occurs once in the sentence."""
    segments = model_segments(alignments, k)
    if target == "gloss":
        by_position = {p: (a, b) for p, g, a, b in segments}
        return [(t, *by_position[t]) for t, g in enumerate(sample["tokens"])
                if t in by_position and sample["gloss_reference"][t] == g]
    if not links:
        return []
    once = {g: (a, b) for p, g, a, b in segments if sample["gloss_reference"].count(g) == 1}
    return [(t, *once[links[w]]) for t, w in enumerate(sample["tokens"]) if links.get(w) in once]


def plot_all(run_dir, data, data_path, fmt, log):
    plt = pyplot()
    written = []
    meta = data["meta"]
    alignments, links = segment_sources(data, data_path)
    for correct_only in (True, False):
        view = "correct" if correct_only else "all"
        g = global_numbers(data, alignments, links, correct_only)
        label = (f"{g['count']} {meta['split']} samples whose prediction equals the reference" if correct_only
                 else f"all {g['count']} {meta['split']} samples")
        if not g["count"]:
            log(f"no {meta['split']} sample in the '{view}' view: its figures are skipped")
            continue

        def save(fig, name):
            path = os.path.join(run_dir, f"all_{view}_{name}.{fmt}")
            sa.atomic_write(path, lambda f: fig.savefig(f, format=fmt, bbox_inches="tight"))
            plt.close(fig)
            written.append(path)

        lengths = sorted(g["profiles"])
        fig, axes = plt.subplots(1, len(lengths), figsize=(3.6 * len(lengths), 3.6), squeeze=False, layout="constrained")
        for ax, L in zip(axes[0], lengths):
            mean = torch.stack(g["profiles"][L]).mean(0).numpy()
            im = ax.imshow(mean, aspect="auto", cmap="viridis", extent=[0, 100, len(mean) - 0.5, -0.5])
            plt.colorbar(im, ax=ax, label="attention mass", fraction=0.046, pad=0.02)
            ax.set_yticks(range(len(mean)), [str(i + 1) for i in range(len(mean))])
            ax.set_xlabel("video position (% of frames)")
            ax.set_title(f"{L}{'+' if L == 5 else ''} token{'s' if L > 1 else ''} ({len(g['profiles'][L])} samples)"
                         + (", first 5 shown" if L == 5 else ""), fontsize=10)
        fig.supylabel("token position", fontsize=10)        # once: beside each colour bar it met its label
        fig.suptitle(f"Decoder cross-attention (last layer) by relative video position: {label}", fontsize=10)
        save(fig, "cross_attention_by_length")
        scores = [float(np.nanmean(d)) if d else float("nan") for d in g["diagonality"]]
        fig, ax = plt.subplots(figsize=(4 + 0.6 * len(scores), 3.4), layout="constrained")
        ax.bar([f"layer {l + 1}" for l in range(len(scores))], scores, color="tab:green")
        for l, v in enumerate(scores):
            ax.text(l, v, f"{v:.2f}", ha="center", va="bottom" if v >= 0 else "top")
        ax.set_ylim(-1, 1.1)
        ax.axhline(0, color="0.5", linewidth=0.8)
        ax.set_ylabel("diagonality (Spearman, token position\nvs cross-attention centroid)")
        ax.set_title(f"Diagonality of the cross-attention: {label}", fontsize=9)
        save(fig, "diagonality")
        log(f"diagonality ({view}): " + ", ".join(f"layer {l + 1} {v:.3f}" for l, v in enumerate(scores)))
        fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
        for L in sorted(g["reliance"]):
            rows = g["reliance"][L]
            width = max(len(r) for r in rows)
            padded = torch.full((len(rows), width), float("nan"))
            for i, r in enumerate(rows):
                padded[i, :len(r)] = r
            ax.plot(range(1, width + 1), np.nanmean(padded.numpy(), 0), marker="o",
                    label=f"{L}{'+' if L == 5 else ''} token{'s' if L > 1 else ''}")
        ax.set_xlabel("decoding step (1 = first token; the last step writes EOS)")
        ax.set_ylabel("video share of the attention outputs\n(mean over decoder layers)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.set_title(f"Reliance on the video vs the previous tokens: {label}", fontsize=9)
        save(fig, "reliance")
        offsets = torch.stack(g["offsets"])                                 # (samples, L, 21)
        mean = np.nanmean(offsets.numpy(), 0)
        fig, ax = plt.subplots(figsize=(7, 3.6), layout="constrained")
        for l, row in enumerate(mean):
            ax.plot(range(-10, 11), row, marker="o", label=f"layer {l + 1}")
        ax.set_xlabel(f"key frame - query frame (model frames, one in {meta['data_config']['subsample']})")
        ax.set_ylabel("mean attention weight")
        ax.legend(fontsize=8)
        ax.set_title(f"Encoder self-attention by relative frame offset: {label}", fontsize=9)
        save(fig, "encoder_offsets")
        groups = list(g["entropy"])
        fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.2), squeeze=False, layout="constrained")
        for ax, group in zip(axes[0], groups):
            values = np.nanmean(torch.stack(g["entropy"][group]).numpy(), 0)     # (L, h)
            im = ax.imshow(values, cmap="magma", vmin=0, vmax=1, aspect="auto")
            plt.colorbar(im, ax=ax, label="normalised entropy", fraction=0.046, pad=0.02)
            ax.set_xticks(range(values.shape[1]), [str(h + 1) for h in range(values.shape[1])])
            ax.set_yticks(range(values.shape[0]), [str(l + 1) for l in range(values.shape[0])])
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(group.replace("_", " "), fontsize=10)
        fig.suptitle(f"Attention entropy (0 = one key, 1 = uniform): {label}", fontsize=10)
        save(fig, "entropy")
        if g["pointing"]:
            methods = list(g["pointing"])
            accuracy = [100 * np.mean(g["pointing"][m]) for m in methods]
            mass = [100 * np.mean(g["mass"][m]) for m in methods]
            fig, ax = plt.subplots(figsize=(10, 3.8), layout="constrained")
            x = np.arange(len(methods))
            ax.bar(x - 0.2, accuracy, 0.4, label="pointing game (argmax in the segment)")
            ax.bar(x + 0.2, mass, 0.4, label="positive relevance mass in the segment")
            ax.set_xticks(x, methods, rotation=45, ha="right")
            ax.set_ylabel("% (hits, or mean share of mass)")
            ax.set_ylim(0, 100)
            ax.legend(fontsize=8)
            ax.set_title(f"Plausibility against the true gloss segments ({len(g['pointing'][methods[0]])} "
                         f"occurrences): {label}", fontsize=9)
            save(fig, "pointing_game")
            log(f"pointing game ({view}): " + ", ".join(f"{m} {a:.1f}%" for m, a in zip(methods, accuracy)))
    return written


def plot(args):
    log = lambda msg: print(msg, flush=True)
    start = time.time()
    run_dir, data, data_path = load_extract(args, log)
    if args.all:
        written = plot_all(run_dir, data, data_path, args.format, log)
    else:
        written = plot_sample(run_dir, data, data_path, args.sample, args.format, args.animate, log)
    for path in written:
        log(path)
    log(f"{len(written)} figures in {time.time() - start:.1f}s")


# ----------------------------------------------------------------------------------------------------
# Faithfulness (perturbation tests) and plausibility
# ----------------------------------------------------------------------------------------------------

def perturb_samples(args, opened, methods, log):
    """The extraction samples (tokens, relevance) of the first --limit samples of the split: from the run's
    extraction where it holds them for this checkpoint, else explained now (and saved as the extraction when
    that is the whole split with every method and no extraction file exists yet)."""
    run_dir, _, dataset, _, state, _ = opened
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    path = os.path.join(run_dir, f"extract_{args.split}.pt")
    if os.path.exists(path):
        data = torch.load(path, weights_only=True)
        meta, samples = data["meta"], data["samples"]
        held = [s["id"] for s in samples[:count]] == [r.id for r in dataset.records[:count]]
        if meta["epoch"] == state["epoch"] and set(methods) <= set(meta["methods"]) and held:
            log(f"relevance from {path}")
            data["samples"] = samples[:count]
            return data
        why = ("an earlier checkpoint" if meta["epoch"] != state["epoch"] else
               "other methods" if not set(methods) <= set(meta["methods"]) else "other samples")
        log(f"{path} holds {why}: explaining {count} samples now")
    options = argparse.Namespace(**{**vars(args), "run": run_dir, "methods": ",".join(methods), "batch_size": 16,
                                    "limit": count, "beam": None})
    data = extract_samples(options, log, opened=opened)
    data["samples"] = data["samples"][:count]
    if count == len(dataset) and set(methods) >= set(explain.METHODS) and not os.path.exists(path):
        sa.save_checkpoint(path, data)
        log(f"wrote {path} (`python run.py plot` reads it)")
    return data


class Progress:
    """Method, fraction and how long the rest should take: one line rewritten in place on a terminal, else a
    line every 10 seconds and at the end of each method."""

    def __init__(self, methods, level, log):
        self.methods, self.level, self.log = methods, level, log
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
        if self.tty:
            print("\r" + line.ljust(100), end="\n" if done == total else "", flush=True)
        elif done == total or time.time() - self.printed >= 10:
            self.log(line)
            self.printed = time.time()


def sentence_scores(decoded, references, target):
    """Token accuracy of each perturbed greedy decoding against the clean one (fraction 0), position by
    position up to the clean EOS, and sacrebleu's BLEU statistics against the reference: (B, 2, P) and
    (B, 2, P, 10)."""
    clean = decoded[:, 0, 0]                                                 # (B, L)
    length = ((clean != sa.Vocabulary.pad_id).sum(-1)).clamp(min=1)
    valid = torch.arange(clean.shape[1]) < length[:, None]
    accuracy = ((decoded == clean[:, None, None]) & valid[:, None, None]).sum(-1).double() / length[:, None, None]
    stats = [[[sa.bleu_statistics(" ".join(target.decode(ids)), ref) for ids in row] for row in rows]
             for rows, ref in zip(decoded.tolist(), references)]
    return accuracy, torch.tensor(stats, dtype=torch.float64)


def perturb(args):
    """Positive/negative perturbation AUC of each method with 95% bootstrap intervals, random as control,
    and the pointing game and relevance mass in the true segments where alignments exist."""
    log = lambda msg: print(msg, flush=True)
    start = time.time()
    methods = method_list(args.methods)
    named = args.methods != "all"
    methods += [] if "random" in methods else ["random"]
    opened = open_run(args, log)
    run_dir, model, dataset, _, state, device = opened
    data = perturb_samples(args, opened, methods, log)
    samples, meta = data["samples"], data["meta"]
    plausibility = plausibility_of(data, args.data or state["config"]["data_path"], methods)
    B, target = len(samples), dataset.target_vocab
    batch = to(dataset.batch(list(range(B))), device)
    src, mask = batch["src"], batch["src_mask"]
    lengths = sa.frame_lengths(mask)
    for b, s in enumerate(samples):
        if s["frames"] != int(lengths[b]):
            raise sa.DataError(f"{run_dir}/extract_{args.split}.pt: sample {s['id']} has {s['frames']} frames, the data "
                               f"{int(lengths[b])} (extracted from other data? run `python run.py extract` again)")
        for m in methods:
            if not torch.isfinite(s["relevance"][m]).all():
                raise sa.DataError(f"{run_dir}: the {m} relevance of sample {s['id']} holds NaN or infinite values")
    n, T = max(len(s["tokens"]) for s in samples), src.shape[1]
    out = torch.full((B, n), target.pad_id, dtype=torch.long)
    for b, s in enumerate(samples):
        out[b, :len(s["tokens"])] = torch.tensor([target.stoi[w] for w in s["tokens"]])
    out = out.to(device)
    references = [" ".join(s[f"{meta['target']}_reference"]) for s in samples]
    seed = 0 if args.seed is None else args.seed
    progress = Progress(methods, args.level, log)
    log(f"{run_dir}: {B} {args.split} samples, {len(methods)} methods, {args.level} level, frames removed by "
        f"{'the key mask' if args.perturb_mode == 'mask' else 'zeroing'}, fractions 0..0.9")
    curves, stats = {}, {}
    for method in methods:
        R = torch.zeros(B, n, T)
        for b, s in enumerate(samples):
            rel = s["relevance"][method].float()
            R[b, :rel.shape[0], :rel.shape[1]] = rel
        progress.begin(method)
        if args.level == "token":
            scores = explain.token_perturbation(model, src, mask, out, R.to(device), mode=args.perturb_mode,
                                                seed=seed, progress=progress)
            curves[method] = scores.nanmean(1).double().cpu()                # (B, 2, P): mean over tokens
        else:
            decoded = explain.sentence_perturbation(model, src, mask, R.to(device), out != target.pad_id,
                                                    dataset.cfg.max_tokens + 1, mode=args.perturb_mode, seed=seed,
                                                    progress=progress)
            curves[method], stats[method] = sentence_scores(decoded.cpu(), references, target)
    rows = perturb_table(curves, stats, plausibility, args.bootstrap, seed)
    stem = os.path.join(run_dir, f"perturb_{args.split}_{args.level}" + ("_zero" if args.perturb_mode == "zero" else "")
                        + (f"_first{B}" if B < len(dataset) else "") + ("_" + "+".join(methods) if named else ""))
    clean = clean_score(curves, stats)
    means = mean_curves(curves, stats)
    written = write_perturb(stem, rows, means, args, B, clean)
    written.append(plot_curves(stem, means, rows, args, B))
    log(markdown_table(rows, args.level))
    log(clean)
    log(verdict(rows))
    for path in written:
        log(path)
    log(f"perturbation tests of {len(methods)} methods on {B} samples in {format_time(time.time() - start)}")


def clean_score(curves, stats):
    """What the unperturbed input scores (fraction 0, the same for every method)."""
    c = next(iter(curves.values()))
    if not stats:
        return (f"clean input: {100 * float(c[:, 0, 0].mean()):.2f}% of the explained tokens are the teacher-forced "
                f"model's first choice (mean over samples)")
    bleu = float(sa.bleu_from_statistics(next(iter(stats.values()))[:, 0, 0].sum(0).numpy()))
    return f"clean input: greedy decoding BLEU-4 {bleu:.2f} against the reference"


def plausibility_of(data, data_path, methods):
    """{method: (pointing-game hits, relevance mass in the segment)} over the gloss occurrences with a true
    segment and a token that realises them, and 'sample': each occurrence's sample; {} without alignments."""
    alignments, links = segment_sources(data, data_path)
    if not alignments:
        return {}
    meta = data["meta"]
    out, sample = {m: ([], []) for m in methods}, []
    for b, s in enumerate(data["samples"]):
        segments = token_segments(s, alignments.get(s["id"], []), meta["data_config"]["subsample"], meta["target"],
                                  links)
        sample += [b] * len(segments)
        for m in methods:
            out[m][0].extend(explain.pointing_game(s["relevance"][m], segments))
            out[m][1].extend(explain.segment_mass(s["relevance"][m], segments))
    tensor = lambda v: torch.tensor(v, dtype=torch.float64)
    return dict({m: (tensor(h), tensor(v)) for m, (h, v) in out.items()}, sample=torch.tensor(sample, dtype=torch.long))


def perturb_table(curves, stats, plausibility, resamples, seed):
    """One row per method: each measure as (value, low, high) with a 95% bootstrap interval over the samples,
    and the tests on which it beats random: where the interval of its difference to random (paired: every
    method sees the same resamples) excludes 0 on the better side. AUCs are means over samples; BLEU is a
    corpus score and plausibility a share of gloss occurrences, recomputed on each resample."""
    AUC = {m: explain.auc(c) for m, c in curves.items()}                   # (B, 2) per sample
    B = len(next(iter(curves.values())))
    interval = lambda statistic: explain.bootstrap(statistic, B, resamples, seed=seed)
    mean = lambda values: (lambda w: w @ values / B)

    def corpus_bleu(s, d):                                                  # s (B, 2, P, 10) statistics
        def statistic(w):
            summed = (w @ s.reshape(B, -1)).reshape(len(w), *s.shape[1:])
            return explain.auc(sa.bleu_from_statistics(summed.numpy())[:, d] / 100)
        return statistic

    def share(values):                                                      # over occurrences, samples drawn
        occurrence = plausibility["sample"]
        return lambda w: (w[:, occurrence] @ values) / w[:, occurrence].sum(-1).clamp(min=1)

    def beats(statistic, random_statistic, lower_is_better):
        _, low, high = interval(lambda w: statistic(w) - random_statistic(w))
        return high < 0 if lower_is_better else low > 0

    rows = []
    for m in curves:
        row, better = dict(method=m), []
        for d, direction in enumerate(explain.DIRECTIONS):
            row[direction] = interval(mean(AUC[m][:, d]))
            if beats(mean(AUC[m][:, d]), mean(AUC["random"][:, d]), d == 0):
                better.append(direction)
            if stats:
                row[f"bleu_{direction}"] = interval(corpus_bleu(stats[m], d))
                if beats(corpus_bleu(stats[m], d), corpus_bleu(stats["random"], d), d == 0):
                    better.append(f"BLEU {direction}")
        if plausibility:
            (hits, mass), (random_hits, _) = plausibility[m], plausibility["random"]
            row["occurrences"] = len(hits)
            if len(hits):
                row["pointing"] = interval(share(100 * hits))
                row["mass"] = interval(share(100 * mass))
                if beats(share(hits), share(random_hits), False):
                    better.append("pointing")
        row["beats_random"] = better if m != "random" else None
        rows.append(row)
    return rows


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


def verdict(rows):
    """Which methods beat random on both perturbation tests, and on plausibility."""
    both = [r["method"] for r in rows if r["beats_random"] and {"positive", "negative"} <= set(r["beats_random"])]
    plausible = [r["method"] for r in rows if r["beats_random"] and "pointing" in r["beats_random"]]
    text = "beat random on both perturbation tests (paired 95% bootstrap): " + (", ".join(both) or "none")
    if "pointing" in rows[0]:
        text += "\nbeat random on the pointing game: " + (", ".join(plausible) or "none")
    return text


def mean_curves(curves, stats):
    """{method: {'score': (2, P), and at sentence level 'bleu4': (2, P)}}: the mean score per direction and
    fraction over samples, and the corpus BLEU-4, as the curves CSV and the figure show them."""
    means = {m: dict(score=c.mean(0).numpy()) for m, c in curves.items()}
    for m, s in stats.items():
        means[m]["bleu4"] = sa.bleu_from_statistics(s.sum(0).numpy())
    return means


def write_perturb(stem, rows, means, args, count, clean):
    """The table as CSV and Markdown, and the mean curves as CSV."""
    columns = table_columns(rows, args.level)
    header = ["method"] + [f"{k}{suffix}" for k, _ in columns for suffix in ("", "_low", "_high")]
    header += ["occurrences"] * ("occurrences" in rows[0]) + ["beats_random"]

    def table(f):
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for r in rows:
            values = [f"{v:.4f}" for k, _ in columns for v in r.get(k, (float("nan"),) * 3)]
            w.writerow([r["method"]] + values + [r["occurrences"]] * ("occurrences" in r)
                       + ["control" if r["beats_random"] is None else ";".join(r["beats_random"])])

    def markdown(f):
        f.write(f"# Perturbation tests: {args.level} level, {count} {args.split} samples, frames removed by "
                f"{'the key mask' if args.perturb_mode == 'mask' else 'zeroing'}\n\n"
                "AUC of the score against the fraction of frames removed (0 to 0.9, x 100, so 90 at most), the "
                "mean over samples (BLEU: of the corpus score); plausibility over gloss occurrences. Brackets: 95% "
                f"bootstrap interval over the {count} samples.\n\n")
        f.write(markdown_table(rows, args.level) + "\n\n" + clean + "\n\n" + verdict(rows) + "\n")

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
        sa.atomic_write(path, lambda f: f.write(buffer.getvalue().encode("utf-8")))
        written.append(path)
    return written


def plot_curves(stem, means, rows, args, count):
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
        ylabel = ("token still ranked first" if args.level == "token" else "token accuracy vs clean decoding")
        ax.set_ylabel(ylabel if what == "score" else "BLEU-4 vs reference")
        ax.set_xlabel(f"frames removed ({'most' if d == 0 else 'least'} relevant first), %")
        ax.set_xlim(0, 90)
        ax.set_ylim(0, 1.02 if what == "score" else 100)
        ax.set_title(f"{direction} perturbation ({'lower' if d == 0 else 'higher'} AUC is better)", fontsize=10)
        ax.legend(fontsize=7, title="method (AUC)", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(f"Perturbation tests, {args.level} level: {count} {args.split} samples, frames removed by "
                 f"{'the key mask' if args.perturb_mode == 'mask' else 'zeroing'}", fontsize=11)
    path = f"{stem}.{args.format}"
    sa.atomic_write(path, lambda f: fig.savefig(f, format=args.format, bbox_inches="tight"))
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

class Number:
    """An argparse type for a numeric option: `kind` (int or float), finite, at least `low` (above it when
    `open_low`) and at most `high`; a value out of range is refused before any work is done."""

    def __init__(self, kind, low=None, high=None, open_low=False):
        self.kind, self.low, self.high, self.open_low = kind, low, high, open_low
        self.__name__ = kind.__name__                      # argparse names the type in its messages

    def __call__(self, text):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if self.kind is int else 'a number'}")
        if not math.isfinite(value) or (self.low is not None and (value <= self.low if self.open_low
                                                                  else value < self.low)) \
                or (self.high is not None and value > self.high):
            raise argparse.ArgumentTypeError(f"{text} is not {self.describe()}")
        return value

    def describe(self):
        low = "" if self.low is None else f"{'>' if self.open_low else '>='} {self.low}"
        if self.high is None:
            return f"{'an integer' if self.kind is int else 'a number'} {low}"
        return f"in {self.low} .. {self.high}"


COUNT = Number(int, 1)                      # epochs, batch sizes, layers, beams, sample limits
INDEX = Number(int, 0)                      # a sample index, a patience
WEIGHT = Number(float, 0.0)                 # loss weights
SEED = Number(int, 0, 2 ** 63 - 1)


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block): `run.py train: error: argument --epochs: ...`."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser():
    p = Parser(description="Interpretable sign language translation: train, evaluate, explain.")
    sub = p.add_subparsers(dest="mode", required=True)
    shared = Parser(add_help=False)
    shared.add_argument("--data", help=f"dataset folder or signjoey prefix (default: {SYNTHETIC}, generated if missing)")
    shared.add_argument("--format", choices=("gsl", "signjoey"), default="gsl", help="dataset layout (DATA.md 1 or 2)")
    shared.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to compute")
    shared.add_argument("--skip-bad", action="store_true", help="skip bad samples with a warning instead of stopping")
    shared.add_argument("--seed", type=SEED, help="random seed (default 0)")

    t = sub.add_parser("train", parents=[shared], help="train a model (default: synthetic GSL)")
    t.add_argument("--out", help="run folder (default: runs/<time>-<data>-<preset>)")
    t.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint")
    t.add_argument("--preset", choices=sorted(PRESETS), default="default", help="configuration to start from")
    t.add_argument("--epochs", type=COUNT, help="number of training epochs")
    t.add_argument("--batch-size", type=COUNT, help="samples per batch")
    t.add_argument("--lr", type=Number(float, 0.0, open_low=True), help="peak learning rate")
    t.add_argument("--signcl", type=WEIGHT, help="weight of the SignCL loss on the encoder features (e.g. 0.01)")
    t.add_argument("--ctc-weight", type=WEIGHT, help="weight of the CTC gloss loss (0 disables the gloss head)")
    t.add_argument("--target", choices=("text", "gloss"), help="what the decoder writes")
    t.add_argument("--subsample", type=COUNT, help="keep one frame per chunk of this many")
    t.add_argument("--d-model", type=COUNT, help="transformer width")
    t.add_argument("--encoder-layers", type=COUNT, help="encoder depth")
    t.add_argument("--decoder-layers", type=COUNT, help="decoder depth")
    t.add_argument("--patience", type=INDEX, help="early stopping patience in epochs (0: off)")
    t.add_argument("--beam", type=COUNT, help="beam size of the final evaluation (1: greedy)")

    e = sub.add_parser("eval", parents=[shared], help="evaluate a trained run on a split")
    e.add_argument("run", nargs="?", help="run folder (default: the most recent under runs/)")
    e.add_argument("--split", choices=sa.SPLITS, default="test", help="split to evaluate")
    e.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint")
    e.add_argument("--beam", type=COUNT, help="beam size (default: the run's)")

    for name, helptext in (("extract", "decode a split and save attention, CTC posteriors and relevance"),
                           ("bench", "time batched explanations against the per-token loop")):
        x = sub.add_parser(name, parents=[shared], help=helptext)
        x.add_argument("run", nargs="?", help="run folder (default: the most recent under runs/)")
        x.add_argument("--split", choices=sa.SPLITS, default="test", help="split to explain")
        x.add_argument("--methods", default="all", help="comma-separated methods, or all")
        x.add_argument("--batch-size", type=COUNT, default=16, help="samples per batch")
        x.add_argument("--limit", type=COUNT, default=20 if name == "bench" else None, help="first K samples only")
        if name == "extract":
            x.add_argument("--beam", type=COUNT, help="beam size of the decoding (default: the run's)")
        else:
            x.add_argument("--perturb", action="store_true",
                           help="time the token-level perturbation tests instead, against one forward per removal")
    figures = Parser(add_help=False)       # the modes that draw: --format is the figure type
    figures.add_argument("run", nargs="?", help="run folder (default: the most recent under runs/)")
    figures.add_argument("--data", help="dataset folder (default: the run's)")
    figures.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to compute")
    figures.add_argument("--skip-bad", action="store_true", help="skip bad samples with a warning when explaining")
    figures.add_argument("--split", choices=sa.SPLITS, default="test", help="split to draw or evaluate")
    figures.add_argument("--format", dest="format", choices=("png", "pdf", "svg"), default="png", help="figure file type")
    pl = sub.add_parser("plot", parents=[figures],
                        help="draw the SignAttention figures from the extraction (made if missing)")
    pl.add_argument("--sample", type=INDEX, default=0, help="index of the sample in the extraction")
    pl.add_argument("--all", action="store_true", help="the global analyses over the whole split")
    pl.add_argument("--animate", action="store_true", help="also a GIF of the skeleton with attention bars")
    pe = sub.add_parser("perturb", parents=[figures],
                        help="perturbation tests (faithfulness) and pointing game (plausibility)")
    pe.add_argument("--methods", default="all", help="comma-separated methods, or all (random is always added)")
    pe.add_argument("--level", choices=("token", "sentence"), default="token",
                    help="token: is each teacher-forced token still first; sentence: greedy decoding, accuracy, BLEU")
    pe.add_argument("--perturb-mode", choices=explain.MODES, default="mask",
                    help="mask: removed frames leave the encoder's key mask; zero: they are replaced by zeros")
    pe.add_argument("--limit", type=COUNT, help="first K samples only (a quick table)")
    pe.add_argument("--bootstrap", type=Number(int, 10, 100000), default=1000, help="bootstrap resamples of the 95%% intervals")
    pe.add_argument("--seed", type=SEED, help="seed of the tie-breaking and the bootstrap (default 0)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        {"train": train, "eval": eval_mode, "extract": extract, "bench": bench, "plot": plot,
         "perturb": perturb}[args.mode](args)
    except sa.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
