"""A full disk ends a run with one line, never with SIGBUS (tasks/disk.py): real edge shards, real
small filesystems (tmpfs, mounted when the test runs as root, else skipped)."""

import os
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest
from qdrant_client import models

from flows.cli import main
from tasks.disk import MIB, MIN_FREE_BYTES, free_bytes, prepare_data_dir, write_whole
from tasks.edge_store import EdgeStore
from tasks.errors import DataDirError, DiskSpaceError
from tasks.outputs import AnswerCheckpoint
from tasks.store import VectorLayout

from .conftest import ROOT


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs of the given size in MiB under tmp_path; unmounted after the test."""
    mounted = []

    def mount(size_mib: int):
        point = tmp_path / f"tmpfs-{size_mib}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}M", "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def points(start: int, count: int) -> list[models.PointStruct]:
    return [models.PointStruct(id=i, vector={"dense": [1.0, float(i % 7), 0.5, 2.0]}, payload={"doc_id": f"d{i}"})
            for i in range(start, start + count)]


def test_edge_store_refuses_to_write_below_its_free_space_floor(tmp_path, monkeypatch):
    store = EdgeStore.open(f"edge:{tmp_path / 'edge'}")
    store.create_collection("c", dimension=4, metadata={}, layout=VectorLayout(dense=True))
    store.upsert("c", points(0, 10))

    store.min_free_bytes = free_bytes(tmp_path) + 1024**4  # a disk one TiB short of the floor
    refused = [lambda: store.upsert("c", points(10, 5)), lambda: store.delete("c", [0]), lambda: store.optimize("c"),
               lambda: store.create_collection("d", dimension=4, metadata={}, layout=VectorLayout(dense=True))]
    for write in refused:
        with pytest.raises(DiskSpaceError, match=r"MiB free on the disk of .*, at least \d+ MiB needed"):
            write()
    assert store.count("c") == 10 and store.resolve("d") is None

    store.min_free_bytes = MIN_FREE_BYTES
    store.upsert("c", points(10, 5))
    assert store.count("c") == 15
    # Optimizing writes the collection anew beside itself: it needs the collection's size free as well.
    monkeypatch.setattr("tasks.edge_store.allocated_bytes", lambda path: 1024**5 if path.name == "c" else 0)
    store.upsert("c", points(15, 1))
    with pytest.raises(DiskSpaceError, match="optimizing c"):
        store.optimize("c")
    store.close()


FILL_UNTIL_REFUSED = textwrap.dedent("""
    import sys
    from qdrant_client import models
    from tasks.edge_store import EdgeStore
    from tasks.errors import DiskSpaceError
    from tasks.store import VectorLayout

    store = EdgeStore.open("edge:" + sys.argv[1])
    store.create_collection("c", dimension=384, metadata={}, layout=VectorLayout(dense=True))
    written = 0
    try:
        while written < 200_000:  # about 1.5 GB: a disk without the floor fills long before
            store.upsert("c", [models.PointStruct(id=written + i, vector={"dense": [0.01 * (i % 97)] * 384},
                                                  payload={"doc_id": f"d{written + i}", "text": "x" * 2000})
                               for i in range(256)])
            written += 256
    except DiskSpaceError as exc:
        print(written)
        print(exc)
    store.close()
""")


def test_filling_the_disk_stops_writes_with_one_line_and_keeps_what_was_written(tmpfs):
    disk = tmpfs(MIN_FREE_BYTES // MIB + 64)
    result = subprocess.run([sys.executable, "-c", FILL_UNTIL_REFUSED, str(disk / "edge")],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, f"died with {result.returncode} (-7 is SIGBUS): {result.stderr[-2000:]}"
    written, message = result.stdout.strip().splitlines()
    assert int(written) > 0, "the floor stopped the very first write"
    assert message.startswith("Qdrant edge at edge:") and "writing points to c: only" in message
    assert free_bytes(disk) >= MIN_FREE_BYTES - 8 * MIB  # what one batch and its log record may take past the check

    store = EdgeStore.open(f"edge:{disk / 'edge'}")
    assert store.count("c") == int(written)
    store.close()


def test_a_run_on_a_full_disk_fails_at_once_in_one_line(tmpfs, corpus, monkeypatch, capsys):
    disk = tmpfs(16)
    monkeypatch.setenv("RAGBATCH_DATA_DIR", str(disk / "state"))
    assert main(["ingest", str(corpus), "--collection", "x"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"ragbatch: error: ingest: only 16 MiB free on the disk of {disk / 'state'}, at least 128 MiB needed")
    assert not (disk / "state").exists()


def test_answers_on_a_full_disk_fail_in_one_line_and_keep_the_finished_parts(tmpfs):
    from .test_outputs import row

    checkpoint = AnswerCheckpoint(tmpfs(1) / "answers.parquet")
    checkpoint.write_part([row("q1"), row("q2")])
    too_big = [dict(row(f"big{i}"), answer=os.urandom(3000).hex()) for i in range(400)]  # 2.4 MB that does not compress
    with pytest.raises(DiskSpaceError, match=r"^writing answers \(finished questions are kept\): no space left on the disk of "):
        checkpoint.write_part(too_big)
    assert set(checkpoint.answered()) == {"q1", "q2"}
    assert not list(checkpoint.parts_dir.glob("*.tmp"))  # the half-written part does not hold the space


def test_evaluation_outputs_on_a_full_disk_fail_in_one_line_and_keep_the_previous_run(tmpfs):
    """`evaluate --out` may name another disk than the data directory, which the free-space floor does not
    cover. The previous run's files were truncated by the failed write; now they are replaced whole or not at all."""
    from tasks.evaluation import EvalQuery, query_rows, summarize, write_outputs

    def outputs(queries):
        rows = query_rows(queries, {query.id: ["x"] for query in queries})
        return rows, summarize(rows, collection="kb", dataset="d", retrieval="dense")

    disk = tmpfs(1)
    write_outputs(*outputs([EvalQuery("earlier", "a question", {"x": 1})]), disk / "eval.parquet")
    summary = (disk / "eval.summary.json").read_text()
    big = [EvalQuery(f"q{i}", os.urandom(3000).hex(), {"x": 1}) for i in range(400)]  # 2.4 MB that does not compress
    with pytest.raises(DiskSpaceError, match=r"^writing eval.parquet: no space left on the disk of .*; free some space and run again$"):
        write_outputs(*outputs(big), disk / "eval.parquet")
    assert pq.read_table(disk / "eval.parquet").column("query_id").to_pylist() == ["earlier"]
    assert (disk / "eval.summary.json").read_text() == summary
    assert sorted(path.name for path in disk.iterdir()) == ["eval.parquet", "eval.summary.json"]


def test_preparing_smollm2_without_room_fails_at_once_in_one_line(tmpfs, monkeypatch, capsys):
    disk = tmpfs(256)
    monkeypatch.setenv("RAGBATCH_DATA_DIR", str(disk / "state"))
    assert main(["models", "prepare"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"ragbatch: error: preparing SmolLM2-135M-Instruct: only 256 MiB free on the disk of {disk / 'state'}")
    assert not list((disk / "state" / "models").iterdir())


def test_a_data_dir_on_a_read_only_disk_is_refused_in_one_line(tmpfs):
    disk = tmpfs(1)
    prepare_data_dir(disk / "writable")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    for data_dir in (disk / "writable", disk / "state"):  # one that exists already, one to be created
        with pytest.raises(DataDirError, match=rf"^cannot use {data_dir} as the data directory: read-only file system; set --data-dir"):
            prepare_data_dir(data_dir)


def test_two_writers_of_one_file_each_replace_it_whole(tmp_path):
    """Two evaluate runs given one --out: with one shared temporary name the second truncated the first's
    half-written file and renamed it away, so the first ended in a traceback or a mixed file."""
    target = tmp_path / "eval.summary.json"

    def first(temporary):
        with open(temporary, "w") as file:
            file.write("first, ")
            write_whole(target, lambda other: other.write_text("second"))  # the other run, meanwhile
            file.write("whole")

    write_whole(target, first)
    assert target.read_text() == "first, whole"  # the last rename wins, each file whole
    assert [path.name for path in tmp_path.iterdir()] == ["eval.summary.json"]
    with pytest.raises(ZeroDivisionError):
        write_whole(target, lambda temporary: (temporary.write_text("half"), 1 / 0))
    assert target.read_text() == "first, whole" and len(list(tmp_path.iterdir())) == 1


def test_only_a_full_disk_is_reported_as_one(tmp_path):
    """Every other failure of a write keeps its own error: "denied" is no reason to free space."""
    import errno

    from tasks.disk import no_space_is_one_line
    from tasks.errors import DiskSpaceError

    with pytest.raises(DiskSpaceError, match="^writing x: no space left on the disk of"):
        with no_space_is_one_line(tmp_path, "writing x"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(PermissionError):
        with no_space_is_one_line(tmp_path, "writing x"):
            raise PermissionError(errno.EACCES, "denied")
