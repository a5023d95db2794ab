"""Explanations of a sign language translation model: which frames mattered for each output token.

    relevance = explain(model, src, src_mask, out_tokens, method="generic")      # (B, n, T)

Row t of a sample's relevance is how much each frame mattered for the score s_t of out_tokens[:, t], given
the frames and the tokens before it (the decoder input is BOS followed by out_tokens[:, :-1]). Padded frames
and padded rows are 0; signed methods stay signed. Each method's docstring says what it computes and which
paper and reference code it follows; the table METHODS below maps names to functions, each a few lines over
two shared pieces written once:

- `_Pass`: one teacher-forced forward of each sample that keeps every attention map, and the gradients of
  each explained token's score (sample b, position t: a "copy" of the sample's maps indexed per token)
  from one backward per token position, batched (vmapped) over the positions, each serving every sample
  at once.
- `_Relprop`: LRP (Chefer et al., CVPR 2021 rules) walked backwards through the same model class that
  trains, from activations recorded by forward hooks.

Below the methods: what `python run.py extract` keeps per sample (extract_batch); the analyses behind the
global figures (global_numbers, token_segments); the perturbation tests that ask whether a relevance is
faithful (token_perturbation, sentence_perturbation, auc, bootstrap), the table and verdicts built on them
(perturb_table, verdict), and plausibility against true gloss segments (plausibility). Last, the four
papers' claims (CLAIMS): each a measure on trained models (SignAttention's diagonality, contiguity and
reliance_trend; SignCL's SDR and BLEU; the perturbation AUCs), a Rule written before any number was seen,
and a two-stage bootstrap interval over the models and their samples (seed_bootstrap, measure_claim).
"""
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from signattention import (EOS, Vocabulary, beam_search, bleu_from_statistics, bleu_statistics, ctc_decode, decodable,
                           frame_lengths, greedy_decode, shift_right, sinusoid)

METHODS = ("attention", "rollout", "gradcam", "saliency", "input_x_gradient", "integrated_gradients", "lrp",
           "partial_lrp", "transformer_attribution", "generic", "dsmi", "dsmi_grad", "dsmi_grad_attn", "random")
SIGNED = {"input_x_gradient", "integrated_gradients", "lrp"}
# the methods that also give relevance (n, n) over the decoder inputs (explain's return_tokens)
TOKEN_RELEVANCE = ("attention", "lrp", "transformer_attribution", "generic")
# LRP's residual rule divides by a + b, which can nearly cancel element-wise (relevance sums then grow a
# hundredfold inside one add): in float32 the rounding of the forward pass decides these methods' maps for
# about a fifth of the tokens of the trained default model. They are computed in float64.
FLOAT64 = {"lrp", "partial_lrp", "transformer_attribution"}
PER_TOKEN = ("gradcam", "saliency", "input_x_gradient", "integrated_gradients", "lrp", "partial_lrp",
             "transformer_attribution", "generic", "dsmi_grad", "dsmi_grad_attn")   # each token its own pass
GROUPS = ("encoder_self", "decoder_self", "decoder_cross")
DEFAULTS = dict(layer=-1, score="logit", steps=64, transpose=True, seed=0, chunk=256, eps=1e-9)


def explain(model, src, src_mask, out_tokens, method="generic", return_tokens=False, rows=None, **options):
    """Relevance (B, n, T) of each frame for each output token; with return_tokens, also (B, n, n) relevance
    over the decoder inputs (BOS, y_1, .., y_{n-1}) for the methods that give one, else None.

    rows (B, n) bool picks the tokens to explain (default: every non-padding token); other rows are 0.
    Options (DEFAULTS): layer=-1 (attention, gradcam, partial_lrp: which decoder layer),
    score='logit' or 'logprob', steps=64 (integrated_gradients), transpose=True (generic's cross rule as the
    reference code), seed=0 (random), chunk=256 (tokens explained per batched pass), eps=1e-9 (LRP).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))}; options are {', '.join(DEFAULTS)}")
    opts = {**DEFAULTS, **options}
    if opts["score"] not in ("logit", "logprob"):
        raise ValueError("score must be 'logit' or 'logprob'")
    B, n = out_tokens.shape
    T = src.shape[1]
    frames = torch.zeros(B, n, T, device=src.device)
    tokens = torch.zeros(B, n, n, device=src.device)
    rows = out_tokens != model.pad_id if rows is None else rows & (out_tokens != model.pad_id)
    if method == "random":
        g = torch.Generator().manual_seed(opts["seed"])
        frames = torch.rand(B, n, T, generator=g).to(src.device) * src_mask[:, None] * rows[..., None]
        return (frames, None) if return_tokens else frames
    tgt_in = shift_right(out_tokens, model.bos_id)
    b_idx, t_idx = rows.nonzero(as_tuple=True)                       # ordered by sample, then token
    if method in FLOAT64 and src.dtype != torch.float64:
        with torch.random.fork_rng(devices=[]):                        # building the twin draws no numbers
            twin = type(model)(model.cfg).to(src.device)
        twin.load_state_dict(model.state_dict())
        model, src = twin.double(), src.double()
    modules = [m for group in model.attention_modules().values() for m in group]
    saved = [(m.keep, m.attention) for m in modules], [layer.branches for layer in model.decoder]
    training = model.training
    model.eval()
    try:
        for copy_sample, copy_position in _chunks(b_idx, t_idx, opts["chunk"]):
            ctx = _Context(model, src, src_mask, tgt_in, out_tokens, copy_sample, copy_position, opts)
            f, tok = _FUNCTIONS[method](ctx)
            frames[copy_sample, copy_position, :f.shape[1]] = f.float() * src_mask[copy_sample, :f.shape[1]]
            if tok is not None:
                tokens[copy_sample, copy_position, :tok.shape[1]] = tok.float()
    finally:                                                           # the model as the caller left it
        for m, (keep, attention) in zip(modules, saved[0]):
            m.keep, m.attention = keep, attention
        for layer, branches in zip(model.decoder, saved[1]):
            layer.branches = branches
        model.train(training)
    return (frames, tokens if method in TOKEN_RELEVANCE else None) if return_tokens else frames


def extract_batch(model, dataset, indices, methods, beam=1, alpha=1.0, device="cpu", seconds=None):
    """What `python run.py extract` keeps of samples `indices` of a SignDataset, one dict per sample: its id
    and references, the beam search's prediction and explained tokens (with EOS), the number of frames, every
    attention map teacher-forced on the prediction (float16: encoder_self (L, h, T, T), decoder_self
    (L, h, n, n), decoder_cross (L, h, n, T)), the CTC gloss posteriors (T, V), the norms of each decoder
    step's self- and cross-attention outputs (branch_norms), and per method the relevance (n, T) and, where
    the method gives one, the relevance over the decoder inputs (n, n). `seconds` ({method: s}) accumulates
    each method's time."""
    batch = dataset.batch(indices)
    src, mask = batch["src"].to(device), batch["src_mask"].to(device)
    target = dataset.target_vocab
    with torch.no_grad():
        memory = model.encode(src, mask)
        out = beam_search(model, src, mask, beam, alpha, dataset.cfg.max_tokens + 1, memory)
        posteriors = model.gloss_logits(memory).softmax(-1)
        model.keep_attention(True)
        model(src, mask, shift_right(out, model.bos_id))
        maps = {k: torch.stack([m.attention for m in v], 1) for k, v in model.attention_modules().items()}
        branches = [layer.branches for layer in model.decoder]
        model.keep_attention(False)
    relevance = {}
    for method in methods:
        tic = time.time()
        relevance[method] = explain(model, src, mask, out, method, return_tokens=True)
        if seconds is not None:
            seconds[method] = seconds.get(method, 0.0) + time.time() - tic
    ctc = ctc_decode(posteriors.log(), mask)
    lengths = frame_lengths(mask)
    half = lambda x: x.detach().to("cpu", torch.float16).clone()
    samples = []
    for b, i in enumerate(indices):
        r = dataset.records[i]
        T, n = int(lengths[b]), int((out[b] != model.pad_id).sum())
        samples.append(dict(
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
                             if tok is not None}))
    return samples


def _chunks(b_idx, t_idx, size, slack=1.25):
    """Groups of whole samples with about `size` tokens in all. Samples are taken longest output first and
    a group closes when padding every sample to the group's longest output would cost more than `slack`
    times its real tokens: the batched backward runs once per token position for every sample."""
    counts = torch.bincount(b_idx)
    order = sorted(counts.nonzero().flatten().tolist(), key=lambda b: -int(counts[b]))
    group, longest, tokens = [], 0, 0
    for b in order + [None]:
        n_b = 0 if b is None else int(counts[b])
        full = tokens + n_b > size or (len(group) + 1) * max(longest, n_b) > slack * (tokens + n_b)
        if group and (b is None or full):
            pick = torch.isin(b_idx, torch.tensor(group, device=b_idx.device))
            yield b_idx[pick], t_idx[pick]
            group, longest, tokens = [], 0, 0
        if b is not None:
            group.append(b)
            longest, tokens = max(longest, n_b), tokens + n_b


# ----------------------------------------------------------------------------------------------------
# The shared teacher-forced pass
# ----------------------------------------------------------------------------------------------------

class _Context:
    """The tokens of one chunk: copy i explains token copy_position[i] of sample copy_sample[i]. Each sample
    is forwarded once; frames and decoder inputs are trimmed to what the chunk needs (later frames are
    padding, later tokens are not seen by the causal decoder)."""

    def __init__(self, model, src, src_mask, tgt_in, out_tokens, copy_sample, copy_position, opts):
        self.model, self.opts, self.position = model, opts, copy_position
        samples, self.inverse = torch.unique(copy_sample, return_inverse=True)
        T = int(src_mask[samples].any(0).nonzero().max()) + 1         # up to the last real frame
        n = int(copy_position.max()) + 1
        self.src, self.mask = src[samples, :T], src_mask[samples, :T]         # (S, T, F), (S, T) per sample
        self.tgt_in, self.out = tgt_in[samples, :n], out_tokens[samples, :n]
        self.target = out_tokens[copy_sample, copy_position]                   # (N,) per copy
        self.N, self.T, self.n = len(copy_sample), T, n
        self.rows = torch.arange(self.N, device=src.device)

    def run(self, grads=(), src=None, tape=False, maps=GROUPS, layers=False):
        """One forward of the chunk's samples with attention kept. `grads` names what to differentiate each
        copy's score by: 'input' and/or attention groups ('encoder_self', 'decoder_self', 'decoder_cross');
        all copies' gradients come from one backward batched over token positions. `tape` records every
        module's inputs and output (for LRP); `maps` names the attention groups the method reads; `layers`
        keeps each encoder layer's output as the model reads it next (see _spectral). Returns a _Pass whose
        tensors are per copy (the layer outputs and the memory per sample)."""
        model = self.model.keep_attention(True)
        wanted_maps = set(maps) | {g for g in grads if g != "input"}
        x = self.src if src is None else src
        if "input" in grads:
            x = x.detach().requires_grad_(True)
        records, hooks = {}, []
        if tape:
            for module in model.modules():
                hooks.append(module.register_forward_hook(
                    lambda m, args, out: records.__setitem__(m, (args, out))))
        outputs = []
        if layers:
            for layer in model.encoder:
                hooks.append(layer.register_forward_hook(lambda m, args, out: outputs.append(out.detach())))
        try:
            with torch.set_grad_enabled(bool(grads)):
                memory = model.encode(x, self.mask)
                logits = model.decode(memory, self.mask, self.tgt_in)
        finally:
            for h in hooks:
                h.remove()
        maps = {k: [m.attention for m in v] for k, v in model.attention_modules().items()}
        copy = lambda t: t[self.inverse] if t.dim() and t.shape[0] == len(self.src) else t   # masks broadcast
        p = _Pass(maps={k: [copy(a.detach()) for a in maps[k]] for k in maps if k in wanted_maps},
                  src=copy(x.detach()),
                  mask=copy(self.mask), memory=memory.detach(), tape=records, copy=copy)
        if layers:
            with torch.no_grad():
                p.layers = [model.encoder[l + 1].norm1(out) if model.encoder[l + 1].norm_first else out
                            for l, out in enumerate(outputs[:-1])] + [model.encoder_norm(outputs[-1])]
        if grads:
            step = logits.log_softmax(-1) if self.opts["score"] == "logprob" else logits
            score = step.gather(-1, self.out[..., None])[..., 0]                   # (S, n)
            wanted = ([x] if "input" in grads else []) + [a for g in grads if g != "input" for a in maps[g]]
            got = _per_token_grads(score, wanted, self.inverse, self.position)
            if "input" in grads:
                p.input_grad, got = got[0], got[1:]
            for g in (g for g in grads if g != "input"):
                p.grads[g], got = got[:len(maps[g])], got[len(maps[g]):]
        return p


def _per_token_grads(score, wanted, inverse, copy_position):
    """d score[inverse[i], copy_position[i]] / d wanted, for every copy i: one backward per distinct token
    position, batched (vmapped) over the positions; each position's backward serves every sample at once."""
    positions, slot = torch.unique(copy_position, return_inverse=True)
    cotangent = torch.zeros(len(positions), *score.shape, device=score.device)
    cotangent[slot, inverse, copy_position] = 1.0
    if len(positions) == 1:
        got = torch.autograd.grad(score, wanted, cotangent[0], allow_unused=True)
        got = [None if g is None else g[None] for g in got]
    else:
        got = torch.autograd.grad(score, wanted, cotangent, is_grads_batched=True, allow_unused=True)
    return [torch.zeros_like(w[inverse]) if g is None else g[slot, inverse] for w, g in zip(wanted, got)]


class _Pass:
    """What one forward of a chunk gives the methods: attention maps, input and mask per copy, the memory,
    the LRP tape, the encoder layers' outputs (per sample), and the requested gradients per copy."""

    def __init__(self, maps, src, mask, memory, tape, copy):
        self.maps, self.src, self.mask, self.memory, self.tape, self.copy = maps, src, mask, memory, tape, copy
        self.input_grad, self.grads, self.layers = None, {}, None


def _row(a, ctx):
    """Row copy_position[i] of copy i's map, averaged over heads: (N, h, q, k) -> (N, k)."""
    return a[ctx.rows, :, ctx.position].mean(1)


# ----------------------------------------------------------------------------------------------------
# Attention and gradient methods
# ----------------------------------------------------------------------------------------------------

def attention(ctx):
    """Raw attention: R[t] = mean_h A_cross[h, t, :] of one decoder layer (the last by default)."""
    p = ctx.run(maps=("decoder_cross", "decoder_self"))
    layer = ctx.opts["layer"]
    return _row(p.maps["decoder_cross"][layer], ctx), _row(p.maps["decoder_self"][layer], ctx)


def rollout(ctx):
    """Attention rollout (Abnar & Zuidema 2020): E = prod_l rownorm(mean_h A_enc_l + I); R[t] = (mean_h A_cross_L E)[t]."""
    p = ctx.run(maps=("encoder_self", "decoder_cross"))
    eye = torch.eye(ctx.T, device=ctx.src.device, dtype=ctx.src.dtype)
    E = eye.expand(ctx.N, ctx.T, ctx.T)
    for a in p.maps["encoder_self"]:
        a = a.mean(1) + eye
        E = (a / a.sum(-1, keepdim=True)) @ E
    return (_row(p.maps["decoder_cross"][-1], ctx)[:, None] @ E)[:, 0], None


def gradcam(ctx):
    """Grad-CAM on the last decoder cross-attention (Chefer's baseline): per head w_h = mean over the real
    frames of dA[h, t, :]; R[t] = (mean_h w_h A[h, t, :])^+."""
    p = ctx.run(grads=("decoder_cross",), maps=())
    layer = ctx.opts["layer"]
    a = p.maps["decoder_cross"][layer][ctx.rows, :, ctx.position]                 # (N, h, T)
    g = p.grads["decoder_cross"][layer][ctx.rows, :, ctx.position] * p.mask[:, None]     # a masked entry is 0 but
    w = g.sum(-1, keepdim=True) / p.mask.sum(1)[:, None, None]                    # its gradient need not be
    return (w * a).mean(1).clamp(min=0), None


def saliency(ctx):
    """Saliency: R[t, tau] = sum_f |ds_t / dx[tau, f]|."""
    p = ctx.run(grads=("input",), maps=())
    return p.input_grad.abs().sum(-1), None


def input_x_gradient(ctx):
    """Input x gradient: R[t, tau] = sum_f x[tau, f] ds_t / dx[tau, f]."""
    p = ctx.run(grads=("input",), maps=())
    return (p.src.detach() * p.input_grad).sum(-1), None


def integrated_gradients(ctx):
    """Integrated gradients (Sundararajan et al. 2017) from the all-zero baseline, the path integral taken
    by Gauss-Legendre quadrature with `steps` nodes on [0, 1]:
    R[t, tau] = sum_f x[tau, f] sum_i w_i ds_t/dx[tau, f] (alpha_i x); sum_tau R[t] ~ s_t(x) - s_t(0).
    ReLU switches along the path put kinks in the integrand, so the error falls about as 1 / steps^2."""
    nodes, weights = np.polynomial.legendre.leggauss(ctx.opts["steps"])
    total = 0.0
    for alpha, w in zip((nodes + 1) / 2, weights / 2):
        total = total + w * ctx.run(grads=("input",), src=ctx.src * float(alpha), maps=()).input_grad
    return (ctx.src[ctx.inverse] * total).sum(-1), None


def _aggregate(a, g):
    """mean_h (g * a)^+ : (N, h, q, k) -> (N, q, k)."""
    return (g * a).clamp(min=0).mean(1)


def _norm_rows(R):
    """(R - I) / rowsum(R - I) + I, rows whose sum is 0 staying I."""
    eye = torch.eye(R.shape[-1], device=R.device, dtype=R.dtype)
    D = R - eye
    s = D.sum(-1, keepdim=True)
    return torch.where(s == 0, torch.zeros_like(D), D / torch.where(s == 0, torch.ones_like(s), s)) + eye


def _propagate(ctx, A, transpose):
    """Chefer et al. (ICCV 2021) encoder-decoder propagation of the aggregated maps A[group][layer] (N, q, k).
    Returns R_de rows (N, T) and R_dd rows (N, n)."""
    like = dict(device=ctx.src.device, dtype=A["decoder_cross"][0].dtype)
    R_ee = torch.eye(ctx.T, **like).repeat(ctx.N, 1, 1)
    for a in A["encoder_self"]:
        R_ee = R_ee + a @ R_ee
    R_dd = torch.eye(ctx.n, **like).repeat(ctx.N, 1, 1)
    R_de = torch.zeros(ctx.N, ctx.n, ctx.T, **like)
    for s, c in zip(A["decoder_self"], A["decoder_cross"]):
        R_dd = R_dd + s @ R_dd
        R_de = R_de + s @ R_de
        dd = _norm_rows(R_dd)
        R_de = R_de + (dd.transpose(1, 2) if transpose else dd) @ c @ _norm_rows(R_ee)
    return R_de[ctx.rows, ctx.position], R_dd[ctx.rows, ctx.position]


def generic(ctx):
    """Generic attention-model explainability (Chefer et al., ICCV 2021): A_bar = mean_h (dA * A)^+ for every
    attention map, propagated through the encoder, the decoder self- and the cross-attention."""
    p = ctx.run(grads=GROUPS)
    A = {g: [_aggregate(a, d) for a, d in zip(p.maps[g], p.grads[g])] for g in GROUPS}
    return _propagate(ctx, A, ctx.opts["transpose"])


def transformer_attribution(ctx):
    """The same propagation with A_bar = mean_h (dA * R_A)^+, R_A the LRP relevance at each attention map
    (the reference's variant with LRP)."""
    p = ctx.run(grads=GROUPS, tape=True, maps=())
    rel = _Relprop(ctx, p)
    rel.run()
    A = {g: [_aggregate(rel.at_attention[m], d) for m, d in zip(ctx.model.attention_modules()[g], p.grads[g])]
         for g in GROUPS}
    return _propagate(ctx, A, ctx.opts["transpose"])


# ----------------------------------------------------------------------------------------------------
# LRP (Chefer et al., CVPR 2021 rules)
# ----------------------------------------------------------------------------------------------------

class _Relprop:
    """Relevance propagated backwards from a one-hot at y_t in the output logits of each copy.

    Rules: linear alpha=1 beta=0 (positive contributions x_j w_jk only, one shared denominator, bias
    ignored); LayerNorm, softmax, activations and dropout pass relevance through; a matmul of two tensors
    gives each operand half of the G-rule u * dZ/du . (R / Z); a residual add splits by contribution, then
    rescales the two branches to |sum R_a| / (|sum R_a| + |sum R_b|) of the total; a tensor used twice
    receives the sum. Divisions are stabilised: a / (b + eps sign(b)), 0 where b = 0.
    `trace`, when a list, receives (rule, relevance in, relevance out) per copy for conservation checks.

    Activations are recorded once per sample; relevance is per copy (one per explained token). The rules'
    denominators depend on the activations only, so they are computed per sample and handed to the copies."""

    def __init__(self, ctx, p, trace=None):
        self.ctx, self.tape, self.copy, self.eps, self.trace = ctx, p.tape, p.copy, ctx.opts["eps"], trace
        self.at_attention = {}          # attention module -> (N, h, q, k) relevance at its map

    def get(self, module):
        """The module's recorded (inputs, output), per sample."""
        return self.tape[module]

    def _div(self, a, b):
        safe = torch.where(b == 0, torch.ones_like(b), b + self.eps * torch.sign(b))
        return torch.where(b == 0, torch.zeros_like(a * b), a / safe)

    def _log(self, rule, r_in, *r_out):
        if self.trace is not None:
            dims = lambda r: tuple(range(1, r.dim()))
            self.trace.append((rule, r_in.sum(dims(r_in)), sum(r.sum(dims(r)) for r in r_out)))

    def linear(self, module, R):
        x = self.get(module)[0][0]
        w = module.weight
        xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
        S = self._div(R, self.copy(F.linear(xp, wp) + F.linear(xn, wn)))
        out = self.copy(xp) * (S @ wp) + self.copy(xn) * (S @ wn)
        self._log("linear", R, out)
        return out

    def matmul(self, a, b, R):
        S = self._div(R, self.copy(a @ b))
        a, b = self.copy(a), self.copy(b)
        ra, rb = a * (S @ b.transpose(-2, -1)) / 2, b * (a.transpose(-2, -1) @ S) / 2
        self._log("matmul", R, ra, rb)
        return ra, rb

    def add(self, a, b, R):
        S = self._div(R, self.copy(a + b))
        a, b = self.copy(a), self.copy(b)
        ra, rb = a * S, b * S
        dims = tuple(range(1, R.dim()))
        sa, sb, total = (r.sum(dims, keepdim=True) for r in (ra, rb, R))
        share = sa.abs() + sb.abs()
        ra = ra * self._div(self._div(sa.abs(), share) * total, sa)
        rb = rb * self._div(self._div(sb.abs(), share) * total, sb)
        self._log("add", R, ra, rb)
        return ra, rb

    def sequential(self, modules, R):
        """Linear layers take the linear rule; activations, dropout and LayerNorm pass relevance through."""
        for m in reversed(list(modules)):
            if isinstance(m, torch.nn.Linear):
                R = self.linear(m, R)
        return R

    def attention(self, module, R):
        """Returns relevance at the query input and at the key/value input."""
        (x, memory, _), _ = self.get(module)
        _, Tq, C = x.shape
        h, Tk = module.heads, memory.shape[1]
        heads = lambda t, L: t.view(len(t), L, h, C // h).transpose(1, 2)              # (., h, L, hs)
        merge = lambda t: t.transpose(1, 2).reshape(len(t), -1, C)
        R_y = heads(self.linear(module.proj, R), Tq)
        q = heads(self.get(module.query)[1], Tq) / math.sqrt(C // h)
        k, v = heads(self.get(module.key)[1], Tk), heads(self.get(module.value)[1], Tk)
        R_att, R_v = self.matmul(module.attention, v, R_y)
        self.at_attention[module] = R_att
        R_q, R_kt = self.matmul(q, k.transpose(-2, -1), R_att)          # the softmax passes relevance on
        R_x = self.linear(module.query, merge(R_q))
        R_m = self.linear(module.key, merge(R_kt.transpose(-2, -1))) + self.linear(module.value, merge(R_v))
        return R_x, R_m

    def encoder_layer(self, layer, R):
        (x, _), _ = self.get(layer)
        a = self.get(layer.self_attention)[1]
        f = self.get(layer.feedforward)[1]
        # pre-LN: x1 = x + a, out = x1 + f(norm2(x1));  post-LN: x1 = norm1(x + a), out = norm2(x1 + f(x1))
        x1 = x + a if layer.norm_first else self.get(layer.norm1)[1]
        R_x1, R_f = self.add(x1, f, R)
        R_x1 = R_x1 + self.sequential(layer.feedforward, R_f)
        R_x, R_a = self.add(x, a, R_x1)
        R_q, R_kv = self.attention(layer.self_attention, R_a)
        return R_x + R_q + R_kv

    def decoder_layer(self, layer, R):
        (y, _, _, _), _ = self.get(layer)
        s = self.get(layer.self_attention)[1]
        c = self.get(layer.cross_attention)[1]
        f = self.get(layer.feedforward)[1]
        if layer.norm_first:
            y1, y2 = y + s, y + s + c
        else:
            y1, y2 = self.get(layer.norm1)[1], self.get(layer.norm2)[1]
        R_y2, R_f = self.add(y2, f, R)
        R_y2 = R_y2 + self.sequential(layer.feedforward, R_f)
        R_y1, R_c = self.add(y1, c, R_y2)
        R_q, R_memory = self.attention(layer.cross_attention, R_c)
        R_y1 = R_y1 + R_q
        R_y, R_s = self.add(y, s, R_y1)
        R_q, R_kv = self.attention(layer.self_attention, R_s)
        return R_y + R_q + R_kv, R_memory

    @torch.no_grad()
    def run(self):
        """Relevance of the input features (N, T, F) and of the decoder input tokens (N, n)."""
        ctx, model = self.ctx, self.ctx.model
        logits = self.get(model.head)[1]
        R = logits.new_zeros(ctx.N, *logits.shape[1:])
        R[ctx.rows, ctx.position, ctx.target] = 1.0
        R = self.linear(model.head, R)
        R_memory = 0
        for layer in reversed(model.decoder):
            R, R_m = self.decoder_layer(layer, R)
            R_memory = R_memory + R_m
        (tokens,), embedded = self.get(model.token_embed)
        token_part = embedded * math.sqrt(model.cfg.d_model)
        R_tokens, _ = self.add(token_part, _positions(token_part), R)      # the positions are a sink
        R = R_memory
        for layer in reversed(model.encoder):
            R = self.encoder_layer(layer, R)
        frames = self.get(model.embed)[1]
        R_frames, _ = self.add(frames, _positions(frames), R)
        return self.sequential(model.embed, R_frames), R_tokens.sum(-1)


def _positions(x):
    return sinusoid(x.shape[1], x.shape[2], x.device).expand_as(x)


def lrp(ctx):
    """Full LRP down to the input features, summed over the feature axis."""
    p = ctx.run(tape=True, maps=())
    R_src, R_tokens = _Relprop(ctx, p).run()
    return R_src.sum(-1), R_tokens


def partial_lrp(ctx):
    """Partial LRP: the LRP relevance at one decoder cross-attention map (the last), (.)^+, mean over heads."""
    p = ctx.run(tape=True, maps=())
    rel = _Relprop(ctx, p)
    rel.run()
    module = ctx.model.attention_modules()["decoder_cross"][ctx.opts["layer"]]
    return rel.at_attention[module].clamp(min=0)[ctx.rows, :, ctx.position].mean(1), None


# ----------------------------------------------------------------------------------------------------
# Spectral methods (DSMI)
# ----------------------------------------------------------------------------------------------------

def fiedler(features, mask):
    """|v| of the random-walk Fiedler vector of each sample's frame-affinity graph: (B, T, C) -> (B, T).

    f = the real frames' features, L2-normalised; W = (f f^T)^+ / max W; D = rowsum W (below 1e-12 -> 1);
    v = D^-1/2 u_2 with u_2 the eigenvector of the second-smallest eigenvalue of I - D^-1/2 W D^-1/2, in
    float64, all samples in one batched eigh (padding gets a large diagonal so its eigenvalues come last).
    With fewer than 3 real frames the map is uniform (a graph of 1 frame has no Fiedler vector; one of 2
    frames, each most similar to itself, has a uniform one)."""
    count = mask.sum(1, keepdim=True)
    uniform = mask.float() / count.clamp(min=1)
    if mask.shape[1] < 3:
        return uniform
    f = F.normalize(features.double(), dim=-1) * mask[..., None]
    W = (f @ f.transpose(1, 2)).clamp(min=0)
    W = W / W.amax((1, 2), keepdim=True).clamp(min=1e-300)
    d = W.sum(-1)
    d = torch.where(d < 1e-12, torch.ones_like(d), d)
    r = d.rsqrt()
    L = torch.eye(W.shape[1], dtype=W.dtype, device=W.device) - r[:, :, None] * W * r[:, None, :]
    real = mask[:, :, None] & mask[:, None, :]
    L = torch.where(real, L, torch.zeros_like(L)) + torch.diag_embed((~mask).double() * 10.0)
    _, vectors = torch.linalg.eigh(L)
    v = (r * vectors[:, :, 1]).abs() * mask
    return torch.where(count < 3, uniform, v.float())


def _spectral(ctx, grads=None):
    """The spectral methods of Transformer-spectral-interpretability (spectral/get_fev.py: get_eigs,
    get_grad_eigs, get_grad_cam_eigs; ExplanationGeneratorOurs.py), on the encoder's frames.

    Followed: features L2-normalised per frame, W = (f f^T)^+ / max W, the Fiedler vector of L v = lambda D v,
    its absolute value; DSMI+Grad weights layer l's attention gradient by the Fiedler vector of the features
    that layer l itself outputs (`get_grad_eigs(feats_list[i], ...)` for layer i) and sums over the layers.
    The reference's model (LXMERT) is post-LayerNorm, so its layer outputs are normalised: here layer l's
    output is taken as the model reads it next, through the LayerNorm in front of the next layer (pre-LN) or
    the encoder's final norm (the last layer, whose vector is the one `dsmi` uses: the encoder output).
    Departures: the score is the explained token's s_t (the reference leaves `index=None`, which
    differentiates the sum of all logits); the generalised problem is solved exactly by a batched eigh
    (not scipy's shift-invert `eigs`), all layers and samples at once; a sample with fewer than 3 real frames
    gets a uniform map (the reference crashes there)."""
    if grads is None:
        return fiedler(ctx.run(maps=()).memory, ctx.mask)[ctx.inverse], None
    p = ctx.run(grads=("encoder_self",), layers=True)
    L = len(p.layers)
    v = fiedler(torch.cat(p.layers), ctx.mask.repeat(L, 1)).view(L, len(ctx.mask), -1)[:, ctx.inverse]
    R = torch.zeros(ctx.N, ctx.T, device=ctx.src.device)
    for a, g, v_l in zip(p.maps["encoder_self"], p.grads["encoder_self"], v):
        weight = g.clamp(min=0).mean(1) if grads == "grad" else _aggregate(a, g)
        R = R + (weight @ v_l[..., None].to(weight.dtype))[..., 0]
    return R, None


def dsmi(ctx):
    """DSMI: |v| of the Fiedler vector of the encoder output's frame graph, the same for every token."""
    return _spectral(ctx)


def dsmi_grad(ctx):
    """DSMI + Grad: R[t] = sum_l mean_h (dA_enc_l)^+ @ |v_l|, gradients of s_t, v_l layer l's own vector."""
    return _spectral(ctx, "grad")


def dsmi_grad_attn(ctx):
    """DSMI + Grad + Attn: R[t] = sum_l mean_h (dA_enc_l * A_enc_l)^+ @ |v_l|."""
    return _spectral(ctx, "grad_attn")


_FUNCTIONS = dict(attention=attention, rollout=rollout, gradcam=gradcam, saliency=saliency,
                  input_x_gradient=input_x_gradient, integrated_gradients=integrated_gradients, lrp=lrp,
                  partial_lrp=partial_lrp, transformer_attribution=transformer_attribution, generic=generic,
                  dsmi=dsmi, dsmi_grad=dsmi_grad, dsmi_grad_attn=dsmi_grad_attn)


# ----------------------------------------------------------------------------------------------------
# Attention analyses (the numbers behind the global figures)
# ----------------------------------------------------------------------------------------------------

def centroids(cross):
    """Where each token's attention sits: sum_tau A[t, tau] * tau / (T - 1), in [0, 1]. cross (n, T)."""
    T = cross.shape[-1]
    position = torch.arange(T, dtype=cross.dtype) / max(T - 1, 1)
    return (cross * position).sum(-1) / cross.sum(-1).clamp(min=1e-12)


def spearman(x, y):
    """Spearman rank correlation of two 1-D tensors (average ranks for ties); NaN when either is constant."""
    def ranks(v):
        order = v.argsort()
        r = torch.empty_like(v, dtype=torch.float64)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in v.unique():                   # ties share their average rank
            tie = v == value
            r[tie] = r[tie].mean()
        return r
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.norm() * ry.norm()).item()
    return float((rx @ ry) / denominator) if denominator > 0 else float("nan")


def diagonality(cross):
    """Rank correlation between a token's position and the centroid of its cross-attention: 1 for attention
    that walks monotonically through the video. cross (n, T) for n >= 2 tokens."""
    return spearman(torch.arange(cross.shape[0], dtype=torch.float64), centroids(cross.double()))


def relative_profile(cross, bins=20):
    """Attention mass of each token per bin of relative video position: (n, T) -> (n, bins)."""
    T = cross.shape[-1]
    which = torch.clamp((torch.arange(T) * bins) // T, max=bins - 1)
    return torch.zeros(cross.shape[0], bins, dtype=cross.dtype).index_add_(1, which, cross)


def offset_profile(att, max_offset):
    """Mean attention of a query frame to the key at offset d = key - query, for d in -max..max: (T, T) ->
    (2 max + 1,), NaN where no query has that offset."""
    T = att.shape[-1]
    d = torch.arange(T)[None, :] - torch.arange(T)[:, None]
    out = torch.full((2 * max_offset + 1,), float("nan"), dtype=torch.float64)
    for k in range(-max_offset, max_offset + 1):
        sel = d == k
        if sel.any():
            out[k + max_offset] = att.double()[sel].mean()
    return out


def entropy(att, causal=False):
    """Normalised entropy of each head's attention rows, averaged over rows: (h, q, k) -> (h,), in [0, 1]
    (1 = uniform over the keys a row may see, 0 = one key). Causal row t sees t + 1 keys; rows that can
    see one key only are left out. NaN where no row is left."""
    q, k = att.shape[-2], att.shape[-1]
    keys = torch.arange(1, q + 1, dtype=torch.float64) if causal else torch.full((q,), float(k), dtype=torch.float64)
    p = att.double().clamp(min=0)
    h = -(p * p.clamp(min=1e-30).log()).sum(-1)                              # (h, q)
    rows = keys > 1
    if not rows.any():
        return torch.full((att.shape[0],), float("nan"), dtype=torch.float64)
    return (h[:, rows] / keys[rows].log()).mean(-1)


def pointing_game(relevance, segments):
    """For (token row, start, end) segments in model frames: does the row's argmax fall in [start, end)?
    A constant row (all zero, say) points nowhere: a miss."""
    return [bool(relevance[t].max() > relevance[t].min()) and start <= int(relevance[t].argmax()) < end
            for t, start, end in segments]


def segment_mass(relevance, segments):
    """Share of the row's positive relevance inside its segment, for (token row, start, end) segments."""
    out = []
    for t, start, end in segments:
        positive = relevance[t].clamp(min=0)
        out.append(float(positive[start:end].sum() / positive.sum()) if positive.sum() > 0 else 0.0)
    return out


def model_segments(segments, k):
    """Original-frame segments [start, end) -> model frames (frame t is original frame t * k)."""
    return [(p, g, -(-a // k), -(-b // k)) for p, g, a, b in segments]


def token_segments(sample, alignments, k, target, links):
    """(token row, start, end) in model frames for predicted tokens that realise a gloss with a known segment:
    glosses by position where the decoder writes the reference glosses; text words through `links` where
    the linked gloss occurs once in the sentence. A segment is cut at the sample's last model frame; one that
    holds none of the model's frames (past a clip cut at max_frames, or between two frames it reads) is left
    out."""
    T = sample["frames"]
    segments = [(p, g, a, min(b, T)) for p, g, a, b in model_segments(alignments, k) if a < min(b, T)]
    if target == "gloss":
        by_position = {p: (a, b) for p, g, a, b in segments}
        return [(t, *by_position[t]) for t, g in enumerate(sample["tokens"])
                if t in by_position and sample["gloss_reference"][t] == g]
    if not links:
        return []
    once = {g: (a, b) for p, g, a, b in segments if sample["gloss_reference"].count(g) == 1}
    return [(t, *once[links[w]]) for t, w in enumerate(sample["tokens"]) if links.get(w) in once]


def video_share(branch_norms):
    """(L, n) each decoding step's video share per layer: |cross-attention output| / (|cross| + |self|)."""
    video, tokens = branch_norms["video"].float(), branch_norms["tokens"].float()
    return video / (video + tokens).clamp(min=1e-12)


def global_numbers(data, alignments, links, correct_only):
    """The numbers behind the global figures, over the samples whose prediction equals the reference
    (correct_only) or over all samples; 'diagonality' is each decoder layer's mean over the samples of two
    tokens or more whose attention centroids differ (NaN where there is none)."""
    meta = data["meta"]
    k = meta["data_config"]["subsample"]
    target = meta["target"]
    samples = [s for s in data["samples"] if not correct_only or s["prediction"] == s[f"{target}_reference"]]
    layers = len(samples[0]["attention"]["decoder_cross"]) if samples else 0
    bins = 20
    out = dict(count=len(samples), profiles={}, diagonality=[[] for _ in range(layers)], reliance={},
               offsets=[], entropy={}, pointing={}, mass={}, aligned=bool(alignments))
    for s in samples:
        cross = s["attention"]["decoder_cross"].float().mean(1)             # (L, n, T)
        words = len(s["tokens"]) - (s["tokens"][-1] == EOS)                # tokens before EOS
        length = min(words, 5)
        if words >= 1:
            profile = relative_profile(cross[-1, :words], bins)
            out["profiles"].setdefault(length, []).append(profile if length < 5 else profile[:5])
        for l in range(layers):
            if words >= 2:
                out["diagonality"][l].append(diagonality(cross[l, :words]))
        share = video_share(s["branch_norms"]).mean(0)
        out["reliance"].setdefault(length, []).append(share)
        enc = s["attention"]["encoder_self"].float().mean(1)
        out["offsets"].append(torch.stack([offset_profile(a, 10) for a in enc]))
        for group, maps in s["attention"].items():
            out["entropy"].setdefault(group, []).append(
                torch.stack([entropy(a.float(), causal=group == "decoder_self") for a in maps]))
        segments = token_segments(s, alignments.get(s["id"], []), k, target, links)
        for method, rel in s["relevance"].items():
            if segments:
                out["pointing"].setdefault(method, []).extend(pointing_game(rel, segments))
                out["mass"].setdefault(method, []).extend(segment_mass(rel, segments))
    out["diagonality"] = [float(np.mean([v for v in d if np.isfinite(v)])) if np.isfinite(d).any() else float("nan")
                          for d in out["diagonality"]]
    return out


# ----------------------------------------------------------------------------------------------------
# Faithfulness: remove frames in the order a relevance gives, and score what the model still predicts
# ----------------------------------------------------------------------------------------------------

FRACTIONS = tuple(i / 10 for i in range(10))          # share of the real frames removed; 0 = the clean input
DIRECTIONS = ("positive", "negative")                 # most relevant removed first / least relevant first
MODES = ("mask", "zero")                              # removed through the key mask, or replaced by zeros


def _tie_keys(T, salt, seed, device):
    """Pseudo-random keys (rows, T) from a hash of (frame index, row salt, seed): a tie-breaking order that
    depends on neither the batch nor the other rows, so a sample's ranks are the same however it is batched."""
    frame = torch.arange(1, T + 1, device=device)[None]
    x = frame * 0x9E3779B1 + salt[:, None].long() * 0x85EBCA77 + (seed * 0xC2B2AE3D & 0xFFFFFFFF)
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):            # murmur3's finaliser, 32 bits
        x = x & 0xFFFFFFFF
        x = ((x ^ (x >> shift)) * multiplier) & 0xFFFFFFFF
    return x ^ (x >> 16)


def removal_ranks(relevance, mask, seed=0, salt=None):
    """Rank of each frame by relevance, 0 = most relevant: (R, T) -> (R, T) long. Padded frames rank after the
    real ones; ties are broken in a pseudo-random order (seeded, per row `salt` (R,), e.g. the token position),
    so that a constant row does not remove frames left to right."""
    if not torch.isfinite(relevance).all():
        raise ValueError("relevance holds NaN or infinite values")
    mask = mask.expand_as(relevance)
    salt = torch.zeros(len(relevance), dtype=torch.long, device=relevance.device) if salt is None else salt
    shuffle = _tie_keys(relevance.shape[-1], salt, seed, relevance.device).argsort(dim=-1)
    key = relevance.double().masked_fill(~mask, float("-inf")).gather(-1, shuffle)
    order = shuffle.gather(-1, key.argsort(dim=-1, descending=True, stable=True))
    ranks = torch.empty_like(order)
    return ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))


def kept_frames(ranks, mask, fractions=FRACTIONS):
    """(..., 2, P, T) bool: the real frames left when floor(p * T_real) of them are removed, at most
    T_real - 1 (one frame always remains), the most relevant first (positive, index 0) or the least relevant
    first (negative, index 1). ranks (..., T) from removal_ranks, mask broadcastable to it."""
    mask = mask.expand_as(ranks)
    real = mask.sum(-1, keepdim=True)                                       # (..., 1)
    p = torch.tensor(fractions, dtype=torch.float64, device=ranks.device)
    removed = torch.minimum(torch.floor(p * real + 1e-9).long(), (real - 1).clamp(min=0))   # (..., P)
    r, removed, real = ranks[..., None, :], removed[..., None], real[..., None]
    positive = r >= removed
    negative = r < real - removed
    return torch.stack([positive, negative], -3) & mask[..., None, None, :]


def perturbed_inputs(src, src_mask, sample, keep, mode="mask"):
    """The inputs of perturbed copies: copy i is sample[i] with only the frames keep[i] (T) left. 'mask'
    drops the removed frames, which is what the encoder's key mask does, and keeps the others' positions (so
    the sequences are shorter); 'zero' replaces them by zeros. Returns src, src_mask, positions (or None)."""
    if mode == "zero":
        last = int(src_mask[sample].any(0).nonzero().max()) + 1
        x = src[sample, :last] * keep[:, :last, None]
        return x, src_mask[sample, :last], None
    if mode != "mask":
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    count = keep.sum(-1)
    positions = (~keep).int().argsort(dim=-1, stable=True)[:, :int(count.max())]    # kept frames first, in order
    frames = torch.arange(positions.shape[1], device=src.device)[None] < count[:, None]
    positions = positions.masked_fill(~frames, 0)
    return src[sample[:, None], positions] * frames[..., None], frames, positions


class _Removals:
    """The perturbed inputs of every fraction for copies (sample, keep (P, T)): identical inputs (the same
    frames of the same sample left) run once, in batches of about `budget` frames, shortest first. Calls
    progress(fraction index, frames done, frames in all) after each batch."""

    def __init__(self, src, src_mask, sample, keep, mode, budget, progress):
        self.src, self.src_mask, self.mode, self.budget, self.progress = src, src_mask, mode, budget, progress
        self.fractions = []                                   # per fraction: distinct samples, keeps, inverse
        for f in range(keep.shape[1]):
            key = torch.cat([sample[:, None], keep[:, f].long()], 1)
            unique, inverse = torch.unique(key, dim=0, return_inverse=True)
            self.fractions.append((unique[:, 0], unique[:, 1:].bool(), inverse))
        self.lengths = [k.sum(-1) if mode == "mask" else src_mask[s].sum(-1) for s, k, _ in self.fractions]
        self.total, self.done = sum(int(L.sum()) for L in self.lengths), 0

    def batches(self, f):
        """(indices into the fraction's distinct inputs, their samples, src, src_mask, positions) per batch."""
        u_sample, u_keep, _ = self.fractions[f]
        lengths = self.lengths[f].tolist()
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        group, longest = [], 0
        for i in order + [None]:
            if group and (i is None or (len(group) + 1) * max(longest, lengths[i]) > self.budget):
                index = torch.tensor(group, device=self.src.device)
                yield (index, u_sample[index], *perturbed_inputs(self.src, self.src_mask, u_sample[index],
                                                                 u_keep[index], self.mode))
                self.done += sum(lengths[j] for j in group)
                if self.progress:
                    self.progress(f, self.done, self.total)
                group, longest = [], 0
            if i is not None:
                group.append(i)
                longest = max(longest, lengths[i])


@torch.no_grad()
def token_perturbation(model, src, src_mask, out_tokens, relevance, fractions=FRACTIONS, mode="mask", seed=0,
                       budget=4096, progress=None):
    """Token-level perturbation test: for output token t of each sample, frames are removed in the order of
    relevance[b, t] and the teacher-forced model (its prefix unperturbed) is asked whether it still ranks
    out_tokens[b, t] first at position t. Returns (B, n, 2, P) float: 1 or 0 per token, direction (positive,
    negative) and fraction; NaN on padding tokens. Fraction 0 is the clean input.

    Every removal of every token of every sample is an input; identical inputs run once, all fractions of all
    samples in batches (see _Removals); each batch is decoded only as far as its longest output.
    `progress(fraction index, frames done, frames in all)` is called after each batch."""
    model.eval()
    B, n = out_tokens.shape
    rows = out_tokens != model.pad_id
    b_idx, t_idx = rows.nonzero(as_tuple=True)
    ranks = removal_ranks(relevance[b_idx, t_idx], src_mask[b_idx], seed, salt=t_idx)    # (N, T)
    keep = kept_frames(ranks, src_mask[b_idx], fractions)                                # (N, 2, P, T)
    removals = _Removals(src, src_mask, b_idx.repeat_interleave(2), keep.flatten(0, 1), mode, budget, progress)
    token = t_idx.repeat_interleave(2)                                                    # per copy
    tgt_in = shift_right(out_tokens, model.bos_id)
    scores = torch.full((B, n, 2, len(fractions)), float("nan"), device=src.device)
    for f in range(len(fractions)):
        u_sample, _, inverse = removals.fractions[f]
        correct = torch.zeros(len(u_sample), n, dtype=torch.bool, device=src.device)
        for index, sample, x, mask, positions in removals.batches(f):
            n_batch = int(rows[sample].sum(-1).max())                                    # the longest output
            logits = model.decode(model.encode(x, mask, positions), mask, tgt_in[sample, :n_batch])
            correct[index, :n_batch] = decodable(logits, model).argmax(-1) == out_tokens[sample, :n_batch]
        scores[b_idx, t_idx, :, f] = correct[inverse, token].float().view(-1, 2)
    return scores


@torch.no_grad()
def sentence_perturbation(model, src, src_mask, relevance, rows, max_len, fractions=FRACTIONS, mode="mask", seed=0,
                          budget=4096, progress=None):
    """Sentence-level perturbation test: frames are ranked by sum_t R[t] / ||R[t]||_1 over the explained rows
    (rows (B, n) bool), removed, and the model greedy-decodes. Returns (B, 2, P, L) token ids (PAD after
    EOS) per direction (positive, negative) and fraction; fraction 0 is the clean decoding. `progress` as in
    token_perturbation."""
    model.eval()
    R = relevance * rows[..., None]
    ranking = (R / R.abs().sum(-1, keepdim=True).clamp(min=1e-12)).sum(1)                 # (B, T)
    keep = kept_frames(removal_ranks(ranking, src_mask, seed), src_mask, fractions)      # (B, 2, P, T)
    sample = torch.arange(len(src), device=src.device).repeat_interleave(2)
    removals = _Removals(src, src_mask, sample, keep.flatten(0, 1), mode, budget, progress)
    out = []
    for f in range(len(fractions)):
        u_sample, _, inverse = removals.fractions[f]
        decoded = torch.full((len(u_sample), max_len), model.pad_id, dtype=torch.long, device=src.device)
        for index, _, x, mask, positions in removals.batches(f):
            tokens = greedy_decode(model, x, mask, max_len, memory=model.encode(x, mask, positions))
            decoded[index, :tokens.shape[1]] = tokens
        out.append(decoded[inverse].view(len(src), 2, max_len))
    return torch.stack(out, 2)


def near_ties(logits, rel=1e-4):
    """(..., V) -> (...) bool: the two best logits lie within `rel` of the logits' scale, so close that the
    rounding of another CPU's kernels (another summation order) could swap them. An argmax taken there may
    differ between two computation paths; exact comparisons of such decisions skip them."""
    top = logits.topk(2, dim=-1).values
    scale = logits.masked_fill(~torch.isfinite(logits), 0).abs().amax(-1).clamp(min=1.0)
    return top[..., 0] - top[..., 1] <= rel * scale


def auc(curves, fractions=FRACTIONS):
    """Area under score-vs-fraction curves (..., P), trapezoid rule, x 100: Chefer's convention, with the
    clean score at fraction 0, so a score of 1 throughout 0..0.9 gives 90."""
    y = torch.as_tensor(curves, dtype=torch.float64)
    p = torch.tensor(fractions, dtype=torch.float64, device=y.device)
    return ((y[..., 1:] + y[..., :-1]) / 2 * p.diff()).sum(-1) * 100


def bootstrap(statistic, count, resamples=1000, level=0.95, seed=0):
    """Percentile bootstrap over `count` samples: statistic(weights) -> (R,) values of the statistic on R
    resamples, where weights (R, count) float64 (on the CPU) says how often each sample was drawn (a mean is
    `weights @ values / count`; a corpus statistic is a weighted sum). Returns (estimate, low, high): the
    statistic on the whole data (every weight 1) and the 95% interval. The same seed draws the same
    resamples, so intervals of differences between methods are paired.

    The estimate is computed in the same call as the resamples, and the interval always contains it: where
    every resample gives the same value (or values equal but for rounding), sums taken over other weights
    can land an ulp beside the estimate, on either side depending on the CPU's kernels, so the bounds are
    widened to the estimate rather than left to the last bit."""
    g = torch.Generator().manual_seed(seed)
    drawn = torch.randint(count, (resamples, count), generator=g)
    weights = torch.zeros(resamples, count, dtype=torch.float64).scatter_add_(
        1, drawn, torch.ones(resamples, count, dtype=torch.float64))
    weights = torch.cat([torch.ones(1, count, dtype=torch.float64), weights])          # row 0: the data itself
    values = torch.as_tensor(statistic(weights), dtype=torch.float64)
    estimate, values = float(values[0]), values[1:]
    tail = (1 - level) / 2
    low, high = float(values.quantile(tail)), float(values.quantile(1 - tail))
    return estimate, min(low, estimate), max(high, estimate)


def sentence_scores(decoded, references, target):
    """Token accuracy of each perturbed greedy decoding against the clean one (fraction 0), position by
    position up to the clean EOS, and sacrebleu's BLEU statistics against the reference: (B, 2, P) and
    (B, 2, P, 10)."""
    clean = decoded[:, 0, 0]                                                 # (B, L)
    length = ((clean != Vocabulary.pad_id).sum(-1)).clamp(min=1)
    valid = torch.arange(clean.shape[1]) < length[:, None]
    accuracy = ((decoded == clean[:, None, None]) & valid[:, None, None]).sum(-1).double() / length[:, None, None]
    stats = [[[bleu_statistics(" ".join(target.decode(ids)), ref) for ids in row] for row in rows]
             for rows, ref in zip(decoded.tolist(), references)]
    return accuracy, torch.tensor(stats, dtype=torch.float64)


def token_ids(samples, vocab, device="cpu"):
    """(B, n) the extraction samples' explained tokens as ids, padded: what the perturbation tests score."""
    out = torch.full((len(samples), max(len(s["tokens"]) for s in samples)), vocab.pad_id, dtype=torch.long)
    for b, s in enumerate(samples):
        out[b, :len(s["tokens"])] = torch.tensor([vocab.stoi[w] for w in s["tokens"]])
    return out.to(device)


def padded_relevance(samples, method, n, T, device="cpu"):
    """(B, n, T) one method's relevance of the extraction samples, zero past each sample's tokens and frames."""
    R = torch.zeros(len(samples), n, T)
    for b, s in enumerate(samples):
        rel = s["relevance"][method].float()
        R[b, :rel.shape[0], :rel.shape[1]] = rel
    return R.to(device)


def plausibility(data, alignments, links, methods):
    """{method: (pointing-game hits, relevance mass in the segment)} over the gloss occurrences with a true
    segment and a token that realises them (see token_segments), and 'sample': each occurrence's sample;
    {} without alignments. `data` is an extraction ({'meta', 'samples'})."""
    if not alignments:
        return {}
    meta = data["meta"]
    out, sample = {m: ([], []) for m in methods}, []
    for b, s in enumerate(data["samples"]):
        segments = token_segments(s, alignments.get(s["id"], []), meta["data_config"]["subsample"], meta["target"],
                                  links)
        sample += [b] * len(segments)
        for m in methods:
            out[m][0].extend(pointing_game(s["relevance"][m], segments))
            out[m][1].extend(segment_mass(s["relevance"][m], segments))
    tensor = lambda v: torch.tensor(v, dtype=torch.float64)
    return dict({m: (tensor(h), tensor(v)) for m, (h, v) in out.items()}, sample=torch.tensor(sample, dtype=torch.long))


def perturb_table(curves, stats, plausibility, resamples, seed):
    """One row per method: each measure as (value, low, high) with a 95% bootstrap interval over the samples,
    and the tests on which it beats random: where the interval of its difference to random (paired: every
    method sees the same resamples) excludes 0 on the better side. AUCs are means over samples; BLEU is a
    corpus score and plausibility a share of gloss occurrences, recomputed on each resample."""
    AUC = {m: auc(c) for m, c in curves.items()}                   # (B, 2) per sample
    B = len(next(iter(curves.values())))
    interval = lambda statistic: bootstrap(statistic, B, resamples, seed=seed)
    mean = lambda values: (lambda w: w @ values / B)

    def corpus_bleu(s, d):                                                  # s (B, 2, P, 10) statistics
        def statistic(w):
            summed = (w @ s.reshape(B, -1)).reshape(len(w), *s.shape[1:])
            return auc(bleu_from_statistics(summed.numpy())[:, d] / 100)
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
        for d, direction in enumerate(DIRECTIONS):
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
        means[m]["bleu4"] = bleu_from_statistics(s.sum(0).numpy())
    return means


# ----------------------------------------------------------------------------------------------------
# Claims of the four papers: each a measure with a 95% interval and a rule fixed before any number is seen
# ----------------------------------------------------------------------------------------------------

def lag_correlation(row):
    """Pearson correlation of a row's neighbours, a[tau] with a[tau + 1] (T,): near 1 when the weight lies on
    runs of consecutive frames, near -1/(T - 1) when the same weights are scattered at random. NaN for fewer
    than 3 frames or a row without variation."""
    a = row.double()
    if len(a) < 3:
        return float("nan")
    x, y = a[:-1] - a[:-1].mean(), a[1:] - a[1:].mean()
    denominator = float(x.norm() * y.norm())
    return float(x @ y) / denominator if denominator > 1e-300 else float("nan")


def contiguity(cross, permutations=20, seed=0):
    """SignAttention's 'each gloss attends to a cluster of consecutive frames' on one sample: for each token
    row of cross-attention (n, T), lag_correlation(row) minus its mean over `permutations` random orders of
    that row's frames (the same weights, scattered), averaged over the rows where it is defined. Positive
    when attention sits on consecutive frames; about 0 for scattered single frames, a flat row or a row
    whose weights are already in a random order. NaN where no row is defined."""
    g = torch.Generator().manual_seed(seed)
    excess = []
    for row in cross:
        observed = lag_correlation(row)
        if math.isnan(observed):
            continue
        shuffled = [lag_correlation(row[torch.randperm(len(row), generator=g)]) for _ in range(permutations)]
        excess.append(observed - float(np.nanmean(shuffled)))
    return float(np.mean(excess)) if excess else float("nan")


def reliance_trend(branch_norms):
    """SignAttention's 'the decoder relies on the video first and on its previous tokens later' on one sample:
    the Spearman correlation between the decoding step and the difference |cross-attention output| -
    |self-attention output| (averaged over decoder layers). Negative when the video's share falls as the
    sentence goes on. NaN for fewer than 3 steps or a constant difference."""
    difference = (branch_norms["video"].double() - branch_norms["tokens"].double()).mean(0)
    if len(difference) < 3:
        return float("nan")
    return spearman(torch.arange(len(difference), dtype=torch.float64), difference)


def weighted_mean(values):
    """Bootstrap statistic: the mean of per-sample values under resampling weights (R, count)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    return lambda w: w @ values / w.sum(-1)


def weighted_slope(x, y):
    """Bootstrap statistic: the least-squares slope of y on x under resampling weights (R, count); NaN where a
    resample holds one value of x only."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)

    def statistic(w):
        total = w.sum(-1, keepdim=True)
        mx, my = (w * x).sum(-1, keepdim=True) / total, (w * y).sum(-1, keepdim=True) / total
        var = (w * (x - mx) ** 2).sum(-1)
        return torch.where(var > 0, (w * (x - mx) * (y - my)).sum(-1) / var.clamp(min=1e-300), float("nan"))
    return statistic


def weighted_correlation(x, y):
    """Bootstrap statistic: Pearson's correlation of x and y under resampling weights (R, count)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)

    def statistic(w):
        total = w.sum(-1, keepdim=True)
        dx, dy = x - (w * x).sum(-1, keepdim=True) / total, y - (w * y).sum(-1, keepdim=True) / total
        denominator = ((w * dx ** 2).sum(-1) * (w * dy ** 2).sum(-1)).sqrt()
        return torch.where(denominator > 0, (w * dx * dy).sum(-1) / denominator.clamp(min=1e-300), float("nan"))
    return statistic


def seed_bootstrap(per_seed, resamples=1000, level=0.95, seed=0):
    """A two-stage percentile bootstrap for a measure of trained models: per_seed is a list of (count,
    statistic) pairs, one per trained model, where statistic(weights (R, count)) gives the measure on
    resampled samples as `bootstrap` takes it. Each resample draws the models with replacement and, for each
    drawn model, one of its sample resamples; the measure is the mean over the drawn models. The estimate is
    the mean of the models' measures on their whole data, and the interval contains it by construction
    (see `bootstrap`). With one model this is `bootstrap` over its samples. (nan, nan, nan) without data."""
    per_seed = [(count, statistic) for count, statistic in per_seed if count > 0]
    if not per_seed:
        return float("nan"), float("nan"), float("nan")
    g = torch.Generator().manual_seed(seed)
    values = []                                                              # (S, R + 1) per model
    for count, statistic in per_seed:
        drawn = torch.randint(count, (resamples, count), generator=g)
        weights = torch.zeros(resamples, count, dtype=torch.float64).scatter_add_(
            1, drawn, torch.ones(resamples, count, dtype=torch.float64))
        weights = torch.cat([torch.ones(1, count, dtype=torch.float64), weights])
        values.append(torch.as_tensor(statistic(weights), dtype=torch.float64))
    values = torch.stack(values)
    S = len(values)
    estimate = float(values[:, 0].mean())
    if S == 1:
        resampled = values[0, 1:]
    else:
        models = torch.randint(S, (resamples, S), generator=g)
        columns = torch.randint(1, resamples + 1, (resamples, S), generator=g)
        resampled = values[models, columns].mean(-1)
    resampled = resampled[torch.isfinite(resampled)]
    if not math.isfinite(estimate) or not len(resampled):
        return estimate, float("nan"), float("nan")
    tail = (1 - level) / 2
    low, high = float(resampled.quantile(tail)), float(resampled.quantile(1 - tail))
    return estimate, min(low, estimate), max(high, estimate)


@dataclass(frozen=True)
class Rule:
    """What 'holds' means for a claim, in numbers, fixed before the measure is taken: the claim is that the
    measure is above (side '>') or below (side '<') the threshold. It holds when the whole 95% interval lies
    on the claimed side, fails when the whole interval lies on the other side (the threshold included: the
    interval then excludes the claim), and is inconclusive otherwise, or when the measure is undefined."""
    side: str
    threshold: float

    def verdict(self, low, high):
        if not (math.isfinite(low) and math.isfinite(high)):
            return "inconclusive"
        if self.side == ">":
            return "holds" if low > self.threshold else "fails" if high <= self.threshold else "inconclusive"
        return "holds" if high < self.threshold else "fails" if low >= self.threshold else "inconclusive"

    def text(self, unit=""):
        other = "<=" if self.side == ">" else ">="
        return (f"holds if the 95% interval lies {self.side} {self.threshold:g}{unit}; fails if it lies {other} "
                f"{self.threshold:g}{unit}; inconclusive otherwise")


@dataclass(frozen=True)
class Claim:
    """One claim of a paper: which paper and which of its figures or tables, the claim in one line, the
    measure (a function of the claims' inputs giving (count, statistic) per trained model, see
    seed_bootstrap), its rule, the runs it needs and the paper's own figure where the paper gives one."""
    key: str
    paper: str
    source: str
    claim: str
    measure: str
    unit: str
    rule: Rule
    runs: str                      # "gloss": SignAttention's gloss models; "text": default models; "signcl": pairs
    compute: object
    paper_value: str | None = None


def _correct(data):
    """The samples of an extraction decoded exactly (the SignAttention paper's analyses keep these)."""
    target = data["meta"]["target"]
    return [s for s in data["samples"] if s["prediction"] == s[f"{target}_reference"]]


def _words(s):
    return len(s["tokens"]) - (s["tokens"][-1] == EOS)


def _per_sample(inputs, value):
    """(count, weighted mean) per model of a per-sample value over the correctly decoded samples where it is
    defined."""
    out = []
    for data in inputs["gloss"]:
        values = [v for v in (value(s) for s in _correct(data)) if math.isfinite(v)]
        out.append((len(values), weighted_mean(values)))
    return out


def _last_cross(s):
    cross = s["attention"]["decoder_cross"][-1].float().mean(0)             # (n, T): last layer, mean over heads
    return cross[:_words(s)]


def _diagonality(s):
    return diagonality(_last_cross(s)) if _words(s) >= 2 else float("nan")


def _length_trend(inputs):
    out = []
    for data in inputs["gloss"]:
        pairs = [(_words(s), _diagonality(s)) for s in _correct(data)]
        pairs = [(n, d) for n, d in pairs if math.isfinite(d)]
        out.append((len(pairs), weighted_slope(*zip(*pairs)) if pairs else None))
    return out


def _gain(auc_of, better, worse, tests):
    """Bootstrap statistic on one model's per-sample AUCs ({method: (B, 2) positive, negative}): the smaller
    over `tests` of better's mean advantage over worse (positive test: worse - better, lower is better there;
    negative test: better - worse)."""
    a, b = auc_of[better].double(), auc_of[worse].double()
    gains = [weighted_mean(b[:, 0] - a[:, 0] if t == "positive" else a[:, 1] - b[:, 1]) for t in tests]
    return lambda w: torch.stack([g(w) for g in gains]).amin(0)


def _advantage(better, baselines, tests=("positive", "negative")):
    """Per model: the smallest of better's advantages (_gain) over each of the baselines, on `tests`."""
    def per_model(auc_of):
        gains = [_gain(auc_of, better, b, tests) for b in baselines]
        return len(auc_of[better]), lambda w: torch.stack([g(w) for g in gains]).amin(0)
    return lambda inputs: [per_model(auc_of) for auc_of in inputs["text"]]


def _signcl_bleu(inputs):
    """Per seed: corpus BLEU-4 of the SignCL model minus its lambda = 0 twin, on the same resampled sentences."""
    def per_seed(pair):
        with_cl, without = (torch.as_tensor(pair[k]["bleu_statistics"], dtype=torch.float64) for k in ("signcl", "base"))
        bleu = lambda stats, w: torch.as_tensor(bleu_from_statistics((w @ stats).numpy()))
        return lambda w: bleu(with_cl, w) - bleu(without, w)
    return [(len(pair["base"]["bleu_statistics"]), per_seed(pair)) for pair in inputs["signcl"]]


def _signcl_sdr(inputs):
    """Per seed: SDR of the SignCL model minus its twin's (one number per pair: the interval is over seeds)."""
    def constant(value):
        return lambda w: torch.full((len(w),), value, dtype=torch.float64)
    return [(1, constant(pair["signcl"]["sdr"] - pair["base"]["sdr"])) for pair in inputs["signcl"]]


def _density_bleu(inputs):
    """Over every trained model of the SignCL pairs: Pearson's correlation of test SDR and test BLEU-4, the
    models resampled."""
    models = [pair[k] for pair in inputs["signcl"] for k in ("base", "signcl")]
    return [(len(models), weighted_correlation([m["sdr"] for m in models], [m["bleu4"] for m in models]))]


CHEFER_BASELINES = ("attention", "rollout", "gradcam", "lrp", "partial_lrp")
SPECTRAL_BASELINES = ("attention", "gradcam", "rollout")
CLAIM_METHODS = tuple(dict.fromkeys(CHEFER_BASELINES + ("transformer_attribution", "generic", "dsmi", "dsmi_grad",
                                                        "dsmi_grad_attn", "random")))

SIGNATTENTION = "SignAttention (Dal Bianco, Stanchi et al., arXiv 2410.14506)"
SIGNCL = "SignCL (Ye et al., NeurIPS 2024, arXiv 2405.14312)"
CHEFER = "Chefer, Gur, Wolf (CVPR 2021; ICCV 2021)"
SPECTRAL = "Spectral attribution (DSMI)"
AUC_POINTS = " AUC points"

CLAIMS = (
    Claim("diagonal", SIGNATTENTION, "abstract and cross-attention maps: 'a diagonal alignment pattern'",
          "cross-attention aligns diagonally with the video",
          "Spearman correlation of token position and cross-attention centroid (last decoder layer, mean over "
          "heads), mean over correctly decoded test samples of 2+ glosses", "", Rule(">", 0.5), "gloss",
          lambda inputs: _per_sample(inputs, _diagonality)),
    Claim("diagonal_weakens", SIGNATTENTION, "abstract: 'less distinct as the number of glosses increases'",
          "the diagonal alignment weakens as sentences get longer",
          "least-squares slope of a sample's diagonality on its gloss count (correct test samples)", " per gloss",
          Rule("<", 0.0), "gloss", _length_trend),
    Claim("contiguous", SIGNATTENTION, "abstract: 'clusters of frames rather than individual ones'",
          "each gloss attends to a cluster of consecutive frames, not scattered single frames",
          "lag-1 autocorrelation of each gloss's cross-attention row minus that of the same row with its frames "
          "permuted, mean over correct test samples", "", Rule(">", 0.0), "gloss",
          lambda inputs: _per_sample(inputs, lambda s: contiguity(_last_cross(s)))),
    Claim("video_then_tokens", SIGNATTENTION, "abstract and the per-step contribution analysis",
          "the decoder relies on the video first and on its previous tokens later",
          "Spearman correlation of decoding step and ‖cross-attention output‖ - ‖self-attention output‖ (mean "
          "over layers), mean over correct test samples of 3+ steps", "", Rule("<", 0.0), "gloss",
          lambda inputs: _per_sample(inputs, lambda s: reliance_trend(s["branch_norms"]))),
    Claim("signcl_sdr", SIGNCL, "Eqs. 1-3 and its density analysis", "SignCL lowers representation density (SDR)",
          "test SDR with SignCL (lambda 0.01) minus without, gloss-free training, paired by seed", " SDR points",
          Rule("<", 0.0), "signcl", _signcl_sdr),
    Claim("signcl_bleu", SIGNCL, "its gloss-free results (abstract: BLEU +39% and +46% on CSL-Daily)",
          "SignCL improves translation in gloss-free training",
          "test BLEU-4 with SignCL (lambda 0.01) minus without, CTC weight 0, paired by seed and sentence", " BLEU",
          Rule(">", 0.0), "signcl", _signcl_bleu, paper_value="+39% (SLT), +46% (GFSLT-VLP) BLEU-4, CSL-Daily"),
    Claim("density_bleu", SIGNCL, "its density-performance analysis",
          "representation density and translation quality are negatively related",
          "Pearson correlation of test SDR and test BLEU-4 across the trained gloss-free models", "",
          Rule("<", 0.0), "signcl", _density_bleu),
    *(Claim(f"ta_beats_{b}", CHEFER, "CVPR'21 perturbation tests (positive and negative)",
            f"transformer attribution beats {b} on both perturbation tests",
            f"the smaller of transformer attribution's two AUC advantages over {b} (positive: {b} - TA; negative: "
            "TA - " + b + "), token level, mean over test samples", AUC_POINTS, Rule(">", 0.0), "text",
            _advantage("transformer_attribution", (b,))) for b in CHEFER_BASELINES),
    Claim("generic_vs_ta", CHEFER, "ICCV'21 perturbation tests against the CVPR'21 method",
          "generic relevance is at least as good as transformer attribution",
          "the smaller of generic's two AUC advantages over transformer attribution (non-inferiority margin "
          "1 AUC point)", AUC_POINTS, Rule(">", -1.0), "text", _advantage("generic", ("transformer_attribution",))),
    *(Claim(f"{m}_beats_baselines", SPECTRAL, "the LXMERT positive perturbation table",
            f"{m} beats raw attention, Grad-CAM and rollout on the positive test",
            f"the smallest of {m}'s positive-test AUC advantages over attention, gradcam and rollout", AUC_POINTS,
            Rule(">", 0.0), "text", _advantage(m, SPECTRAL_BASELINES, ("positive",)))
      for m in ("dsmi_grad", "dsmi_grad_attn")),
    Claim("dsmi_below_grad", SPECTRAL, "the LXMERT positive perturbation table",
          "class-agnostic DSMI is worse than DSMI+Grad",
          "DSMI+Grad's positive-test AUC advantage over DSMI", AUC_POINTS, Rule(">", 0.0), "text",
          _advantage("dsmi_grad", ("dsmi",), ("positive",))),
)


def measure_claim(claim, inputs, resamples=1000, seed=0):
    """(value, low, high, verdict) of a claim on its inputs (see Claim)."""
    per_seed = [(count, statistic) for count, statistic in claim.compute(inputs) if statistic is not None]
    value, low, high = seed_bootstrap(per_seed, resamples, seed=seed)
    return value, low, high, claim.rule.verdict(low, high)
