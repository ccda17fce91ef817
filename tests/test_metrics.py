"""Tests for ftune.eval.metrics and ftune.eval.report: numbers against scikit-learn and hand
computation, reject/threshold logic, and the files the report writer produces."""

from __future__ import annotations

import json
import random

import pytest
from rich.console import Console
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from sklearn.metrics import precision_recall_fscore_support as prfs

from ftune.eval.metrics import (
    apply_threshold,
    classification_report,
    confusion,
    threshold_sweep,
    top_confusions,
)
from ftune.eval.report import (
    confusions_table,
    metrics_table,
    reject_table,
    save_confusion_png,
    to_markdown,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)

INV = "<invalid>"

# Hand-computed case: 3 labels, "other" is the reject (out-of-scope) label, 8 examples.
#   i  gold      pred
#   0  balance   balance    correct
#   1  balance   balance    correct
#   2  balance   transfer
#   3  transfer  transfer   correct
#   4  transfer  other      false reject
#   5  other     other      correct
#   6  other     balance    false accept
#   7  other     <invalid>  false accept (invalid is not a rejection)
HAND_LABELS = ["balance", "transfer", "other"]
HAND_GOLD = ["balance", "balance", "balance", "transfer", "transfer", "other", "other", "other"]
HAND_PRED = ["balance", "balance", "transfer", "transfer", "other", "other", "balance", INV]


def _close(a: float, b: float) -> bool:
    return a == pytest.approx(b, abs=1e-12)


def test_hand_computed_report() -> None:
    r = classification_report(HAND_GOLD, HAND_PRED, HAND_LABELS, reject_label="other")
    assert r["n"] == 8
    assert r["n_invalid"] == 1
    assert _close(r["accuracy"], 4 / 8)
    assert list(r["per_class"]) == HAND_LABELS

    # balance: tp 2, predicted {0,1,6} = 3, support 3
    assert r["per_class"]["balance"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    # transfer: tp 1, predicted {2,3} = 2, support 2
    assert r["per_class"]["transfer"] == pytest.approx(
        {"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2})
    # other: tp 1, predicted {4,5} = 2, support 3 -> f1 = 2*(1/2*1/3)/(1/2+1/3) = 2/5
    assert r["per_class"]["other"] == pytest.approx(
        {"precision": 1 / 2, "recall": 1 / 3, "f1": 2 / 5, "support": 3})

    # macro: P (2/3+1/2+1/2)/3 = 5/9, R (2/3+1/2+1/3)/3 = 1/2, F1 (2/3+1/2+2/5)/3 = 47/90
    assert r["macro"] == pytest.approx({"precision": 5 / 9, "recall": 1 / 2, "f1": 47 / 90})
    # micro: tp 4; 7 predictions fall in a label (the invalid one does not), 8 gold
    # P 4/7, R 4/8, F1 2tp/(2tp+fp+fn) = 8/(8+3+4) = 8/15
    assert r["micro"] == pytest.approx({"precision": 4 / 7, "recall": 1 / 2, "f1": 8 / 15})
    # weighted by support 3,2,3: P (2+1+1.5)/8, R (2+1+1)/8, F1 (2+1+1.2)/8
    assert r["weighted"] == pytest.approx({"precision": 4.5 / 8, "recall": 4 / 8, "f1": 4.2 / 8})

    # In scope = examples 0..4, labels balance/transfer; pred "other" on 4 is just wrong.
    ins = r["in_scope"]
    assert ins["n"] == 5
    assert _close(ins["accuracy"], 3 / 5)
    assert list(ins["per_class"]) == ["balance", "transfer"]
    # balance: tp 2, predicted {0,1} = 2 (example 6 is out of scope), support 3 -> F1 0.8
    assert ins["per_class"]["balance"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert ins["per_class"]["transfer"] == pytest.approx(
        {"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2})
    assert ins["macro"] == pytest.approx({"precision": 0.75, "recall": 7 / 12, "f1": 0.65})
    # micro: tp 3, 4 predictions in in-scope labels, 5 gold -> F1 6/(6+1+2) = 2/3
    assert ins["micro"] == pytest.approx({"precision": 3 / 4, "recall": 3 / 5, "f1": 2 / 3})
    # weighted by 3,2: P (3*1+2*.5)/5, R (2+1)/5, F1 (3*.8+2*.5)/5
    assert ins["weighted"] == pytest.approx({"precision": 0.8, "recall": 0.6, "f1": 0.68})

    rej = r["reject"]
    assert rej["precision"] == pytest.approx(1 / 2)
    assert rej["recall"] == pytest.approx(1 / 3)
    assert rej["f1"] == pytest.approx(2 / 5)
    assert rej["false_accept_rate"] == pytest.approx(2 / 3)  # examples 6, 7 of 5, 6, 7
    assert rej["false_reject_rate"] == pytest.approx(1 / 5)  # example 4 of 0..4
    assert rej["n_in_scope"] == 5
    assert rej["n_out_of_scope"] == 3

    json.dumps(r)  # JSON-serialisable, no numpy scalars


def _random_case(seed: int, n: int = 300) -> tuple[list[str], list[str], list[str]]:
    rng = random.Random(seed)
    labels = ["a", "b", "c", "d", "other"]
    gold = [rng.choice(labels) for _ in range(n)]
    # mostly right, some confusions, some invalid outputs, one label never predicted
    pred = []
    for g in gold:
        roll = rng.random()
        if roll < 0.6:
            pred.append(g)
        elif roll < 0.9:
            pred.append(rng.choice(["a", "b", "c", "other"]))
        else:
            pred.append(INV)
    return gold, pred, labels


def _assert_block_matches_sklearn(block: dict, gold: list[str], pred: list[str],
                                  labels: list[str]) -> None:
    assert block["n"] == len(gold)
    assert block["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    p, r, f, s = prfs(gold, pred, labels=labels, zero_division=0)
    assert list(block["per_class"]) == labels
    for i, lab in enumerate(labels):
        got = block["per_class"][lab]
        assert got["precision"] == pytest.approx(p[i])
        assert got["recall"] == pytest.approx(r[i])
        assert got["f1"] == pytest.approx(f[i])
        assert got["support"] == s[i]
    for avg in ("macro", "micro", "weighted"):
        ap, ar, af, _ = prfs(gold, pred, labels=labels, average=avg, zero_division=0)
        assert block[avg] == pytest.approx({"precision": ap, "recall": ar, "f1": af})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_report_matches_sklearn(seed: int) -> None:
    gold, pred, labels = _random_case(seed)
    r = classification_report(gold, pred, labels, reject_label="other")
    _assert_block_matches_sklearn(r, gold, pred, labels)
    assert r["n_invalid"] == pred.count(INV)

    keep = [i for i, g in enumerate(gold) if g != "other"]
    in_gold = [gold[i] for i in keep]
    in_pred = [pred[i] for i in keep]
    _assert_block_matches_sklearn(r["in_scope"], in_gold, in_pred, ["a", "b", "c", "d"])

    p, rc, f, _ = prfs(gold, pred, labels=["other"], zero_division=0)
    assert r["reject"]["precision"] == pytest.approx(p[0])
    assert r["reject"]["recall"] == pytest.approx(rc[0])
    assert r["reject"]["f1"] == pytest.approx(f[0])
    oos = [pred[i] for i, g in enumerate(gold) if g == "other"]
    assert r["reject"]["false_accept_rate"] == pytest.approx(
        sum(p != "other" for p in oos) / len(oos))
    assert r["reject"]["false_reject_rate"] == pytest.approx(in_pred.count("other") / len(in_pred))
    assert r["reject"]["n_in_scope"] + r["reject"]["n_out_of_scope"] == len(gold)


def test_invalid_predictions_hurt_recall_not_precision() -> None:
    r = classification_report(["a", "a", "b"], ["a", INV, INV], ["a", "b"])
    assert r["n_invalid"] == 2
    assert r["accuracy"] == pytest.approx(1 / 3)
    assert r["per_class"]["a"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert r["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert r["micro"] == pytest.approx({"precision": 1.0, "recall": 1 / 3, "f1": 0.5})
    assert "in_scope" not in r and "reject" not in r


def test_custom_invalid_label() -> None:
    r = classification_report(["a", "b"], ["a", "??"], ["a", "b"], invalid_label="??")
    assert r["n_invalid"] == 1
    assert r["per_class"]["b"]["recall"] == 0.0


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="reject_label 'oos'"):
        classification_report(["a"], ["a"], ["a", "b"], reject_label="oos")
    with pytest.raises(ValueError, match="length"):
        classification_report(["a", "b"], ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="predictions not in labels"):
        classification_report(["a"], ["zzz"], ["a", "b"])
    with pytest.raises(ValueError, match="gold labels not in labels"):
        classification_report(["zzz"], ["a"], ["a", "b"])


def test_no_out_of_scope_examples() -> None:
    r = classification_report(["a", "b"], ["a", "other"], ["a", "b", "other"],
                              reject_label="other")
    assert r["reject"]["n_out_of_scope"] == 0
    assert r["reject"]["false_accept_rate"] == 0.0
    assert r["reject"]["false_reject_rate"] == pytest.approx(0.5)


def test_confusion_matrix() -> None:
    matrix, axis = confusion(HAND_GOLD, HAND_PRED, HAND_LABELS)
    assert axis == ["balance", "transfer", "other", INV]
    assert matrix == [
        [2, 1, 0, 0],
        [0, 1, 1, 0],
        [1, 0, 1, 1],
    ]
    gold, pred, labels = _random_case(3)
    matrix, axis = confusion(gold, pred, labels)
    expected = confusion_matrix(gold, pred, labels=labels + [INV])[: len(labels)]
    assert matrix == expected.tolist()


def test_confusion_without_invalid_has_no_extra_column() -> None:
    matrix, axis = confusion(["a", "b"], ["b", "b"], ["a", "b"])
    assert axis == ["a", "b"]
    assert matrix == [[0, 1], [0, 1]]


def test_top_confusions_order() -> None:
    # first-seen order differs from the expected order, so ties must really be sorted by name
    gold = ["c", "c", "c", "c", "b", "b", "a", "a", "a"]
    pred = ["b", "a", "a", "c", "c", "a", "b", "b", "a"]
    # errors: (a,b) x2, (c,a) x2, (b,a) x1, (b,c) x1, (c,b) x1
    assert top_confusions(gold, pred) == [
        ("a", "b", 2), ("c", "a", 2), ("b", "a", 1), ("b", "c", 1), ("c", "b", 1),
    ]
    assert top_confusions(gold, pred, k=2) == [("a", "b", 2), ("c", "a", 2)]
    assert top_confusions(["a"], ["a"]) == []


def test_apply_threshold() -> None:
    pred = ["a", "b", "c", "a"]
    conf = [0.9, 0.5, 0.49, 0.1]
    assert apply_threshold(pred, conf, 0.5, "other") == ["a", "b", "other", "other"]
    assert apply_threshold(pred, conf, 0.0, "other") == pred


def test_threshold_sweep_finds_known_best() -> None:
    labels = ["a", "b", "other"]
    gold = ["a", "a", "b", "b", "other", "other"]
    pred = ["a", "a", "b", "b", "a", "b"]
    conf = [0.9, 0.8, 0.95, 0.7, 0.3, 0.4]
    # Rejecting below 0.7 turns both out-of-scope mistakes into "other" and keeps every
    # correct in-scope prediction; any higher threshold rejects the correct 0.7 one.
    out = threshold_sweep(gold, pred, conf, labels, "other")
    assert out["best_threshold"] == pytest.approx(0.7)
    assert out["best_macro_f1"] == pytest.approx(1.0)
    assert [t for t, _ in out["curve"]] == pytest.approx([0.0, 0.3, 0.4, 0.7, 0.8, 0.9, 0.95])
    for t, f in out["curve"]:
        thresholded = apply_threshold(pred, conf, t, "other")
        assert f == pytest.approx(
            f1_score(gold, thresholded, labels=labels, average="macro", zero_division=0))
    # No rejection: a and b each P 2/3 R 1 F1 0.8, other F1 0 -> 1.6/3
    assert out["curve"][0][1] == pytest.approx(1.6 / 3)

    # Ties go to the lowest threshold (the one that rejects least), whatever the grid order.
    tied = threshold_sweep(gold, pred, conf, labels, "other", thresholds=[0.2, 0.0, 0.1])
    assert [f for _, f in tied["curve"]] == pytest.approx([1.6 / 3] * 3)
    assert tied["best_threshold"] == 0.0


def test_threshold_sweep_with_invalid_and_many_confidences() -> None:
    gold, pred, labels = _random_case(4, n=1000)
    rng = random.Random(4)
    conf = [rng.random() for _ in gold]
    out = threshold_sweep(gold, pred, conf, labels, "other")
    assert len(out["curve"]) <= 102
    assert out["curve"][0][0] == 0.0
    for t, f in out["curve"][::10]:
        thresholded = apply_threshold(pred, conf, t, "other")
        assert f == pytest.approx(
            f1_score(gold, thresholded, labels=labels, average="macro", zero_division=0))
    assert out["best_macro_f1"] == pytest.approx(max(f for _, f in out["curve"]))

    explicit = threshold_sweep(gold, pred, conf, labels, "other", thresholds=[0.0, 0.5])
    assert [t for t, _ in explicit["curve"]] == [0.0, 0.5]
    with pytest.raises(ValueError, match="reject_label"):
        threshold_sweep(gold, pred, conf, labels, "oos")


def _render(table) -> str:
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def test_rich_tables() -> None:
    r = classification_report(HAND_GOLD, HAND_PRED, HAND_LABELS, reject_label="other")
    text = _render(metrics_table(r, "hand"))
    assert "balance" in text and "0.667" in text and "macro avg" in text and "accuracy" in text
    text = _render(reject_table(r))
    assert "false accept rate" in text and "0.667" in text and "0.200" in text
    assert reject_table(classification_report(["a"], ["a"], ["a"])) is None
    text = _render(confusions_table(top_confusions(HAND_GOLD, HAND_PRED)))
    assert "transfer" in text
    # label text must not be parsed as rich markup
    r2 = classification_report(["[bold]x"], ["[bold]x"], ["[bold]x"])
    assert "[bold]x" in _render(metrics_table(r2, "t"))


def test_markdown_report() -> None:
    r = classification_report(HAND_GOLD, HAND_PRED, HAND_LABELS, reject_label="other")
    md = to_markdown(r, "Eval", top=top_confusions(HAND_GOLD, HAND_PRED),
                     meta={"model": "tiny", "dataset": "bank"})
    assert md.startswith("# Eval")
    assert "| balance | 0.667 | 0.667 | 0.667 | 3 |" in md
    assert "| transfer | 0.500 | 0.500 | 0.500 | 2 |" in md
    assert "| other | 0.500 | 0.333 | 0.400 | 3 |" in md
    assert "| **macro avg** | 0.556 | 0.500 | 0.522 | 8 |" in md
    assert "| **accuracy** |  |  | 0.500 | 8 |" in md
    assert "| false reject rate | 0.200 |" in md
    assert "| balance | transfer | 1 |" in md
    assert "| other | \\<invalid> | 1 |" in md  # escaped, or GitHub drops it as an HTML tag
    assert "**model**: tiny" in md and "**dataset**: bank" in md


def test_confusion_png(tmp_path) -> None:
    matrix, axis = confusion(HAND_GOLD, HAND_PRED, HAND_LABELS)
    out = save_confusion_png(matrix, axis, tmp_path / "cm.png")
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png"]  # no temp file left


def test_atomic_writes_round_trip(tmp_path) -> None:
    r = classification_report(HAND_GOLD, HAND_PRED, HAND_LABELS, reject_label="other")
    path = tmp_path / "sub" / "metrics.json"
    write_json_atomic(path, r)
    assert json.loads(path.read_text()) == r
    write_json_atomic(path, {"x": 1})  # overwrite in place
    assert json.loads(path.read_text()) == {"x": 1}

    rows = [{"gold": g, "pred": p} for g, p in zip(HAND_GOLD, HAND_PRED)]
    write_jsonl_atomic(tmp_path / "preds.jsonl", rows)
    lines = (tmp_path / "preds.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows

    write_text_atomic(tmp_path / "r.md", "héllo\n")
    assert (tmp_path / "r.md").read_text(encoding="utf-8") == "héllo\n"
    # no temp files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.jsonl", "r.md", "sub"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["metrics.json"]
