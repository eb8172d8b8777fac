"""WebDataset tar shards: vitfood.shards writes a data set's splits, vitfood.train reads them as it reads the data
set they came from (the same weights), resumes exactly on them, and bad shards are one line."""

import os
import tarfile

import pytest
from conftest import TINY, cli, error, error_line, killed_and_resumed, same, train, weights

from vitfood.shards import main as write_shards

SOURCE = ["--dataset", "synthetic", "--train-split", "train", "--synthetic-size", "240", "--synthetic-classes", "4",
          "--synthetic-max-px", "128"]  # TINY's data: 192 train and 48 held-out eval images, JPEG


@pytest.fixture(scope="module")
def shards(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("shards")
    counts = write_shards([*SOURCE, "--out", str(out), "--shard-size", "50"])
    assert counts == {"train": 192, "eval": 48}
    return out


def flags(out):
    return ["--dataset", f"{out}/train-{{000000..000003}}.tar", "--eval-split", f"{out}/eval-{{000000..000000}}.tar",
            "--image-column", "jpg", "--label-column", "cls"]


def test_shards_hold_the_splits_as_written(shards):
    assert sorted(os.listdir(shards)) == ["classes.txt", "eval-000000.tar", "train-000000.tar", "train-000001.tar",
                                          "train-000002.tar", "train-000003.tar"]
    with tarfile.open(shards / "train-000003.tar") as t:
        names = t.getnames()
        assert names[:2] == ["000000150.jpg", "000000150.cls"] and len(names) == 2 * 42
        image = t.extractfile("000000150.jpg").read()
    assert image[:2] == b"\xff\xd8"  # the JPEG file's own bytes
    assert (shards / "classes.txt").read_text().split() == ["apple_pie", "bibimbap", "caesar_salad", "dumplings"]


def test_a_run_on_the_shards_ends_with_the_weights_of_a_run_on_their_source(shards, tmp_path):
    """Same images in the same order, same labels and class names: the same run, bit for bit."""
    steps = ["--max-steps", 8, "--eval-steps", 8, "--save-steps", 8]
    from_source = train(*steps, "--output-dir", tmp_path / "source")
    from_shards = train(*steps, *flags(shards), "--output-dir", tmp_path / "shards")
    assert from_shards["eval_accuracy"] == from_source["eval_accuracy"]
    assert same(weights(tmp_path / "shards"), weights(tmp_path / "source"))


def test_bad_shards_are_one_line(shards, tmp_path, capsys):
    assert "does not exist" in error(capsys, *flags(shards)[:1], f"{shards}/train-{{000000..000009}}.tar",
                                     "--output-dir", tmp_path / "a")
    (tmp_path / "not-a-tar.tar").write_bytes(b"this is not a tar file")
    assert "cannot read the train shards" in error(capsys, "--dataset", tmp_path / "not-a-tar.tar",
                                                   "--output-dir", tmp_path / "b")
    with tarfile.open(shards / "train-000000.tar") as source, tarfile.open(tmp_path / "no-label.tar", "w") as t:
        for name in ("000000000.jpg", "000000000.cls", "000000001.jpg"):  # the second sample has no class id
            t.addfile(source.getmember(name), source.extractfile(name))
    assert "share the same prefix or the same types" in error(capsys, "--dataset", tmp_path / "no-label.tar",
                                                              "--image-column", "jpg", "--label-column", "cls",
                                                              "--output-dir", tmp_path / "c")
    assert "sample 000000001 of shard" in error(capsys, "--dataset", f"{shards}/train-000000.tar,{tmp_path}/no-label.tar",
                                                "--image-column", "jpg", "--label-column", "cls",
                                                "--output-dir", tmp_path / "c2")  # a later shard: a missing file
    assert "name the eval shards" in error(capsys, *flags(shards)[:2], "--eval-split", "validation",
                                           "--output-dir", tmp_path / "d")
    assert "multi-label" in error_line(cli("--dataset", "synthetic", "--synthetic-dishes", 3, "--synthetic-size", 40,
                                           "--out", tmp_path / "e", module="vitfood.shards"))


@pytest.mark.slow
def test_kill_9_and_resume_on_shards_is_exact(shards, tmp_path):
    ref, killed = killed_and_resumed(tmp_path, *flags(shards))
    assert same(weights(killed), weights(ref))


@pytest.mark.slow
def test_torchrun_with_two_processes_reads_the_shards_as_one_process_does(shards, tmp_path):
    from test_dist import ATOL, max_diff
    run = [*TINY, *flags(shards), "--max-steps", 6, "--eval-steps", 6, "--save-steps", 6]
    assert cli(*run, "--output-dir", tmp_path / "one", env={"OMP_NUM_THREADS": "1"}).returncode == 0
    p = cli("--standalone", "--nproc_per_node=2", "-m", "vitfood.train", *run, "--batch-size", 8,  # the same 16 a step
            "--output-dir", tmp_path / "two",
            module="torch.distributed.run", env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < ATOL
