"""Phantom findings <-> report <-> labeller round trips, edits and the tokenizer."""

import numpy as np
import pytest

from cvlm.errors import UserError
from cvlm.phantoms import FINDINGS, Finding, sample_findings
from cvlm.report_text import Tokenizer, label_report, parse_edit, possible_edits, random_edit, write_report


@pytest.mark.parametrize("varied", [False, True])
def test_report_labeller_round_trip(varied):
    rng = np.random.default_rng(0)
    for _ in range(400):
        f = sample_findings(rng, p=0.5)
        assert label_report(write_report(f, varied=varied, rng=rng)) == f


def test_labeller_on_real_iu_sentences():
    # sentences as they appear in the IU X-ray reports shipped by torchxrayvision
    normal = (
        "The cardiac silhouette and mediastinum size are within normal limits. There is no pulmonary edema. "
        "There is no focal consolidation. There are no XXXX of a pleural effusion. There is no evidence of pneumothorax."
    )
    assert label_report(normal) == {}
    assert label_report("No pneumothorax or pleural effusion. Heart size normal.") == {}
    f = label_report("Heart size is enlarged. Small left pleural effusion. Right PICC line in place. Left apical pneumothorax.")
    assert f["cardiomegaly"] == Finding("cardiomegaly")
    assert f["effusion"] == Finding("effusion", side="left", size="small")
    assert f["device"].side == "right" and f["pneumothorax"].side == "left"
    assert label_report("Specifically, no evidence of focal consolidation, pneumothorax, or pleural effusion.") == {}


def test_negation_is_per_finding_sentence():
    f = label_report("There is a large right pleural effusion. No pneumothorax.")
    assert set(f) == {"effusion"} and f["effusion"].size == "large"


def test_edits_change_exactly_one_finding():
    rng = np.random.default_rng(1)
    for _ in range(200):
        f = sample_findings(rng, p=0.4)
        for e in possible_edits(f, rng):
            g = e.apply(f)
            changed = [n for n in FINDINGS if f.get(n) != g.get(n)]
            assert changed == [e.name]
            assert label_report(write_report(g)) == g
        assert random_edit(f, rng) is not None


def test_parse_edit():
    f = {"effusion": Finding("effusion", "right", None, "small")}
    assert parse_edit("remove effusion", f).apply(f) == {}
    assert parse_edit("flip effusion", f).apply(f)["effusion"].side == "left"
    assert parse_edit("resize effusion", f).apply(f)["effusion"].size == "large"
    add = parse_edit("add large left upper nodule", f).apply(f)["nodule"]
    assert (add.side, add.zone, add.size) == ("left", "upper", "large")
    for bad in ("explode effusion", "remove nodule", "add effusion", "flip cardiomegaly", "remove"):
        with pytest.raises(UserError):
            parse_edit(bad, f)


def test_tokenizer_round_trip():
    tok = Tokenizer()
    rng = np.random.default_rng(2)
    for _ in range(50):
        r = write_report(sample_findings(rng, p=0.5))
        ids = tok.encode(r)
        assert tok.UNK not in ids and ids[0] == tok.BOS and ids[-1] == tok.EOS
        assert tok.decode(ids) == r


# Sentences from the IU X-ray reports that torchxrayvision ships (each is checked to occur there
# below), hand-labelled CheXpert style: NAME+ present, NAME- negated, NAME? uncertain, followed by
# the side / zone / size words of a present finding; "" = no finding of ours is mentioned.
IU_TABLE = [
    ("No pneumonia or effusion.", "effusion-"),
    ("The lungs are clear, without focal infiltrate or pleural effusion.", "opacity- effusion-"),
    ("No focal consolidation or significant pleural effusion identified.", "opacity- effusion-"),
    ("There is no pleural effusion or pneumothorax.", "effusion- pneumothorax-"),
    ("No pleural effusions noted.", "effusion-"),
    ("Large pericardial effusion.", ""),
    ("No consolidation, pleural effusion or pneumothorax.", "opacity- effusion- pneumothorax-"),
    ("No visualized pneumothorax.", "pneumothorax-"),
    ("There is no focal consolidation, pneumothorax, or large pleural effusion.", "opacity- pneumothorax- effusion-"),
    ("Heart size normal and lungs clear.", "cardiomegaly-"),
    ("Borderline heart size, no acute pulmonary findings", "cardiomegaly?"),
    ("Heart is slightly large.", "cardiomegaly+"),
    ("Heart normal.", "cardiomegaly-"),
    ("Heart size upper limit of normal.", "cardiomegaly?"),
    ("Cardiomegaly without overt heart failure.", "cardiomegaly+"),
    ("Cardiomegaly, but no focal consolidation.", "cardiomegaly+ opacity-"),
    ("Stable minimal cardiomegaly.", "cardiomegaly+"),
    ("The cardiac silhouette is normal in size and configuration.", "cardiomegaly-"),
    ("Negative for cardiac enlargement.", "cardiomegaly-"),
    ("Borderline enlargement of cardiac silhouette, otherwise no acute cardiopulmonary abnormality.", "cardiomegaly?"),
    ("The cardiac silhouette is enlarged, but stable.", "cardiomegaly+"),
    ("Heart size and mediastinal silhouette appear stable.", ""),
    ("Cardiomegaly with low lung volumes which are grossly clear.", "cardiomegaly+"),
    ("Enlarged cardiac silhouette, possibly consistent with mild cardiomegaly versus a small pericardial effusion.",
     "cardiomegaly?"),
    ("Scattered calcified nodules compatible with granulomatous disease.", "nodule+"),
    ("Left lower lobe nodule which is worrisome.", "nodule+ left lower"),
    ("Multiple pulmonary nodules consistent with metastases.", "nodule+"),
    ("Clear lungs with no suspicious pulmonary nodules or masses.", "nodule-"),
    ("No nodules, masses, or adenopathy.", "nodule-"),
    ("Left midlung mass.", "nodule+ left mid"),
    ("It may be artifactual, but another mass on the left cannot be excluded.", "nodule?"),
    ("No focal air space opacities, pleural effusion, or pneumothorax.", "opacity- effusion- pneumothorax-"),
    ("Left lower lobe air space opacities without significant change.", "opacity+ left lower"),
    ("Stable cardiomegaly with prominent perihilar opacities which may represent scarring or edema.",
     "cardiomegaly+ opacity+"),
    ("The lungs are clear without areas of focal consolidation.", "opacity-"),
    ("No focal airspace consolidation.", "opacity-"),
    ("Mild patchy bilateral airspace disease.", "opacity+ bilateral"),
    ("Possible infiltrates in the right lung and left base.", "opacity?"),
    ("Small bilateral pleural effusions and right infrahilar infiltrate versus bronchovascular crowding.",
     "effusion+ bilateral small opacity?"),
    ("The previously visualized bilateral pneumothoraces have resolved.", "pneumothorax-"),
    ("Possible small right pleural effusion, without focal consolidation or pneumothorax.",
     "effusion? opacity- pneumothorax-"),
    ("The right internal jugular catheter has been removed.", "device-"),
    ("Left venous catheter with tip in the right atrium.", "device+ left"),
    ("There is a right IJ central venous catheter with tip overlying the inferior SVC.", "device+ right"),
    ("Left PICC tip at cavoatrial junction.", "device+ left"),
    ("Previously seen left-sided PICC line has been removed.", "device-"),
    ("Specifically, no radiographic evidence of active tuberculosis.", ""),
    ("Gastrostomy tube is noted.", "device+"),
    ("Endotracheal tube noted with tip approximately 4.5 cm above the carina.", "device+"),
    ("There is a cardiac pacemaker.", "device+"),
    ("Left-sided biventricular cardiac pacemaker.", "device+ left"),
    ("Mild blunting left costophrenic recess, possibly mild atelectasis or scarring.", ""),
]
_SIGN = {"+": "present", "-": "absent", "?": "uncertain"}


def _expected(spec: str) -> dict:
    out, cur = {}, None
    for w in spec.split():
        if w[-1] in _SIGN:
            cur = w[:-1]
            out[cur] = (_SIGN[w[-1]], set())
        else:
            out[cur][1].add(w)
    return out


@pytest.mark.parametrize(("text", "spec"), IU_TABLE)
def test_labeller_table_of_real_iu_sentences(text, spec):
    from cvlm.report_text import label_findings

    got = label_findings(text)
    want = _expected(spec)
    assert {n: m.status for n, m in got.items()} == {n: s for n, (s, _) in want.items()}
    for n, (status, attrs) in want.items():
        if status == "present":
            assert {a for a in (got[n].side, got[n].zone, got[n].size) if a} == attrs, n


def test_table_sentences_occur_in_the_iu_reports():
    from cvlm.data import iu_reports_from_xrv
    from cvlm.phantoms import xrv_data_dir
    from cvlm.report_text import split_sentences

    if xrv_data_dir() is None:
        pytest.skip("torchxrayvision data files not installed")
    assert len(IU_TABLE) >= 40
    corpus = {s for r in iu_reports_from_xrv() for s in split_sentences(r)}
    missing = [t for t, _ in IU_TABLE if t not in corpus]
    assert not missing


@pytest.mark.parametrize(("text", "want"), [
    ("No pneumothorax, but a small right effusion.", {"effusion": Finding("effusion", "right", None, "small")}),
    ("The heart is not enlarged.", {}),
    ("Small bilateral pleural effusions.", {"effusion": Finding("effusion", "bilateral", None, "small")}),
    ("Pneumothorax cannot be excluded.", {}),
])  # fmt: skip
def test_negation_scope_and_uncertainty(text, want):
    assert label_report(text) == want


def test_edits_of_the_generators_own_text():
    from cvlm.report_text import Edit, edit_text

    rng = np.random.default_rng(3)
    for _ in range(100):  # on the canonical style, editing the text = writing the edited findings
        f = sample_findings(rng, p=0.4)
        for e in possible_edits(f, rng):
            assert edit_text(write_report(f), e) == write_report(e.apply(f))
    # on free text, only the sentence about the finding changes, and the labeller reads the edit
    t = "Heart size is normal. There is a small right pleural effusion. No pneumothorax. Old rib fracture."
    f = label_report(t)
    for e, changed in ((Edit("remove", f["effusion"], "effusion"), "No pleural effusion."),
                       (Edit("flip", Finding("effusion", "left", None, "small"), "effusion"),
                        "There is a small left pleural effusion."),
                       (Edit("resize", Finding("effusion", "right", None, "large"), "effusion"),
                        "There is a large right pleural effusion."),
                       (Edit("add", Finding("pneumothorax", "left"), "pneumothorax"), "There is a left pneumothorax.")):  # fmt: skip
        new = edit_text(t, e)
        assert changed in new and "Old rib fracture." in new and "Heart size is normal." in new
        assert label_report(new) == e.apply(f)
    # a sentence stating two findings is restated, the other finding kept
    t2 = "No pneumothorax, but a small right effusion."
    new = edit_text(t2, Edit("add", Finding("pneumothorax", "right"), "pneumothorax"))
    assert label_report(new) == {"pneumothorax": Finding("pneumothorax", "right"),
                                 "effusion": Finding("effusion", "right", None, "small")}
