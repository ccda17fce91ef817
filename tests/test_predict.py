"""`ftune predict` and `ftune chat` through the CLI, on a tiny classification run trained in the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CLS_TEST, invoke, write_jsonl

from ftune.eval import calibrate as C


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory, tiny_model_dir, data_dir):
    """A LoRA classification run whose threshold and temperature were chosen at the end of training."""
    import yaml
    from conftest import base_config, deep_merge

    tmp = tmp_path_factory.mktemp("predict-run")
    raw = deep_merge(base_config(tiny_model_dir, data_dir, tmp / "run"),
                     {"data": {"eval": str(data_dir / "cls_test.jsonl")},
                      "eval": {"reject_label": "other", "threshold": "auto", "temperature": "auto"}})
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    ok("train", config)  # on the CPU: conftest pins module fixtures there
    return tmp / "run"


@pytest.fixture
def unlabeled(tmp_path) -> Path:
    """The test texts without their labels, in a shuffled order of their own."""
    rows = [{"text": r["text"]} for r in reversed(CLS_TEST)] + [{"text": "great film", "id": 7}]
    return write_jsonl(tmp_path / "new.jsonl", rows)


def test_predict_writes_one_line_per_row_with_labels_probabilities_and_the_stored_threshold(calibrated_run, unlabeled):
    run = calibrated_run
    result = ok("predict", run, "--data", unlabeled)
    out = run / "predict" / "new.jsonl"
    assert f"6 predictions written to {out}" in flat(result.output)  # the default place is said
    rows = read_lines(out)
    texts = [json.loads(line)["text"] for line in unlabeled.read_text().splitlines()]
    assert [r["text"] for r in rows] == texts and [r["row"] for r in rows] == list(range(1, 7))
    stored = json.loads((run / C.CALIBRATION_FILE).read_text())
    threshold = stored["threshold"]["value"]
    labels = ["positive", "negative", "other"]  # the train file's labels, first seen first
    for r in rows:
        assert list(r["scores"]) == labels and r["pred"] in labels and "gold" not in r
        assert sum(r["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["confidence"] == pytest.approx(max(r["scores"].values()), abs=1e-6)
        assert r["scored"] == max(r["scores"], key=r["scores"].get)
        assert r["threshold"] == threshold and r["rejected"] == (r["confidence"] < threshold)
        assert r["pred"] == ("other" if r["rejected"] else r["scored"])
        assert r["threshold_from"].startswith(str(run / C.CALIBRATION_FILE)) and "cls_test.jsonl" in r["threshold_from"]
    record = json.loads((out.parent / ".new.jsonl.ftune-predict").read_text())
    assert record["threshold"]["value"] == threshold and record["temperature"]["value"] == stored["temperature"]["value"]
    assert record["rows"] == 6 and record["kind"] == "run"

    # an explicit threshold replaces the stored one, and says so
    other = unlabeled.parent / "fixed.jsonl"
    ok("predict", run, "--data", unlabeled, "--out", other, "eval.threshold=0.99")
    fixed = read_lines(other)
    assert all(r["threshold"] == 0.99 and r["threshold_from"] == "eval.threshold=0.99 on the command line" for r in fixed)
    assert all(r["pred"] == "other" for r in fixed if r["confidence"] < 0.99)
    ok("predict", run, "--data", unlabeled, "--out", other, "eval.threshold=null", "eval.temperature=null")
    off = read_lines(other)
    assert all(r["rejected"] is None and r["threshold"] is None and "scored" not in r for r in off)
    assert [r["pred"] for r in off] == [r["scored"] for r in rows]  # no threshold: the top label itself


def test_predict_agrees_with_eval_on_the_same_rows(calibrated_run, data_dir, tmp_path):
    run = calibrated_run
    ok("eval", run, "--out", tmp_path / "report")
    evaluated = read_lines(tmp_path / "report" / "predictions.jsonl")
    ok("predict", run, "--data", data_dir / "cls_test.jsonl", "--out", tmp_path / "p.jsonl", "--batch-size", "2")
    predicted = read_lines(tmp_path / "p.jsonl")
    assert [p["pred"] for p in predicted] == [e["pred"] for e in evaluated]
    for p, e in zip(predicted, evaluated):
        assert p["text"] == e["text"] and p["gold"] == e["gold"]  # a label in the file is carried along as gold
        assert p["scores"] == pytest.approx(e["scores"], abs=1e-5) and p["confidence"] == pytest.approx(e["confidence"], abs=1e-5)


def test_predict_refuses_a_file_it_did_not_write_unless_overwrite(calibrated_run, unlabeled, tmp_path):
    mine = tmp_path / "mine.jsonl"
    mine.write_text("my notes\n", encoding="utf-8")
    result = invoke("predict", calibrated_run, "--data", unlabeled, "--out", mine)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "was not written by `ftune predict`" in flat(result.output) and "--overwrite" in result.output
    assert mine.read_text() == "my notes\n"
    target = tmp_path / "p.jsonl"
    ok("predict", calibrated_run, "--data", unlabeled, "--out", target)
    ok("predict", calibrated_run, "--data", unlabeled, "--out", target)  # its own file: replaced without asking
    target.write_text(target.read_text() + "{}\n", encoding="utf-8")  # edited since: the user's now
    assert invoke("predict", calibrated_run, "--data", unlabeled, "--out", target).exit_code == 2
    ok("predict", calibrated_run, "--data", unlabeled, "--out", mine, "--overwrite")
    assert len(read_lines(mine)) == 6
    result = invoke("predict", calibrated_run, "--data", unlabeled, "--out", unlabeled, "--overwrite")
    assert result.exit_code == 2 and "is the data file" in result.output


def test_predict_names_the_file_and_row_of_bad_data(calibrated_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good movie"}\n{"sentence": "bad film"}\n{"text": 3}\nnot json\n', encoding="utf-8")
    result = invoke("predict", calibrated_run, "--data", bad)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{bad}:4: not valid JSON" in flat(result.output)
    bad.write_text('{"text": "good movie"}\n{"sentence": "bad film"}\n{"text": 3}\n', encoding="utf-8")
    result = invoke("predict", calibrated_run, "--data", bad)
    out = flat(result.output)
    assert result.exit_code == 2 and f"{bad}:2: field 'text': missing" in out and f"{bad}:3: field 'text': expected text" in out
    table = tmp_path / "bad.csv"
    table.write_text("sentence\ngood movie\n", encoding="utf-8")
    result = invoke("predict", calibrated_run, "--data", table)
    assert result.exit_code == 2 and f"{table}: no column 'text'" in flat(result.output)
    result = invoke("predict", calibrated_run, "--data", bad, "--temperature", "0.7")
    assert result.exit_code == 2 and "eval.temperature=T" in flat(result.output)
    result = invoke("predict", calibrated_run, "--data", tmp_path / "missing.jsonl")
    assert result.exit_code == 2 and "missing.jsonl: data file not found" in result.output
    assert not (calibrated_run / "predict" / "bad.jsonl").exists()


def test_predict_generates_for_an_alpaca_model(tiny_model_dir, data_dir, make_config, tmp_path):
    config = make_config({"data": {"train": str(data_dir / "alpaca.jsonl"), "test": None, "format": "alpaca",
                                   "max_length": 64}})
    rows = write_jsonl(tmp_path / "ask.jsonl", [{"instruction": "say hello", "input": "to bob"},
                                                {"instruction": "write a short poem", "output": "the sea"}])
    ok("predict", tiny_model_dir, "--config", config, "--data", rows, "--out", tmp_path / "o.jsonl", "--max-new-tokens", "5")
    out = read_lines(tmp_path / "o.jsonl")
    assert [r["instruction"] for r in out] == ["say hello", "write a short poem"]
    assert all(isinstance(r["output"], str) for r in out) and "gold" not in out[0] and out[1]["gold"] == "the sea"
    # greedy: the same output twice, and the same as generating with transformers directly
    ok("predict", tiny_model_dir, "--config", config, "--data", rows, "--out", tmp_path / "o.jsonl", "--max-new-tokens", "5")
    assert read_lines(tmp_path / "o.jsonl") == out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    ids = tok("### Instruction:\nsay hello\n\n### Input:\nto bob\n\n### Response:\n", return_tensors="pt")
    expected = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out[0]["output"] == tok.decode(expected[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_chat_with_piped_input_replies_and_handles_reset_and_exit(calibrated_run, monkeypatch):
    from typer.testing import CliRunner

    from ftune.chat import Chat
    from ftune.cli import app

    seen = []
    prompt = Chat.prompt
    monkeypatch.setattr(Chat, "prompt", lambda self, text, reserve: (seen.append(list(self.history)), prompt(self, text, reserve))[1])
    result = CliRunner().invoke(app, ["chat", str(calibrated_run), "--max-new-tokens", "4"],
                                input="hi\nhow are you\n/reset\nwhat is this\n/exit\nnever read\n")
    assert result.exit_code == 0, result.output
    assert "(history cleared)" in result.output and "/reset clears the history" in result.output
    assert [len(h) for h in seen] == [0, 2, 0]  # three replies; /reset emptied the history; nothing after /exit
    assert seen[1][0] == {"role": "user", "content": "hi"} and seen[1][1]["role"] == "assistant"
    result = CliRunner().invoke(app, ["chat", str(calibrated_run), "--max-new-tokens", "3"], input="hi\n")
    assert result.exit_code == 0 and len(seen) == 4  # end of input ends the chat too


def test_chat_streams_the_greedy_reply_to_stdout(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from ftune.cli import app

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    reply = tok.decode(model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids["input_ids"].shape[1]:],
                       skip_special_tokens=True)
    result = CliRunner().invoke(app, ["chat", str(tiny_model_dir), "--max-new-tokens", "6"], input="hi\n")
    assert result.exit_code == 0, result.output
    assert reply.strip() and reply.strip() in result.stdout  # the reply itself is on stdout, notes on stderr
    assert "chatting with" not in result.stdout


def test_chat_without_a_chat_template_says_what_to_do(tmp_path):
    from conftest import build_model_dir

    model_dir = no_chat_template(build_model_dir(tmp_path / "m"))
    result = invoke("chat", model_dir)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "no chat template" in flat(result.output) and "ftune predict" in flat(result.output)


def no_chat_template(model_dir: Path) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.chat_template = None
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    tok.save_pretrained(str(model_dir))
    return model_dir


def test_chat_falls_back_to_an_alpaca_runs_prompt_template(tmp_path, make_config, data_dir, monkeypatch):
    from conftest import build_model_dir
    from typer.testing import CliRunner

    from ftune.cli import app

    model_dir = no_chat_template(build_model_dir(tmp_path / "m"))
    # a config names the base model with the run's data settings: no training needed to see the prompt
    config = make_config({"model": {"path": str(model_dir)}, "data": {"train": str(data_dir / "alpaca.jsonl"),
                                                                       "test": None, "format": "alpaca", "max_length": 64}})
    import ftune.chat as chat_module

    sent = []
    real = chat_module.prompt_ids
    monkeypatch.setattr(chat_module, "prompt_ids", lambda tok, text: (sent.append(text), real(tok, text))[1])
    result = CliRunner().invoke(app, ["chat", str(config), "--max-new-tokens", "3"], input="say hello\nto bob\n")
    assert result.exit_code == 0, result.output
    assert "no chat template: each line is sent alone through the run's prompt template" in flat(result.output)
    assert sent == ["### Instruction:\nsay hello\n\n### Response:\n", "### Instruction:\nto bob\n\n### Response:\n"]


def test_predict_answers_chat_rows_and_keeps_a_final_assistant_turn_as_gold(tiny_model_dir, data_dir, make_config, tmp_path):
    config = make_config({"data": {"train": str(data_dir / "chat.jsonl"), "test": None, "format": "chat", "max_length": 64}})
    rows = write_jsonl(tmp_path / "talk.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "what is this"}, {"role": "assistant", "content": "a poem"}]}])
    ok("predict", tiny_model_dir, "--config", config, "--data", rows, "--out", tmp_path / "o.jsonl", "--max-new-tokens", "4")
    out = read_lines(tmp_path / "o.jsonl")
    assert out[0]["messages"] == [{"role": "user", "content": "hi"}] and "gold" not in out[0]
    assert out[1]["messages"] == [{"role": "user", "content": "what is this"}] and out[1]["gold"] == "a poem"
    assert all(isinstance(r["output"], str) for r in out)
