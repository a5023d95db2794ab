"""SignAttention: sign language pose sequences -> glosses and text, with attention you can look at.

Read top to bottom like a method section:
  1. data      -- the synthetic GSL generator (default, or grown to GSL's size: synthetic_grammar,
                  SYNTHETIC_SIZES), the GSL, pose-format and signjoey readers, the importers and
                  MediaPipe Holistic conversion of real recordings, vocabularies, batches
  2. model     -- frame embedder, sinusoidal positions, transformer encoder with a CTC gloss head,
                  autoregressive decoder; attention written out so every map can be kept with its gradient
  3. decoding  -- batched greedy and beam search, CTC greedy decoding
  4. metrics   -- BLEU-1..4, chrF, WER, ROUGE-L
  5. files     -- atomic checkpoints that load with torch.load(weights_only=True), load_model()
This module is importable and quiet: argument parsing, run folders and progress live in run.py.
"""
import contextlib
import csv
import gzip
import io
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sign_cl import SignCL, batch_margins

# ----------------------------------------------------------------------------------------------------
# 1. Data
# ----------------------------------------------------------------------------------------------------

N_KEYPOINTS = 543                       # MediaPipe Holistic: 33 body, 468 face, 21 left hand, 21 right hand
BODY = list(range(0, 33))
FACE = list(range(33, 501))
LEFT_HAND = list(range(501, 522))
RIGHT_HAND = list(range(522, 543))
KEYPOINT_SETS = {"body+hands": BODY + LEFT_HAND + RIGHT_HAND, "hands": LEFT_HAND + RIGHT_HAND,
                 "all": list(range(N_KEYPOINTS))}
L_SHOULDER, R_SHOULDER = 11, 12
# The face outline in MediaPipe's face mesh (FACEMESH_FACE_OVAL as one closed path), from the forehead
# clockwise on the image; the viewer draws it
FACE_OVAL = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148,
             176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109]
# The skeleton the figures and the viewer draw: pairs of indices into BODY (its first 25 points) and into a
# hand's 21 points (LEFT_HAND, RIGHT_HAND), MediaPipe's POSE_CONNECTIONS and HAND_CONNECTIONS in part
BODY_EDGES = [(11, 12), (11, 13), (13, 15), (12, 14), (14, 16), (11, 23), (12, 24), (23, 24), (9, 10), (7, 8)]
HAND_EDGES = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (5, 9), (9, 10), (10, 11), (11, 12),
              (9, 13), (13, 14), (14, 15), (15, 16), (13, 17), (17, 18), (18, 19), (19, 20), (0, 17)]
SPLITS = ("train", "val", "test")
SPLIT_NAMES = {"train": "train", "dev": "val", "val": "val", "test": "test"}     # dev is our val; any case
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"


class DataError(ValueError):
    """Bad input: the message is one line naming the file, the row and the problem."""


# --- 1a. The synthetic GSL -------------------------------------------------------------------------
# A gloss lexicon over three GSL scenarios (police, health, citizen service) and a small grammar that
# turns gloss sentences (GSL order: time first, verb-final, negation and wh-words last) into Greek text
# (verb-second, pro-drop, articles and prepositions without a gloss, tense from a distant time gloss).

PRONOUNS = {"ΕΓΩ(1)": 0, "ΕΣΥ": 1}      # gloss -> grammatical person index
# noun gloss -> (gender, word); genders m/f/n choose the article
NOUNS = {
    "ΑΣΤΥΝΟΜΙΑ": ("f", "αστυνομία"), "ΤΑΥΤΟΤΗΤΑ": ("f", "ταυτότητα"), "ΔΙΑΒΑΤΗΡΙΟ": ("n", "διαβατήριο"),
    "ΠΟΡΤΟΦΟΛΙ": ("n", "πορτοφόλι"), "ΑΥΤΟΚΙΝΗΤΟ": ("n", "αυτοκίνητο"), "ΚΛΕΙΔΙ": ("n", "κλειδί"),
    "ΔΙΠΛΩΜΑ": ("n", "δίπλωμα"), "ΤΗΛΕΦΩΝΟ": ("n", "τηλέφωνο"),
    "ΓΙΑΤΡΟΣ": ("m", "γιατρό"), "ΝΟΣΟΚΟΜΕΙΟ": ("n", "νοσοκομείο"), "ΦΑΡΜΑΚΟ": ("n", "φάρμακο"),
    "ΦΑΡΜΑΚΕΙΟ": ("n", "φαρμακείο"), "ΡΑΝΤΕΒΟΥ": ("n", "ραντεβού"), "ΣΥΝΤΑΓΗ": ("f", "συνταγή"),
    "ΑΣΘΕΝΟΦΟΡΟ": ("n", "ασθενοφόρο"), "ΕΞΕΤΑΣΗ": ("f", "εξέταση"),
    "ΕΦΟΡΙΑ": ("f", "εφορία"), "ΑΙΤΗΣΗ": ("f", "αίτηση"), "ΠΙΣΤΟΠΟΙΗΤΙΚΟ": ("n", "πιστοποιητικό"),
    "ΣΥΝΤΑΞΗ": ("f", "σύνταξη"), "ΛΟΓΑΡΙΑΣΜΟΣ": ("m", "λογαριασμό"), "ΤΡΑΠΕΖΑ": ("f", "τράπεζα"),
    "ΔΗΜΑΡΧΕΙΟ": ("n", "δημαρχείο"), "ΙΚΑ(Δ.Α.)": ("n", "ικα"),
}
ARTICLE = {"m": "τον", "f": "την", "n": "το"}          # accusative definite article
NOMINATIVE = {"m": "ο", "f": "η", "n": "το"}
NOMINATIVE_WORD = {"ΓΙΑΤΡΟΣ": "γιατρός", "ΛΟΓΑΡΙΑΣΜΟΣ": "λογαριασμός"}
PLACES = ["ΑΣΤΥΝΟΜΙΑ", "ΝΟΣΟΚΟΜΕΙΟ", "ΦΑΡΜΑΚΕΙΟ", "ΕΦΟΡΙΑ", "ΤΡΑΠΕΖΑ", "ΔΗΜΑΡΧΕΙΟ", "ΙΚΑ(Δ.Α.)", "ΓΙΑΤΡΟΣ"]
# verb gloss -> (present, past, future) x (1st, 2nd person), and the objects it takes
VERBS = {
    "ΘΕΛΩ": ((("θέλω",), ("θέλεις",)), (("ήθελα",), ("ήθελες",)), (("θα", "θέλω"), ("θα", "θέλεις"))),
    "ΧΡΕΙΑΖΟΜΑΙ": ((("χρειάζομαι",), ("χρειάζεσαι",)), (("χρειάστηκα",), ("χρειάστηκες",)),
                   (("θα", "χρειαστώ"), ("θα", "χρειαστείς"))),
    "ΧΑΝΩ": ((("χάνω",), ("χάνεις",)), (("έχασα",), ("έχασες",)), (("θα", "χάσω"), ("θα", "χάσεις"))),
    "ΒΡΙΣΚΩ": ((("βρίσκω",), ("βρίσκεις",)), (("βρήκα",), ("βρήκες",)), (("θα", "βρω"), ("θα", "βρεις"))),
    "ΠΛΗΡΩΝΩ": ((("πληρώνω",), ("πληρώνεις",)), (("πλήρωσα",), ("πλήρωσες",)),
                (("θα", "πληρώσω"), ("θα", "πληρώσεις"))),
    "ΚΑΝΩ": ((("κάνω",), ("κάνεις",)), (("έκανα",), ("έκανες",)), (("θα", "κάνω"), ("θα", "κάνεις"))),
    "ΠΑΙΡΝΩ": ((("παίρνω",), ("παίρνεις",)), (("πήρα",), ("πήρες",)), (("θα", "πάρω"), ("θα", "πάρεις"))),
    "ΠΗΓΑΙΝΩ": ((("πηγαίνω",), ("πηγαίνεις",)), (("πήγα",), ("πήγες",)), (("θα", "πάω"), ("θα", "πας"))),
}
WANTS = ["ΤΑΥΤΟΤΗΤΑ", "ΔΙΑΒΑΤΗΡΙΟ", "ΔΙΠΛΩΜΑ", "ΦΑΡΜΑΚΟ", "ΣΥΝΤΑΓΗ", "ΡΑΝΤΕΒΟΥ", "ΑΣΘΕΝΟΦΟΡΟ",
         "ΠΙΣΤΟΠΟΙΗΤΙΚΟ", "ΕΞΕΤΑΣΗ"]
BELONGINGS = ["ΤΑΥΤΟΤΗΤΑ", "ΔΙΑΒΑΤΗΡΙΟ", "ΠΟΡΤΟΦΟΛΙ", "ΚΛΕΙΔΙ", "ΔΙΠΛΩΜΑ", "ΤΗΛΕΦΩΝΟ", "ΑΥΤΟΚΙΝΗΤΟ"]
OBJECTS = {"ΘΕΛΩ": WANTS, "ΧΡΕΙΑΖΟΜΑΙ": WANTS, "ΧΑΝΩ": BELONGINGS, "ΒΡΙΣΚΩ": BELONGINGS,
           "ΠΛΗΡΩΝΩ": ["ΛΟΓΑΡΙΑΣΜΟΣ", "ΦΑΡΜΑΚΟ", "ΕΞΕΤΑΣΗ"], "ΚΑΝΩ": ["ΑΙΤΗΣΗ", "ΕΞΕΤΑΣΗ", "ΡΑΝΤΕΒΟΥ"],
           "ΠΑΙΡΝΩ": ["ΣΥΝΤΑΞΗ", "ΦΑΡΜΑΚΟ", "ΠΙΣΤΟΠΟΙΗΤΙΚΟ", "ΔΙΠΛΩΜΑ", "ΤΑΥΤΟΤΗΤΑ"]}
TIMES = {"ΧΘΕΣ": (1, "χθες"), "ΣΗΜΕΡΑ": (0, "σήμερα"), "ΑΥΡΙΟ": (2, "αύριο"), "ΤΩΡΑ": (0, "τώρα")}
COPULA = ("είναι", "ήταν", "θα είναι")
WH = {"ΠΟΥ;": ("πού", PLACES + BELONGINGS), "ΠΟΤΕ": ("πότε", ["ΡΑΝΤΕΒΟΥ", "ΕΞΕΤΑΣΗ", "ΣΥΝΤΑΞΗ"]),
      "ΠΟΣΟ": ("πόσο", ["ΛΟΓΑΡΙΑΣΜΟΣ", "ΦΑΡΜΑΚΟ", "ΕΞΕΤΑΣΗ", "ΔΙΑΒΑΤΗΡΙΟ"])}
SINGLES = {"ΒΟΗΘΕΙΑ": "βοήθεια", "ΕΥΧΑΡΙΣΤΩ": "ευχαριστώ πολύ", "ΓΕΙΑ": "γεια σας", "ΝΑΙ": "ναι"}
SYNTHETIC_GLOSSES = (list(PRONOUNS) + list(NOUNS) + list(VERBS) + list(TIMES) + list(WH)
                     + list(SINGLES) + ["ΟΧΙ", "ΠΑΡΑΚΑΛΩ"])


@dataclass
class Grammar:
    """The glosses a synthetic GSL is drawn from, and how they become Greek: the hand-written lexicon above, or
    that lexicon grown to `vocabulary` glosses (synthetic_grammar). `unused` holds the grown lexicon's nouns and
    verbs that no sentence has used yet: sentences take those first, so that every gloss is signed somewhere."""
    nouns: dict
    verbs: dict
    objects: dict
    places: list
    wants: list
    wh: dict
    unused: set = field(default_factory=set)

    @property
    def glosses(self):
        return (list(PRONOUNS) + list(self.nouns) + list(self.verbs) + list(TIMES) + list(self.wh) + list(SINGLES)
                + ["ΟΧΙ", "ΠΑΡΑΚΑΛΩ"])

    def pick(self, options, rng):
        """A gloss among `options`: an unused one if any (the grown lexicon's coverage), else any."""
        fresh = [o for o in options if o in self.unused]
        return rng.choice(fresh if fresh else options)

    def pick_verb(self, rng, other_than=None):
        """A verb that takes objects: one that is unused or has unused objects if any, else any."""
        verbs = [v for v in self.objects if v != other_than]
        wanting = [v for v in verbs if v in self.unused or any(o in self.unused for o in self.objects[v])]
        return rng.choice(wanting if wanting else verbs)


GRAMMAR = Grammar(NOUNS, VERBS, OBJECTS, PLACES, WANTS, WH)

CONSONANTS, VOWELS = "κλμνπρστφχβγδζθ", "αεηιου"
PLAIN = str.maketrans("άέήίόύώ", "αεηιουω")


def _pseudo_word(rng, syllables):
    """A Greek-looking word of `syllables` consonant-vowel syllables (lower case, unaccented)."""
    return "".join(rng.choice(list(CONSONANTS)) + rng.choice(list(VOWELS)) for _ in range(syllables))


def _accent(word, syllable):
    """The word with a tonos on the vowel of its `syllable`-th syllable from the end (1 = last)."""
    vowels = [i for i, c in enumerate(word) if c in VOWELS + "ω"]
    i = vowels[-min(syllable, len(vowels))]
    return word[:i] + "άέήίόύώ"["αεηιουω".index(word[i])] + word[i + 1:]


def synthetic_grammar(vocabulary, seed):
    """The hand-written lexicon grown to `vocabulary` glosses (for a synthetic GSL of GSL's size: 310): new
    nouns (feminine in -α/-η, neuter in -ο/-ι, whose article is all the text needs) and, one in five, new verbs
    with their own present, past and future forms in both persons; each new verb takes a share of the nouns as
    objects, and the new nouns also join the places, the wanted things and the wh-questions' subjects. The
    words are made of Greek syllables, unlike any real word and unlike each other."""
    if vocabulary <= len(SYNTHETIC_GLOSSES):
        return Grammar(NOUNS, VERBS, OBJECTS, PLACES, WANTS, WH)
    rng = np.random.default_rng([seed, vocabulary])
    extra = vocabulary - len(SYNTHETIC_GLOSSES)
    n_verbs = max(1, extra // 5)
    taken = set(SYNTHETIC_GLOSSES)
    nouns, verbs = dict(NOUNS), dict(VERBS)

    def fresh(syllables, ending=""):
        while True:
            word = _pseudo_word(rng, syllables) + ending
            gloss = word.translate(PLAIN).upper()
            if gloss not in taken:
                taken.add(gloss)
                return word, gloss
    new_nouns = []
    for _ in range(extra - n_verbs):
        gender = "f" if rng.random() < 0.5 else "n"
        word, gloss = fresh(int(rng.integers(2, 4)), str(rng.choice(["α", "η"] if gender == "f" else ["ο", "ι"])))
        nouns[gloss] = (gender, _accent(word, 2))
        new_nouns.append(gloss)
    new_verbs = []
    for _ in range(n_verbs):
        stem, gloss = fresh(2)
        present = ((_accent(stem + "ω", 2),), (_accent(stem + "εις", 2),))
        past = ((_accent(stem + "σα", 3),), (_accent(stem + "σες", 3),))
        future = (("θα", _accent(stem + "σω", 2)), ("θα", _accent(stem + "σεις", 2)))
        verbs[gloss + "Ω"] = (present, past, future)
        taken.add(gloss + "Ω")
        new_verbs.append(gloss + "Ω")
    order = rng.permutation(len(new_nouns))
    share = lambda k, parts: [new_nouns[i] for i in order[k::parts]]
    objects = {v: list(o) for v, o in OBJECTS.items()}
    for k, v in enumerate(new_verbs):
        objects[v] = share(k, len(new_verbs))
    places, wants = PLACES + share(0, 5), WANTS + share(1, 5)
    wh = {w: (word, list(subjects) + share(2 + k, 5)) for k, (w, (word, subjects)) in enumerate(WH.items())}
    return Grammar(nouns, verbs, objects, places, wants, wh, unused=set(nouns) | set(verbs))


def _verb_phrase(verb, person, tense, negated, obj=None, motion=False, grammar=GRAMMAR):
    words = (["δεν"] if negated else []) + list(grammar.verbs[verb][tense][person])
    if obj is not None:
        gender, word = grammar.nouns[obj]
        words += [("σ" + ARTICLE[gender]) if motion else ARTICLE[gender], word]
    return words


def _sentence(rng, grammar=GRAMMAR):
    """Draw one (gloss list, text word list) pair from the grammar."""
    g = grammar
    pick = lambda options: g.pick(options, rng)
    kind = rng.choice(["statement", "motion", "question", "request", "compound", "single"],
                      p=[0.30, 0.16, 0.16, 0.10, 0.20, 0.08])
    time = rng.choice(list(TIMES)) if rng.random() < 0.5 else None
    tense, time_word = TIMES[time] if time else (0, None)
    lead = [time] if time else []
    tail = [time_word] if time else []              # GSL topicalises time; the Greek text puts it last
    pron = rng.choice(list(PRONOUNS))
    person = PRONOUNS[pron]
    negated = rng.random() < 0.25
    if kind == "statement":
        verb = g.pick_verb(rng)
        obj = pick(g.objects[verb])
        gloss = lead + [pron, obj, verb] + (["ΟΧΙ"] if negated else [])
        text = _verb_phrase(verb, person, tense, negated, obj, grammar=g) + tail
    elif kind == "motion":
        place = pick(g.places)
        gloss = lead + [pron, place, "ΠΗΓΑΙΝΩ"] + (["ΟΧΙ"] if negated else [])
        text = _verb_phrase("ΠΗΓΑΙΝΩ", person, tense, negated, place, motion=True, grammar=g) + tail
    elif kind == "question":
        wh = rng.choice(list(g.wh))
        word, nouns = g.wh[wh]
        noun = pick(nouns)
        gender, _ = g.nouns[noun]
        verb = "κοστίζει" if wh == "ΠΟΣΟ" else COPULA[tense]
        gloss = lead + [noun, wh]
        text = [word] + verb.split() + [NOMINATIVE[gender], NOMINATIVE_WORD.get(noun, g.nouns[noun][1])] + tail
    elif kind == "request":
        verb = rng.choice(["ΘΕΛΩ", "ΧΡΕΙΑΖΟΜΑΙ"])
        obj = pick(g.wants)
        gloss = [pron, obj, verb, "ΠΑΡΑΚΑΛΩ"]
        text = ["παρακαλώ"] + _verb_phrase(verb, person, 0, False, obj, grammar=g)
    elif kind == "compound":
        verb = g.pick_verb(rng)
        obj = pick(g.objects[verb])
        place = pick(g.places)
        gloss = lead + [pron, obj, verb, place, "ΠΗΓΑΙΝΩ"]
        text = (_verb_phrase(verb, person, tense, False, obj, grammar=g) + ["και"]
                + _verb_phrase("ΠΗΓΑΙΝΩ", person, tense, False, place, motion=True, grammar=g))
        if rng.random() < 0.5:                       # a third clause: up to 8 glosses
            verb2 = g.pick_verb(rng, other_than=verb)
            obj2 = pick(g.objects[verb2])
            gloss += [obj2, verb2]
            text += ["και"] + _verb_phrase(verb2, person, tense, False, obj2, grammar=g)
        text += tail
    else:
        single = rng.choice(list(SINGLES))
        gloss, text = [single], SINGLES[single].split()
        if single == "ΒΟΗΘΕΙΑ" and rng.random() < 0.5:
            gloss, text = ["ΒΟΗΘΕΙΑ", "ΠΑΡΑΚΑΛΩ"], ["βοήθεια", "παρακαλώ"]
    return [str(g) for g in gloss], [str(w) for w in text]


# Body geometry in shoulder-width units: x to the image's right, y down, origin between the shoulders.
# MediaPipe's "left" is the signer's left, which is the image's right.
HANDSHAPES = np.array([  # curl of thumb, index, middle, ring, pinky (0 = straight, 1 = closed)
    [0.9, 1.0, 1.0, 1.0, 1.0],   # fist (A)
    [0.3, 0.0, 0.0, 0.0, 0.0],   # flat (B)
    [0.9, 0.0, 1.0, 1.0, 1.0],   # index (1)
    [0.9, 0.0, 0.0, 1.0, 1.0],   # V
    [0.4, 0.5, 0.5, 0.5, 0.5],   # C
    [0.7, 0.8, 0.8, 0.8, 0.8],   # O
    [0.0, 1.0, 1.0, 1.0, 0.0],   # Y
    [0.0, 0.0, 0.0, 0.0, 0.0],   # spread (5)
])
LOCATIONS = np.array([[-0.35, 0.30], [-0.15, -0.45], [-0.20, -0.95], [-0.55, 0.10], [-0.10, 0.75],
                      [-0.70, -0.30], [0.10, 0.25], [-0.40, -0.10]])   # chest, chin, forehead, side, ...
MOVEMENTS = ("line", "arc", "circle", "zigzag", "tap", "shape")
REST = np.array([[-0.40, 1.55], [0.40, 1.55]])         # right and left wrist at rest
FINGER_BASE = np.array([[-0.25, -0.15], [-0.12, -0.42], [0.0, -0.45], [0.11, -0.42], [0.21, -0.36]])
FINGER_LEN = np.array([0.20, 0.16, 0.17, 0.16, 0.13])
# A frame's hand state: [x, y, z, orientation, 5 curls] for the right hand, then the same for the left.


def _gloss_lexicon(rng, glosses=SYNTHETIC_GLOSSES):
    """Each gloss: a distinct motion (the location x movement pair is unique; beyond 48 glosses the location x
    movement x first handshape triple), handshapes and duration."""
    pairs = [(m, loc) for loc in range(len(LOCATIONS)) for m in range(len(MOVEMENTS))]
    triples = len(glosses) > len(pairs)
    if triples:
        pairs = [(m, loc, h) for m, loc in pairs for h in range(len(HANDSHAPES))]
        if len(glosses) > len(pairs):
            raise ValueError(f"at most {len(pairs)} glosses have distinct motions")
    order = rng.permutation(len(pairs))
    lexicon = {}
    for i, gloss in enumerate(glosses):
        movement, location = pairs[order[i]][:2]
        shape_a = pairs[order[i]][2] if triples else rng.integers(len(HANDSHAPES))
        shape_b = (shape_a + 1 + rng.integers(len(HANDSHAPES) - 1)) % len(HANDSHAPES) if MOVEMENTS[movement] == "shape" \
            else (shape_a if rng.random() < 0.7 else rng.integers(len(HANDSHAPES)))
        lexicon[gloss] = dict(
            movement=MOVEMENTS[movement], location=int(location), start=LOCATIONS[location] + rng.normal(0, 0.05, 2),
            direction=rng.uniform(0, 2 * np.pi), size=rng.uniform(0.25, 0.5), turns=rng.choice([1, 2]),
            shapes=(int(shape_a), int(shape_b)), angles=rng.uniform(-1.0, 1.0, 2),
            two_handed=rng.random() < 0.35, mirror=rng.random() < 0.6,
            duration=int(rng.integers(8, 20) if triples else rng.integers(9, 23)))    # GSL-sized: GSL's pace
    return lexicon


def _gloss_states(spec, n, style, rng):
    """(n, 18) hand states for one gloss of n frames, in the signer's style."""
    s = np.linspace(0, 1, n)
    ease = 0.5 - 0.5 * np.cos(np.pi * s)
    size = spec["size"] * style["amplitude"]
    start = spec["start"] + style["location"]
    d = np.array([np.cos(spec["direction"]), np.sin(spec["direction"])])
    normal = np.array([-d[1], d[0]])
    kind = spec["movement"]
    if kind == "line":
        path = start + ease[:, None] * size * d
    elif kind == "arc":
        angle = ease * np.pi * 0.8
        path = start + size * (np.cos(angle)[:, None] * d + np.sin(angle)[:, None] * normal - d)
    elif kind == "circle":
        angle = s * 2 * np.pi * spec["turns"]
        path = start + 0.6 * size * (np.cos(angle)[:, None] * d + np.sin(angle)[:, None] * normal - d)
    elif kind == "zigzag":
        path = start + ease[:, None] * size * d + 0.12 * np.sin(s * 6 * np.pi)[:, None] * normal
    elif kind == "tap":
        path = start + 0.10 * np.abs(np.sin(s * 3 * np.pi))[:, None] * np.array([0.0, 1.0])
    else:                                                  # "shape": hold the place, change the hand
        path = start + 0.03 * np.sin(s * 2 * np.pi)[:, None] * d
    shapes = HANDSHAPES[list(spec["shapes"])]
    curls = (1 - ease[:, None]) * shapes[0] + ease[:, None] * shapes[1]
    curls = curls * (1 - style["lax"]) + 0.5 * style["lax"]
    angle = (1 - ease) * spec["angles"][0] + ease * spec["angles"][1]
    z = -0.15 - 0.1 * np.sin(s * np.pi)
    right = np.concatenate([path, z[:, None], angle[:, None], curls], 1)
    if spec["two_handed"]:
        if spec["mirror"]:                                 # both hands move, mirrored about the midline
            left = right.copy()
            left[:, 0] = -right[:, 0]
            left[:, 3] = -right[:, 3]
        else:                                              # a flat base hand under the moving one
            left = np.zeros_like(right)
            left[:, :2] = start + np.array([0.35, 0.25])
            left[:, 2], left[:, 3], left[:, 4:] = -0.1, 1.4, HANDSHAPES[1]
    else:
        left = _rest_states(n, rng)[:, 9:]
    return np.concatenate([right, left], 1)


def _rest_states(n, rng):
    rest = np.zeros((n, 18))
    for h, base in enumerate(REST):
        rest[:, 9 * h:9 * h + 2] = base + rng.normal(0, 0.01, 2)
        rest[:, 9 * h + 2] = 0.0
        rest[:, 9 * h + 3] = 0.3 * (1 - 2 * h)
        rest[:, 9 * h + 4:9 * h + 9] = 0.5
    return rest


def _blend(a, b, n):
    """n transition frames from state a to state b (co-articulation)."""
    w = (0.5 - 0.5 * np.cos(np.pi * np.arange(1, n + 1) / (n + 1)))[:, None]
    return (1 - w) * a + w * b


def _render_hand(state, side):
    """21 MediaPipe hand points (n, 21, 3) from (n, 9) states, in shoulder-width units."""
    n = len(state)
    wrist = state[:, :3]
    angle = state[:, 3]
    curl = state[:, 4:9]
    base = FINGER_BASE * np.array([side, 1.0])
    points = np.zeros((n, 21, 3))
    points[:, 0] = wrist
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    for f in range(5):
        pos = np.broadcast_to(base[f] * 0.8, (n, 2)).copy()
        direction = np.arctan2(base[f][1], base[f][0]) * np.ones(n)
        for j in range(4):
            bend = curl[:, f] * (0.5 + 0.35 * j) * (-side if f == 0 else 1.0)
            step = FINGER_LEN[f] * (1.0 if j == 0 else 0.7 ** j) * (0.6 if j == 0 else 1.0)
            direction = direction + bend * (0.9 if f else 0.6)
            pos = pos + step * np.stack([np.cos(direction), np.sin(direction)], 1)
            local = pos * 0.55
            rotated = np.stack([cos[:, 0] * local[:, 0] - sin[:, 0] * local[:, 1],
                                sin[:, 0] * local[:, 0] + cos[:, 0] * local[:, 1]], 1)
            points[:, 1 + 4 * f + j, :2] = wrist[:, :2] + rotated
            points[:, 1 + 4 * f + j, 2] = wrist[:, 2] - 0.05 * curl[:, f] * (j + 1)
    return points


def _render(states, signer, rng):
    """(n, 543, 3) image-normalised keypoints from (n, 18) states for one signer."""
    n = len(states)
    sway = signer["sway"] * np.sin(np.arange(n) / 9.0 + rng.uniform(0, 6))[:, None] * np.array([1.0, 0.3])
    body = np.zeros((n, 33, 3))
    template = signer["body"]
    body[:] = template
    body[:, :, :2] += sway[:, None]
    right = _render_hand(states[:, :9], -1.0)
    left = _render_hand(states[:, 9:], 1.0)
    for h, (wrist_id, shoulder_id, elbow_id, hand) in enumerate([(16, 12, 14, right), (15, 11, 13, left)]):
        shoulder = body[:, shoulder_id, :2]
        wrist = hand[:, 0, :2] + sway
        hand[:, :, :2] += sway[:, None]
        middle = (shoulder + wrist) / 2
        gap = np.linalg.norm(wrist - shoulder, axis=1, keepdims=True)
        outward = np.stack([np.full(n, 1.0 if h else -1.0), np.full(n, 0.4)], 1)
        body[:, elbow_id, :2] = middle + outward * np.sqrt(np.clip(0.64 - (gap / 2) ** 2, 0.01, None))
        body[:, wrist_id, :2] = wrist
        for pose_id, hand_id in zip((18 - h, 20 - h, 22 - h), (17, 5, 4)):  # pinky, index, thumb
            body[:, pose_id] = hand[:, hand_id]
        body[:, wrist_id, 2] = hand[:, 0, 2]
    # into image units (x, y scaled and moved to the signer's origin, z scaled), the face from its template
    # once and then moved by the sway, which writes the 468 face points in one pass
    scale = signer["scale"] * 0.24
    to_image = lambda part: part * scale + np.append(signer["origin"], 0.0)
    points = np.empty((n, N_KEYPOINTS, 3))                           # MediaPipe order
    points[:, BODY], points[:, LEFT_HAND], points[:, RIGHT_HAND] = to_image(body), to_image(left), to_image(right)
    points[:, FACE] = to_image(signer["face"])[None]
    points[:, FACE, :2] += sway[:, None] * scale
    points += rng.normal(0, signer["jitter"], points.shape)
    return points


def _signer(k, rng):
    body = np.zeros((33, 3))
    body[0, :2] = [0, -0.85]                                          # nose
    body[1:4, :2] = [[0.08, -0.97], [0.12, -0.97], [0.16, -0.97]]      # left eye
    body[4:7, :2] = [[-0.08, -0.97], [-0.12, -0.97], [-0.16, -0.97]]   # right eye
    body[7:9, :2] = [[0.25, -0.92], [-0.25, -0.92]]
    body[9:11, :2] = [[0.07, -0.68], [-0.07, -0.68]]
    body[11:13, :2] = [[0.5, 0.0], [-0.5, 0.0]]
    body[23:25, :2] = [[0.32, 1.9], [-0.32, 1.9]]
    body[25:33, :2] = [[0.3, 2.9], [-0.3, 2.9], [0.3, 3.8], [-0.3, 3.8], [0.3, 3.9], [-0.3, 3.9],
                       [0.35, 4.0], [-0.35, 4.0]]
    body[:, :2] *= rng.uniform(0.92, 1.08, 2)                          # the signer's build
    angle = rng.uniform(0, 2 * np.pi, 468)
    radius = np.sqrt(rng.uniform(0, 1, 468))
    face = np.stack([0.3 * radius * np.cos(angle), -0.85 + 0.4 * radius * np.sin(angle), -0.1 * (1 - radius)], 1)
    outline = 2 * np.pi * np.arange(len(FACE_OVAL)) / len(FACE_OVAL)       # the mesh's outline on the edge
    face[FACE_OVAL] = np.stack([0.3 * np.sin(outline), -0.85 - 0.4 * np.cos(outline), 0 * outline], 1)
    face *= np.array([rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1), 1])
    return dict(id=k, body=body, face=face, scale=rng.uniform(0.8, 1.2),
                origin=np.array([0.5 + rng.uniform(-0.08, 0.08), 0.42 + rng.uniform(-0.05, 0.05)]),
                speed=rng.uniform(0.8, 1.25), jitter=rng.uniform(0.001, 0.004), sway=rng.uniform(0.01, 0.04),
                amplitude=rng.uniform(0.85, 1.15), location=rng.normal(0, 0.06, 2), lax=rng.uniform(0, 0.2),
                missing_at_rest=rng.uniform(0, 0.6))


def _perform(gloss, lexicon, signer, rng, slow=0.0):
    """One signer signs one gloss sentence: keypoints (F, 1, 543, 3) and the gloss segments. With probability
    `slow` the sentence is signed slowly (each gloss and transition 2.8 to 4.2 times longer, one in thirty of
    those 4.2 to 5 times, but at most about 600 frames in all): the long tail of real recordings' lengths."""
    tempo = 1.0
    if slow > 0 and rng.random() < slow:
        tempo = rng.uniform(4.2, 5.0) if rng.random() < 1 / 30 else rng.uniform(2.8, 4.2)
        usual = 15 + sum(lexicon[g]["duration"] * signer["speed"] + 3.5 for g in gloss)    # frames at tempo 1
        tempo = min(tempo, 600 / usual)
    parts, segments, cursor = [], [], 0
    short = rng.random() < (0.25 if len(gloss) <= 2 else 0.02)   # a clip cut tight around the signing
    long_pause = rng.random() < 0.02                  # a signer who hesitates: a long hold mid-sentence
    rest_len = 0 if short else int(rng.integers(4, 11))
    rest = _rest_states(max(rest_len, 1), rng)
    if rest_len:
        parts.append(rest[:rest_len])
        cursor += rest_len
    previous = rest[-1]
    for i, g in enumerate(gloss):
        spec = lexicon[g]
        n = int(np.clip(round(spec["duration"] * signer["speed"] * rng.uniform(0.85, 1.15)), 8, 25))
        n = int(round(n * tempo))                         # slowly: the same motion, drawn out
        states = _gloss_states(spec, n, signer, rng)
        states[:, :2] += rng.normal(0, 0.02, 2)
        gap = (int(rng.integers(3, 6)) if i == 0 else int(rng.integers(2, 5))) if not (short and i == 0) else 0
        gap = int(round(gap * tempo))
        if long_pause and i == len(gloss) // 2:
            hold = int(rng.integers(30, 80))
            parts.append(np.repeat(previous[None], hold, 0) + rng.normal(0, 0.005, (hold, 18)))
            cursor += hold
        if gap:
            parts.append(_blend(previous, states[0], gap))
            cursor += gap
        parts.append(states)
        segments.append((cursor, cursor + n))
        cursor += n
        previous = states[-1]
    if not short:
        end_rest = _rest_states(int(rng.integers(4, 11)), rng)
        parts += [_blend(previous, end_rest[0], int(rng.integers(3, 6))), end_rest]
    states = np.concatenate(parts)
    points = _render(states, signer, rng)
    # hand detection faults: hands low at rest are often lost, and short runs of misses anywhere
    for h, ids in enumerate((RIGHT_HAND, LEFT_HAND)):
        low = states[:, 9 * h + 1] > 1.2
        lost = low & (rng.random() < signer["missing_at_rest"])
        if rng.random() < 0.3:
            start = int(rng.integers(0, len(states)))
            lost[start:start + int(rng.integers(2, 7))] = True
        points[np.ix_(lost, ids)] = np.nan
    return points[:, None].astype(np.float32), segments


SYNTHETIC_GENERATOR = 2              # recorded in metadata.json: 2 = each signer from their own generator


SYNTHETIC_SIZES = dict(
    default={},
    # GSL's size: 331 distinct sentences over 310 glosses, five repetitions per signer (7 x 5 x 331 = 11,585
    # recordings; GSL has 10,290), and a length tail like GSL's (frames at 30 fps: mean 101, p95 254, max 615)
    gsl=dict(n_sentences=331, reps=5, vocabulary=310, slow=0.09),
)


def generate_synthetic_gsl(path, n_sentences=300, n_signers=7, reps=1, seed=0, workers=1, vocabulary=None,
                           slow=0.0):
    """Write the synthetic GSL to `path` in the GSL layout plus alignments.csv (the README's "The synthetic
    GSL" says what it holds). `vocabulary` grows the lexicon to that many glosses (synthetic_grammar; default
    the 47 hand-written ones), `slow` is the share of sentences signed slowly (_perform); SYNTHETIC_SIZES names
    the sets the package generates.

    Every signer signs every sentence `reps` times; the last signer is the test split, the one
    before it validation (signer-independent, like GSL SI). Each signer's recordings are drawn from their
    own generator (seed, signer), so `workers` processes (at most one per signer; `python run.py` uses one
    per core) write the same data as one. They are started with "spawn": a script that calls this with
    workers > 1 needs the `if __name__ == "__main__":` guard. The folder appears atomically.
    """
    rng = np.random.default_rng(seed)
    grammar = synthetic_grammar(vocabulary or len(SYNTHETIC_GLOSSES), seed)
    lexicon = _gloss_lexicon(rng, grammar.glosses)
    sentences, seen = [], set()
    while len(sentences) < n_sentences:
        gloss, text = _sentence(rng, grammar)
        if tuple(gloss) not in seen:
            seen.add(tuple(gloss))
            grammar.unused -= set(gloss)
            sentences.append((gloss, text))
    signers = [_signer(k, rng) for k in range(n_signers)]
    tmp = f"{path}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "poses"))
    split_of = {n_signers - 1: "test", n_signers - 2: "val"}
    jobs = [(signer, split_of.get(signer["id"], "train"), reps, sentences, lexicon, tmp, seed, slow)
            for signer in signers]
    workers = min(workers, n_signers)
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            signed = list(pool.map(_sign_sentences, jobs))
    else:
        signed = [_sign_sentences(job) for job in jobs]
    rows = [row for r, _ in signed for row in r]
    alignments = [row for _, a in signed for row in a]
    with open(os.path.join(tmp, "annotations.csv"), "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "text", "gloss", "split"]] + rows)
    with open(os.path.join(tmp, "alignments.csv"), "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "position", "gloss", "start", "end"]] + alignments)
    with open(os.path.join(tmp, "metadata.json"), "w", encoding="utf-8") as f:
        json.dump(dict(name="Synthetic GSL", id="synthetic_gsl", input_language="gsl", output_language="el",
                       fps=30, seed=seed, generator=SYNTHETIC_GENERATOR, sentences=n_sentences, signers=n_signers,
                       repetitions=reps, glosses=len(lexicon), slow=slow, test_signer=n_signers,
                       val_signer=n_signers - 1),
                  f, ensure_ascii=False, indent=1)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def _sign_sentences(job):
    """One signer signs every sentence `reps` times, drawn from the generator (seed, signer): writes the pose
    files into folder/poses and returns their annotation rows and alignment rows."""
    signer, split, reps, sentences, lexicon, folder, seed, slow = job
    rng = np.random.default_rng([seed, signer["id"]])
    rows, alignments = [], []
    for rep in range(reps):
        for j, (gloss, text) in enumerate(sentences):
            sid = f"synth_signer{signer['id'] + 1}_rep{rep + 1}_sentences{j:04d}"
            points, segments = _perform(gloss, lexicon, signer, rng, slow)
            np.save(os.path.join(folder, "poses", sid + ".npy"), points)
            rows.append([sid, " ".join(text), " ".join(gloss), split])
            alignments += [[sid, p, g, a, b] for p, (g, (a, b)) in enumerate(zip(gloss, segments))]
    return rows, alignments


# --- 1b. Readers: the GSL layout and signjoey pickles ----------------------------------------------

@dataclass
class Record:
    """One sample as read from disk: frames are the selected features at the original frame rate."""
    id: str
    split: str
    gloss: list
    text: list
    frames: np.ndarray                 # (F, features) float32, NaN where a keypoint was not detected


def _read_csv(path, required):
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise DataError(f"{path}: empty file (expected a header {','.join(required)})")
            names = [n.strip() for n in reader.fieldnames]
            missing = [c for c in required if c not in names]
            if missing:
                raise DataError(f"{path}: line 1: missing column(s) {', '.join(missing)} (found {', '.join(names)})")
            reader.fieldnames = names
            rows = []
            for row in reader:
                if None not in row and not any((v or "").strip() for v in row.values()):
                    continue                                     # ",,," : a spreadsheet's empty row
                if None in row:                                  # more fields than the header names
                    raise DataError(f"{path}: line {reader.line_num}: {len(names) + len(row[None])} fields where "
                                    f"the header has {len(names)} (a comma inside a field that is not quoted?)")
                rows.append((reader.line_num, row))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: unreadable CSV ({e})") from None
    if not rows:
        raise DataError(f"{path}: no rows after the header")
    return rows


def pose_path(folder, sample_id, format="gsl"):
    """A sample's pose file: poses/<id>.npy (gsl), poses/<id>.pose or else <id>.pose (pose); None for an id
    that would leave the dataset folder, and for signjoey pickles (features, not poses)."""
    if (format == "signjoey" or not sample_id or os.path.isabs(sample_id) or "/" in sample_id or "\\" in sample_id or "\0" in sample_id
            or sample_id in (".", "..")):
        return None
    suffix = ".pose" if format == "pose" else ".npy"
    path = os.path.join(folder, "poses", sample_id + suffix)
    if format == "pose" and not os.path.isfile(path) and os.path.isfile(os.path.join(folder, sample_id + suffix)):
        path = os.path.join(folder, sample_id + suffix)
    return path


def select_keypoints(pose, keypoints="body+hands", coords=2):
    """(F, 1, 543, D) MediaPipe array -> (F, len(keypoints) * coords) float32 features."""
    return pose[:, 0, KEYPOINT_SETS[keypoints], :coords].reshape(len(pose), -1).astype(np.float32)


def read_gsl(folder, splits=SPLITS, keypoints="body+hands", coords=2, on_bad=None, format="gsl"):
    """Read the SignAttention/GSL layout -> list of Record: annotations.csv (id,text,gloss,split) and
    poses/<id>.npy MediaPipe Holistic arrays (frames, 1, 543, D), NaN where nothing was detected; with
    format "pose", pose-format files poses/<id>.pose or <id>.pose instead (see read_pose_format).

    on_bad(message) is called for a bad sample, which is then skipped; without it the first bad sample
    raises DataError. Problems with the annotations file itself always raise.
    """
    annotations = os.path.join(folder, "annotations.csv")
    records, seen = [], {}
    for line, row in _read_csv(annotations, ("id", "text", "gloss", "split")):
        sid, split = (row["id"] or "").strip(), (row["split"] or "").strip()
        where = f"{annotations}: line {line}"
        try:
            if split.lower() not in SPLIT_NAMES:
                raise DataError(f"{where}: unknown split {split!r} (expected one of {', '.join(SPLITS)})")
            split = SPLIT_NAMES[split.lower()]
            if sid in seen:
                raise DataError(f"{where}: the id {sid!r} was given before, on line {seen[sid]}")
            seen[sid] = line
            if split not in splits:
                continue
            path = pose_path(folder, sid, format)
            if path is None:
                raise DataError(f"{where}: id {sid!r} is not a plain file name inside {folder}")
            gloss, text = (row["gloss"] or "").split(), (row["text"] or "").split()
            if not gloss or not text:
                raise DataError(f"{where}: empty {'gloss' if not gloss else 'text'} for id {sid}")
            frames = select_keypoints(read_pose_array(path, coords), keypoints, coords)
            if not np.isfinite(frames).any():
                raise DataError(f"{path}: every selected keypoint is NaN (nothing was detected)")
            records.append(Record(sid, split, gloss, text, frames))
        except DataError as e:
            if on_bad is None:
                raise
            on_bad(str(e))
    return records


def sample_pose(folder, sample_id, format="gsl"):
    """A sample's keypoints (frames, 543, 2) in x, y, or None where the data has no pose file for it."""
    path = pose_path(folder, sample_id, format)
    return read_pose_array(path)[:, 0, :, :2] if path and os.path.exists(path) else None


def read_pose_array(path, coords=2):
    """A pose file (.npy, or pose-format .pose) as a checked (frames, 1, 543, D) float array."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: pose file not found")
    try:
        pose = read_pose_format(path) if path.endswith(".pose") else np.load(path, allow_pickle=False)
    except DataError:
        raise
    except Exception as e:  # a truncated or foreign file: numpy raises several kinds
        raise DataError(f"{path}: unreadable pose file ({type(e).__name__}: {e})".splitlines()[0]) from None
    if pose.ndim != 4:
        raise DataError(f"{path}: pose array has rank {pose.ndim}, expected 4 (frames, 1, 543, coords)")
    if pose.shape[2] != N_KEYPOINTS or pose.shape[3] < coords or pose.shape[1] < 1:
        raise DataError(f"{path}: pose array has shape {pose.shape}, expected (frames, 1, 543, >={coords})")
    if pose.shape[0] == 0:
        raise DataError(f"{path}: zero frames")
    if not np.issubdtype(pose.dtype, np.floating):
        raise DataError(f"{path}: pose array has dtype {pose.dtype}, expected float")
    if np.isinf(pose).any():
        frame = int(np.isinf(pose).reshape(len(pose), -1).any(1).argmax())
        raise DataError(f"{path}: frame {frame}: infinite coordinates (NaN marks a point not detected)")
    return pose


class _TensorUnpickler(pickle.Unpickler):
    """Admits only what tensors, numpy arrays and plain containers need; anything else is refused."""
    ALLOWED = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
               ("torch._utils", "_rebuild_tensor"), ("torch._tensor", "_rebuild_from_type_v2"),
               ("torch", "Tensor"), ("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("builtins", "set"), ("builtins", "frozenset")} | {
        ("torch", s) for s in ("FloatStorage", "DoubleStorage", "HalfStorage", "LongStorage", "IntStorage",
                               "BFloat16Storage", "ByteStorage", "BoolStorage")}

    def __init__(self, file, name):
        super().__init__(file)
        self.name = name

    def find_class(self, module, name):
        if (module, name) == ("torch.storage", "_load_from_bytes"):    # a tensor's storage, saved by torch
            return lambda b: torch.load(io.BytesIO(b), weights_only=True)
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"{self.name}: refused to load: the pickle asks for {module}.{name}, "
                        "which is neither a tensor nor a plain container")


def _signjoey_files(data):
    if os.path.isdir(data):
        found = sorted(f[:-len(".train")] for f in os.listdir(data) if f.endswith(".train"))
        if len(found) != 1:
            raise DataError(f"{data}: expected one <prefix>.train/.dev/.test set, found {len(found)}")
        data = os.path.join(data, found[0])
    return {split: f"{data}.{suffix}" for split, suffix in (("train", "train"), ("val", "dev"), ("test", "test"))}


def read_signjoey(data, splits=SPLITS, on_bad=None):
    """Read signjoey / PHOENIX-2014-T feature pickles -> list of Record: gzip pickles <prefix>.train, .dev,
    .test, each a list of dicts with name, signer, gloss, text and sign (frames x features), read by a
    restricted unpickler that admits tensors, arrays and plain containers only."""
    records = []
    for split, path in _signjoey_files(data).items():
        if split not in splits:
            continue
        if not os.path.isfile(path):
            raise DataError(f"{path}: file not found")
        try:
            with open(path, "rb") as raw:
                magic = raw.read(2)
                raw.seek(0)
                f = gzip.open(raw) if magic == b"\x1f\x8b" else raw
                items = _TensorUnpickler(f, path).load()
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{path}: unreadable pickle ({type(e).__name__}: {e})".splitlines()[0]) from None
        if not isinstance(items, (list, tuple)):
            raise DataError(f"{path}: expected a list of samples, found {type(items).__name__}")
        for i, item in enumerate(items):
            where = f"{path}: sample {i}"
            try:
                if not isinstance(item, dict) or not {"name", "gloss", "text", "sign"} <= set(item):
                    raise DataError(f"{where}: expected a dict with name, gloss, text, sign")
                sign = item["sign"]
                sign = sign.float().numpy() if isinstance(sign, torch.Tensor) else np.asarray(sign, np.float32)
                if sign.ndim != 2 or len(sign) == 0:
                    raise DataError(f"{where} ({item['name']}): sign has shape {sign.shape}, expected (frames>0, features)")
                if not np.isfinite(sign).any():
                    raise DataError(f"{where} ({item['name']}): every feature is NaN")
                gloss, text = str(item["gloss"]).split(), str(item["text"]).split()
                if not gloss or not text:
                    raise DataError(f"{where} ({item['name']}): empty gloss or text")
                records.append(Record(str(item["name"]), split, gloss, text, sign.astype(np.float32)))
            except DataError as e:
                if on_bad is None:
                    raise
                on_bad(str(e))
    return records


def read_alignments(folder, format="gsl", samples=None, log=None):
    """alignments.csv -> {id: [(position, gloss, start, end), ...]} (segments [start, end) in original frames),
    or {} when there is none (and for signjoey pickles, which have no dataset folder).

    Each row is checked against its sample: `samples` {id: (glosses, frames)} where the caller has read the
    data (rows of the samples it left out, another split or a skipped bad sample, are left out too); else the
    first row of that id in annotations.csv, with the frames of its .npy pose file. A row needs integers with
    0 <= start < end, the gloss at that position of the sample's glosses, a position not given before, and a
    start inside the clip; an end past the clip's last frame is cut to it (a segment annotated on the video
    may outlast the frames its keypoints were extracted from). A bad row raises DataError naming the file and
    line. Rows of ids that annotations.csv does not list are left out, with one warning through `log`; if no
    row names a sample of annotations.csv, the file is refused."""
    path = os.path.join(folder, "alignments.csv")
    if format == "signjoey" or not os.path.isfile(path):
        return {}
    annotated = {}
    for sid, _, gloss, _ in read_annotations(folder):
        annotated.setdefault(sid, gloss)                     # the first row of an id, as read_gsl keeps it
    if samples is None:
        samples = {sid: (gloss, None) for sid, gloss in annotated.items()}
    segments, unknown, counted, rows = {}, set(), {}, _read_csv(path, ("id", "position", "gloss", "start", "end"))
    for line, row in rows:
        sid, gloss, where = (row["id"] or "").strip(), (row["gloss"] or "").strip(), f"{path}: line {line}"
        if sid not in samples:
            unknown |= set() if sid in annotated else {sid}
            continue
        try:
            position, start, end = int(row["position"]), int(row["start"]), int(row["end"])
        except (TypeError, ValueError):
            raise DataError(f"{where}: position, start and end must be integers") from None
        glosses, frames = samples[sid]
        if not 0 <= start < end:
            raise DataError(f"{where}: segment [{start}, {end}) of {sid} is empty or reversed (0 <= start < end)")
        if not 0 <= position < len(glosses) or glosses[position] != gloss:
            raise DataError(f"{where}: {sid} has no gloss {gloss!r} at position {position} (its glosses: "
                            f"{' '.join(glosses)})")
        if any(p == position for p, _, _, _ in segments.get(sid, [])):
            raise DataError(f"{where}: position {position} of {sid} was given before")
        if frames is None:
            if sid not in counted:
                counted[sid] = _frame_count(pose_path(folder, sid, format))
            frames = counted[sid]
        if frames is not None and start >= frames:
            raise DataError(f"{where}: segment [{start}, {end}) of {sid} starts after its clip's {frames} frames")
        segments.setdefault(sid, []).append((position, gloss, start, end if frames is None else min(end, frames)))
    if unknown and len(unknown) == len({(r["id"] or "").strip() for _, r in rows}):
        raise DataError(f"{path}: no row names a sample of annotations.csv (its ids: {', '.join(sorted(unknown)[:3])}, ...)")
    if unknown and log:
        log(f"warning: {path}: rows of {len(unknown)} id(s) not in annotations.csv left out: "
            + ", ".join(sorted(unknown)[:5]) + (", ..." if len(unknown) > 5 else ""))
    return segments


def _frame_count(path):
    """The frames of a .npy pose file, read from its header only; None where that cannot be known cheaply
    (other formats) or the file is not a readable clip (the data reader reports it)."""
    try:
        frames = int(np.load(path, mmap_mode="r").shape[0]) if path and path.endswith(".npy") else 0
    except Exception:  # a missing or unreadable file: numpy raises several kinds
        return None
    return frames or None


# --- 1c. Real recordings: dataset importers, MediaPipe Holistic keypoints, .pose files ---------------

# MediaPipe Holistic as `python run.py poses` runs it: a video in order with tracking, and the one model
# complexity that mediapipe==0.10.21 ships inside its wheel (0 and 2 would download a model).
HOLISTIC = dict(static_image_mode=False, model_complexity=1, smooth_landmarks=True, refine_face_landmarks=False,
                min_detection_confidence=0.5, min_tracking_confidence=0.5)
POSES_INSTALL = "pip install --no-deps -r requirements-poses.txt"
VIDEO_TYPES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".m4v", ".wmv")
IMAGE_TYPES = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass
class Clip:
    """One recording to convert: its id in the SignAttention layout, its video file or frame folder, and
    its annotation (glosses and text as space-separated strings)."""
    id: str
    path: str
    split: str
    gloss: str
    text: str
    where: str = ""                    # the annotation's file and line


def _walk(root):
    """(folders, CSV files) under root, in sorted order (the frames themselves are not listed)."""
    folders, files = [], []
    for here, dirs, names in os.walk(root):
        dirs.sort()
        folders.append(here)
        files += [os.path.join(here, n) for n in sorted(names) if n.lower().endswith(".csv")]
    return folders, files


def _one(paths, what, root, option):
    """The single path of `paths`, or a one-line error saying there is none or several."""
    if len(paths) != 1:
        found = "none" if not paths else f"{len(paths)}: {', '.join(paths[:3])}"
        raise DataError(f"{root}: expected one {what}, found {found} (name it with {option})")
    return paths[0]


def _pipe_rows(path, fields=None, header=()):
    """(line number, fields) of a pipe-separated file: without `header`, rows of exactly `fields` fields;
    with it, the first line names the columns (at least `header`) and rows are dicts."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [(n, line.rstrip("\r\n")) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})".splitlines()[0]) from None
    columns = None
    if header:
        columns = [c.strip() for c in lines.pop(0)[1].split("|")] if lines else []
        missing = [c for c in header if c not in columns]
        if missing:
            raise DataError(f"{path}: line 1: missing column(s) {', '.join(missing)} (expected {'|'.join(header)})")
        fields = len(columns)
    rows = []
    for n, line in lines:
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != fields:
            raise DataError(f"{path}: line {n}: expected {fields} fields separated by |, found {len(parts)}")
        rows.append((n, dict(zip(columns, parts)) if columns else parts))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _bad(message, on_bad):
    if on_bad is None:
        raise DataError(message)
    on_bad(message)


def _clip(where, sid, path, split, gloss, text, on_bad):
    """A Clip, or None for a bad row after its one-line error went to on_bad (raised without it)."""
    problem = (f"unknown split {split!r} (expected train, dev, val or test)" if split not in SPLIT_NAMES
               else "empty gloss" if not gloss.split() else "empty text" if not text.split()
               else f"the id {sid!r} cannot be a file name" if pose_path(".", sid) is None else None)
    if problem:
        return _bad(f"{where}: {problem}", on_bad)
    return Clip(sid, path, SPLIT_NAMES[split], " ".join(gloss.split()), " ".join(text.split()), where)


def import_gsl(root, split_files=(), text_file=None, protocol="SI", on_bad=None):
    """Clips of a raw GSL tree: the split files (`path|glosses`, no header: gsl_split_SI_train/dev/test.csv,
    or the signer-dependent GSL_SD_* with protocol SD) joined with the Greek text of merged_continuous.csv
    (`path|text|glosses`, its path without the scenario folder). Files not given are searched anywhere under
    root. Ids are the path without its scenario folder with / replaced by _, as in the SignAttention layout
    (police1/police1_signer1_rep1_sentences/sentences0000 is police1_signer1_rep1_sentences_sentences0000);
    dev becomes val."""
    pattern = re.compile(rf"^(?:gsl_split_)?(?:gsl_)?{protocol}_(train|dev|val|test)\.csv$", re.IGNORECASE)
    folders, files = _walk(root)
    split_files = split_files or [f for f in files if pattern.match(os.path.basename(f))]
    if not split_files:
        raise DataError(f"{root}: no GSL split files (gsl_split_{protocol}_train.csv, ...) under it "
                        "(name them with --split-files)")
    text_file = text_file or _one([f for f in files if os.path.basename(f) == "merged_continuous.csv"],
                                  "merged_continuous.csv (the Greek text)", root, "--text-file")
    texts = {path: text for _, (path, text, _) in _pipe_rows(text_file, 3)}
    clips = []
    for split_file in split_files:
        match = re.search(r"(?:^|[^a-z])(train|dev|val|test)\.csv$", os.path.basename(split_file), re.IGNORECASE)
        if not match:
            raise DataError(f"{split_file}: the file name does not end in its split (train, dev or test).csv")
        rows = _pipe_rows(split_file, 2)
        base = next((d for _, (path, _) in rows[:20] for d in folders if os.path.isdir(os.path.join(d, path))), root)
        for n, (path, gloss) in rows:
            key = path.strip("/").split("/", 1)[-1]              # merged_continuous.csv drops the scenario folder
            text = texts.get(key, texts.get(path))
            if text is None:
                _bad(f"{split_file}: line {n}: no text for {path} in {text_file}", on_bad)
                continue
            clip = _clip(f"{split_file}: line {n}", key.replace("/", "_"), os.path.join(base, path),
                         match.group(1).lower(), gloss, text, on_bad)
            clips += [clip] if clip else []
    return clips


def import_phoenix(root, on_bad=None):
    """Clips of a raw PHOENIX-2014-T tree: annotations/manual/PHOENIX-2014-T.<split>.corpus.csv
    (`name|video|start|end|speaker|orth|translation`) and the frames of
    features/fullFrame-210x260px/<split>/<name>/, found anywhere under root; ids are the names."""
    corpus = [f for f in _walk(root)[1] if re.fullmatch(r"PHOENIX-2014-T\.(train|dev|test)\.corpus\.csv",
                                                         os.path.basename(f))]
    if not corpus:
        raise DataError(f"{root}: no PHOENIX-2014-T.<split>.corpus.csv under it")
    clips = []
    for path in corpus:
        split = os.path.basename(path).split(".")[1]
        release = os.path.dirname(os.path.dirname(os.path.dirname(path)))          # .../annotations/manual/
        frames = os.path.join(release, "features", "fullFrame-210x260px", split)
        for n, row in _pipe_rows(path, header=("name", "video", "orth", "translation")):
            clip = _clip(f"{path}: line {n}", row["name"], os.path.join(frames, row["name"]), split, row["orth"],
                         row["translation"], on_bad)
            clips += [clip] if clip else []
    return clips


def import_folder(root, annotations, on_bad=None):
    """Clips of a folder of videos or of frame folders, annotated by a CSV with id,text,gloss,split whose ids
    are the video file names without their extension, or the frame folder names."""
    found = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        stem, ext = os.path.splitext(name)
        sid = stem if os.path.isfile(path) and ext.lower() in VIDEO_TYPES else name if os.path.isdir(path) else None
        if sid in found:
            raise DataError(f"{root}: {os.path.basename(found[sid])} and {name} both give the id {sid!r}")
        if sid is not None:
            found[sid] = path
    clips = []
    for line, row in _read_csv(annotations, ("id", "text", "gloss", "split")):
        sid = (row["id"] or "").strip()
        if sid not in found:
            _bad(f"{annotations}: line {line}: no video or frame folder named {sid!r} in {root}", on_bad)
            continue
        clip = _clip(f"{annotations}: line {line}", sid, found[sid], (row["split"] or "").strip(),
                     row["gloss"] or "", row["text"] or "", on_bad)
        clips += [clip] if clip else []
    return clips


def detect_source(root):
    """What a source folder holds: "gsl" (GSL split files or merged_continuous.csv under it), "phoenix" (a
    PHOENIX-2014-T corpus file under it), else "videos" or "frames" (frame folders) at its top level."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such folder")
    names = [os.path.basename(f) for f in _walk(root)[1]]
    if any(re.match(r"(?i)^(gsl_split_|gsl_)?s[id]_(train|dev|test)\.csv$", n) or n == "merged_continuous.csv"
           for n in names):
        return "gsl"
    if any(re.fullmatch(r"PHOENIX-2014-T\.(train|dev|test)\.corpus\.csv", n) for n in names):
        return "phoenix"
    top = os.listdir(root)
    if any(os.path.splitext(n)[1].lower() in VIDEO_TYPES for n in top):
        return "videos"
    if any(os.path.isdir(os.path.join(root, n)) for n in top):
        return "frames"
    raise DataError(f"{root}: neither a GSL or PHOENIX-2014-T tree nor a folder of videos or frame folders")


def import_clips(root, source, annotations=None, split_files=(), text_file=None, protocol="SI", on_bad=None):
    """The clips of a source folder of the given kind (see detect_source), each with its annotation; an id
    given twice is a bad row."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such folder")
    if source in ("videos", "frames") and not annotations:
        raise DataError(f"{root}: a folder of {source} needs --annotations FILE (a CSV with id,text,gloss,split)")
    clips = (import_gsl(root, split_files, text_file, protocol, on_bad) if source == "gsl" else
             import_phoenix(root, on_bad) if source == "phoenix" else import_folder(root, annotations, on_bad))
    seen, unique = {}, []
    for clip in clips:
        if clip.id in seen:
            _bad(f"{clip.where}: the id {clip.id} was given before, by {seen[clip.id]}", on_bad)
            continue
        seen[clip.id] = clip.where
        unique.append(clip)
    return unique


def natural_key(name):
    """A file name's sort key in which runs of digits compare as numbers (2.jpg before 10.jpg), the name
    itself breaking ties (01.jpg, 1.jpg)."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))], name


def read_frames(path):
    """The RGB frames (H, W, 3) uint8 of a video file, in order, or of a frame folder, in the natural order of
    its file names (2.jpg before 10.jpg). A file that cannot be decoded (a corrupt video, a truncated image)
    raises DataError naming it."""
    if os.path.isdir(path):
        names = sorted((n for n in os.listdir(path) if os.path.splitext(n)[1].lower() in IMAGE_TYPES
                        and not n.startswith(".")), key=natural_key)   # not macOS's ._ companions; 2 before 10
        if not names:
            raise DataError(f"{path}: zero frames (no {', '.join(IMAGE_TYPES)} files)")
        for name in names:
            yield _rgb(os.path.join(path, name))
        return
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such video file or frame folder")
    import cv2
    video, count = cv2.VideoCapture(path), 0
    try:
        if not video.isOpened():
            raise DataError(f"{path}: unreadable video")
        declared = int(video.get(cv2.CAP_PROP_FRAME_COUNT))
        while True:
            ok, frame = video.read()
            if not ok:
                break
            count += 1
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        video.release()
    if not count:
        raise DataError(f"{path}: zero frames (unreadable video)")
    if declared > 0 and count < 0.95 * declared - 1:
        raise DataError(f"{path}: the video ends after {count} of its {declared} frames (truncated?)")


def _rgb(path):
    """An image file as (H, W, 3) uint8 RGB, upright as its EXIF orientation says; 16-bit images scaled."""
    from PIL import Image, ImageOps                               # matplotlib's dependency: always here
    try:
        with Image.open(path) as image:                          # a truncated file raises in load()
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):       # 16-bit grey: to 8 bits, not clipped
                grey = np.asarray(image, dtype=np.float64) * (255 / 65535)
                return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[:, :, None], 3, 2)
            if image.mode not in ("RGB", "RGBA", "L", "LA", "P", "CMYK", "YCbCr", "1"):
                raise DataError(f"{path}: unsupported image mode {image.mode}")
            return np.asarray(image.convert("RGB"))
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: unreadable image ({e})".splitlines()[0]) from None


def holistic_keypoints(frames, holistic):
    """(F, 1, 543, 3) float32 keypoints of a frame sequence from a MediaPipe Holistic solution: 33 pose,
    468 face (a refined face's 10 iris points dropped), 21 left and 21 right hand points (the signer's
    left and right); x and y normalised to the image width and height, z as MediaPipe gives it; NaN for
    every point of a part that was not detected."""
    out = []
    for frame in frames:
        result = holistic.process(frame)
        points = np.full((N_KEYPOINTS, 3), np.nan, np.float32)
        for part, ids in ((result.pose_landmarks, BODY), (result.face_landmarks, FACE),
                          (result.left_hand_landmarks, LEFT_HAND), (result.right_hand_landmarks, RIGHT_HAND)):
            if part is not None:
                points[ids] = [(p.x, p.y, p.z) for p in part.landmark[:len(ids)]]
        out.append(points)
    return np.stack(out)[:, None]


def pose_file_complete(path):
    """Whether a converted pose file exists and holds a readable (frames, 1, 543, 3) array."""
    try:
        pose = np.load(path, mmap_mode="r", allow_pickle=False)
        return pose.ndim == 4 and pose.shape[0] > 0 and pose.shape[1:] == (1, N_KEYPOINTS, 3)
    except Exception:
        return False


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the process's standard error (file descriptor 2, which C++ libraries write to) for a while."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def convert_clip(clip, out):
    """Run MediaPipe Holistic over one clip (a fresh tracker) and write out/poses/<id>.npy atomically.
    Returns (id, frames, None), or (id, 0, (file, reason)) for a clip that could not be converted: unreadable,
    no person found in any frame, or any other error, which then concerns this clip only."""
    try:
        with _quiet_stderr():                 # MediaPipe's and FFmpeg's own log lines; failures are returned
            import mediapipe as mp
            with mp.solutions.holistic.Holistic(**HOLISTIC) as holistic:
                pose = holistic_keypoints(read_frames(clip.path), holistic)
        if np.isnan(pose[:, 0, BODY + LEFT_HAND + RIGHT_HAND]).all():
            return clip.id, 0, (clip.path, f"MediaPipe found no body or hand in any of its {len(pose)} frames")
        atomic_write(os.path.join(out, "poses", clip.id + ".npy"), lambda f: np.save(f, pose))
    except DataError as e:
        file, _, reason = str(e).partition(": ")              # our messages begin with the file they concern
        return clip.id, 0, (file, reason)
    except Exception as e:
        return clip.id, 0, (clip.path, f"{type(e).__name__}: {e}".splitlines()[0])
    return clip.id, len(pose), None


def mediapipe_version():
    """The installed MediaPipe's version, after importing what `poses` needs; a one-line DataError if it
    cannot be imported."""
    try:
        with _quiet_stderr():
            __import__("cv2")
            return __import__("mediapipe").__version__
    except ImportError as e:
        raise DataError(f"MediaPipe cannot be imported ({e}): {POSES_INSTALL}") from None


# MediaPipe's point names, which pose-format files carry (the face's points are named by their index)
POSE_NAMES = ["NOSE", "LEFT_EYE_INNER", "LEFT_EYE", "LEFT_EYE_OUTER", "RIGHT_EYE_INNER", "RIGHT_EYE",
              "RIGHT_EYE_OUTER", "LEFT_EAR", "RIGHT_EAR", "MOUTH_LEFT", "MOUTH_RIGHT", "LEFT_SHOULDER", "RIGHT_SHOULDER",
              "LEFT_ELBOW", "RIGHT_ELBOW", "LEFT_WRIST", "RIGHT_WRIST", "LEFT_PINKY", "RIGHT_PINKY", "LEFT_INDEX",
              "RIGHT_INDEX", "LEFT_THUMB", "RIGHT_THUMB", "LEFT_HIP", "RIGHT_HIP", "LEFT_KNEE", "RIGHT_KNEE",
              "LEFT_ANKLE", "RIGHT_ANKLE", "LEFT_HEEL", "RIGHT_HEEL", "LEFT_FOOT_INDEX", "RIGHT_FOOT_INDEX"]
HAND_NAMES = ["WRIST"] + [f"{finger}_{joint}" for finger, joints in (
    ("THUMB", ("CMC", "MCP", "IP", "TIP")), ("INDEX_FINGER", ("MCP", "PIP", "DIP", "TIP")),
    ("MIDDLE_FINGER", ("MCP", "PIP", "DIP", "TIP")), ("RING_FINGER", ("MCP", "PIP", "DIP", "TIP")),
    ("PINKY", ("MCP", "PIP", "DIP", "TIP"))) for joint in joints]
POSE_FORMAT_PARTS = (("POSE_LANDMARKS", BODY, POSE_NAMES), ("FACE_LANDMARKS", FACE, [str(i) for i in range(468)]),
                     ("LEFT_HAND_LANDMARKS", LEFT_HAND, HAND_NAMES), ("RIGHT_HAND_LANDMARKS", RIGHT_HAND, HAND_NAMES))


def read_pose_format(path):
    """A pose-format `.pose` file of MediaPipe Holistic components -> (frames, 1, 543, 3) float32 in our order.

    The first person's POSE_LANDMARKS, FACE_LANDMARKS, LEFT_ and RIGHT_HAND_LANDMARKS, each point placed by
    its name (MediaPipe's landmark names, the face's by index: a refined face's iris points and any other
    component are left out, and a reduced file fills only the points it has); x and y (pixels) divided by the
    header's width and height, z as stored; points masked or of confidence 0, and points the file lacks, NaN.
    """
    try:
        from pose_format import Pose
    except ImportError:
        raise DataError(f"{path}: reading .pose files needs pose-format ({POSES_INSTALL})") from None
    try:
        with open(path, "rb") as f:
            pose = Pose.read(f.read())
    except Exception as e:
        raise DataError(f"{path}: unreadable .pose file ({type(e).__name__}: {e})".splitlines()[0]) from None
    header, data = pose.header, pose.body.data                     # data: masked (frames, people, points, dims)
    confidence = np.asarray(pose.body.confidence)
    components, start = {}, 0
    for component in header.components:
        components[component.name] = (start, list(component.points))
        start += len(component.points)
    missing = [name for name, _, _ in POSE_FORMAT_PARTS if name not in components]
    width, height = header.dimensions.width, header.dimensions.height
    problem = (f"no {', '.join(missing)} component (not a MediaPipe Holistic pose)" if missing
               else "zero frames" if data.shape[0] == 0 else "no person" if data.shape[1] == 0
               else f"the header's width and height are {width} x {height}" if width <= 0 or height <= 0 else None)
    if problem:
        raise DataError(f"{path}: {problem}")
    out = np.full((data.shape[0], 1, N_KEYPOINTS, 3), np.nan, np.float32)
    dims = min(3, data.shape[-1])
    scale = np.array([width, height, 1.0][:dims], np.float32)
    for name, ids, names in POSE_FORMAT_PARTS:
        first, points = components[name]
        where = {n: i for i, n in enumerate(points)}
        pairs = [(ids[k], first + where[n]) for k, n in enumerate(names) if n in where]
        if not pairs:
            raise DataError(f"{path}: {name} has no point named as MediaPipe names them ({', '.join(points[:3])}, ...)")
        ours, theirs = [a for a, _ in pairs], [b for _, b in pairs]
        part = np.ma.filled(data[:, 0, theirs, :dims].astype(np.float32), np.nan) / scale
        part[confidence[:, 0, theirs] <= 0] = np.nan                                   # not detected
        out[:, 0, ours, :dims] = part
    return out


# --- 1d. Vocabularies, preprocessing and batches -------------------------------------------------

class Vocabulary:
    """Word-level vocabulary with PAD/UNK/BOS/EOS at ids 0..3; PAD doubles as the CTC blank."""

    def __init__(self, words):
        self.itos = [PAD, UNK, BOS, EOS] + sorted(set(words) - {PAD, UNK, BOS, EOS})
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

    def __len__(self):
        return len(self.itos)

    def encode(self, words):
        return [self.stoi.get(w, self.unk_id) for w in words]

    def decode(self, ids):
        """Token ids -> words, stopping at EOS and dropping specials."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i > self.eos_id:
                words.append(self.itos[i] if i < len(self.itos) else UNK)
        return words

    @classmethod
    def from_list(cls, itos):
        vocab = cls([])
        vocab.itos, vocab.stoi = list(itos), {w: i for i, w in enumerate(itos)}
        return vocab


def gloss_links(pairs, threshold=0.6):
    """Which gloss each text word realises, learnt from (gloss list, text list) pairs: the gloss with the
    highest Dice coefficient over sentences (of equal ones, the first in sorting order), kept where it reaches
    `threshold` (function words find none)."""
    word_count, gloss_count, both = {}, {}, {}
    for gloss, text in pairs:
        for g in set(gloss):
            gloss_count[g] = gloss_count.get(g, 0) + 1
        for w in set(text):
            word_count[w] = word_count.get(w, 0) + 1
            for g in set(gloss):
                both[w, g] = both.get((w, g), 0) + 1
    links = {}
    for (w, g), n in sorted(both.items()):              # sorted: a tie goes to the first gloss, in every process
        dice = 2 * n / (word_count[w] + gloss_count[g])
        if dice >= threshold and dice > links.get(w, (None, 0))[1]:
            links[w] = (g, dice)
    return {w: g for w, (g, _) in links.items()}


def read_annotations(folder):
    """(id, split, gloss list, text list) of every row of annotations.csv, without reading poses."""
    rows = _read_csv(os.path.join(folder, "annotations.csv"), ("id", "text", "gloss", "split"))
    split = lambda r: (r["split"] or "").strip()
    return [((r["id"] or "").strip(), SPLIT_NAMES.get(split(r).lower(), split(r)), (r["gloss"] or "").split(),
             (r["text"] or "").split()) for _, r in rows]


def normalise_pose(frames, keypoints):
    """Centre on the mid-shoulder point and scale by the shoulder width (means over the frames where both
    shoulders were detected), in place.

    Removes the signer's position and size, which the held-out-signer split makes essential. Applies
    only to keypoint features that include the shoulders; other features pass unchanged. A clip in which
    no frame has both shoulders apart raises DataError: it cannot be put in the same frame of reference
    as the others (left in image units, it would be silently wrong input).
    """
    ids = KEYPOINT_SETS.get(keypoints, [])
    if L_SHOULDER not in ids or R_SHOULDER not in ids:
        return frames
    points = frames.reshape(len(frames), len(ids), -1)
    left, right = points[:, ids.index(L_SHOULDER), :2], points[:, ids.index(R_SHOULDER), :2]
    both = np.isfinite(left).all(1) & np.isfinite(right).all(1)
    width = float(np.linalg.norm(left[both] - right[both], axis=1).mean()) if both.any() else 0.0
    if not width > 1e-6:
        raise DataError("no frame has both shoulders detected apart, so the keypoints cannot be centred on them "
                        "and scaled by their width (train with --no-normalise, or skip it with --skip-bad)")
    centre = ((left[both] + right[both]) / 2).mean(0)
    points[:, :, :2] = (points[:, :, :2] - centre) / width
    return frames


def option(default, help, **limits):
    """A configuration field that is also a command-line option (run.py builds its parser from these): its
    help, and `choices`, or for a number its range (low, high, open_low: low itself excluded); for run.py's
    modes also `positional`, `metavar`, `nargs` (with `const`, the value of the flag given alone) or `parse`
    (a function from the text to the value)."""
    return field(default=default, metadata=dict(help=help, **limits))


@dataclass
class DataConfig:
    """How records become model inputs (saved with the model, so eval and extract match training)."""
    format: str = "gsl"             # the dataset layout (train's --format: gsl, pose or signjoey)
    keypoints: str = option("body+hands", "MediaPipe keypoints used as features", choices=tuple(KEYPOINT_SETS))
    coords: int = option(2, "coordinates per keypoint (x, y or x, y, z)", choices=(2, 3))
    normalise: bool = option(True, "centre the keypoints on the shoulders and scale by the shoulder width")
    subsample: int = option(3, "keep one frame per chunk of this many (a random one in training)", low=1)
    max_frames: int = option(400, "frames kept per sample after subsampling", low=1)
    max_tokens: int = option(20, "output tokens per sample before EOS", low=1)
    target: str = option("text", "what the decoder writes", choices=("text", "gloss"))
    augment: bool = option(True, "random rotation, scale and shift of the keypoints in training")
    mask_empty: bool = option(False, "also mask frames with nothing detected (every feature 0), as SignAttention")


def load_records(data, cfg, splits=SPLITS, on_bad=None):
    if cfg.format == "signjoey":
        records = read_signjoey(data, splits, on_bad)
    else:
        records = read_gsl(data, splits, cfg.keypoints, cfg.coords, on_bad, cfg.format)
        if cfg.normalise:
            kept = []
            for r in records:
                try:
                    normalise_pose(r.frames, cfg.keypoints)
                    kept.append(r)
                except DataError as e:
                    _bad(f"{pose_path(data, r.id, cfg.format)}: {e}", on_bad)
            records = kept
    return records


class SignDataset:
    """Records with vocabularies and the time/augmentation transforms; batches are padded tensors."""

    def __init__(self, records, cfg, gloss_vocab, text_vocab, train=False):
        self.records, self.cfg, self.train = records, cfg, train
        self.gloss_vocab, self.text_vocab = gloss_vocab, text_vocab
        self.target_vocab = gloss_vocab if cfg.target == "gloss" else text_vocab

    def __len__(self):
        return len(self.records)

    def frames(self, i, generator=None):
        """Subsampled (and in training augmented) frames of sample i, NaN set to 0."""
        x = self.records[i].frames
        k = self.cfg.subsample
        starts = np.arange(0, len(x), k)
        if self.train and generator is not None and k > 1:
            sizes = np.minimum(k, len(x) - starts)
            offsets = (torch.rand(len(starts), generator=generator).numpy() * sizes).astype(int)
            x = x[starts + offsets]
        else:
            x = x[starts]
        x = x[:self.cfg.max_frames]
        if self.train and generator is not None and self.cfg.augment and self.cfg.format != "signjoey":
            x = _augment(x, self.cfg.coords, generator)
        return np.nan_to_num(x, nan=0.0)

    def tokens(self, i):
        r = self.records[i]
        words = r.gloss if self.cfg.target == "gloss" else r.text
        return self.target_vocab.encode(words[:self.cfg.max_tokens])

    def batch(self, indices, generator=None):
        """Padded batch: src (B, T, F), src_mask (B, T) True = real frame, tgt_in/tgt_out (B, n),
        gloss ids (B, g) with lengths for CTC. With `mask_empty`, frames with nothing detected are masked
        too, so the mask can have holes: `frame_lengths(src_mask)` gives each sample's length.

        SignAttention (pedroodb/sign_attention, helpers.create_src_mask) masks a frame whose features sum
        to 0; here a frame is masked when every feature is 0 (a sum can cancel), and a sample whose every
        frame is empty keeps its frames rather than leave attention nothing to attend to."""
        frames = [self.frames(i, generator) for i in indices]
        T = max(len(x) for x in frames)
        src = torch.zeros(len(indices), T, frames[0].shape[1])
        src_mask = torch.zeros(len(indices), T, dtype=torch.bool)
        for b, x in enumerate(frames):
            src[b, :len(x)] = torch.from_numpy(x)
            src_mask[b, :len(x)] = True
        if self.cfg.mask_empty:           # SignAttention's padding mask: frames whose features are all 0
            seen = src_mask & (src != 0).any(-1)
            src_mask = torch.where(seen.any(1, keepdim=True), seen, src_mask)   # a sample keeps a frame
        tokens = [self.tokens(i) for i in indices]
        n = max(len(t) for t in tokens) + 1
        tgt_in = torch.full((len(indices), n), self.target_vocab.pad_id)
        tgt_out = torch.full((len(indices), n), self.target_vocab.pad_id)
        for b, t in enumerate(tokens):
            tgt_in[b, :len(t) + 1] = torch.tensor([self.target_vocab.bos_id] + t)
            tgt_out[b, :len(t) + 1] = torch.tensor(t + [self.target_vocab.eos_id])
        glosses = [self.gloss_vocab.encode(self.records[i].gloss) for i in indices]
        gloss = torch.zeros(len(indices), max(len(g) for g in glosses), dtype=torch.long)
        for b, g in enumerate(glosses):
            gloss[b, :len(g)] = torch.tensor(g)
        return dict(src=src, src_mask=src_mask, tgt_in=tgt_in, tgt_out=tgt_out, gloss=gloss,
                    gloss_lengths=torch.tensor([len(g) for g in glosses]), index=list(indices))

    def batches(self, batch_size, generator=None, shuffle=False, pooled=True):
        """Index lists. Unshuffled: the split in order. Shuffled and `pooled`: a random permutation cut into pools
        of 16 batches, each pool sorted by length and cut into batches, the batches in random order (a batch
        of the synthetic GSL then spans about 17 frames of length, so little of it is padding). Shuffled and
        not pooled: a random permutation cut into batches (a PyTorch DataLoader's shuffle=True)."""
        order = torch.randperm(len(self), generator=generator).tolist() if shuffle else list(range(len(self)))
        if not (shuffle and pooled):
            return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        pool = batch_size * 16
        out = []
        for p in range(0, len(order), pool):
            chunk = sorted(order[p:p + pool], key=lambda i: len(self.records[i].frames))
            out += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        perm = torch.randperm(len(out), generator=generator).tolist()
        return [out[i] for i in perm]

    def parts(self, indices, size):
        """A batch's indices cut into parts of at most `size` samples of similar length (sorted by frames), so
        that little of each part is padding; with size 0 or at least the batch, the batch as one part. A
        step that adds the parts' losses, each from training_loss with `whole=self.totals(indices)`, takes
        the batch's gradient (the synthetic GSL's shuffled batches of 64 are 49% padding, their parts of 16 17%)."""
        if not size or size >= len(indices):
            return [list(indices)]
        ordered = sorted(indices, key=lambda i: len(self.records[i].frames))
        return [ordered[i:i + size] for i in range(0, len(ordered), size)]

    def totals(self, indices):
        """(target tokens with EOS, samples) of a batch: what training_loss divides a part's sums by."""
        return sum(len(self.tokens(i)) + 1 for i in indices), len(indices)


def _augment(x, coords, generator):
    """Random rotation (+-10 deg), scale (+-10%) and shift (+-0.1) of the 2-D coordinates."""
    r = torch.rand(4, generator=generator).numpy() * 2 - 1
    angle, scale, shift = r[0] * np.pi / 18, 1 + 0.1 * r[1], 0.1 * r[2:4]
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], np.float32)
    points = x.reshape(len(x), -1, coords).copy()
    points[..., :2] = points[..., :2] @ rot.T + shift
    return points.reshape(len(x), -1)


# ----------------------------------------------------------------------------------------------------
# 2. Model
# ----------------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    in_features: int = 150           # features per frame (from the data)
    n_gloss: int = 0                 # gloss vocabulary size (CTC head; from the data)
    n_out: int = 0                   # decoder vocabulary size (from the data)
    d_model: int = option(128, "transformer width", low=1)
    heads: int = option(4, "attention heads (d_model must be a multiple)", low=1)
    encoder_layers: int = option(3, "encoder depth", low=1)
    decoder_layers: int = option(2, "decoder depth", low=1)
    feedforward: int = option(512, "hidden width of each feed-forward block", low=1)
    embed_hidden: int = option(128, "hidden width of the per-frame embedder", low=1)
    dropout: float = option(0.0, "dropout in the transformer", low=0.0, high=0.99)
    pos_dropout: float = option(0.0, "dropout after the positional encoding", low=0.0, high=0.99)
    norm_first: bool = option(True, "pre-LayerNorm layers (--no-norm-first: post-LayerNorm, as SignAttention)")
    final_norm: bool = option(True, "a LayerNorm after the last encoder and decoder layer (nn.Transformer's)")
    init: str = option("default", "initialisation: PyTorch's layer defaults, or nn.Transformer's Xavier",
                       choices=("default", "xavier"))


class Attention(nn.Module):
    """Multi-head attention, written out. With `keep` set, the post-softmax map (B, heads, q, k) is kept
    on `self.attention` and retains its gradient; otherwise the fused scaled_dot_product_attention runs."""

    def __init__(self, d_model, heads, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query, self.key, self.value, self.proj = (nn.Linear(d_model, d_model) for _ in range(4))
        self.keep, self.attention = False, None

    def forward(self, x, memory, mask):
        """x (B, q, C) attends to memory (B, k, C); mask (B or 1, q or 1, k) bool, True = may attend."""
        B, Tq, C = x.shape
        Tk, h = memory.shape[1], self.heads
        q = self.query(x).view(B, Tq, h, C // h).transpose(1, 2)        # (B, h, q, hs)
        k = self.key(memory).view(B, Tk, h, C // h).transpose(1, 2)     # (B, h, k, hs)
        v = self.value(memory).view(B, Tk, h, C // h).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        if self.keep:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(C // h)
            att = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)   # (B, h, q, k)
            if att.requires_grad:
                att.retain_grad()
            self.attention = att
            y = F.dropout(att, p, self.training) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(B, Tq, C))


class FeedForward(nn.Sequential):
    def __init__(self, d_model, hidden, dropout):
        super().__init__(nn.Linear(d_model, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, d_model))


class EncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm_first = cfg.norm_first
        self.self_attention = Attention(cfg.d_model, cfg.heads, cfg.dropout)
        self.feedforward = FeedForward(cfg.d_model, cfg.feedforward, cfg.dropout)
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask):
        if self.norm_first:
            h = self.norm1(x)
            x = x + self.drop(self.self_attention(h, h, mask))
            return x + self.drop(self.feedforward(self.norm2(x)))
        x = self.norm1(x + self.drop(self.self_attention(x, x, mask)))
        return self.norm2(x + self.drop(self.feedforward(x)))


class DecoderLayer(nn.Module):
    """Self-attention over previous tokens, cross-attention over the video, feed-forward. With `keep`,
    the two attention branches' outputs are kept too (how much each step draws on video vs tokens)."""

    def __init__(self, cfg):
        super().__init__()
        self.norm_first = cfg.norm_first
        self.self_attention = Attention(cfg.d_model, cfg.heads, cfg.dropout)
        self.cross_attention = Attention(cfg.d_model, cfg.heads, cfg.dropout)
        self.feedforward = FeedForward(cfg.d_model, cfg.feedforward, cfg.dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.drop = nn.Dropout(cfg.dropout)
        self.branches = None

    def forward(self, y, memory, self_mask, cross_mask):
        if self.norm_first:
            h = self.norm1(y)
            s = self.self_attention(h, h, self_mask)
            y = y + self.drop(s)
            c = self.cross_attention(self.norm2(y), memory, cross_mask)
            y = y + self.drop(c)
            out = y + self.drop(self.feedforward(self.norm3(y)))
        else:
            s = self.self_attention(y, y, self_mask)
            y = self.norm1(y + self.drop(s))
            c = self.cross_attention(y, memory, cross_mask)
            y = self.norm2(y + self.drop(c))
            out = self.norm3(y + self.drop(self.feedforward(y)))
        if self.cross_attention.keep:
            self.branches = (s, c)                   # (B, n, C) each: previous tokens, video
        return out


def sinusoid(length, d_model, device=None):
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, d_model, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model, device=device)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(position * rate), torch.cos(position * rate)
    return pe


class SignTranslator(nn.Module):
    """Frames -> per-frame embedder -> + sinusoidal positions -> transformer encoder (-> CTC gloss head)
    -> autoregressive transformer decoder -> token logits."""
    pad_id, unk_id, bos_id, eos_id = Vocabulary.pad_id, Vocabulary.unk_id, Vocabulary.bos_id, Vocabulary.eos_id

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Sequential(nn.Linear(cfg.in_features, cfg.embed_hidden), nn.ReLU(),
                                   nn.Linear(cfg.embed_hidden, d), nn.ReLU())
        self.pos_drop = nn.Dropout(cfg.pos_dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.encoder_norm = nn.LayerNorm(d) if cfg.final_norm else nn.Identity()
        self.gloss_head = nn.Linear(d, cfg.n_gloss)
        self.token_embed = nn.Embedding(cfg.n_out, d, padding_idx=self.pad_id)
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(d) if cfg.final_norm else nn.Identity()
        self.head = nn.Linear(d, cfg.n_out)
        if cfg.init == "xavier":
            self.xavier_init()
        elif cfg.init != "default":
            raise ValueError(f"init must be 'default' or 'xavier', not {cfg.init!r}")

    def xavier_init(self):
        """nn.Transformer's initialisation (its _reset_parameters, after MultiheadAttention's): every weight
        matrix of the encoder and decoder layers Xavier-uniform, attention biases 0, feed-forward biases and
        LayerNorms as PyTorch makes them; the embedders and the output heads keep PyTorch's defaults, as
        they sit outside nn.Transformer. Query, key and value are one (3d, d) matrix there, so their bound is
        sqrt(6 / (d + 3d))."""
        d = self.cfg.d_model
        for layer in list(self.encoder) + list(self.decoder):
            for name, p in layer.named_parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            for attention in (m for m in layer.modules() if isinstance(m, Attention)):
                for linear in (attention.query, attention.key, attention.value):
                    nn.init.uniform_(linear.weight, -math.sqrt(6 / (4 * d)), math.sqrt(6 / (4 * d)))
                for linear in (attention.query, attention.key, attention.value, attention.proj):
                    nn.init.zeros_(linear.bias)

    def attention_modules(self):
        """{'encoder_self': [...], 'decoder_self': [...], 'decoder_cross': [...]}, one module per layer."""
        return {"encoder_self": [l.self_attention for l in self.encoder],
                "decoder_self": [l.self_attention for l in self.decoder],
                "decoder_cross": [l.cross_attention for l in self.decoder]}

    def keep_attention(self, keep=True):
        """Switch every attention to the explicit path that keeps its map (and its gradient)."""
        for group in self.attention_modules().values():
            for module in group:
                module.keep, module.attention = keep, None
        return self

    def encode(self, src, src_mask, positions=None):
        """src (B, T, F), src_mask (B, T) -> memory (B, T, C). positions (B, T) long: each frame's index in
        its video (default 0..T-1), so that frames can be dropped and the rest keep their positional encoding."""
        if positions is None:
            x = self.embed(src) + sinusoid(src.shape[1], self.cfg.d_model, src.device)
        else:
            x = self.embed(src) + sinusoid(int(positions.max()) + 1, self.cfg.d_model, src.device)[positions]
        x = self.pos_drop(x)
        mask = src_mask[:, None, :]
        for layer in self.encoder:
            x = layer(x, mask)
        return self.encoder_norm(x)

    def gloss_logits(self, memory):
        return self.gloss_head(memory)

    def decode(self, memory, src_mask, tgt_in):
        """Teacher-forced decoder: tgt_in (B, n) starting with BOS -> logits (B, n, V)."""
        n = tgt_in.shape[1]
        y = self.token_embed(tgt_in) * math.sqrt(self.cfg.d_model) + sinusoid(n, self.cfg.d_model, tgt_in.device)
        y = self.pos_drop(y)
        causal = torch.ones(n, n, dtype=torch.bool, device=tgt_in.device).tril()[None]
        cross = src_mask[:, None, :]
        for layer in self.decoder:
            y = layer(y, memory, causal, cross)
        return self.head(self.decoder_norm(y))

    def forward(self, src, src_mask, tgt_in):
        return self.decode(self.encode(src, src_mask), src_mask, tgt_in)


class TorchTransformerTranslator(SignTranslator):
    """The same translator on torch.nn.Transformer's encoder and decoder layers (fused attention, no map
    kept): embedder, positions, token embedding, heads, sizes and dropout as SignTranslator's. It is the
    baseline that `python run.py bench --train` times our training step against."""

    def __init__(self, cfg):
        super().__init__(cfg)
        d = cfg.d_model
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(
            d, cfg.heads, cfg.feedforward, cfg.dropout, batch_first=True, norm_first=cfg.norm_first),
            cfg.encoder_layers, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(
            d, cfg.heads, cfg.feedforward, cfg.dropout, batch_first=True, norm_first=cfg.norm_first), cfg.decoder_layers)

    def encode(self, src, src_mask, positions=None):
        x = self.pos_drop(self.embed(src) + sinusoid(src.shape[1], self.cfg.d_model, src.device))
        return self.encoder_norm(self.encoder(x, src_key_padding_mask=~src_mask))

    def decode(self, memory, src_mask, tgt_in):
        n = tgt_in.shape[1]
        y = self.token_embed(tgt_in) * math.sqrt(self.cfg.d_model) + sinusoid(n, self.cfg.d_model, tgt_in.device)
        causal = nn.Transformer.generate_square_subsequent_mask(n, device=tgt_in.device)
        y = self.decoder(self.pos_drop(y), memory, tgt_mask=causal, tgt_is_causal=True,
                         memory_key_padding_mask=~src_mask)
        return self.head(self.decoder_norm(y))


def decoder_loss(model, memory, batch, label_smoothing=0.0, reduction="mean"):
    """The decoder's teacher-forced cross-entropy over the batch's target tokens (PAD ignored), with label
    smoothing, and its logits (B, n, V): training takes the mean, evaluation the sum and the tokens the logits
    rank first."""
    logits = model.decode(memory, batch["src_mask"], batch["tgt_in"])
    loss = F.cross_entropy(logits.flatten(0, 1), batch["tgt_out"].flatten(), ignore_index=model.pad_id,
                           label_smoothing=label_smoothing, reduction=reduction)
    return loss, logits


def training_loss(model, batch, label_smoothing=0.0, ctc_weight=0.0, signcl=0.0, generator=None, whole=None):
    """The whole objective of a batch (SignDataset.batch): the decoder's teacher-forced cross-entropy with
    label smoothing (decoder_loss), plus ctc_weight x the CTC loss of the gloss head over each sample's frames
    (blank = PAD; each sample's loss over its gloss count, averaged over samples), plus signcl x the SignCL
    loss of the encoder's frame features (sign_cl.SignCL, its negatives drawn from `generator`, each sample's
    margin from its frames and words). Returns the loss and the encoder's memory (B, T, C).

    With `whole` = (tokens, samples) of a larger batch this one is a part of (SignDataset.totals), the loss is
    this part's share of that batch's: the cross-entropy summed over the part's tokens over the batch's
    tokens, the CTC terms summed over the part's samples over the batch's samples, so that the parts' losses
    add up to the batch's. SignCL's mean over the part's anchors is weighted by its share of the samples,
    which is not the batch's loss: the batch averages over all its anchors alike, so that in parts sorted by
    length the anchors of short clips weigh more (1.4x against 0.7x for the long ones in a batch of 11)."""
    memory = model.encode(batch["src"], batch["src_mask"])
    lengths = frame_lengths(batch["src_mask"])
    if whole is None:
        loss, _ = decoder_loss(model, memory, batch, label_smoothing)
    else:
        tokens, samples = whole
        loss = decoder_loss(model, memory, batch, label_smoothing, reduction="sum")[0] / tokens
    if ctc_weight > 0:
        log_probs = model.gloss_logits(memory).log_softmax(-1).transpose(0, 1)          # (T, B, V)
        ctc = F.ctc_loss(log_probs, batch["gloss"], lengths, batch["gloss_lengths"], blank=model.pad_id,
                         zero_infinity=True, reduction="mean" if whole is None else "none")
        if whole is not None:
            ctc = (ctc / batch["gloss_lengths"].clamp(min=1)).sum() / samples
        loss = loss + ctc_weight * ctc
    if signcl > 0:
        margin = batch_margins(lengths, batch["tgt_out"], model.pad_id)
        contrast = SignCL()(memory, margin, lengths, generator)
        loss = loss + signcl * (contrast if whole is None else contrast * len(lengths) / samples)
    return loss, memory


# ----------------------------------------------------------------------------------------------------
# 3. Decoding
# ----------------------------------------------------------------------------------------------------

def shift_right(tokens, bos_id):
    """Decoder inputs for output tokens: (B, n) y_1..y_n -> BOS, y_1..y_{n-1} (teacher forcing)."""
    return torch.cat([torch.full_like(tokens[:, :1], bos_id), tokens[:, :-1]], 1)


def decodable(logits, model):
    """PAD and BOS are never written: their logits are set to -inf."""
    logits = logits.clone()
    logits[..., [model.pad_id, model.bos_id]] = float("-inf")
    return logits


@torch.no_grad()
def greedy_decode(model, src, src_mask, max_len=30, memory=None):
    """(B, L) token ids, each row ending with EOS (or cut at max_len) and padded with PAD."""
    memory = model.encode(src, src_mask) if memory is None else memory
    B = src.shape[0]
    seq = torch.full((B, 1), model.bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    for _ in range(max_len):
        token = decodable(model.decode(memory, src_mask, seq)[:, -1], model).argmax(-1)
        token = token.masked_fill(done, model.pad_id)
        seq = torch.cat([seq, token[:, None]], 1)
        done |= token == model.eos_id
        if done.all():
            break
    return seq[:, 1:]


@torch.no_grad()
def beam_search(model, src, src_mask, beam=4, alpha=1.0, max_len=30, memory=None):
    """Batched beam search on log-probabilities with the GNMT length penalty ((5 + len) / 6) ** alpha.

    Returns (B, L) token ids like greedy_decode. beam=1 falls back to greedy decoding.
    """
    if beam <= 1:
        return greedy_decode(model, src, src_mask, max_len, memory)
    memory = model.encode(src, src_mask) if memory is None else memory
    B, K, dev = src.shape[0], beam, src.device
    memory = memory.repeat_interleave(K, 0)
    mask = src_mask.repeat_interleave(K, 0)
    seqs = torch.full((B * K, 1), model.bos_id, dtype=torch.long, device=dev)
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0
    best_score = torch.full((B,), float("-inf"), device=dev)
    best = [None] * B

    def penalty(length):
        return ((5.0 + length) / 6.0) ** alpha

    for step in range(1, max_len + 1):
        logp = decodable(model.decode(memory, mask, seqs)[:, -1], model).log_softmax(-1)   # (B*K, V)
        V = logp.shape[-1]
        cand = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V)
        top, idx = cand.topk(2 * K, dim=1)                                          # (B, 2K)
        origin, token = idx // V, idx % V
        ended = token == model.eos_id
        if step == max_len:
            ended = torch.ones_like(ended)
        finished = torch.where(ended, top / penalty(step), torch.full_like(top, float("-inf")))
        f_score, f_pos = finished.max(1)
        for b in torch.nonzero(f_score > best_score).flatten().tolist():
            best_score[b] = f_score[b]
            k = origin[b, f_pos[b]]
            best[b] = seqs[b * K + k, 1:].tolist() + [int(token[b, f_pos[b]])]
        alive = top.masked_fill(ended, float("-inf"))
        scores, pick = alive.topk(K, dim=1)
        rows = (torch.arange(B, device=dev)[:, None] * K + origin.gather(1, pick)).flatten()
        seqs = torch.cat([seqs[rows], token.gather(1, pick).reshape(-1, 1)], 1)
        if (best_score >= scores.max(1).values / penalty(max_len)).all():
            break
    out = torch.full((B, max(len(s) for s in best)), model.pad_id, dtype=torch.long, device=dev)
    for b, s in enumerate(best):
        out[b, :len(s)] = torch.tensor(s, device=dev)
    return out


def frame_lengths(mask):
    """Each sample's length, up to its last real frame: (B, T) bool -> (B,) long. A mask can have holes
    (DataConfig.mask_empty), so a length is not the count of real frames."""
    T = mask.shape[1]
    return torch.where(mask.any(1), T - mask.flip(1).int().argmax(1), 0)


def ctc_decode(gloss_logits, src_mask, blank=0):
    """Greedy CTC: best class per frame up to the last real one, repeats merged, blanks dropped -> list of id
    lists."""
    best = gloss_logits.argmax(-1).cpu()
    lengths = frame_lengths(src_mask).cpu()
    out = []
    for path, n in zip(best, lengths):
        path = torch.unique_consecutive(path[:n]).tolist()
        out.append([i for i in path if i != blank])
    return out


def ctc_viterbi(log_probs, target, blank=0):
    """Most likely CTC path of `target` (list of ids) through log_probs (T, V): the label of every frame
    (blank frames get `blank`). Labels frames for SDR where no alignment is given (viterbi_centres)."""
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


def segment_centres(segments, subsample):
    """(model frame, gloss) at the centre of each gloss segment [(position, gloss, start, end)] of one sample,
    in original frames (alignments.csv), the model reading one frame in `subsample`. A segment between two of
    the frames the model reads has no centre and is left out."""
    k = subsample
    return [((a + b) // 2 // k, g) for _, g, a, b in segments if -(-a // k) < -(-b // k)]


def viterbi_centres(log_probs, gloss_ids, itos, blank=0):
    """(model frame, gloss) at the centre of each run of one gloss on the CTC Viterbi path (ctc_viterbi) of
    the reference glosses `gloss_ids` through one sample's gloss log-probabilities (T, V); `itos` names them."""
    path, n = ctc_viterbi(log_probs, gloss_ids, blank), len(log_probs)
    centres, t = [], 0
    while t < n:
        end = t
        while end + 1 < n and path[end + 1] == path[t]:
            end += 1
        if path[t] != blank:
            centres.append(((t + end) // 2, itos[path[t]]))
        t = end + 1
    return centres


# ----------------------------------------------------------------------------------------------------
# 4. Metrics
# ----------------------------------------------------------------------------------------------------

def bleu(hypotheses, references):
    """Cumulative corpus BLEU-1..4 (sacrebleu, tokenize='none' on whitespace tokens) and the signature."""
    from sacrebleu.metrics import BLEU
    scores, signature = {}, None
    for n in range(1, 5):
        metric = BLEU(tokenize="none", max_ngram_order=n)
        scores[f"bleu{n}"] = metric.corpus_score(hypotheses, [references]).score
        signature = str(metric.get_signature())
    return scores, signature


def bleu_statistics(hypothesis, reference, order=4):
    """sacrebleu's sufficient statistics of one whitespace-tokenised sentence pair: [hypothesis length,
    reference length, clipped n-gram matches for n = 1..order, hypothesis n-grams for n = 1..order]."""
    h, r = hypothesis.split(), reference.split()
    matches, totals = [], []
    for n in range(1, order + 1):
        hyp = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
        ref = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
        matches.append(sum(min(c, ref[g]) for g, c in hyp.items()))
        totals.append(max(len(h) - n + 1, 0))
    return [len(h), len(r)] + matches + totals


def bleu_from_statistics(stats, order=4):
    """Corpus BLEU from summed bleu_statistics (..., 2 + 2 order), vectorised over the leading axes: the
    formula of sacrebleu's corpus_score (its default 'exp' smoothing), so that a bootstrap over sentences
    can resum statistics instead of re-tokenising."""
    stats = np.asarray(stats, dtype=np.float64)
    hyp_len, ref_len = stats[..., 0], stats[..., 1]
    correct, total = stats[..., 2:2 + order], stats[..., 2 + order:2 + 2 * order]
    halvings = np.cumsum(correct == 0, -1)                        # exp smoothing: 1/2, 1/4, .. per zero order
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(correct > 0, correct / total, 1.0 / (2.0 ** halvings * total))
        brevity = np.where(hyp_len >= ref_len, 1.0, np.exp(1 - ref_len / hyp_len))
        score = 100 * brevity * np.exp(np.log(precision).mean(-1))
    defined = (total > 0).all(-1) & (correct > 0).any(-1) & (hyp_len > 0)
    return np.where(defined, score, 0.0)


def chrf(hypotheses, references):
    from sacrebleu.metrics import CHRF
    return CHRF().corpus_score(hypotheses, [references]).score     # already 0-100


def edit_distance(a, b):
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def wer(hypotheses, references):
    """Corpus word error rate in %: total word-level edit distance / total reference words."""
    errors = sum(edit_distance(h.split(), r.split()) for h, r in zip(hypotheses, references))
    return 100.0 * errors / max(1, sum(len(r.split()) for r in references))


def rouge_l(hypotheses, references, beta=1.2):
    """Sentence-level ROUGE-L F (beta 1.2) averaged over sentences, in %."""
    total = 0.0
    for h, r in zip(hypotheses, references):
        h, r = h.split(), r.split()
        if not h or not r:
            continue
        lcs = [0] * (len(r) + 1)
        for x in h:
            prev = 0
            for j, y in enumerate(r, 1):
                prev, lcs[j] = lcs[j], (prev + 1 if x == y else max(lcs[j], lcs[j - 1]))
        p, rec = lcs[-1] / len(h), lcs[-1] / len(r)
        if p and rec:
            total += (1 + beta ** 2) * p * rec / (rec + beta ** 2 * p)
    return 100.0 * total / max(1, len(references))


def translation_metrics(hypotheses, references):
    """BLEU-1..4, chrF and ROUGE-L of whitespace-tokenised strings."""
    scores, _ = bleu(hypotheses, references)
    scores["chrf"] = chrf(hypotheses, references)
    scores["rouge_l"] = rouge_l(hypotheses, references)
    return scores


# ----------------------------------------------------------------------------------------------------
# 5. Files: atomic checkpoints and load_model
# ----------------------------------------------------------------------------------------------------

def atomic_write(path, write):
    """Write through `write(file)` into a temporary file beside `path`, fsync, then rename over it."""
    tmp = f"{path}.tmp{os.getpid()}-{os.urandom(4).hex()}"         # unique, even across machines
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(folder, older_than=600):
    """Remove atomic_write's temporary files in `folder` older than `older_than` seconds: left by a process
    killed mid-write (a file lives milliseconds), never one being written now, by any machine."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if re.search(r"\.tmp\d+-[0-9a-f]{8}$", name) and time.time() - os.path.getmtime(path) > older_than:
            os.remove(path)


def save_checkpoint(path, state):
    """Save a dict of tensors and plain data atomically: a kill at any moment leaves the old file."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, device="cpu"):
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint not found") from None
    except Exception as e:
        raise DataError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})".splitlines()[0]) from None


def build_model(config, records):
    """A new model for a run configuration ({'data', 'model', ...}) and its records by split: the gloss and
    text vocabularies of the training split, the model (its input and vocabulary sizes written into
    config['model']), and a SignDataset per split. Returns (model, datasets, gloss_vocab, text_vocab)."""
    data_cfg = DataConfig(**config["data"])
    gloss_vocab = Vocabulary(w for r in records["train"] for w in r.gloss)
    text_vocab = Vocabulary(w for r in records["train"] for w in r.text)
    target_vocab = gloss_vocab if data_cfg.target == "gloss" else text_vocab
    model_cfg = ModelConfig(**{**config["model"], "in_features": records["train"][0].frames.shape[1],
                               "n_gloss": len(gloss_vocab), "n_out": len(target_vocab)})
    config["model"] = asdict(model_cfg)
    model = SignTranslator(model_cfg)
    model.data_config = data_cfg
    datasets = {s: SignDataset(r, data_cfg, gloss_vocab, text_vocab, train=(s == "train")) for s, r in records.items()}
    return model, datasets, gloss_vocab, text_vocab


def training_state(model, optimizer, config, gloss_vocab, text_vocab, epoch, history):
    """A training checkpoint: tensors and plain data only (it loads with weights_only=True), the run's
    configuration once; model_from_checkpoint reads it back."""
    return dict(model=model.state_dict(), optimizer=optimizer.state_dict(), config=config,
                gloss_vocab=gloss_vocab.itos, text_vocab=text_vocab.itos, epoch=epoch, history=history)


def model_from_checkpoint(state, device="cpu"):
    """The eval-mode model of a training checkpoint, with its `data_config` (how frames were preprocessed)."""
    model_config, data_config = dict(state["config"]["model"]), state["config"]["data"]
    model_config.setdefault("final_norm", model_config.get("norm_first", True))   # older post-LN: no final norms
    model = SignTranslator(ModelConfig(**model_config))
    model.load_state_dict(state["model"])
    model.data_config = DataConfig(**data_config)
    return model.to(device).eval()


def load_model(path, device="cpu"):
    """A run folder (its best checkpoint) or a checkpoint file -> (eval-mode model, gloss vocabulary,
    text vocabulary). The model's `data_config` says how frames were preprocessed."""
    if os.path.isdir(path):
        path = os.path.join(path, "best.pt")
    state = load_checkpoint(path, device)
    model = model_from_checkpoint(state, device)
    return model, Vocabulary.from_list(state["gloss_vocab"]), Vocabulary.from_list(state["text_vocab"])
