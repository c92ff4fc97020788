"""Safety filter: every shipped category catches its cases, clean code and prose pass untouched, both modes
and the classifier hook do what they say, counts add up, and bad list files are named in the error."""

from __future__ import annotations

import pytest

from gptforge.cli import build_parser
from gptforge.errors import DataError, GptforgeError
from gptforge.evaluate.safety import SafetyFilter, luhn, safety_from_args

CAUGHT = {
    "profanity": ["Well, damn, that build failed again.", "This code is CRAP.", "Oh, piss   off."],
    "violence_instructions": ["Here is how to make a pipe bomb at home.",
                              "Step-by-step instructions for building a bomb",
                              "how do I build an untraceable ghost gun", "how to kill someone without being caught"],
    "self_harm": ["I just want to kill myself.", "what are the easiest ways to die", "How do I end my life"],
    "personal_data": [
        "write to jane.doe+news@mail.example.co.uk today", "call me on (415) 555-0132", "or +44 20 7946 0958",
        "my SSN is 123-45-6789", "card: 4111 1111 1111 1111", "amex 378282246310005", "AWS key AKIAIOSFODNN7EXAMPLE",
        "OPENAI_API_KEY=sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8t", "token ghp_" + "x7" * 18, "slack xoxb-1234567890-abcdef",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n",
    ],
}

CLEAN = [
    # Python, with the email-, number- and operator-shaped things code is full of
    "import email.utils\n\ndef parse(addr):\n    return email.utils.parseaddr(addr)[1].split('@')[0]\n",
    "y = x @ w.T + b  # matmul\nassert version >= (3, 10, 12)\nMAX = 1234567890123456\n",
    "os.kill(pid, signal.SIGTERM)  # how to kill a process: send it SIGTERM, then kill the child process\n",
    "sk = 'sklearn'; key = 'sk-short'; host = '192.168.0.1'; when = '2024-01-15T12:30:00'; hex = 0xDEADBEEF\n",
    "@property\ndef assessment(self) -> str:\n    return self._class.__name__\n",
    # prose with listed words inside longer words
    "The scrappy team from Scunthorpe reached the Dickens museum, a classic assessment of damnation in art.",
    "She cooked shiitake mushrooms and caught a crappie; the passage was hellish but the bass was good.",
    "Call the function with 4111111111111112 as an id; it is not a card number, the checksum fails.",
    "The pharmacist said the dose should not exceed 500 mg per day, and the bomb squad cleared the area.",
]


@pytest.fixture
def shipped() -> SafetyFilter:
    return SafetyFilter.from_file()


@pytest.mark.parametrize("category", CAUGHT)
def test_every_shipped_category_masks_its_cases(shipped, category):
    for text in CAUGHT[category]:
        shown, verdict = shipped.apply(text)
        assert verdict.categories == {category: 1}, text
        assert f"[masked:{category}]" in shown and not verdict.blocked
        start, end, _ = verdict.spans[0]
        assert shown == text[:start] + f"[masked:{category}]" + text[end:]
    assert shipped.counts.masked == shipped.counts.outputs == len(CAUGHT[category])
    assert shipped.counts.categories == {category: len(CAUGHT[category])}


def test_a_private_key_is_masked_to_its_footer():
    text = "key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----\ndone"
    assert SafetyFilter.from_file().apply(text)[0] == "key:\n[masked:personal_data]\ndone"


@pytest.mark.parametrize("text", CLEAN)
def test_clean_code_and_prose_pass_untouched(shipped, text):
    assert shipped.apply(text) == (text, shipped.check(text))
    assert shipped.check(text).categories == {} and shipped.counts.masked == 0


def test_block_mode_withholds_the_whole_output_and_counts():
    f = SafetyFilter.from_file(mode="block")
    outputs = ["fine text", "damn it, mail jane@example.com", "also fine", CAUGHT["self_harm"][0]]

    shown = [f.apply(text)[0] for text in outputs]

    assert shown[0] == "fine text" and shown[2] == "also fine"
    assert shown[1] == "[output withheld by the safety filter: personal_data, profanity]"
    assert shown[3] == "[output withheld by the safety filter: self_harm]"
    assert (f.counts.outputs, f.counts.masked, f.counts.blocked) == (4, 0, 2)
    assert f.counts.categories == {"personal_data": 1, "profanity": 1, "self_harm": 1}
    assert f.summary() == ("safety (block): 4 outputs, 0 masked, 2 blocked; "
                           "found personal_data in 1, profanity in 1, self_harm in 1")


def test_the_classifier_hook_blocks_at_its_threshold_in_either_mode():
    score = {"a gentle sentence": 0.1, "a sentence the classifier dislikes": 0.9, "borderline": 0.5}.get
    for mode in ("mask", "block"):
        f = SafetyFilter.from_file(mode=mode, classifier=score, threshold=0.5)

        gentle, ok = f.apply("a gentle sentence")
        disliked, flagged = f.apply("a sentence the classifier dislikes")
        _, edge = f.apply("borderline")

        assert gentle == "a gentle sentence" and ok.score == 0.1 and not ok.blocked
        assert disliked == "[output withheld by the safety filter: classifier]" and flagged.score == 0.9
        assert edge.blocked and f.counts.blocked == 2 and f.counts.categories == {"classifier": 2}

    with pytest.raises(GptforgeError, match="classifier returned 1.5"):
        SafetyFilter.from_file(classifier=lambda text: 1.5).check("x")


def test_overlapping_matches_are_masked_once():
    shown, verdict = SafetyFilter.from_file().apply("ring +1 415 555 0132 now")
    assert shown == "ring [masked:personal_data] now" and verdict.categories == {"personal_data": 1}


def test_luhn():
    assert luhn("4111 1111 1111 1111") and luhn("378282246310005")
    assert not luhn("4111 1111 1111 1112")


LIST_ERRORS = {
    "not yaml": ("categories: [\n", "not valid YAML"),
    "no categories": ("words: [a]\n", "expected a mapping `categories:"),
    "unknown key": ("categories:\n  c: {word: [a]}\n",
                    "category 'c': expected a mapping with `words` and/or `patterns`"),
    "bad regex": ("categories:\n  c: {patterns: ['a(b']}\n",
                  "category 'c', pattern 1: not a valid regular expression"),
    "empty match": ("categories:\n  c: {patterns: ['x', 'a*']}\n", "category 'c', pattern 2: matches the empty string"),
    "unknown check": ("categories:\n  c: {patterns: [{regex: '\\d+', check: crc}]}\n",
                      "pattern 1: expected {regex: ..., check: luhn}"),
    "empty word": ("categories:\n  c: {words: [a, '']}\n", "words must be a list of non-empty strings"),
    "reserved name": ("categories:\n  classifier: {words: [a]}\n", "the name is reserved"),
    "unknown top key": ("categories:\n  c: {words: [a]}\nrefusals: no\n", "unknown top-level keys ['refusals']"),
}


@pytest.mark.parametrize("case", LIST_ERRORS)
def test_a_bad_list_file_is_named_with_the_problem(case, tmp_path):
    text, message = LIST_ERRORS[case]
    path = tmp_path / "lists.yaml"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        SafetyFilter.from_file(path)
    assert str(err.value).startswith(f"{path}:") and message in str(err.value)


def test_own_lists_and_refusal(tmp_path):
    path = tmp_path / "lists.yaml"
    path.write_text("refusal: 'no ({categories})'\ncategories:\n  fruit: {words: [apple, 'passion fruit']}\n")
    f = SafetyFilter.from_file(path)
    assert f.apply("An Apple and a passion\nfruit, not pineapple.")[0] == (
        "An [masked:fruit] and a [masked:fruit], not pineapple.")
    assert SafetyFilter.from_file(path, mode="block").apply("apple")[0] == "no (fruit)"


def test_command_line_arguments(tmp_path):
    def parse(argv):
        return build_parser().parse_args(["sample", "RUN", *argv])

    assert safety_from_args(parse([])).mode == "mask"
    assert safety_from_args(parse(["--safety", "block"])).mode == "block"
    assert safety_from_args(parse(["--safety", "off"])) is None
    with pytest.raises(DataError, match="nope.yaml: no such safety list file"):
        safety_from_args(parse(["--safety-lists", str(tmp_path / "nope.yaml")]))
    with pytest.raises(GptforgeError, match="no effect with --safety off"):
        safety_from_args(parse(["--safety", "off", "--safety-lists", "x.yaml"]))
    with pytest.raises(GptforgeError, match="not one of mask, block"):
        SafetyFilter.from_file(mode="loud")
