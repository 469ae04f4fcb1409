from storage.tracking import flatten, redact_uri


def test_flatten_recurses_into_lists_and_masks_credentials():
    config = {"ingest": {"sources": [{"name": "hub", "hf_token": "hf_abc", "text_key": "text"}]},
              "db": {"password": "pw"}, "tokenizer": {"special_tokens": ["<|endoftext|>"], "max_train_chars": 5}}
    flat = flatten(config)
    assert flat["ingest.sources.0.name"] == "hub"
    assert flat["ingest.sources.0.hf_token"] == "***" and flat["db.password"] == "***"
    assert flat["ingest.sources.0.text_key"] == "text"            # a config key, not a secret
    assert flat["tokenizer.special_tokens.0"] == "<|endoftext|>"
    assert "hf_abc" not in str(flat) and "pw" not in flat.values()


def test_redact_uri_hides_passwords_only():
    assert redact_uri("postgresql://me:s3cret@db.local:5432/mlflow") == "postgresql://me:***@db.local:5432/mlflow"
    assert redact_uri("sqlite:////tmp/ws/mlflow.db") == "sqlite:////tmp/ws/mlflow.db"


def test_dead_runs_are_marked_killed_in_every_experiment(tmp_path):
    """A SIGKILLed run under recipe A's experiment is marked when a run of recipe B (another experiment) starts."""
    from storage.tracking import Tracker

    first, second = Tracker(tmp_path, "recipe-a"), Tracker(tmp_path, "recipe-b")
    dead = first.start_run("pipeline", tags={"lmforge.pid": "dead"})
    alive = first.start_run("pipeline", tags={"lmforge.pid": "alive"})
    assert second.mark_dead_runs(lambda tags: tags.get("lmforge.pid") == "dead") == [dead]
    assert first.client.get_run(dead).info.status == "KILLED"
    assert first.client.get_run(alive).info.status == "RUNNING"
