"""Ideas survive whatever shape the ideator's answer takes; an answer without ideas gives none."""

from __future__ import annotations

import json

import pytest

from hpc_executor.idea_parsing import MAX_JSON_STARTS, parse_ideas

TWO = [("Cosine schedule", "Decay the learning rate."), ("Wider MLP", "Use 6x the width.")]

SHAPES = {
    "xml": "<idea><title>Cosine schedule</title><description>Decay the learning rate.</description></idea>\n"
    "<idea>\n<title>\n Wider MLP\n</title>\n<description>\nUse 6x the width.\n</description>\n</idea>",
    "xml in a fence, with prose": "Here you go:\n```xml\n<idea><title>Cosine schedule</title>"
    "<description>Decay the learning rate.</description></idea>\n<IDEA><Title>Wider MLP</Title>"
    "<description>Use 6x the width.</description></IDEA>\n```\nHope this helps.",
    "json list in a fence": 'Ideas:\n```json\n[{"title": "Cosine schedule", "description": "Decay the learning'
    ' rate."},\n {"title": "Wider MLP", "description": "Use 6x the width."}]\n```',
    "bare json object": '{"ideas": [{"name": "Cosine schedule", "details": "Decay the learning rate."}, '
    '{"Title": "Wider MLP", "Description": "Use 6x the width."}]} -- two ideas',
    "numbered, bold titles": "Two ideas:\n\n1. **Cosine schedule**: Decay the learning rate.\n"
    "2. **Wider MLP** - Use 6x the width.",
    "numbered, colon titles": "1) Cosine schedule: Decay the learning rate.\n2) Wider MLP: Use 6x the width.",
    "idea headings": "# My proposals\n\n## Idea 1: Cosine schedule\nDecay the learning rate.\n\n"
    "## Idea 2: Wider MLP\nUse 6x the width.\n",
    "numbered headings": "### 1. Cosine schedule\nDecay the learning rate.\n### 2. Wider MLP\nUse 6x the width.",
    "bullets": "- **Cosine schedule**: Decay the learning rate.\n- **Wider MLP**: Use 6x the width.",
    "plain headings": "## Cosine schedule\nDecay the learning rate.\n\n## Wider MLP\nUse 6x the width.",
}


@pytest.mark.parametrize("text", SHAPES.values(), ids=SHAPES.keys())
def test_every_shape_gives_the_same_ideas(text: str) -> None:
    assert parse_ideas(text) == TWO


def test_sub_bullets_stay_in_their_idea() -> None:
    text = "1. **Cosine schedule**: Decay it.\n   - over 1000 steps\n   - to 10%\n2. **Wider MLP**: 6x."
    assert parse_ideas(text) == [("Cosine schedule", "Decay it.\n   - over 1000 steps\n   - to 10%"),
                                 ("Wider MLP", "6x.")]  # fmt: skip


def test_the_asked_format_wins_over_lists_in_the_prose() -> None:
    text = "I considered:\n1. dropout\n2. warmup\n<idea><title>Warmup</title><description>Add warmup.</description></idea>"
    assert parse_ideas(text) == [("Warmup", "Add warmup.")]


def test_incomplete_blocks_are_skipped() -> None:
    text = (
        "<idea><title>No description</title></idea>"
        "<idea><title></title><description>No title</description></idea>"
        "<idea><title>B</title><description>x</description></idea>"
    )
    assert parse_ideas(text) == [("B", "x")]


@pytest.mark.parametrize(
    "text",
    ["", "I cannot help with that.", '[{"title": "cut off', "{}", "[1, 2, 3]", "# Only a heading\n\nSome prose.",
     "<idea><title>unclosed"],
)  # fmt: skip
def test_answers_without_ideas_give_none(text: str) -> None:
    assert parse_ideas(text) == []


COSINE = "Use a cosine learning-rate decay to 10% of the peak over the last half of training."
TIE = "Tie the input embedding and the output projection, which frees parameters for a wider MLP."


def test_one_sentence_numbered_items_are_ideas_titled_by_their_opening_clause() -> None:
    text = f"Here are two ideas that should lower the validation loss:\n\n1. {COSINE}\n2. {TIE}\n"
    assert parse_ideas(text) == [("Use a cosine learning-rate decay to 10% of…", COSINE),
                                 ("Tie the input embedding and the output projection", TIE)]  # fmt: skip


def test_one_sentence_bullets_are_ideas() -> None:
    text = f"Some directions:\n* **{COSINE}**\n* {TIE}\n\nI expect the first to help most."
    ideas = parse_ideas(text)
    assert [description for _, description in ideas] == [COSINE, TIE + "\n\nI expect the first to help most."]
    assert ideas[0][0] == "Use a cosine learning-rate decay to 10% of…"


def test_one_sentence_items_mix_with_titled_and_multi_line_items() -> None:
    text = (
        "Three ideas:\n"
        "1. **Wider MLP**: Use 6x the width.\n"
        f"2. {TIE}\n"
        "3. Label smoothing\n   Smooth the targets by 0.1.\n   - keeps the evaluator untouched\n"
        "4. First, warm the learning rate up over 500 steps instead of 256.\n"
    )
    assert parse_ideas(text) == [
        ("Wider MLP", "Use 6x the width."),
        ("Tie the input embedding and the output projection", TIE),
        ("Label smoothing", "Smooth the targets by 0.1.\n   - keeps the evaluator untouched"),
        (
            "First, warm the learning rate up over 500…",
            "First, warm the learning rate up over 500 steps instead of 256.",
        ),
    ]


def test_items_of_a_word_or_two_are_topics_not_ideas() -> None:
    assert parse_ideas("Things I considered:\n1. dropout\n2. learning rate") == []
    assert parse_ideas("Things I considered:\n- dropout\n- **label smoothing**") == []


def test_the_asked_format_wins_over_one_sentence_items() -> None:
    text = f"Options:\n1. {COSINE}\n2. {TIE}\n<idea><title>Warmup</title><description>Add warmup.</description></idea>"
    assert parse_ideas(text) == [("Warmup", "Add warmup.")]
    as_json = f'Options:\n- {COSINE}\n```json\n[{{"title": "Warmup", "description": "Add warmup."}}]\n```'
    assert parse_ideas(as_json) == [("Warmup", "Add warmup.")]


N = 50_000  # a degenerate answer (an LLM stuck repeating itself); quadratic parsing takes minutes


@pytest.mark.timeout(15)
@pytest.mark.parametrize(
    "text",
    ["<idea>" * N, "<idea>" + "<title>" * N + "</idea>", "[" * N, '{"a": ' * N, "[1, " * N, "```x\n" * N,
     "1. " * N, "- " * N + "x"],
    ids=["unclosed ideas", "unclosed titles", "brackets", "nested objects", "nested lists", "fences",
         "numbers", "bullets"],
)  # fmt: skip
def test_degenerate_answers_give_no_ideas_quickly_and_never_raise(text: str) -> None:
    assert parse_ideas(text) == []


@pytest.mark.timeout(15)
def test_ideas_after_many_unclosed_tags_are_still_found() -> None:
    text = "<idea>" * N + "<idea><title>A</title><description>x</description></idea>"
    assert parse_ideas(text) == [("A", "x")]


def test_json_is_tried_at_a_bounded_number_of_brackets(monkeypatch: pytest.MonkeyPatch) -> None:
    tries = []
    raw_decode = json.JSONDecoder.raw_decode
    monkeypatch.setattr(
        json.JSONDecoder, "raw_decode", lambda self, s, idx=0: tries.append(idx) or raw_decode(self, s, idx)
    )
    # each try could read on to the end of the answer: trying at every bracket is quadratic
    parse_ideas("[x " * 10_000)
    assert 0 < len(tries) <= MAX_JSON_STARTS
