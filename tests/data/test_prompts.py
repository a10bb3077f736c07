"""Prompt templates: the built-ins' exact text, JSON template files, name resolution, response splitting."""

from __future__ import annotations

import json

import pytest

from lit_recover.data.prompts import (
    PromptTemplate,
    TemplateError,
    builtin_templates,
    load_template,
    resolve_template_path,
)

ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nSort them.\n\n### Input:\n3 1 2\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nSay hi.\n\n### Response:\n"
)


def test_builtins_are_the_three_alpaca_lora_templates():
    assert builtin_templates() == ["alpaca", "alpaca_short", "vigogne"]


def test_alpaca_is_alpaca_lora_text_with_and_without_input():
    t = load_template("alpaca")
    assert t.render("Sort them.", "3 1 2") == ALPACA_INPUT
    assert t.render("Say hi.") == ALPACA_NO_INPUT
    assert t.render("Say hi.", "") == ALPACA_NO_INPUT  # an empty input is no input
    assert t.render("Say hi.", None, "Hi!") == ALPACA_NO_INPUT + "Hi!"
    assert t.response_split == "### Response:"
    assert t.description == "Template used by Alpaca-LoRA."


def test_default_template_is_alpaca():
    assert load_template() == load_template("alpaca")


def test_alpaca_short():
    t = load_template("alpaca_short")
    assert t.render("Say hi.") == "### Instruction:\nSay hi.\n\n### Response:\n"
    assert t.render("Sort.", "3 1", "1 3") == "### Instruction:\nSort.\n\n### Input:\n3 1\n\n### Response:\n1 3"


def test_vigogne_is_french():
    t = load_template("vigogne")
    no_input = t.render("Dis bonjour.")
    assert no_input.startswith("Ci-dessous se trouve une instruction qui décrit une tâche. Écrivez une réponse")
    assert no_input.endswith("### Instruction:\nDis bonjour.\n\n### Réponse:\n")
    assert "### Entrée:\nx\n\n### Réponse:\n" in t.render("Trie.", "x")
    assert t.get_response(no_input + " Bonjour ! ") == "Bonjour !"


def test_braces_in_records_are_kept_literally():
    t = load_template("alpaca_short")
    assert t.render("Fill {name} in.", "{input}") == "### Instruction:\nFill {name} in.\n\n### Input:\n{input}\n\n### Response:\n"


def test_get_response_splits_at_marker_and_cuts_a_second_turn():
    t = load_template("alpaca")
    assert t.get_response(ALPACA_NO_INPUT + "  Hello there.\n") == "Hello there."
    assert t.get_response(ALPACA_NO_INPUT + "Hi.\n\n### Instruction:\nMore\n\n### Response:\nagain") == (
        "Hi.\n\n### Instruction:\nMore"
    )
    with pytest.raises(ValueError, match="'### Response:' not found"):
        t.get_response("no marker at all")


def _write(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


CUSTOM = {
    "description": "Q/A",
    "prompt_input": "Q: {instruction}\nContext: {input}\nA:",
    "prompt_no_input": "Q: {instruction}\nA:",
    "response_split": "A:",
}


def test_custom_template_file_by_path(tmp_path):
    path = _write(tmp_path / "qa.json", CUSTOM)
    t = load_template(str(path))
    assert t.render("Why?", "sky") == "Q: Why?\nContext: sky\nA:"
    assert t.render("Why?", output=" Because.") == "Q: Why?\nA: Because."
    assert t.get_response("Q: Why?\nA: Because.") == "Because."
    assert t.name == str(path)


def test_bare_name_resolves_working_dir_templates_first(tmp_path, monkeypatch):
    (tmp_path / "templates").mkdir()
    _write(tmp_path / "templates" / "qa.json", CUSTOM)
    _write(tmp_path / "templates" / "alpaca.json", {**CUSTOM, "response_split": "SHADOW"})
    monkeypatch.chdir(tmp_path)
    assert resolve_template_path("qa") == tmp_path / "templates" / "qa.json"
    assert load_template("qa").render("x") == "Q: x\nA:"
    assert load_template("alpaca").response_split == "SHADOW"  # ./templates shadows the built-in
    assert load_template("vigogne").response_split == "### Réponse:"  # falls back to the built-in


def test_unknown_template_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TemplateError) as err:
        load_template("alpacca")
    msg = str(err.value)
    assert "\n" not in msg
    assert "unknown prompt template 'alpacca'" in msg and "alpaca, alpaca_short, vigogne" in msg
    with pytest.raises(TemplateError, match=r"prompt template file nope\.json: no such file"):
        load_template("nope.json")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"response_split": None}, "missing key 'response_split'"),
        ({"prompt_input": 3}, "'prompt_input' is a int, expected a string"),
        ({"prompt_no_input": "Q: {instruction} {question}"}, r"'prompt_no_input' uses unknown placeholder\(s\) \['question'\]"),
        ({"prompt_no_input": "Q: {input}"}, r"'prompt_no_input' uses unknown placeholder\(s\) \['input'\]"),
        ({"prompt_input": "Q: {instruction}"}, r"'prompt_input' does not use \['input'\]"),
        ({"prompt_no_input": "Q: {instruction"}, "'prompt_no_input' is not a valid format string"),
        ({"response_split": " "}, "'response_split' is empty"),
    ],
)
def test_bad_template_files(tmp_path, change, message):
    data = {k: v for k, v in {**CUSTOM, **change}.items() if v is not None}
    path = _write(tmp_path / "bad.json", data)
    with pytest.raises(TemplateError, match=f"bad.json: {message}"):
        load_template(str(path))


def test_template_file_not_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"prompt_input": ', encoding="utf-8")
    with pytest.raises(TemplateError, match=r"broken\.json: invalid JSON at line 1 column 18"):
        load_template(str(path))
    _write(path, ["a", "list"])
    with pytest.raises(TemplateError, match="a template must be a JSON object, found list"):
        load_template(str(path))


def test_from_dict_round_trip():
    t = PromptTemplate.from_dict(CUSTOM, "inline")
    assert (t.prompt_input, t.prompt_no_input, t.response_split, t.description) == (
        CUSTOM["prompt_input"], CUSTOM["prompt_no_input"], "A:", "Q/A"
    )
