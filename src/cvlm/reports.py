"""Radiology-style reports from findings, a rule-based labeller back to findings, and report edits.

Phrasing is modelled on the most frequent sentences of the IU X-ray (OpenI) reports that
``torchxrayvision`` ships ("No pneumothorax.", "The heart is normal in size.", "No pleural
effusion or pneumothorax."). The *canonical* style (one fixed sentence per finding, fixed order)
is what the generator is trained on, so that an edited report is always a sentence the generator
could have produced; the *varied* style draws IU-like alternatives and exists to test the labeller.

The labeller works per sentence: it finds finding keywords, a negation cue before them, and the
laterality / zone / size words. It is deliberately simple and is tested on both styles and on
real IU sentences.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .phantoms import ATTRS, FINDINGS, SIDES, SIZES, ZONES, Finding, Findings, random_finding

# ----------------------------------------------------------------------------------------------
# writing reports

_NEG_CANON = {
    "cardiomegaly": "The heart is normal in size.",
    "effusion": "No pleural effusion.",
    "pneumothorax": "No pneumothorax.",
    "opacity": "No focal airspace opacity.",
    "nodule": "There are no nodules or masses.",
    "device": "",  # like real reports, an absent line or tube is simply not mentioned
}
_NEG_VARIANTS = {
    "cardiomegaly": ["Heart size is normal.", "Normal heart size.", "Heart size within normal limits."],
    "effusion": ["There is no pleural effusion.", "No pleural effusions."],
    "pneumothorax": ["There is no pneumothorax.", "No evidence of pneumothorax.", "No visible pneumothorax."],
    "opacity": ["No focal consolidation.", "There is no focal airspace consolidation."],
    "nodule": ["No nodules or masses.", "No suspicious pulmonary nodules."],
    "device": [""],
}


def sentence(f: Finding, varied: bool = False, rng: np.random.Generator | None = None) -> str:
    """The sentence stating a present finding (canonical unless ``varied``)."""
    n = f.name
    choice = (lambda xs: xs[int(rng.integers(len(xs)))]) if (varied and rng is not None) else (lambda xs: xs[0])
    if n == "cardiomegaly":
        return choice(["The heart is enlarged.", "Cardiomegaly.", "Heart size is enlarged."])
    if n == "effusion":
        return choice(
            [f"There is a {f.size} {f.side} pleural effusion.", f"{f.size.capitalize()} {f.side} pleural effusion."]
        )
    if n == "pneumothorax":
        return choice([f"There is a {f.side} pneumothorax.", f"{f.side.capitalize()}-sided pneumothorax."])
    if n == "opacity":
        return choice(
            [f"There is airspace opacity in the {f.side} {f.zone} lung.", f"Focal consolidation in the {f.side} {f.zone} lung."]
        )
    if n == "nodule":
        return choice(
            [f"There is a {f.size} nodule in the {f.side} {f.zone} lung.", f"A {f.size} {f.side} {f.zone} lung nodule is seen."]
        )
    if n == "device":
        return choice([f"A {f.side} central venous catheter is in place.", f"{f.side.capitalize()} central line in place."])
    raise ValueError(n)


def write_report(findings: Findings, varied: bool = False, rng: np.random.Generator | None = None) -> str:
    """A report mentioning every finding (negated when absent) in a fixed order."""
    parts: list[str] = []
    absent = [n for n in FINDINGS if n not in findings]
    for n in FINDINGS:
        if n in findings:
            parts.append(sentence(findings[n], varied, rng))
        elif varied and rng is not None:
            if n == "effusion" and "pneumothorax" in absent and rng.random() < 0.5:
                parts.append("No pleural effusion or pneumothorax.")
                continue
            if n == "pneumothorax" and "effusion" in absent and parts and "pneumothorax" in parts[-1]:
                continue
            parts.append(_NEG_VARIANTS[n][int(rng.integers(len(_NEG_VARIANTS[n])))])
        else:
            parts.append(_NEG_CANON[n])
    return " ".join(p for p in parts if p)


# ----------------------------------------------------------------------------------------------
# labelling reports

_KEYWORDS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("cardiomegaly", "heart", "cardiac silhouette", "cardiac"),
    "effusion": ("effusion",),
    "pneumothorax": ("pneumothora",),
    "opacity": ("opacit", "consolidation", "airspace disease", "air space disease", "infiltrate"),
    "nodule": ("nodul", "mass"),
    "device": ("catheter", "central line", "picc", " port", "pacemaker", "tube", "line in place"),
}
_NEG = re.compile(r"\b(no|without|negative for|free of|clear of|resolved|removed)\b")
_CARDIO_NORMAL = re.compile(r"\b(normal|within normal limits|unremarkable|stable|upper limits of normal)\b")
_CARDIO_ABN = re.compile(r"\b(enlarged|cardiomegaly|enlargement|increased)\b")


def _split_sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.;])\s+|\n+", text) if s.strip()]


def _attr(words: str, options: tuple[str, ...], aliases: dict[str, str] | None = None) -> str | None:
    for o in options:
        if re.search(rf"\b{o}\b", words):
            return o
    for k, v in (aliases or {}).items():
        if re.search(rf"\b{k}\b", words):
            return v
    return None


def label_report(text: str) -> Findings:
    """Findings stated as present in ``text`` (later sentences override earlier ones)."""
    found: Findings = {}
    for sent in _split_sentences(text.lower()):
        for name in FINDINGS:
            hits = [sent.find(k) for k in _KEYWORDS[name] if k in sent]
            if not hits:
                continue
            pos = min(hits)
            if name == "cardiomegaly":
                present = bool(_CARDIO_ABN.search(sent)) and not _NEG.search(sent[:pos])
                if not present and not _CARDIO_NORMAL.search(sent) and "cardiomegaly" not in sent:
                    continue  # e.g. "cardiac XXXX" that states nothing about size
                if present:
                    found[name] = Finding(name)
                else:
                    found.pop(name, None)
                continue
            if _NEG.search(sent[:pos]):
                found.pop(name, None)
                continue
            if name == "device" and "no " in sent:
                continue
            attrs = ATTRS[name]
            found[name] = Finding(
                name,
                side=_attr(sent, SIDES) if "side" in attrs else None,
                zone=_attr(sent, ZONES, {"apical": "upper", "apex": "upper", "base": "lower", "basilar": "lower",
                                         "middle": "mid", "midlung": "mid"}) if "zone" in attrs else None,
                size=_attr(sent, SIZES, {"tiny": "small", "moderate": "large", "massive": "large"})
                if "size" in attrs else None,
            )
    return found


def report_vector(report: str) -> list[float]:
    """48-d encoding of a report: per finding [present, right, left, upper, mid, lower, small, large]."""
    found = label_report(report)
    vec: list[float] = []
    for name in FINDINGS:
        f = found.get(name)
        vec.append(1.0 if f else 0.0)
        vec += [1.0 if f and f.side == v else 0.0 for v in SIDES]
        vec += [1.0 if f and f.zone == v else 0.0 for v in ZONES]
        vec += [1.0 if f and f.size == v else 0.0 for v in SIZES]
    return vec


REPORT_DIM = len(FINDINGS) * (1 + len(SIDES) + len(ZONES) + len(SIZES))


def state(findings: Findings, name: str) -> tuple | None:
    """Comparable state of one finding: ``None`` when absent, else its attribute tuple."""
    f = findings.get(name)
    return None if f is None else f.key()


# ----------------------------------------------------------------------------------------------
# edits


EDIT_KINDS = ("add", "remove", "flip", "resize")


@dataclass(frozen=True)
class Edit:
    """A report edit: add a finding, remove it, flip its laterality, or change its size."""

    kind: str
    finding: Finding  # for add: the finding to add; otherwise the finding as it will be after the edit
    name: str

    def apply(self, findings: Findings) -> Findings:
        out = dict(findings)
        if self.kind == "remove":
            out.pop(self.name, None)
        else:
            out[self.name] = self.finding
        return out

    def describe(self) -> str:
        f = self.finding
        if self.kind == "remove":
            return f"remove {self.name}"
        words = [w for w in (f.size, f.side, f.zone) if w]
        if self.kind == "add":
            return " ".join(["add", *words, self.name])
        if self.kind == "flip":
            return f"flip {self.name} to {f.side}"
        return f"resize {self.name} to {f.size}"


def possible_edits(findings: Findings, rng: np.random.Generator) -> list[Edit]:
    """Every kind of edit that applies to ``findings`` (adds get random attributes)."""
    edits: list[Edit] = []
    for n in FINDINGS:
        f = findings.get(n)
        if f is None:
            edits.append(Edit("add", random_finding(rng, n), n))
            continue
        edits.append(Edit("remove", f, n))
        if f.side is not None:
            other = "left" if f.side == "right" else "right"
            edits.append(Edit("flip", Finding(n, other, f.zone, f.size), n))
        if f.size is not None:
            other = "large" if f.size == "small" else "small"
            edits.append(Edit("resize", Finding(n, f.side, f.zone, other), n))
    return edits


def random_edit(findings: Findings, rng: np.random.Generator, kinds: tuple[str, ...] = EDIT_KINDS) -> Edit | None:
    """A random applicable edit; first a kind uniformly (among those possible), then a finding."""
    edits = [e for e in possible_edits(findings, rng) if e.kind in kinds]
    if not edits:
        return None
    avail = sorted({e.kind for e in edits}, key=EDIT_KINDS.index)
    kind = avail[int(rng.integers(len(avail)))]
    pool = [e for e in edits if e.kind == kind]
    return pool[int(rng.integers(len(pool)))]


_NAME_ALIASES = {
    "cardiomegaly": "cardiomegaly", "heart": "cardiomegaly", "effusion": "effusion", "pleural": "effusion",
    "pneumothorax": "pneumothorax", "ptx": "pneumothorax", "opacity": "opacity", "consolidation": "opacity",
    "nodule": "nodule", "mass": "nodule", "device": "device", "catheter": "device", "line": "device",
}


def parse_edit(text: str, findings: Findings) -> Edit:
    """Parse ``add [small|large] [right|left] [upper|mid|lower] NAME``, ``remove NAME``,
    ``flip NAME [to SIDE]`` or ``resize NAME [to SIZE]`` against the current findings."""
    words = re.findall(r"[a-z]+", text.lower())
    where = "--edit"
    if not words or words[0] not in EDIT_KINDS:
        raise UserError(where, f"expected an edit starting with one of {', '.join(EDIT_KINDS)}, got {text!r}")
    names = [_NAME_ALIASES[w] for w in words[1:] if w in _NAME_ALIASES]
    if len(names) != 1:
        raise UserError(where, f"expected exactly one finding ({', '.join(FINDINGS)}) in {text!r}")
    kind, name = words[0], names[0]
    cur = findings.get(name)
    side = next((w for w in words if w in SIDES), None)
    zone = next((w for w in words if w in ZONES), None)
    size = next((w for w in words if w in SIZES), None)
    attrs = ATTRS[name]
    if kind == "add":
        if cur is not None:
            raise UserError(where, f"cannot add {name}: the generator already reports it ({sentence(cur)!r})")
        f = Finding(
            name,
            side=(side or "right") if "side" in attrs else None,
            zone=(zone or "mid") if "zone" in attrs else None,
            size=(size or "small") if "size" in attrs else None,
        )
        return Edit("add", f, name)
    if cur is None:
        raise UserError(where, f"cannot {kind} {name}: the generator does not report it")
    if kind == "remove":
        return Edit("remove", cur, name)
    if kind == "flip":
        if "side" not in attrs:
            raise UserError(where, f"{name} has no laterality to flip")
        new_side = side if side and side != cur.side else ("left" if cur.side == "right" else "right")
        return Edit("flip", Finding(name, new_side, cur.zone, cur.size), name)
    if "size" not in attrs:
        raise UserError(where, f"{name} has no size to change")
    new_size = size if size and size != cur.size else ("large" if cur.size == "small" else "small")
    return Edit("resize", Finding(name, cur.side, cur.zone, new_size), name)


# ----------------------------------------------------------------------------------------------
# tokenizer


class Tokenizer:
    """Word-level tokenizer over the canonical report vocabulary (lower case, '.' is a token)."""

    PAD, BOS, EOS, UNK = 0, 1, 2, 3
    SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")

    def __init__(self, words: list[str] | None = None):
        if words is None:
            words = sorted(self._canonical_words())
        self.itos = list(self.SPECIAL) + [w for w in words if w not in self.SPECIAL]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @staticmethod
    def _canonical_words() -> set[str]:
        words: set[str] = set()
        texts = list(_NEG_CANON.values())
        for n in FINDINGS:
            for side in SIDES:
                for zone in ZONES:
                    for size in SIZES:
                        texts.append(sentence(Finding(n, side, zone, size)))
        for t in texts:
            words.update(Tokenizer.split(t))
        return words

    @staticmethod
    def split(text: str) -> list[str]:
        return re.findall(r"[a-z]+|\.", text.lower())

    def encode(self, text: str) -> list[int]:
        return [self.BOS] + [self.stoi.get(w, self.UNK) for w in self.split(text)] + [self.EOS]

    def decode(self, ids: list[int]) -> str:
        out: list[str] = []
        for i in ids:
            if i == self.EOS:
                break
            if i in (self.BOS, self.PAD):
                continue
            w = self.itos[i] if 0 <= i < len(self.itos) else "<unk>"
            if w == ".":
                if out:
                    out[-1] += "."
                continue
            out.append(w)
        text = " ".join(out)
        # capitalise sentence starts for readability
        return re.sub(r"(^|\. )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)

    def __len__(self) -> int:
        return len(self.itos)
