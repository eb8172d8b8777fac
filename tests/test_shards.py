"""WebDataset tar shards: vitfood.shards writes a data set's splits, vitfood.train reads them as it reads the data
set they came from (the same weights), resumes exactly on them, and bad shards are one line."""

import io
import os
import random
import shutil
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
    cut = tmp_path / "cut"  # shard 2 of 4 cut short in the middle of a sample, as an interrupted copy leaves it
    shutil.copytree(shards, cut)
    data = (cut / "train-000002.tar").read_bytes()
    (cut / "train-000002.tar").write_bytes(data[:len(data) // 2])
    line = error(capsys, *flags(cut), "--output-dir", tmp_path / "b2")
    assert f"shard {cut}/train-000002.tar breaks at byte " in line and "samples read whole" in line, line
    assert "--bad-images skip does not cover a broken shard" in line, line
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


# --streaming: the train shards read as a stream (not copied to disk), an epoch of --train-samples images
def streamed(out, buffer=64):
    return [*flags(out), "--streaming", "--train-samples", 100, "--shuffle-buffer", buffer]


def test_a_streamed_run_resumes_mid_pass_bit_exact_whatever_the_workers(shards, tmp_path):
    """192 images a pass, 16 a batch, 100 an epoch: step 8 is mid-epoch and mid-pass (with 64 in the buffer),
    and step 24 is in the second pass. A run resumed at step 8 with 2 loader workers (the full run had none)
    ends with the same weights and optimizer state."""
    import torch
    common = ["--max-steps", 24, "--eval-steps", 8, "--save-steps", 8, "--save-total-limit", 5, "--num-workers", 0]
    full = tmp_path / "full"
    train(*streamed(shards), *common, "--output-dir", full)
    state = torch.load(full / "checkpoint-8" / "training_state.pt", weights_only=True)
    assert state["data"]["stream"] == [(0, 128)] and state["data"]["position"] == 8
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-8", part / "checkpoint-8")
    shutil.copy(full / "train_config.json", part / "train_config.json")
    r = cli("--resume", "auto", "--output-dir", part, "--num-workers", 2)
    assert r.returncode == 0 and "2 workers" in r.stdout and "streamed" in r.stdout, r.stderr[-2000:]
    assert same(weights(part), weights(full))
    sa, sb = (torch.load(run / "checkpoint-24" / "training_state.pt", weights_only=True) for run in (full, part))
    assert sa["data"] == sb["data"] and sa["data"]["stream"] == [(1, 192)]
    assert all(torch.equal(x["exp_avg"], y["exp_avg"]) for x, y in
               zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()))


def test_the_stream_takes_every_image_once_a_pass_in_a_seeded_order(shards):
    """Each rank its own shards, every sample once a pass, another order each pass and seed; the buffer mixes
    shards (an order no shard order alone gives)."""
    from vitfood.stream import TarShards, Stream, passes
    import itertools
    names = (shards / "classes.txt").read_text().split()
    files = [str(shards / f"train-{i:06d}.tar") for i in range(4)]
    stream = Stream(TarShards(files, "jpg", "cls"), names, 100, "test shards")
    take = lambda seed, rank, world, n: [s[2] for s in itertools.islice(passes(stream, seed, rank, world, 64), n)]
    one = take(0, 0, 1, 2 * 192)
    assert sorted(one[:192]) == sorted(one[192:]) and len(set(one[:192])) == 192 and one[:192] != one[192:]
    assert take(0, 0, 1, 192) == one[:192] and take(1, 0, 1, 192) != one[:192]
    shard_of = lambda where: where.rsplit("train-", 1)[1]
    assert [shard_of(w) for w in one[:50]] != sorted((shard_of(w) for w in one[:50]), key=[shard_of(w) for w in one[:50]].index)
    ranks = [take(0, r, 2, 96) for r in (0, 1)]
    assert not set(map(shard_of, ranks[0])) & set(map(shard_of, ranks[1]))  # no shard read by both ranks
    assert {len(set(map(shard_of, r))) for r in ranks} == {2}


def test_bad_streams_are_one_line(shards, tmp_path, capsys, monkeypatch):
    from vitfood import stream
    monkeypatch.setattr(stream, "RETRY_SECONDS", 0.01)
    run = lambda *args: error(capsys, *args, "--max-steps", 2, "--output-dir", tmp_path / "out")
    assert "needs --train-samples" in run(*flags(shards), "--streaming")
    assert "needs --eval-split" in run(*flags(shards)[:2], *flags(shards)[4:], "--streaming", "--train-samples", 10)
    assert "does not combine with --streaming" in run(*streamed(shards), "--sampler", "balanced")
    (tmp_path / "not-a-tar.tar").write_bytes(b"this is not a tar file" * 100)
    assert "is not a readable tar file" in run(*streamed(shards), "--dataset", tmp_path / "not-a-tar.tar")
    with tarfile.open(shards / "train-000000.tar") as source, tarfile.open(tmp_path / "no-label.tar", "w") as t:
        for name in ("000000000.jpg", "000000000.cls", "000000001.jpg"):  # the second sample has no class id
            t.addfile(source.getmember(name), source.extractfile(name))
    assert "sample 000000001 of shard" in run(*streamed(shards, buffer=1), "--dataset", tmp_path / "no-label.tar")
    line = run(*streamed(shards), "--dataset", f"file://{tmp_path}/gone-{{0..1}}.tar")
    assert "cannot read shard file://" in line and "(3 tries)" in line
    with tarfile.open(tmp_path / "odd.tar", "w") as t:  # a class that classes.txt does not have
        for suffix, data in (("jpg", (shards / "classes.txt").read_bytes()), ("cls", b"7")):
            info = tarfile.TarInfo(f"x.{suffix}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    assert "label '7' of x of" in run(*streamed(shards), "--dataset", tmp_path / "odd.tar")
    with pytest.raises(stream.UserError, match="4 shard\\(s\\) for 5 processes"):
        stream.StreamSampler(stream.Stream(stream.TarShards(["a"] * 4, "jpg", "cls"), [], 10, "4 shards"), 0, 10, 0, 5, 1)


@pytest.mark.slow
def test_kill_9_at_random_steps_then_resume_on_a_stream_is_exact(shards, tmp_path):
    ref, killed = killed_and_resumed(tmp_path, *streamed(shards))  # killed as checkpoint-5 is renamed into place
    assert same(weights(killed), weights(ref))
    for k in random.sample(range(6, 12), 2):  # killed between saves: the resume reads steps 6..k again
        out = tmp_path / f"step-{k}"
        go = lambda env=None: cli(*TINY, *streamed(shards), "--max-steps", 12, "--save-steps", 5, "--eval-steps", 5,
                                  "--num-workers", 2, "--output-dir", out, "--resume", "auto", env=env)
        assert go({"VITFOOD_FAULT": f"step:{k}"}).returncode == -9, k
        assert go().returncode == 0 and same(weights(out), weights(ref)), k


@pytest.mark.slow
def test_a_stream_under_torchrun_resumes_bit_exact_after_a_kill(shards, tmp_path):
    """2 processes, each reading 2 of the 4 shards; rank 1 killed -9 at a step after the save at 5: torchrun ends the job, and the
    same command with --resume auto ends with the weights of the job never killed. 1 process cannot take over."""
    k = random.randint(6, 11)
    run = [*TINY, *streamed(shards), "--batch-size", 8, "--max-steps", 12, "--save-steps", 5, "--eval-steps", 5,
           "--num-workers", 1]
    go = lambda out, env=None, *more: cli("--standalone", "--nproc_per_node=2", "-m", "vitfood.train", *run, *more,
                                          "--output-dir", out, "--resume", "auto", module="torch.distributed.run",
                                          env={"OMP_NUM_THREADS": "1", **(env or {})})
    assert go(tmp_path / "ref").returncode == 0
    assert go(tmp_path / "killed", {"VITFOOD_FAULT": f"step:{k}", "VITFOOD_FAULT_RANK": "1"}).returncode != 0
    p = go(tmp_path / "killed")
    assert p.returncode == 0 and "resuming from" in p.stdout, p.stderr[-2000:]
    assert same(weights(tmp_path / "killed"), weights(tmp_path / "ref")), k
    shutil.copytree(tmp_path / "killed", tmp_path / "one", ignore=shutil.ignore_patterns("checkpoint-1[0-2]", "model", "all_results.json"))
    line = error_line(cli(*run, "--batch-size", 16, "--output-dir", tmp_path / "one", "--resume", "auto"))
    assert "resumes with the processes and batch it ran with: 2 process(es)" in line, line


def test_a_folder_streamed_by_datasets_trains_and_reads_every_image_once_a_pass(tmp_path, capsys):
    """The `datasets` streaming path (a Hub data set's, here on a local imagefolder): a run ends, and a pass
    holds every training image once, labelled as the folder names them."""
    import itertools
    from conftest import image_folder
    from vitfood.config import resolve
    from vitfood.sources import load_splits
    from vitfood.stream import passes
    image_folder(tmp_path / "data", {"train": 12, "validation": 4}, classes=("a", "b", "c"), splits=["train", "validation"])
    run = ["--dataset", tmp_path / "data", "--train-split", "train", "--eval-split", "validation", "--streaming",
           "--train-samples", 36]
    assert "is a slice" in error(capsys, *run, "--train-split", "train[:10]", "--output-dir", tmp_path / "x")
    cfg = resolve(dict(dataset=str(tmp_path / "data"), train_split="train", eval_split="validation", streaming=True,
                       train_samples=36))
    stream, evals, names = load_splits(cfg, log=lambda *a: None)
    assert names == ["a", "b", "c"] and len(evals) == 12 and len(stream) == 36
    seen = list(itertools.islice(passes(stream, 0, 0, 1, 8), 36))
    assert len({where for _, _, where, _, _ in seen}) == 36 and sorted(label for *_, label in seen) == [0] * 12 + [1] * 12 + [2] * 12
    assert train(*run, "--max-steps", 3, "--eval-steps", 3, "--save-steps", 3,
                 "--output-dir", tmp_path / "run")["eval_accuracy"] is not None
