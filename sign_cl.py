"""SignCL (Ye et al., NeurIPS 2024): a frame-level contrastive loss, and the representation density (SDR).

SignCL pulls each frame's feature towards its temporal neighbours and pushes it away from frames further
than `margin` away, so that frames of different signs stop crowding together. METHODS.md section SignCL
gives the reference behaviour; this version is vectorised over anchors, seedable, honours the padding
mask, and is meant to be back-propagated (total loss = task loss + lambda * SignCL).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def signcl_margin(num_frames, text_length):
    """The reference's negative-sampling margin: min(20, max(10, int(num_frames // text_length * 2.3)))."""
    return min(20, max(10, int(num_frames // max(text_length, 1) * 2.3)))


class SignCL(nn.Module):
    """Per anchor frame i of a sequence of L real frames (the reference's range 1 <= i <= L - 3):
    positives are the `pos_samples` nearest frames (i - 1 and i + 1 for 2), negatives `neg_samples` frames
    drawn without replacement from 2 <= j <= L - 3 with |j - i| > margin. With d the L1 distance (or L2),

        loss_i = mean_pos softplus(d_pos - max_distance) + mean_neg softplus(max_distance - d_neg)

    averaged over the anchors that have at least one negative. An anchor without one contributes nothing;
    a batch without any gives 0 (never NaN)."""

    def __init__(self, max_distance=32.0, pos_samples=2, neg_samples=4, distance="l1"):
        super().__init__()
        if distance not in ("l1", "l2"):
            raise ValueError(f"distance must be 'l1' or 'l2', not {distance!r}")
        self.max_distance, self.pos_samples, self.neg_samples = max_distance, pos_samples, neg_samples
        self.distance = distance

    def _dist(self, a, b):
        diff = a - b
        return diff.abs().sum(-1) if self.distance == "l1" else diff.pow(2).sum(-1).clamp_min(1e-12).sqrt()

    def forward(self, features, margin, mask=None, generator=None):
        """features (B, T, C); margin an int or a (B,) tensor; mask (B, T) bool, True = real frame
        (real frames first); generator a torch.Generator on the CPU for the sampling."""
        B, T, C = features.shape
        dev = features.device
        lengths = mask.sum(1).to(dev) if mask is not None else torch.full((B,), T, device=dev)
        margin = torch.as_tensor(margin, device=dev).expand(B)
        i = torch.arange(T, device=dev)
        anchor_ok = (i[None] >= 1) & (i[None] <= lengths[:, None] - 3)                  # (B, T)

        # positives: the nearest offsets, +-1 first; random order within a distance for odd counts
        reach = (self.pos_samples + 1) // 2
        offsets = torch.tensor([o for r in range(1, reach + 1) for o in (-r, r)], device=dev)
        order = torch.rand(B, T, len(offsets), generator=generator).to(dev)
        order = order + torch.arange(reach, device=dev).repeat_interleave(2)            # nearer ranks first
        pos_idx = i[None, :, None] + offsets[order.argsort(-1)]                          # (B, T, 2 * reach)
        pos_ok = (pos_idx >= 0) & (pos_idx < lengths[:, None, None])
        pos_rank = pos_ok.long().cumsum(-1)
        pos_ok = pos_ok & (pos_rank <= self.pos_samples)
        pos_idx = pos_idx.clamp(0, T - 1)

        # negatives: random scores over the allowed frames, the top neg_samples of them
        j = torch.arange(T, device=dev)
        allowed = ((j[None, None] >= 2) & (j[None, None] <= lengths[:, None, None] - 3)
                   & ((j[None, None] - i[None, :, None]).abs() > margin[:, None, None]))  # (B, T, T)
        k = min(self.neg_samples, T)
        score = torch.rand(B, T, T, generator=generator).to(dev).masked_fill(~allowed, -1.0)
        top, neg_idx = score.topk(k, dim=-1)                                             # (B, T, k)
        neg_ok = top >= 0

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
    """Sign density ratio in %: mean over classes c of (mean intra-class pairwise Euclidean distance) /
    (mean distance from class c's features to every other class's). Lower = better separated.
    Classes with a single feature have no intra-class distance and are left out."""
    features, labels = features.double(), torch.as_tensor(labels)
    dist = torch.cdist(features, features)
    ratios = []
    for c in labels.unique():
        inside = labels == c
        n = int(inside.sum())
        if n < 2 or bool(inside.all()):
            continue
        intra = dist[inside][:, inside].sum() / (n * (n - 1))
        inter = dist[inside][:, ~inside].mean()
        ratios.append(intra / inter)
    if not ratios:
        return float("nan")
    return 100.0 * float(torch.stack(ratios).mean())


def ctc_viterbi(log_probs, target, blank=0):
    """Most likely CTC path of `target` (list of ids) through log_probs (T, V): the label of every frame
    (blank frames get `blank`). Used to label frames for SDR where no alignment is given."""
    T = log_probs.shape[0]
    states = [blank]
    for t in target:
        states += [t, blank]
    S = len(states)
    lp = log_probs[:, states].double()                                     # (T, S)
    labels = torch.tensor(states)
    # a label state may be entered from two back when the label differs from the one before it
    skip = torch.zeros(S, dtype=torch.bool)
    skip[2:] = (labels[2:] != blank) & (labels[2:] != labels[:-2])
    score = torch.full((S,), float("-inf"), dtype=torch.float64)
    score[0] = lp[0, 0]
    if S > 1:
        score[1] = lp[0, 1]
    back = torch.zeros(T, S, dtype=torch.long)
    idx = torch.arange(S)
    for t in range(1, T):
        stay = score
        step = torch.cat([torch.tensor([float("-inf")], dtype=torch.float64), score[:-1]])
        jump = torch.cat([torch.tensor([float("-inf")] * 2, dtype=torch.float64), score[:-2]])[:S]
        jump = torch.where(skip, jump, torch.tensor(float("-inf"), dtype=torch.float64))
        choice = torch.stack([stay, step, jump])                            # (3, S)
        best, arg = choice.max(0)
        back[t] = idx - arg
        score = best + lp[t]
    end = S - 1 if S == 1 or score[S - 1] >= score[S - 2] else S - 2
    path = [end]
    for t in range(T - 1, 0, -1):
        path.append(int(back[t, path[-1]]))
    return labels[torch.tensor(path[::-1])].tolist()
