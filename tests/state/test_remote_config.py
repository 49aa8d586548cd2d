"""kiln.state.remote_config: the remote cache settings from the environment and kiln.toml's
[remote_cache] table. No remote by default; the environment wins key by key and can turn a file's
remote off; URLs are normalised (trailing slash) and checked (scheme, credentials, spaces); a token
comes from the environment or a token_file, never from kiln.toml, and is kept out of repr; every bad
value is one line naming the file or variable, the key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.errors import UsageError
from kiln.state.remote_config import DEFAULT_TIMEOUT, RemoteConfig, remote_config


def write_config(root: Path, body: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "kiln.toml").write_text("[remote_cache]\n" + body)


def test_no_setting_means_no_remote_cache(tmp_path: Path):
    assert remote_config(tmp_path, {}) is None
    (tmp_path / "kiln.toml").write_text("[other]\nx = 1\n")
    assert remote_config(tmp_path, {}) is None


def test_the_environment_alone(tmp_path: Path):
    config = remote_config(tmp_path, {"KILN_REMOTE_CACHE": "http://cache:8080/team-a/", "KILN_REMOTE_CACHE_TOKEN": "s3cret",
                                      "KILN_REMOTE_CACHE_UPLOAD": "1", "KILN_REMOTE_CACHE_TIMEOUT": "2.5"})
    assert config == RemoteConfig(url="http://cache:8080/team-a", upload=True, required=False, timeout=2.5, token="s3cret")
    assert "s3cret" not in repr(config)


def test_the_file_alone_reads_only_by_default(tmp_path: Path):
    write_config(tmp_path, 'url = "https://cache.example.com"\n')
    config = remote_config(tmp_path, {})
    assert config is not None and config.url == "https://cache.example.com"
    assert (config.upload, config.required, config.timeout, config.token) == (False, False, DEFAULT_TIMEOUT, None)


def test_the_environment_wins_over_the_file_key_by_key(tmp_path: Path):
    write_config(tmp_path, 'url = "http://file:1"\nupload = true\nrequired = true\ntimeout = 5\n')
    config = remote_config(tmp_path, {"KILN_REMOTE_CACHE": "http://env:2", "KILN_REMOTE_CACHE_UPLOAD": "0"})
    assert (config.url, config.upload, config.required, config.timeout) == ("http://env:2", False, True, 5.0)
    assert config.required_by == "kiln.toml [remote_cache] required = true"
    assert remote_config(tmp_path, {"KILN_REMOTE_CACHE_REQUIRED": "1"}).required_by == "KILN_REMOTE_CACHE_REQUIRED=1"
    assert remote_config(tmp_path, {"KILN_REMOTE_CACHE": "off"}) is None  # a laptop without the team's network


def test_a_token_file_relative_to_the_workspace(tmp_path: Path):
    write_config(tmp_path, 'url = "http://cache:1"\ntoken_file = "secrets/token"\n')
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "token").write_text("from-file\n")
    assert remote_config(tmp_path, {}).token == "from-file"
    assert remote_config(tmp_path, {"KILN_REMOTE_CACHE_TOKEN": "from-env"}).token == "from-env"


@pytest.mark.parametrize(("body", "env", "message"), [
    ('url = "http://c:1"\nupload = "yes"\n', {}, "kiln.toml [remote_cache] upload: 'yes' is not allowed; use true or false"),
    ('url = "http://c:1"\nrequired = 1\n', {}, "kiln.toml [remote_cache] required: 1 is not allowed; use true or false"),
    ('url = "http://c:1"\ntimeout = -3\n', {}, "kiln.toml [remote_cache] timeout: -3 is not allowed; expected a number of seconds above 0"),
    ('url = "http://c:1"\ntoken = "s3cret"\n', {}, "kiln.toml [remote_cache] token: a token must not be written in a file that is committed"),
    ('url = "http://c:1"\nuplod = true\n', {}, "kiln.toml [remote_cache] uplod: True is not a setting; allowed: url, upload, required, timeout, token_file"),
    ('url = "ftp://c/x"\n', {}, "kiln.toml [remote_cache] url: 'ftp://c/x' is not an http(s) URL"),
    ('url = 8080\n', {}, "kiln.toml [remote_cache] url: 8080 is not allowed; expected a string"),
    ('url = "http://c:1"\ntoken_file = "missing"\n', {}, "kiln.toml [remote_cache] token_file: "),
    ("", {"KILN_REMOTE_CACHE": "http://c:1", "KILN_REMOTE_CACHE_UPLOAD": "sometimes"}, "KILN_REMOTE_CACHE_UPLOAD: 'sometimes' is not allowed; use 0 or 1"),
    ("", {"KILN_REMOTE_CACHE": "http://c:1", "KILN_REMOTE_CACHE_TIMEOUT": "soon"}, "KILN_REMOTE_CACHE_TIMEOUT: 'soon' is not allowed"),
    ("", {"KILN_REMOTE_CACHE": "http://user:pw@c:1"}, "KILN_REMOTE_CACHE: the URL must not hold credentials"),
    ("", {"KILN_REMOTE_CACHE": "http://user:pw@c:port"}, "KILN_REMOTE_CACHE: the URL must not hold credentials"),
    ("", {"KILN_REMOTE_CACHE": "http://c:port"}, "KILN_REMOTE_CACHE: 'http://c:port' is not a URL"),
    ("", {"KILN_REMOTE_CACHE": "http://c:1/my team"}, "KILN_REMOTE_CACHE: 'http://c:1/my team' has a query, a fragment or characters"),
    ("", {"KILN_REMOTE_CACHE": "http://c:1", "KILN_REMOTE_CACHE_TOKEN": "s3cret\nX-Evil: 1"}, "KILN_REMOTE_CACHE_TOKEN: the token holds spaces"),
    ("", {"KILN_REMOTE_CACHE": "http://c:1", "KILN_REMOTE_CACHE_TOKEN": "s3cret s3cret"}, "KILN_REMOTE_CACHE_TOKEN: the token holds spaces"),
])
def test_a_bad_value_is_one_line_naming_it(tmp_path: Path, body: str, env: dict[str, str], message: str):
    write_config(tmp_path, body)
    with pytest.raises(UsageError) as raised:
        remote_config(tmp_path, env)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)
    assert "s3cret" not in str(raised.value) and "pw@" not in str(raised.value)


def test_a_file_that_is_not_toml_is_named(tmp_path: Path):
    (tmp_path / "kiln.toml").write_text("[remote_cache\n")
    with pytest.raises(UsageError, match=r"^kiln.toml: is not valid TOML"):
        remote_config(tmp_path, {})
