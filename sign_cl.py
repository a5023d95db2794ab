"""SignCL (Ye et al., NeurIPS 2024): a frame-level contrastive loss, and the representation density (SDR).

SignCL pulls each frame's feature towards its temporal neighbours and pushes it away from frames further
than a margin away, so that frames of different signs stop crowding together. Reference: JinhuiYE/SignCL
(`SignCL.py`, and the margin of its training scripts `examples/GFSLT-VLP/train_*_SignCL.py`). This version
is vectorised over anchors, seedable, honours each sample's length, and is meant to be back-propagated
(total loss = task loss + lambda * SignCL, as signattention.training_loss adds it; the released pretraining
script computes the loss without back-propagating it). This module needs torch only.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def signcl_margin(num_frames, words):
    """Negatives lie more than this many frames from the anchor (the paper's Eq. 4 and the released training
    scripts): twice max(10, frames per word x 2.3, the Zipf factor), capped at (frames - 30) / 2 so that a
    short clip keeps frames to draw negatives from:

        min(2 * max(10, int(num_frames / words * 2.3)), max(1, (num_frames - 30) // 2))

    `words` is the number of words of the sample's text (its tokens without EOS). Departures: per sample (the
    scripts use the padded batch length and the tokenizer's length with special tokens, and write
    `(T // L + 1) * 2.3`; the paper writes T / L); the cap never goes below 1. The repository README's
    `min(20, max(10, ...))` is half of what the paper and every script use, and is not followed."""
    return min(2 * max(10, int(num_frames / max(words, 1) * 2.3)), max(1, (num_frames - 30) // 2))


def batch_margins(lengths, tgt_out, pad_id):
    """signcl_margin of each sample of a batch: (B,) long, from its frames (`lengths` (B,): up to its last real
    one, signattention.frame_lengths) and its words (its output tokens without EOS)."""
    words = (tgt_out != pad_id).sum(1) - 1
    return torch.tensor([signcl_margin(int(f), int(n)) for f, n in zip(lengths, words)])


class SignCL(nn.Module):
    """Per anchor frame i of a sequence of L real frames (the reference's range 1 <= i <= L - 3):
    positives are up to `pos_samples` of the frames i - 1 and i + 1 (in random order; never farther, as in
    the reference and the paper's Eq. 4, so more than 2 acts as 2), negatives `neg_samples` frames drawn
    without replacement from 2 <= j <= L - 3 with |j - i| > margin. With d the distance between features,

        loss_i = mean_pos softplus(d_pos - max_distance) + mean_neg softplus(max_distance - d_neg)

    averaged over the anchors that have at least one negative. An anchor without one contributes nothing;
    a batch without any gives 0 (never NaN).

    `distance="l1"` (default) is the reference code's L1 distance. `distance="l2"` puts the Euclidean distance
    into the same softplus loss; it is not the paper's Eq. 5, which is a hinge of another form,
    d_pos + max(0, m - d_neg) with m = 64, and is not offered here.

    Departures from the reference, each deliberate: each sample's length is honoured (the reference reads padded
    frames as frames); the sampling comes from a seedable generator, vectorised; the loss is divided once by
    the number of contributing anchors (the reference divides by the batch size twice); each sample has its
    own margin."""

    def __init__(self, max_distance=32.0, pos_samples=2, neg_samples=4, distance="l1"):
        super().__init__()
        if distance not in ("l1", "l2"):
            raise ValueError(f"distance must be 'l1' or 'l2', not {distance!r}")
        self.max_distance, self.pos_samples, self.neg_samples = max_distance, pos_samples, neg_samples
        self.distance = distance

    def _dist(self, a, b):
        diff = a - b
        return diff.abs().sum(-1) if self.distance == "l1" else diff.pow(2).sum(-1).clamp_min(1e-12).sqrt()

    def sample(self, lengths, margin, T, generator=None):
        """The frames each anchor is compared with, for sequences of `lengths` real frames padded to T:
        (anchor_ok (B, T), pos_idx, pos_ok (B, T, 2), neg_idx, neg_ok (B, T, k)); an index whose `ok` is
        False is a placeholder."""
        B, dev = len(lengths), lengths.device
        margin = torch.as_tensor(margin, device=dev).expand(B)
        i = torch.arange(T, device=dev)
        anchor_ok = (i[None] >= 1) & (i[None] <= lengths[:, None] - 3)                  # (B, T)

        # positives: i - 1 and i + 1 in random order, the first pos_samples of them that exist
        offsets = torch.tensor([-1, 1], device=dev)
        order = torch.rand(B, T, 2, generator=generator).to(dev)
        pos_idx = i[None, :, None] + offsets[order.argsort(-1)]                          # (B, T, 2)
        pos_ok = (pos_idx >= 0) & (pos_idx < lengths[:, None, None])
        pos_ok = pos_ok & (pos_ok.long().cumsum(-1) <= self.pos_samples)
        pos_idx = pos_idx.clamp(0, T - 1)

        # negatives: random scores over the allowed frames, the top neg_samples of them
        j = torch.arange(T, device=dev)
        allowed = ((j[None, None] >= 2) & (j[None, None] <= lengths[:, None, None] - 3)
                   & ((j[None, None] - i[None, :, None]).abs() > margin[:, None, None]))  # (B, T, T)
        k = min(self.neg_samples, T)
        score = torch.rand(B, T, T, generator=generator).to(dev).masked_fill(~allowed, -1.0)
        top, neg_idx = score.topk(k, dim=-1)                                             # (B, T, k)
        return anchor_ok, pos_idx, pos_ok, neg_idx, top >= 0

    def forward(self, features, margin, lengths=None, generator=None):
        """features (B, T, C); margin an int or a (B,) tensor (see signcl_margin); lengths (B,) each sample's
        frames, up to its last real one (signattention.frame_lengths of the padding mask; default: all T);
        generator a torch.Generator on the CPU for the sampling."""
        B, T, C = features.shape
        dev = features.device
        lengths = torch.as_tensor(lengths, device=dev) if lengths is not None else torch.full((B,), T, device=dev)
        anchor_ok, pos_idx, pos_ok, neg_idx, neg_ok = self.sample(lengths, margin, T, generator)
        contributing = anchor_ok & neg_ok.any(-1) & pos_ok.any(-1)
        if not contributing.any():
            return features.sum() * 0.0
        gather = lambda idx: features[torch.arange(B, device=dev)[:, None, None], idx]   # (B, T, n, C)
        anchor = features[:, :, None, :]
        d_pos = self._dist(anchor, gather(pos_idx))
        d_neg = self._dist(anchor, gather(neg_idx))
        pos_term = (F.softplus(d_pos - self.max_distance) * pos_ok).sum(-1) / pos_ok.sum(-1).clamp_min(1)
        neg_term = (F.softplus(self.max_distance - d_neg) * neg_ok).sum(-1) / neg_ok.sum(-1).clamp_min(1)
        per_anchor = (pos_term + neg_term) * contributing
        return per_anchor.sum() / contributing.sum()


def sdr(features, labels):
    """Sign density ratio in % (the SignCL paper's Eqs. 1-3): for each class c,

        D(c) = mean pairwise Euclidean distance between c's features,
        D(c, d) = mean distance between the features of c and those of d,
        ratio(c) = D(c) / mean over the other classes d of D(c, d),

    and SDR = 100 x the mean of ratio(c) over classes. The denominator averages over classes, each weighing
    the same however many instances it has (not over instances, which would let frequent classes dominate).
    A class with a single feature has no D(c) and is left out of the mean, but counts as another class for
    the others; so is a class at distance 0 from every other. NaN where no class is left (fewer than two
    classes, or none with two features). Lower = better separated."""
    features, labels = features.double(), torch.as_tensor(labels)
    classes, index = labels.unique(return_inverse=True)
    if len(classes) < 2:
        return float("nan")
    dist = torch.cdist(features, features)
    one_hot = F.one_hot(index, len(classes)).double()                            # (N, K)
    counts = one_hot.sum(0)
    between = one_hot.T @ dist @ one_hot                                         # (K, K) summed distances
    mean = between / (counts[:, None] * counts[None, :])                         # D(c, d); D(c) below
    intra = between.diagonal() / (counts * (counts - 1)).clamp(min=1)
    others = (mean.sum(1) - mean.diagonal()) / (len(classes) - 1)
    ratios = (intra / others.clamp(min=1e-300))[(counts >= 2) & (others > 0)]
    if not len(ratios):
        return float("nan")
    return 100.0 * float(ratios.mean())
