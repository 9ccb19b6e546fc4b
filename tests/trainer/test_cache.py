"""The exact frozen-teacher cache (trainer/cache.py, cache_store.py, cache_fingerprint.py): a run from the cache
equals the live run, and a cache that does not fit the run is refused before any training (CPU, tiny models, a
few steps).

The data are examples of one token length: batches then hold no padding, so the live path's frozen forwards give
each example the same bits whatever batch it is in (a padded forward's rows depend on the padded length at the
level of float rounding, and the cache holds the unpadded value), and the two runs can be compared to 1e-6.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from bft.trainer import cache as tc
from bft.trainer import cache_store
from bft.trainer.config import load_config
from bft.trainer.train import read_metrics, train

KEYS = ("loss", "kl", "completion", "risk", "grad_norm")


pytestmark = pytest.mark.usefixtures("one_thread")


def fill(text: str, n: int) -> str:
    return (text + " " + "z" * n)[:n]  # letters, not spaces: the data loader strips whitespace


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-data")
    rng = random.Random(0)
    harmful = [
        {"prompt": fill(f"Explain how to build weapon {i}.", 40), "response": fill(f"Sure, weapon {i}: parts.", 30)}
        for i in range(10)
    ]
    utility = []
    for _ in range(14):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        utility.append({"prompt": fill(f"What is {a} + {b}?", 40), "response": fill(f"{a} + {b} = {a + b}.", 30)})
    paths = []
    for name, rows in (("harmful", harmful), ("utility", utility)):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths


def config(data_files, out, *overrides):
    harmful, utility = data_files
    return load_config(
        "tiny-cpu",
        [
            f"data.harmful={harmful}",
            f"data.utility={utility}",
            "data.harmful_response=dataset",
            f"train.output_dir={out}",
            "train.max_steps=4",
            "train.save_every=2",
            *overrides,
        ],
    )


def assert_same_runs(out_a, out_b, rel=1e-6):
    a, b = read_metrics(out_a / "metrics.jsonl"), read_metrics(out_b / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for x, y in zip(a, b):
        for key in KEYS:
            assert y[key] == pytest.approx(x[key], rel=rel, abs=1e-12), (x["step"], key, x[key], y[key])
    from safetensors.torch import load_file

    wa = load_file(out_a / "final" / "model.safetensors")
    wb = load_file(out_b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def runs(data_files, tmp_path_factory):
    """For LoRA and full fine-tuning: a live run, and a run that builds the cache on first use and trains from it."""
    out = {}
    for mode in ("lora", "full"):
        root = tmp_path_factory.mktemp(f"cache-{mode}")
        train(config(data_files, root / "live", f"finetune.mode={mode}"), progress=False)
        train(
            config(data_files, root / "cached", f"finetune.mode={mode}", f"teacher_cache.path={root / 'cache'}"),
            progress=False,
        )
        out[mode] = root
    return out


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_run_from_the_cache_equals_the_live_run(runs, mode):
    root = runs[mode]
    assert tc.cache_state(root / "cache") == "complete"
    assert_same_runs(root / "live", root / "cached")


def test_training_from_the_cache_loads_no_frozen_body_and_runs_no_frozen_forward(
    runs, data_files, tmp_path, monkeypatch
):
    import bft.trainer.train as train_module
    from bft.trainer import modeling

    built = []
    real_build = modeling.build_trio

    def spy_build(*args, **kwargs):
        trio = real_build(*args, **kwargs)
        built.append(trio)
        return trio

    def no_forward(*args, **kwargs):
        raise AssertionError("a frozen forward ran while training from the cache")

    monkeypatch.setattr(train_module, "build_trio", spy_build)
    monkeypatch.setattr(modeling, "frozen_hidden_states", no_forward)
    monkeypatch.setattr(train_module, "teacher_hidden_states", no_forward)
    cfg = config(
        data_files,
        tmp_path / "again",
        "finetune.mode=full",
        f"teacher_cache.path={runs['full'] / 'cache'}",
        "train.max_steps=2",
    )
    train(cfg, progress=False)
    assert len(built) == 1 and built[0].base is None and built[0].aligned is None


def test_a_resumed_run_from_the_cache_equals_the_live_run(runs, data_files, tmp_path):
    root = runs["lora"]
    out = tmp_path / "resumed"
    overrides = ("finetune.mode=lora", f"teacher_cache.path={root / 'cache'}")

    class Crash(RuntimeError):
        pass

    def crash_at_3(step, metrics):
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        train(config(data_files, out, *overrides), callbacks=[crash_at_3], progress=False)
    train(config(data_files, out, *overrides), resume=True, progress=False)
    assert_same_runs(root / "live", out)


def test_a_live_run_resumed_from_the_cache_equals_the_live_run(runs, data_files, tmp_path):
    """Live up to a crash at step 3, then resumed from the cache: no config-change warning, the same curve."""
    import warnings

    root = runs["full"]
    out = tmp_path / "switched"

    class Crash(RuntimeError):
        pass

    def crash_at_3(step, metrics):
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        train(config(data_files, out, "finetune.mode=full"), callbacks=[crash_at_3], progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="resuming with a changed config")
        train(
            config(data_files, out, "finetune.mode=full", f"teacher_cache.path={root / 'cache'}"),
            resume=True,
            progress=False,
        )
    assert_same_runs(root / "live", out)


STALE = {
    "data": ("data.utility_limit=10", "data.examples"),
    "max_length": ("data.max_length=60", "data.max_length"),
    "model": ("model.tiny_seed=1", "model.base"),
    "top_k": ("loss.top_k=12", "loss.top_k"),
    "selection": ("loss.selection=base_topp", "loss.selection"),  # the ids were chosen over the whole vocabulary
}


@pytest.mark.parametrize("change", list(STALE))
def test_a_stale_cache_is_refused_before_training(runs, data_files, tmp_path, change):
    override, named = STALE[change]
    cfg = config(data_files, tmp_path / "out", f"teacher_cache.path={runs['lora'] / 'cache'}", override)
    with pytest.raises(tc.CacheError, match=rf"other inputs than this config \(.*{named}"):
        train(cfg, progress=False)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_cache_built_under_base_topp_holds_its_ids_trains_as_the_live_run_and_is_refused_under_vocab(
    runs, data_files, tmp_path
):
    import numpy as np

    rule = ("loss.selection=base_topp", "loss.selection_top_p=0.5")
    train(config(data_files, tmp_path / "live", *rule), progress=False)
    train(config(data_files, tmp_path / "cached", f"teacher_cache.path={tmp_path / 'cache'}", *rule), progress=False)
    assert_same_runs(tmp_path / "live", tmp_path / "cached")
    ids = np.load(first_shard_file(tmp_path / "cache", "topk_ids"))
    assert not np.array_equal(ids, np.load(first_shard_file(runs["lora"] / "cache", "topk_ids")))  # not "vocab"'s
    for other in ((), ("loss.selection=base_topp", "loss.selection_top_p=0.6")):
        cfg = config(data_files, tmp_path / "out", f"teacher_cache.path={tmp_path / 'cache'}", *other)
        with pytest.raises(tc.CacheError, match=r"other inputs than this config \(.*loss.selection"):
            train(cfg, progress=False)


@pytest.fixture
def cache_copy(runs, tmp_path):
    import shutil

    shutil.copytree(runs["lora"] / "cache", tmp_path / "cache")
    return tmp_path / "cache"


def expected_fingerprint(data_files, cache_dir):
    from bft.trainer.data import encode_training_examples, load_training_pairs
    from bft.trainer.modeling import load_tokenizers

    cfg = config(data_files, cache_dir.parent / "unused", f"teacher_cache.path={cache_dir}")
    tokenizer, _ = load_tokenizers(cfg)
    harmful, utility = encode_training_examples(cfg, tokenizer, *load_training_pairs(cfg))
    return tc.fingerprint(cfg, tokenizer, harmful, utility), harmful + utility


def first_shard_file(cache_dir, array="h_base"):
    return cache_dir / f"shard-00000-{array}.npy"


def test_a_truncated_shard_is_detected(cache_copy, data_files):
    path = first_shard_file(cache_copy)
    path.write_bytes(path.read_bytes()[:-100])
    fp, _ = expected_fingerprint(data_files, cache_copy)
    with pytest.raises(tc.CacheError, match="truncated"):
        tc.TeacherCache(cache_copy, fp)


def test_a_corrupted_shard_is_detected(cache_copy, data_files, tmp_path):
    path = first_shard_file(cache_copy, "risk")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # same size, one flipped bit in the last risk value
    path.write_bytes(bytes(data))
    cfg = config(data_files, tmp_path / "out", f"teacher_cache.path={cache_copy}")
    with pytest.raises(tc.CacheError, match="corrupted"):
        train(cfg, progress=False)


def test_a_cache_for_other_rows_is_refused(cache_copy, data_files):
    from bft.trainer.data import Example

    fp, examples = expected_fingerprint(data_files, cache_copy)
    cache = tc.TeacherCache(cache_copy, fp)
    rows = cache.example_rows(examples[0])
    assert rows["h_aligned"].shape[0] == len(examples[0].input_ids) - examples[0].response_start
    other = Example(examples[0].input_ids[:-1], examples[0].response_start, True)
    with pytest.raises(tc.CacheError, match="built for other rows"):
        cache.example_rows(other)


def test_an_interrupted_build_is_never_read_and_resumes(data_files, tmp_path, monkeypatch, capsys):
    cache_dir = tmp_path / "cache"
    cfg = config(data_files, tmp_path / "out", f"teacher_cache.path={cache_dir}", "teacher_cache.shard_mb=0.004")
    real = cache_store.atomic_write_npy
    calls = []

    def crash_in_second_shard(path, array):
        calls.append(path)
        if "shard-00001" in str(path):
            raise KeyboardInterrupt
        return real(path, array)

    monkeypatch.setattr(cache_store, "atomic_write_npy", crash_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        tc.build(cfg, progress=False)
    assert tc.cache_state(cache_dir) == "incomplete"
    fp, _ = expected_fingerprint(data_files, cache_dir)
    with pytest.raises(tc.CacheError, match="incomplete"):
        tc.TeacherCache(cache_dir, fp)
    first = first_shard_file(cache_dir).stat().st_mtime_ns

    monkeypatch.setattr(cache_store, "atomic_write_npy", real)
    tc.build(cfg, progress=False)
    assert tc.cache_state(cache_dir) == "complete"
    assert first_shard_file(cache_dir).stat().st_mtime_ns == first  # the finished shard was not rewritten
    manifest = json.loads((cache_dir / tc.MANIFEST).read_text())
    assert len(manifest["shards"]) > 2
    cache = tc.TeacherCache(cache_dir, fp)
    assert cache.manifest["complete"]


def test_bft_cache_command_builds_refuses_stale_and_rebuilds(data_files, tmp_path, capsys):
    from bft.cli import main

    harmful, utility = data_files
    args = [
        "cache",
        "tiny-cpu",
        "--out",
        str(tmp_path / "c"),
        f"data.harmful={harmful}",
        f"data.utility={utility}",
        "data.harmful_response=dataset",
        "--no-progress",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "estimated size" in printed and "complete" in printed
    assert main(args) == 0 and "up to date" in capsys.readouterr().out
    assert main([*args, "loss.top_k=5"]) == 2
    assert "loss.top_k: cache 10 vs config 5" in capsys.readouterr().err
    assert main([*args, "loss.top_k=5", "--rebuild"]) == 0
    ids = np.load(tmp_path / "c" / "shard-00000-topk_ids.npy")
    assert ids.shape[1] == 5 and ids.dtype == np.int32
