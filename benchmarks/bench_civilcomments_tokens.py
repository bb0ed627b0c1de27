"""CivilComments' tokens: tokenised at every access (as before the cache) against the cache.

Synthesises an `all_data_with_identities.csv` of `--comments` comments (default 20,000; 20 to 80
words each, about the length of real CivilComments comments) in a temporary folder, prepares it
as `robustbench-mat prepare civilcomments` does, then measures side by side, with the offline
`minilm` tokenizer and the default 220 tokens:

1. per access: every training row tokenised by itself, as each read of a row used to be (and
   every evaluation and every epoch paid again);
2. first load: `split("train")` of a fresh dataset, which tokenises every comment once, in
   batches, and writes the cache;
3. cached load: `split("train")` of another fresh dataset, which reads the cache.

    python benchmarks/bench_civilcomments_tokens.py [--comments 20000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from robustbench_mat import backbones
from robustbench_mat.datasets.civilcomments import CivilComments
from robustbench_mat.download import prepare_dataset

TEXT = {"backbone": "minilm", "max_length": 220}


def synthesise(data: Path, comments: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from upstream_fixtures import civilcomments_frame

    shares = {"train": 0.6, "val": 0.1, "test": 0.3}
    frame = civilcomments_frame({split: round(comments * s) for split, s in shares.items()})
    rng = np.random.default_rng(0)
    vocabulary = np.array(
        "the a people law article comment good bad they this would not government money "
        "stupid president trump vote years state public should police tax country right".split()
    )
    frame["comment_text"] = [
        " ".join(rng.choice(vocabulary, rng.integers(20, 81))) for _ in range(len(frame))
    ]
    path = data / "civilcomments" / "all_data_with_identities.csv"
    path.parent.mkdir(parents=True)
    frame.to_csv(path)
    prepare_dataset(CivilComments, data, show_progress=False)


def per_access(data: Path, rows: int) -> float:
    """Rows/s of tokenising training rows one by one, as each access used to."""
    dataset = CivilComments(data, **TEXT)
    texts = dataset.texts()
    filenames = dataset.split_frame("train")["filename"].to_numpy()[:rows]
    tokenizer = backbones.load_tokenizer(TEXT["backbone"])
    start = time.perf_counter()
    for filename in filenames:
        encoded = tokenizer(
            str(texts.loc[filename]),
            padding="max_length",
            truncation=True,
            max_length=TEXT["max_length"],
            return_token_type_ids=True,
        )
        torch.tensor(
            [encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"]]
        ).T.contiguous()
    return len(filenames) / (time.perf_counter() - start)


def load(data: Path) -> tuple[float, int]:
    """Seconds to load the training split of a fresh dataset, and its rows."""
    start = time.perf_counter()
    rows = len(CivilComments(data, **TEXT).split("train").inputs)
    return time.perf_counter() - start, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comments", type=int, default=20_000)
    parser.add_argument("--rows", type=int, default=5_000, help="rows timed per access")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder)
        synthesise(data, args.comments)
        n_comments = len(CivilComments(data, **TEXT).texts())
        rate = per_access(data, args.rows)
        first, rows = load(data)
        cached, _ = load(data)
    print(f"{n_comments} comments of 20-80 words, minilm tokenizer, 220 tokens")
    print("| path | time | rate |")
    print("|---|---|---|")
    print(f"| per access (before) | {rows / rate:.1f} s per pass over train | {rate:.0f} rows/s |")
    built = f"{n_comments / first:.0f} comments/s"
    print(f"| first load (tokenise, write cache) | {first:.1f} s | {built} |")
    print(f"| cached load | {cached:.2f} s | {rows / cached:.0f} rows/s |")
    print(
        f"a pass over the {rows} training rows: {rows / rate:.1f} s per access, once "
        f"{first:.1f} s then {cached:.2f} s per load with the cache "
        f"({rows / rate / cached:.0f}x); 100k rows per access: {100_000 / rate:.0f} s"
    )


if __name__ == "__main__":
    main()
