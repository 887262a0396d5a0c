"""The answer flow's final merge of its parts: time and peak memory, in memory vs streamed.

Run: .venv/bin/python bench/bench_answer_merge.py [--rows 20000 100000] [--context-chars 1000]

Synthetic answer rows shaped like the flow's (4 passages of `--context-chars` characters each, as
with top_k 4), checkpointed in parts of 256 rows (the default `batch_questions`), then merged into
the output in the question set's order, which is the parts' order (a fresh run) or shuffled (a set
reordered since the parts were written). Two merges, each in a process of its own so that its peak
RSS is its own, on the same parts:

- in memory: every part read and concatenated, one `take` in the set's order, one write (what
  `AnswerCheckpoint.finalize` did until 2026-12-02);
- streamed: `AnswerCheckpoint.finalize`, a row group at a time in the parts' order; reordered, each
  row first into the bucket file of its place (16,384 places each), then bucket by bucket, sorted.

Both must write the same rows. Writes bench/results/answer_merge.json.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from scratch import scratch_dir  # bench/scratch.py: the script's own directory is on sys.path

ROOT = Path(__file__).resolve().parents[1]
PART_ROWS = 256
CREATED = datetime(2026, 12, 2, tzinfo=timezone.utc)  # fixed: both variants' parts hold the same rows


def answer_row(question_id: str, context_chars: int) -> dict:
    return {
        "question_id": question_id, "question": f"What about {question_id}?", "filter": None,
        "answer": f"The answer to {question_id} [1].", "error": None,
        "contexts": [{"rank": rank, "score": 0.5, "point_id": "p", "doc_id": f"d{rank}", "chunk_index": 0,
                      "text": f"{question_id} passage {rank} " + "x" * context_chars, "source": "s.md"} for rank in range(1, 5)],
        "citations": [1], "reference_answers": [], "model": "m",
        "sampling": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 128, "seed": 0, "stop": []},
        "prompt_tokens": 900, "completion_tokens": 20, "finish_reason": "stop", "dropped_passages": 0,
        "timings": {"batch_questions": PART_ROWS, "retrieve_s": 0.1, "generate_s": 2.0},
        "run_id": "bench", "created_at": CREATED,
    }


def write_parts(output: Path, rows: int, context_chars: int) -> list[str]:
    from tasks.outputs import AnswerCheckpoint

    ids = [f"q{i:07d}" for i in range(rows)]
    checkpoint = AnswerCheckpoint(output)
    for start in range(0, rows, PART_ROWS):
        checkpoint.write_part([answer_row(question_id, context_chars) for question_id in ids[start:start + PART_ROWS]])
    return ids


def merge_in_memory(output: Path, order: list[str]) -> None:
    """The merge as it was: every part in memory at once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.outputs import ANSWER_SCHEMA

    parts = sorted(output.with_name(output.name + ".parts").glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(path, schema=ANSWER_SCHEMA) for path in parts])
    position = {question_id: index for index, question_id in enumerate(order)}
    first_row: dict[str, int] = {}
    for index, question_id in enumerate(table.column("question_id").to_pylist()):
        first_row.setdefault(question_id, index)
    keep = [first_row[question_id] for question_id in sorted(first_row, key=position.__getitem__)]
    pq.write_table(table.take(pa.array(keep, type=pa.int64())), output)


def merge_streamed(output: Path, order: list[str]) -> None:
    from tasks.outputs import AnswerCheckpoint

    AnswerCheckpoint(output).finalize(order)


def child(variant: str, output: Path, order_file: Path) -> None:
    """One merge in this process; prints its seconds and peak RSS as JSON."""
    order = json.loads(order_file.read_text())
    started = time.perf_counter()
    {"in memory": merge_in_memory, "streamed": merge_streamed}[variant](output, order)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))


def run(rows: int, context_chars: int, shuffled: bool, work: Path) -> dict:
    import pyarrow.parquet as pq

    results = {}
    outputs = {}
    for variant in ("in memory", "streamed"):  # the streamed merge removes its parts: each variant gets its own
        output = work / f"{variant.replace(' ', '-')}-{rows}-{shuffled}" / "answers.parquet"
        output.parent.mkdir(parents=True)
        ids = write_parts(output, rows, context_chars)
        order = random.Random(0).sample(ids, len(ids)) if shuffled else ids
        order_file = output.parent / "order.json"
        order_file.write_text(json.dumps(order))
        finished = subprocess.run([sys.executable, __file__, "--child", variant, str(output), str(order_file)],
                                  capture_output=True, text=True, check=True, cwd=ROOT)
        results[variant] = json.loads(finished.stdout.strip().splitlines()[-1])
        outputs[variant] = output
    same = pq.read_table(outputs["in memory"]).equals(pq.read_table(outputs["streamed"]))
    assert same, "the two merges wrote different rows"
    for output in outputs.values():
        shutil.rmtree(output.parent)
    return {"rows": rows, "order": "shuffled" if shuffled else "parts' order", **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--context-chars", type=int, default=1000)
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "OUTPUT", "ORDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return
    work = scratch_dir("ragbatch-merge-")
    results = [run(rows, args.context_chars, shuffled, work) for rows in args.rows for shuffled in (False, True)]
    print("| rows | order | in memory s | in memory peak RSS MiB | streamed s | streamed peak RSS MiB |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for result in results:
        memory, streamed = result["in memory"], result["streamed"]
        print(f"| {result['rows']:,} | {result['order']} | {memory['seconds']} | {memory['peak_rss_mib']:,} | "
              f"{streamed['seconds']} | {streamed['peak_rss_mib']:,} |")
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "answer_merge.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
