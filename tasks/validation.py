"""Document validation with Great Expectations: valid rows go on, failing rows are quarantined with a reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tasks.sources import SourceRow

# Checked in this order; a row that fails several rules is quarantined for the first.
RULES = ("load_error", "missing_id", "missing_text", "blank_text", "too_long", "duplicate_id")


@dataclass(frozen=True)
class QuarantinedRow:
    """A row that will not be indexed, and why."""

    locator: str
    doc_id: str | None
    source: str
    rule: str
    reason: str


@dataclass
class ValidationSummary:
    """Running totals over the batches of one run."""

    rows: int = 0
    valid: int = 0
    failures: Counter = field(default_factory=Counter)

    @property
    def quarantined(self) -> int:
        return self.rows - self.valid

    def to_markdown(self, max_chars: int, text_label: str = "text", what: str = "Document") -> str:
        descriptions = {
            "load_error": "readable, decodable as text and of a readable size",
            "missing_id": "id present",
            "missing_text": f"{text_label} present",
            "blank_text": f"{text_label} not blank",
            "too_long": f"{text_label} at most {max_chars:,} characters",
            "duplicate_id": "id unique across the source",
        }
        lines = [
            f"# {what} validation (Great Expectations)",
            "",
            f"{self.rows} rows checked: **{self.valid} valid**, **{self.quarantined} quarantined**.",
            "",
            "| rule | rows failing |",
            "| --- | ---: |",
        ]
        lines += [f"| {descriptions[rule]} | {self.failures.get(rule, 0)} |" for rule in RULES]
        return "\n".join(lines)


class DocumentValidator:
    """Validates batches of rows against one expectation suite; remembers ids across batches of a run."""

    def __init__(self, *, max_chars: int, text_label: str = "text") -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.max_chars = max_chars
        self.text_label = text_label
        self.summary = ValidationSummary()
        self._first_kept: dict[str, bool] = {}  # each id's first occurrence: was it kept (valid)?
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        asset = context.data_sources.add_pandas("ragbatch").add_dataframe_asset("documents")
        self._batch_definition = asset.add_batch_definition_whole_dataframe("batch")
        expect = gx.expectations
        self._suite = context.suites.add(
            gx.ExpectationSuite(
                name="documents",
                expectations=[
                    expect.ExpectColumnValuesToBeNull(column="load_error", meta={"rule": "load_error"}),
                    expect.ExpectColumnValuesToNotBeNull(column="doc_id", meta={"rule": "missing_id"}),
                    expect.ExpectColumnValuesToNotBeNull(column="text", meta={"rule": "missing_text"}),
                    expect.ExpectColumnValuesToMatchRegex(column="text", regex=r"\S", meta={"rule": "blank_text"}),
                    expect.ExpectColumnValueLengthsToBeBetween(column="text", max_value=max_chars, meta={"rule": "too_long"}),
                    expect.ExpectColumnValuesToBeInSet(column="seen_before", value_set=[False], meta={"rule": "duplicate_id"}),
                ],
            )
        )

    def validate(self, rows: list[SourceRow]) -> tuple[list[SourceRow], list[QuarantinedRow]]:
        """Split a batch into valid rows and quarantined rows (input order kept in both)."""
        import pandas as pd

        if not rows:
            return [], []
        seen_before = []
        for row in rows:
            seen_before.append(row.doc_id is not None and row.doc_id in self._first_kept)
            if row.doc_id is not None and row.doc_id not in self._first_kept:  # a first occurrence, kept or not
                self._first_kept[row.doc_id] = False  # until it passes every rule, below
        frame = pd.DataFrame(
            {
                "load_error": [row.error for row in rows],
                "doc_id": [row.doc_id for row in rows],
                "text": [row.text for row in rows],
                "seen_before": seen_before,
            },
            dtype=object,
        )
        result = self._batch_definition.get_batch(batch_parameters={"dataframe": frame}).validate(
            self._suite, result_format="COMPLETE"
        )
        failed_rule: dict[int, str] = {}
        for outcome in result.results:
            if outcome.exception_info and outcome.exception_info.get("raised_exception"):
                raise RuntimeError(f"validation rule {outcome.expectation_config.type} failed to run: {outcome.exception_info}")
            rule = outcome.expectation_config.meta["rule"]
            for index in outcome.result.get("unexpected_index_list") or []:
                if index not in failed_rule or RULES.index(rule) < RULES.index(failed_rule[index]):
                    failed_rule[index] = rule
        valid, quarantined = [], []
        for index, row in enumerate(rows):
            rule = failed_rule.get(index)
            if rule is None:
                valid.append(row)
                self._first_kept[row.doc_id] = True
            else:
                quarantined.append(QuarantinedRow(row.locator, row.doc_id, row.source, rule, self._reason(rule, row)))
                self.summary.failures[rule] += 1
        self.summary.rows += len(rows)
        self.summary.valid += len(valid)
        return valid, quarantined

    def _reason(self, rule: str, row: SourceRow) -> str:
        first = "first occurrence kept" if self._first_kept.get(row.doc_id) else "its first occurrence was quarantined too"
        return {
            "load_error": row.error or "unreadable",
            "missing_id": "missing id",
            "missing_text": f"missing {self.text_label}",
            "blank_text": f"{self.text_label} is empty or whitespace only",
            "too_long": f"{self.text_label} has {len(row.text or ''):,} characters, more than the limit of {self.max_chars:,}",
            "duplicate_id": f"duplicate id {row.doc_id!r} ({first})",
        }[rule]
