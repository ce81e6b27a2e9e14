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
    """The sentence stating a present finding (canonical unless ``varied``); a missing attribute
    (a generator's report may leave one out) is left out of the sentence."""
    n = f.name
    choice = (lambda xs: xs[int(rng.integers(len(xs)))]) if (varied and rng is not None) else (lambda xs: xs[0])

    def w(*words: str | None) -> str:
        return " ".join(x for x in words if x)

    def cap(text: str) -> str:
        return text[:1].upper() + text[1:]

    if n == "cardiomegaly":
        return choice(["The heart is enlarged.", "Cardiomegaly.", "Heart size is enlarged."])
    if n == "effusion":
        return choice([f"There is a {w(f.size, f.side)} pleural effusion.".replace("a  ", "a "),
                       cap(f"{w(f.size, f.side, 'pleural effusion')}.")])  # fmt: skip
    if n == "pneumothorax":
        return choice([f"There is a {w(f.side, 'pneumothorax')}.",
                       cap(f"{f.side}-sided pneumothorax.") if f.side else "Pneumothorax."])  # fmt: skip
    where = w(f.side, f.zone)
    if n == "opacity":
        return choice([f"There is airspace opacity in the {w(where, 'lung')}.", f"Focal consolidation in the {w(where, 'lung')}."])
    if n == "nodule":
        return choice([f"There is a {w(f.size, 'nodule')} in the {w(where, 'lung')}.",
                       cap(f"a {w(f.size, where, 'lung nodule')} is seen.")])  # fmt: skip
    if n == "device":
        return choice([cap(f"a {w(f.side, 'central venous catheter')} is in place."),
                       cap(f"{w(f.side, 'central line')} in place.")])  # fmt: skip
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
# labelling reports (CheXpert-style rules: mention, then uncertainty, then negation with a scope)

# the words that mention each finding (regular expressions, matched at word starts); a pericardial
# effusion is not a pleural one, and "tuberculosis" is not a tube
_KEYWORDS: dict[str, str] = {
    "cardiomegaly": r"cardiomegaly|cardiomediastinal silhouette|cardiac silhouette|heart|cardiac",
    "effusion": r"(?<!pericardial )effusions?\b",
    "pneumothorax": r"pneumothora\w*",
    "opacity": r"opacit\w*|consolidat\w*|air ?space disease|infiltrat\w*",
    "nodule": r"nodul\w*|mass(?:es)?\b|masslike",
    "device": r"catheters?\b|central (?:venous )?lines?\b|picc\b|ports?\b|pacemakers?\b|defibrillators?\b|"
              r"tubes?\b|lines? in place",
}
_MENTION = {n: re.compile(r"\b(?:" + k + ")") for n, k in _KEYWORDS.items()}
# a negation or uncertainty cue governs the mentions after it up to one of these (CheXpert's
# "but", "however", ... ; also a new clause opened by "and the" / "and there")
_SCOPE_END = re.compile(r";|\b(but|however|although|though|except|aside from|apart from|otherwise|which|whereas)\b"
                        r"|,? and (the|there|a|an)\b")
_PRE_NEG = re.compile(r"\b(no|not|without|negative for|free of|clear of|absence of|rather than|resolution of|"
                      r"removal of|resolved)\b")
_POST_NEG = re.compile(r"\b(not|no longer|resolved|removed|cleared|absent|ruled out)\b")
_UNCERTAIN = re.compile(r"\b(may|might|possibl[ey]|probabl[ey]|likely|questionable|question of|suspect(ed)?|"
                        r"suspicious|concern(ing)? for|cannot be (excluded|ruled out)|can not be (excluded|ruled out)|"
                        r"not (be )?(excluded|ruled out)|versus|vs|could (be|represent)|suggest(s|ive|ing)?|equivocal|"
                        r"borderline|upper limits? of normal|top normal|indeterminate|differential|vs\.)\b")
_NOT_EXCLUDED = re.compile(r"\b(cannot|can not|not) (be )?(excluded|ruled out)\b")
_CARDIO_NORMAL = re.compile(r"\b(normal|within normal limits|unremarkable)\b")
_CARDIO_ABN = re.compile(r"\b(enlarged|cardiomegaly|enlargement|increased|prominent|large)\b")
_SIDE_WORDS = {"right": "right", "left": "left", "bilateral": "bilateral", "bilaterally": "bilateral",
               "both": "bilateral", "bibasilar": "bilateral"}
_ZONE_WORDS = {"upper": "upper", "apical": "upper", "apex": "upper", "apices": "upper", "mid": "mid",
               "middle": "mid", "midlung": "mid", "lingula": "mid", "lingular": "mid", "lower": "lower",
               "base": "lower", "bases": "lower", "basilar": "lower", "basal": "lower", "bibasilar": "lower"}
_SIZE_WORDS = {"small": "small", "tiny": "small", "trace": "small", "minimal": "small", "large": "large",
               "moderate": "large", "massive": "large", "big": "large", "sizable": "large"}
STATUSES = ("present", "uncertain", "absent")


@dataclass(frozen=True)
class Mention:
    """One statement about a finding in a report: ``status`` is present / uncertain / absent;
    ``span`` is the (start, end) of the words the attributes were read from, in the sentence."""

    name: str
    status: str
    side: str | None = None
    zone: str | None = None
    size: str | None = None
    sentence: int = 0
    span: tuple[int, int] = (0, 0)

    def finding(self) -> Finding:
        return Finding(self.name, self.side, self.zone, self.size)


def split_sentences(text: str) -> list[str]:
    """Sentences of a report (split after '.', ';' or at line breaks); the text between them is whitespace."""
    return [s.strip() for s in re.split(r"(?<=[.;])\s+|\n+", text) if s.strip()]


def _word(words: str, table: dict[str, str]) -> str | None:
    hits = [(m.start(), table[m.group(0)]) for m in re.finditer(r"\b(" + "|".join(table) + r")\b", words)]
    if not hits:
        return None
    vals = {v for _, v in hits}
    if table is _SIDE_WORDS and {"right", "left"} <= vals:
        return "bilateral"
    if table is _SIDE_WORDS and "bilateral" in vals:
        return "bilateral"
    return hits[-1][1]  # the word nearest before the mention


def sentence_mentions(sent: str, index: int = 0) -> list[Mention]:
    """The finding mentions of one (lower-case) sentence with their status and attributes."""
    out: list[Mention] = []
    hits = sorted((m.start(), m.end(), n) for n, rx in _MENTION.items() for m in rx.finditer(sent))
    # one mention per finding and clause; a later keyword of the same finding in the same clause
    # ("no nodules or masses") is the same statement
    bounds = [0, *(m.end() for m in _SCOPE_END.finditer(sent)), len(sent) + 1]
    seen: set[tuple[str, int]] = set()
    kept = []
    for s, e, n in hits:
        clause = max(i for i, b in enumerate(bounds) if b <= s)
        if (n, clause) not in seen:
            seen.add((n, clause))
            kept.append((s, e, n, clause))
    stated_end: dict[int, int] = {}  # per clause, the end of the last mention that stated something
    for k, (s, e, n, clause) in enumerate(kept):
        c0, c1 = bounds[clause], bounds[clause + 1]
        prev_end = stated_end.get(clause, c0)
        nxt = min([kk[0] for kk in kept[k + 1 :] if kk[3] == clause] + [c1])
        before, after = sent[c0:s], sent[e:nxt]
        pre, post = sent[prev_end:e], sent[e:nxt]
        if n == "cardiomegaly" and not sent[s:e].startswith("cardiomegaly"):
            # "heart" / "cardiac silhouette" state something only with a size word; the first of
            # "enlarged"-like and "normal"-like words decides ("normal in size, with a large effusion")
            tail = sent[prev_end:nxt]
            words = sorted([(m.start(), "abn") for m in _CARDIO_ABN.finditer(tail)]
                           + [(m.start(), "normal") for m in _CARDIO_NORMAL.finditer(tail)])  # fmt: skip
            if _UNCERTAIN.search(tail):
                status = "uncertain"
            elif not words:
                continue
            elif words[0][1] == "abn":
                status = "absent" if _PRE_NEG.search(before) or _POST_NEG.search(tail) else "present"
            else:
                status = "absent"
        elif _NOT_EXCLUDED.search(sent[c0:c1]):
            status = "uncertain"
        elif _PRE_NEG.search(before):
            status = "absent"
        elif _UNCERTAIN.search(before) or _UNCERTAIN.search(after):
            status = "uncertain"
        elif _POST_NEG.search(after):
            status = "absent"
        else:
            status = "present"
        attrs = ATTRS[n]

        def get(table: dict[str, str], _pre: str = pre, _post: str = post) -> str | None:
            return _word(_pre, table) or _word(_post, table)

        out.append(Mention(
            n, status,
            side=get(_SIDE_WORDS) if "side" in attrs else None,
            zone=get(_ZONE_WORDS) if "zone" in attrs else None,
            size=get(_SIZE_WORDS) if "size" in attrs else None,
            sentence=index, span=(prev_end, nxt),
        ))  # fmt: skip
        stated_end[clause] = e
    return out


def report_mentions(text: str) -> list[Mention]:
    """Every finding mention of a report, sentence by sentence."""
    return [m for i, s in enumerate(split_sentences(text)) for m in sentence_mentions(s.lower(), i)]


def label_findings(text: str) -> dict[str, Mention]:
    """Per finding the report's verdict: present beats uncertain beats absent (CheXpert's
    aggregation); findings never mentioned are not keys. Attributes merge over present mentions."""
    out: dict[str, Mention] = {}
    for m in report_mentions(text):
        cur = out.get(m.name)
        if cur is None or STATUSES.index(m.status) < STATUSES.index(cur.status):
            out[m.name] = m
        elif m.status == cur.status == "present":
            side = cur.side or m.side
            if cur.side and m.side and cur.side != m.side:
                side = "bilateral"
            out[m.name] = Mention(m.name, "present", side, cur.zone or m.zone, cur.size or m.size, cur.sentence, cur.span)
    return out


def label_report(text: str) -> Findings:
    """Findings stated as present in ``text`` (uncertain and negated mentions are not present)."""
    return {n: m.finding() for n, m in label_findings(text).items() if m.status == "present"}


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


def _swap(text: str, table: dict[str, str], old: str | None, new: str) -> str:
    """Replace the words of ``table`` that mean ``old`` by ``new`` (keeping a capital letter)."""
    words = [w for w, v in table.items() if v == old] if old else []

    def rep(m: re.Match) -> str:
        return new.capitalize() if m.group(0)[0].isupper() else new

    for w in words:
        text = re.sub(rf"\b{w}\b", rep, text, flags=re.I)
    return text


def edit_text(text: str, edit: Edit) -> str:
    """The report ``text`` with ``edit`` applied to its own sentences: the sentence stating the
    finding is removed (replaced by its negation), changed in its side or size word, or - for an
    added finding - the sentence negating it becomes the positive one (a new sentence is put in
    the findings' order when none mentions it). A sentence that states several findings is
    rewritten as the canonical sentences of those findings. Every other sentence is kept as G wrote it.

    For a report in the canonical style, ``edit_text(write_report(f), e) == write_report(e.apply(f))``."""
    sents = split_sentences(text)
    per = [sentence_mentions(s.lower(), i) for i, s in enumerate(sents)]
    name = edit.name
    out: list[str] = []
    placed = False
    for s, ms in zip(sents, per, strict=True):
        mine = [m for m in ms if m.name == name]
        if not mine:
            out.append(s)
            continue
        others = {m.name for m in ms} - {name}
        present = [m.finding() for m in mine if m.status == "present"]
        target = edit.apply({name: present[0]} if present else {}).get(name)
        if not others and (edit.kind in ("remove", "add") or all(m.status != "present" for m in mine)):
            if edit.kind == "add" and placed:
                continue  # one positive sentence is enough
            repl = sentence(target) if target is not None else _NEG_CANON[name]
            placed = placed or target is not None
        elif not others:
            cur = mine[0].finding()
            repl = _swap(s, _SIDE_WORDS, cur.side, target.side) if edit.kind == "flip" else _swap(s, _SIZE_WORDS, cur.size, target.size)
        else:  # several findings in one sentence: restate each canonically
            parts = []
            for m in ms:
                if m.name == name:
                    if target is not None and not placed:
                        parts.append(sentence(target))
                        placed = True
                    elif target is None:
                        parts.append(_NEG_CANON[name])
                elif m.status == "present":
                    parts.append(sentence(m.finding()))
                elif m.status == "absent":
                    parts.append(_NEG_CANON[m.name])
                else:
                    parts.append(s)  # an uncertain statement is kept as written
            repl = " ".join(dict.fromkeys(p for p in parts if p))
        if repl:
            out.append(repl)
    if edit.kind == "add" and not placed:
        later = [i for i, ms in enumerate(per) if any(FINDINGS.index(m.name) > FINDINGS.index(name) for m in ms)]
        at = len(out) if not later else out.index(sents[later[0]]) if sents[later[0]] in out else len(out)
        out.insert(at, sentence(edit.finding))
    return " ".join(out)


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
