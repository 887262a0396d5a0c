"""The progress artifact moves as batches finish, so a long run shows where it is in the UI."""

from prefect import flow, get_client

from tasks.progress import RunProgress


def read_progress(artifact_id) -> tuple[float, str]:
    with get_client(sync_client=True) as client:
        artifact = client.read_artifacts()
        (match,) = [a for a in artifact if a.id == artifact_id]
    return match.data, match.description


@flow
def three_batches(total: int | None) -> list[tuple[float, str]]:
    progress = RunProgress(key="progress-test", label="ingest test", total=total, min_interval_s=0)
    seen = [read_progress(progress.artifact_id)]
    for rows in (2, 1):
        progress.advance(rows)
        seen.append(read_progress(progress.artifact_id))
    progress.close()
    return [*seen, read_progress(progress.artifact_id)]


def test_progress_moves_with_each_batch_and_ends_at_100(prefect_api_url):
    seen = three_batches(4)
    assert [percent for percent, _ in seen] == [0.0, 50.0, 75.0, 100.0]
    assert seen[1][1] == "ingest test: 2 of 4 rows processed"


def test_unknown_total_counts_rows_and_completes_at_the_end(prefect_api_url):
    seen = three_batches(None)
    assert [percent for percent, _ in seen] == [0.0, 0.0, 0.0, 100.0]
    assert seen[2][1] == "ingest test: 3 rows processed"


@flow
def overcounted_and_throttled() -> list[tuple[float, str]]:
    """More rows than the pre-count (a count can be off), then a throttled update."""
    progress = RunProgress(key="progress-test", label="ingest test", total=2, min_interval_s=3600)
    progress.advance(3)
    seen = [read_progress(progress.artifact_id), (progress.percent, "")]
    progress.close()
    return [*seen, read_progress(progress.artifact_id)]


def test_progress_never_passes_100_and_updates_at_most_once_per_interval(prefect_api_url):
    seen = overcounted_and_throttled()
    assert [percent for percent, _ in seen] == [0.0, 100.0, 100.0]  # held back by the interval, then capped


def test_row_counts_match_what_the_readers_yield(tmp_path):
    from tasks.sources import count_rows, read_rows

    from .conftest import ROOT, SAMPLE_CORPUS

    table = tmp_path / "docs.csv"
    table.write_text('id,text\n1,"two\nlines"\n2,plain\n')
    parquet_free = [SAMPLE_CORPUS, ROOT / "data" / "questions.jsonl", table]
    for path in parquet_free:
        column = "question" if path.suffix == ".jsonl" else "text"
        assert count_rows(path) == sum(1 for _ in read_rows(path, text_column=column)), path
    assert count_rows(tmp_path / "missing.jsonl") is None
