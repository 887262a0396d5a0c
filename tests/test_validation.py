import pytest

from tasks.sources import SourceRow
from tasks.validation import DocumentValidator


@pytest.fixture(scope="module")
def make_validator():
    return lambda max_chars=50: DocumentValidator(max_chars=max_chars)


def row(doc_id, text, error=None, n=0):
    return SourceRow(f"src:{n}", doc_id, text, source="src", error=error)


def test_each_rule_quarantines_with_its_reason(make_validator):
    validator = make_validator()
    batch = [
        row("ok", "fine text", n=1),
        row(None, "no id", n=2),
        row("no-text", None, n=3),
        row("blank", " \n\t ", n=4),
        row("long", "x" * 51, n=5),
        row("at-the-limit", "x" * 50, n=8),
        row("ok", "same id again", n=6),
        row("broken", None, error="not valid UTF-8 at byte 3", n=7),
    ]
    valid, quarantined = validator.validate(batch)
    assert [r.doc_id for r in valid] == ["ok", "at-the-limit"]
    reasons = {q.locator: (q.rule, q.reason) for q in quarantined}
    assert reasons == {
        "src:2": ("missing_id", "missing id"),
        "src:3": ("missing_text", "missing text"),
        "src:4": ("blank_text", "text is empty or whitespace only"),
        "src:5": ("too_long", "text has 51 characters, more than the limit of 50"),
        "src:6": ("duplicate_id", "duplicate id 'ok' (first occurrence kept)"),
        "src:7": ("load_error", "not valid UTF-8 at byte 3"),
    }
    assert len(valid) + len(quarantined) == len(batch)


def test_duplicates_are_found_across_batches_and_totals_add_up(make_validator):
    validator = make_validator()
    first, _ = validator.validate([row("a", "one"), row("b", "two")])
    second, rejected = validator.validate([row("b", "two again"), row("c", "three")])
    assert [r.doc_id for r in first + second] == ["a", "b", "c"]
    assert [q.rule for q in rejected] == ["duplicate_id"]
    # Said "first occurrence kept" also when the first occurrence had been quarantined.
    _, blank_first = validator.validate([row("d", "  "), row("d", "real text")])
    assert [q.reason for q in blank_first] == ["text is empty or whitespace only",
                                               "duplicate id 'd' (its first occurrence was quarantined too)"]
    # Also when the first occurrence failed to load (a text that is no string): the second was indexed.
    _, load_first = validator.validate([SourceRow("src:9", "e", None, error="text is not a string (int)"), row("e", "real text")])
    assert [q.reason for q in load_first] == ["text is not a string (int)", "duplicate id 'e' (its first occurrence was quarantined too)"]
    summary = validator.summary
    assert (summary.rows, summary.valid, summary.quarantined) == (8, 3, 5)
    assert summary.to_markdown(50).splitlines()[-6:] == [  # a rule no row failed shows 0
        "| readable, decodable as text and of a readable size | 1 |", "| id present | 0 |", "| text present | 0 |",
        "| text not blank | 1 |", "| text at most 50 characters | 0 |", "| id unique across the source | 3 |"]


def test_a_row_failing_several_rules_is_counted_once(make_validator):
    validator = make_validator()
    valid, quarantined = validator.validate([row(None, "   ", error="binary content (NUL bytes)")])
    assert valid == [] and [q.rule for q in quarantined] == ["load_error"]
    assert sum(validator.summary.failures.values()) == 1
