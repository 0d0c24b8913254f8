import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.prompts import load_prompts
from pipeline.storage import ObjectStore, StorageError, describe_options, is_transient, with_retries


def test_with_retries_backs_off_then_succeeds_or_names_the_operation():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset by peer")
        return "ok"

    assert with_retries(flaky, what="reading x", sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2 and sleeps[1] > sleeps[0] * 0.5

    with pytest.raises(StorageError, match="writing s3://b/k failed after 4 attempt"):
        with_retries(lambda: (_ for _ in ()).throw(TimeoutError("slow")), what="writing s3://b/k", attempts=4,
                     sleep=lambda s: None)
    # permanent errors are not retried
    n = []
    with pytest.raises(StorageError, match="PermissionError"):
        with_retries(lambda: n.append(1) or (_ for _ in ()).throw(PermissionError("denied")), what="x",
                     sleep=lambda s: None)
    assert len(n) == 1
    with pytest.raises(FileNotFoundError):
        with_retries(lambda: (_ for _ in ()).throw(FileNotFoundError("gone")), what="x")
    assert is_transient(OSError("SlowDown")) and not is_transient(ValueError("bad"))


def test_secrets_are_masked():
    opts = {"key": "AKIA123", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://x", "aws_session_token": "t"}}
    shown = json.dumps(describe_options(opts))
    assert "s3cr3t" not in shown and "AKIA123" not in shown and '"t"' not in shown and "http://x" in shown


def test_object_store_local_and_memory(tmp_path):
    for url in (str(tmp_path / "root"), "memory://tf-test/root"):
        store = ObjectStore(url)
        sha, n = store.put_verified("shards/a.tar", b"abc" * 100)
        assert n == 300 and store.exists("shards/a.tar") and store.size("shards/a.tar") == 300
        assert store.read_bytes("shards/a.tar") == b"abc" * 100
        store.write_bytes("commits/a.json", b"{}")
        assert store.list("commits") == ["a.json"] and store.list("nothing-here") == []
        assert set(store.walk_files()) == {"shards/a.tar", "commits/a.json"}
        store.remove("commits/a.json")
        assert not store.exists("commits/a.json")
        with pytest.raises(FileNotFoundError):
            store.read_bytes("missing")


def test_s3_store_on_moto(s3_bucket):
    store = ObjectStore(f"s3://{s3_bucket}/p")
    sha, n = store.put_verified("shards/x.tar", b"\x00" * 1000)
    assert store.size("shards/x.tar") == 1000 and store.list("shards") == ["x.tar"]
    with pytest.raises(StorageError, match="NoSuchBucket|does not exist|not found|FileNotFound|Forbidden|bucket"):
        ObjectStore("s3://no-such-bucket-tf/p").put_verified("x", b"1")


def test_prompt_files(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text('{"prompt_id": 1, "prompt": "a cat"}\n\n{"prompt_id": "b", "prompt": "a dog"}\n')
    pairs, sha = load_prompts(str(j))
    assert pairs == ((1, "a cat"), ("b", "a dog")) and len(sha) == 64
    pq.write_table(pa.table({"prompt_id": [3, 4], "prompt": ["x", "y"]}), tmp_path / "p.parquet")
    assert load_prompts(str(tmp_path / "p.parquet"))[0] == ((3, "x"), (4, "y"))
    for text, msg in [('{"prompt": "x"}', "prompt_id"), ('{"prompt_id": 1, "prompt": "x"}\n{"prompt_id": 1, "prompt": "y"}', "duplicate"),
                      ("not json", "not valid JSON"), ("", "no prompts")]:
        j.write_text(text)
        with pytest.raises(ValueError, match=msg):
            load_prompts(str(j))
    (tmp_path / "bad.parquet").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a valid Parquet"):
        load_prompts(str(tmp_path / "bad.parquet"))
    with pytest.raises(ValueError, match=".jsonl or .parquet"):
        load_prompts(str(tmp_path / "p.csv"))
