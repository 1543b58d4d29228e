"""API keys and rate limits (deepfake.auth): the pure parts; tests/test_serve.py and test_web.py take them
through a real Serve app and a real browser."""

import hashlib

import pytest

from deepfake.auth import ENV_VAR, AuthError, RateLimiter, load_keys
from deepfake.serve import warn_if_open

KEY_A = "alpha-0123456789abcdef"
KEY_B = "bravo-0123456789abcdef"


def test_keys_from_env_and_file_are_kept_hashed(tmp_path):
    f = tmp_path / "keys.txt"
    hashed = hashlib.sha256(KEY_B.encode()).hexdigest()
    f.write_text(f"# team keys\nops:sha256:{hashed}\n\nci:{KEY_A}-ci  # a comment\n")
    store = load_keys(f, env={ENV_VAR: f"{KEY_A}, web:{KEY_A}-web"})
    assert store.required and set(store.digests) == {"key1", "web", "ops", "ci"}
    assert all(len(d) == 32 for d in store.digests.values())
    assert KEY_A.encode() not in b"".join(store.digests.values())  # only digests are held
    assert store.identify(KEY_A) == "key1" and store.identify(KEY_B) == "ops" and store.identify(KEY_A + "-ci") == "ci"
    assert (
        store.identify("nope-0123456789abcdef") is None and store.identify(None) is None and store.identify("") is None
    )


def test_no_keys_means_an_open_server():
    store = load_keys(None, env={})
    assert not store.required and store.identify(KEY_A) is None


@pytest.mark.parametrize(
    "text, match",
    [
        ("short\n", "shorter than 16"),
        ("sha256:xyz\n", "sha256:<64 hex"),
        (f"a:{KEY_A}\na:{KEY_B}\n", "used twice"),
    ],
)
def test_bad_key_files_are_clear_errors(tmp_path, text, match):
    f = tmp_path / "k"
    f.write_text(text)
    with pytest.raises(AuthError, match=match):
        load_keys(f, env={})
    with pytest.raises(AuthError, match="not found"):
        load_keys(tmp_path / "missing", env={})


def test_token_bucket_per_key():
    now = [0.0]
    lim = RateLimiter(2.0, burst=3, clock=lambda: now[0])
    assert [lim.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert lim.take("a") == pytest.approx(0.5)  # one token every 0.5 s
    assert lim.take("b") == 0.0  # keys do not share a bucket
    now[0] = 0.5
    assert lim.take("a") == 0.0 and lim.take("a") > 0
    now[0] = 100.0
    assert [lim.take("a") for _ in range(4)][-1] > 0  # refills only up to the burst
    with pytest.raises(AuthError):
        RateLimiter(0)


def test_serve_warns_when_it_listens_beyond_loopback_without_keys(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    keys = tmp_path / "keys"
    keys.write_text(KEY_A + "\n")
    assert not warn_if_open({"http_options": {"host": "127.0.0.1"}, "args": {}})
    assert not warn_if_open({"http_options": {"host": "0.0.0.0"}, "args": {"api_keys_file": str(keys)}})
    assert warn_if_open({"http_options": {"host": "0.0.0.0"}, "args": {}})
    assert "anyone who can reach this port" in caplog.text
