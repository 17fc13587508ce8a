"""keypool serve-admin: the TOML loader, keys from the environment, the token policy, exit codes,
the help text, listening before saying so, and an access log without secrets."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import httpx2
import pytest

from keypool import BreakerConfig, ConfigError, KeyPool, fingerprint
from keypool import _serve as serve

SECRET = "sk-serve-secret-0123456789"
ENV = {
    "DEEPSEEK_API_KEYS": "sk-env-one, sk-env-two,,",
    "DEEPSEEK_BACKUP_API_KEYS": "sk-env-backup",
    "PPLX_KEY_2": "pplx-env-two",
}

GOOD = f"""
[[providers]]
name = "deepseek"
keys_env = "DEEPSEEK_API_KEYS"
backup_keys_env = "DEEPSEEK_BACKUP_API_KEYS"
backup_threshold = 0.3

[providers.breaker]
failure_threshold = 7
timeout = 90

[[providers]]
name = "perplexity"
keys = ["{SECRET}", {{ secret_env = "PPLX_KEY_2", key_id = "pplx-2", weight = 2.5 }}]
"""


def admin(
    config: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    insecure_no_token: bool = False,
    protect_reads: bool = False,
) -> int:
    return serve.serve_admin(
        config=config, host=host, port=port, insecure_no_token=insecure_no_token, protect_reads=protect_reads
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keypool.toml"
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------- the TOML loader


def test_good_file(tmp_path: Path) -> None:
    config = serve.load_config(write(tmp_path, GOOD), ENV)
    deepseek, perplexity = config.providers
    assert deepseek.name == "deepseek"
    assert [(k.secret.get_secret_value(), k.tier) for k in deepseek.keys] == [
        ("sk-env-one", "primary"),
        ("sk-env-two", "primary"),
        ("sk-env-backup", "backup"),
    ]
    assert deepseek.breaker == BreakerConfig(failure_threshold=7, timeout=90)
    assert deepseek.backup_threshold == 0.3
    assert perplexity.breaker == BreakerConfig()
    assert [k.key_id for k in perplexity.keys] == [None, "pplx-2"]
    assert perplexity.keys[1].weight == 2.5
    assert perplexity.keys[1].secret.get_secret_value() == "pplx-env-two"
    pool = KeyPool(config)
    assert pool.providers == ("deepseek", "perplexity")
    assert pool.breaker_config(pool.key_ids("deepseek")[0]).failure_threshold == 7


BAD_FILES = [
    # (TOML, words the message must contain)
    ('[[providers]]\nname = "deepseek"\nkeys = ["sk-x"]\nkeyz = 1\n', "keyz"),
    (
        '[[providers]]\nname = "d"\nkeys = ["sk-x"]\n[providers.breaker]\nfailure_treshold = 3\n',
        "failure_treshold",
    ),
    (
        '[[providers]]\nname = "d"\nkeys = ["sk-x"]\n[providers.breaker]\nfailure_threshold = -1\n',
        "failure_threshold",
    ),
    ('[[providers]]\nname = "d"\nkeys = ["sk-x"]\n[providers.breaker]\ntimeout = "soon"\n', "timeout"),
    ('[[providers]]\nname = "d"\nkeys = ["sk-x"]\nbackup_threshold = 2\n', "backup_threshold"),
    ('[[providers]]\nname = "d"\nkeys_env = "NOT_SET_ANYWHERE"\n', "NOT_SET_ANYWHERE"),
    ('[[providers]]\nname = "d"\nkeys = ["sk-x"]\nbackup_keys_env = "NOPE_KEYS"\n', "NOPE_KEYS"),
    ('[[providers]]\nname = "d"\nkeys = ["sk-x"]\nkeys_env = "DEEPSEEK_API_KEYS"\n', "not both"),
    ('[[providers]]\nname = "d"\n', "no keys"),
    ('[[providers]]\nkeys = ["sk-x"]\n', "name"),
    ('[[providers]]\nname = "bad name!"\nkeys = ["sk-x"]\n', "name"),
    ('[[providers]]\nname = "d"\nkeys = "sk-x"\n', "keys"),
    ('[[providers]]\nname = "d"\nkeys = [3]\n', "keys[0]"),
    ('[[providers]]\nname = "d"\nkeys = [{ secret = "sk-x", weight = -1 }]\n', "weight"),
    ('[[providers]]\nname = "d"\nkeys = [{ secret = "sk-x", colour = "red" }]\n', "colour"),
    ('[[providers]]\nname = "d"\nkeys = [{ key_id = "k" }]\n', "secret_env"),
    ('[[providers]]\nname = "d"\nkeys = [{ secret_env = "UNSET_SECRET_VAR" }]\n', "UNSET_SECRET_VAR"),
    ('[[providers]]\nname = "d"\nkeys = [{ secret = "sk-x", key_id = "no spaces" }]\n', "key_id"),
    ('[[providers]]\nname = "d"\nkeys = ["sk-x", "sk-x"]\n', "duplicate"),
    ('[[providers]]\nname = "d"\nkeys = ["sk-x"]\n[[providers]]\nname = "d"\nkeys = ["sk-y"]\n', "duplicate"),
    ("providers = []\n", "[[providers]]"),
    ("[admin]\nport = 1\n", "admin"),
    ('[[providers]\nname = "d"\n', "not valid TOML"),
]


@pytest.mark.parametrize(("text", "words"), BAD_FILES)
def test_bad_file_names_the_field(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        serve.load_config(path, ENV)
    message = str(info.value)
    assert words in message
    assert str(path) in message


@pytest.mark.parametrize(
    "text",
    [
        f'[[providers]]\nname = "d"\nkeys = ["{SECRET}", "{SECRET}"]\n',
        f'[[providers]]\nname = "d"\nkeys = [{{ secret = "{SECRET}", weight = 0 }}]\n',
        f'[[providers]]\nname = "d"\nkeys = [{{ secret = "{SECRET}", key_id = "bad id" }}]\n',
        f'[[providers]]\nname = "d"\nkeys = ["{SECRET}"]\nbogus = "{SECRET}"\n',
        f'[[providers]]\nname = "d"\nkeys = ["{SECRET}"\n',
    ],
)
def test_errors_never_show_a_secret(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        serve.load_config(write(tmp_path, text), ENV)
    assert SECRET not in str(info.value)
    assert SECRET[-10:] not in str(info.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        serve.load_config(tmp_path / "missing.toml", ENV)
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="UTF-8"):
        serve.load_config(tmp_path / "binary.toml", ENV)


# ---------------------------------------------------------------------- keys from the environment


def test_keys_from_the_environment_without_a_file() -> None:
    env = {
        "DEEPSEEK_API_KEYS": "sk-a,sk-b",
        "PERPLEXITY_API_KEYS": "pplx-a",
        "PERPLEXITY_BACKUP_API_KEYS": "p-b",
    }
    config = serve.load_config(None, env)
    assert [(p.name, len(p.keys)) for p in config.providers] == [("deepseek", 2), ("perplexity", 2)]
    assert config.providers[1].keys[1].tier == "backup"
    only = serve.load_config(None, {"PERPLEXITY_API_KEYS": " pplx-a "})
    assert [p.name for p in only.providers] == ["perplexity"]


def test_no_file_and_no_keys_says_what_to_set() -> None:
    with pytest.raises(ConfigError) as info:
        serve.load_config(None, {"DEEPSEEK_API_KEYS": " , "})
    assert "DEEPSEEK_API_KEYS" in str(info.value)
    assert "PERPLEXITY_API_KEYS" in str(info.value)
    assert "--config" in str(info.value)


# ---------------------------------------------------------------------- the token policy


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_insecure_no_token_is_allowed_on_loopback(host: str) -> None:
    assert serve.is_loopback(host)
    assert serve.no_token_allowed(host, None, insecure_no_token=True) is True


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "example.com", "localhost.evil", ""]
)
def test_insecure_no_token_is_refused_elsewhere(host: str) -> None:
    assert not serve.is_loopback(host)
    with pytest.raises(ConfigError, match="loopback"):
        serve.no_token_allowed(host, None, insecure_no_token=True)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_no_token_without_the_flag_is_refused(host: str) -> None:
    with pytest.raises(ConfigError, match="KEYPOOL_ADMIN_TOKEN"):
        serve.no_token_allowed(host, None, insecure_no_token=False)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_token_protects_any_host(host: str) -> None:
    assert serve.no_token_allowed(host, "a-token", insecure_no_token=False) is False
    assert serve.no_token_allowed(host, "a-token", insecure_no_token=True) is False


# ---------------------------------------------------------------------- serve_admin and the command


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, str, int]]:
    """Never serve: record what would have been served, and on which bound address, instead."""
    served: list[tuple[Any, str, int]] = []

    def record(app: Any, sock: socket.socket) -> None:
        with sock:
            host, port = sock.getsockname()[:2]
        served.append((app, host, port))

    monkeypatch.setattr(serve, "_run", record)
    for name in ("KEYPOOL_ADMIN_TOKEN", "DEEPSEEK_API_KEYS", "PERPLEXITY_API_KEYS"):
        monkeypatch.delenv(name, raising=False)
    return served


@pytest.mark.parametrize(
    ("kwargs", "env", "words"),
    [
        ({}, {"KEYPOOL_ADMIN_TOKEN": "t"}, "DEEPSEEK_API_KEYS"),
        ({}, {"DEEPSEEK_API_KEYS": SECRET}, "KEYPOOL_ADMIN_TOKEN"),
        ({"insecure_no_token": True, "host": "0.0.0.0"}, {"DEEPSEEK_API_KEYS": SECRET}, "loopback"),
        ({"port": 70000}, {"KEYPOOL_ADMIN_TOKEN": "t", "DEEPSEEK_API_KEYS": SECRET}, "--port"),
        ({"config": "/nonexistent/keypool.toml"}, {"KEYPOOL_ADMIN_TOKEN": "t"}, "cannot read"),
    ],
)
def test_config_errors_exit_2_with_one_line(
    no_server: list[Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kwargs: dict[str, Any],
    env: dict[str, str],
    words: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert admin(**kwargs) == 2
    err = capsys.readouterr().err
    assert err.startswith("keypool serve-admin: ")
    assert words in err
    assert "Traceback" not in err
    assert SECRET not in err
    assert no_server == []


def test_bad_field_in_file_exits_2(
    tmp_path: Path, no_server: list[Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KEYPOOL_ADMIN_TOKEN", "t")
    path = write(
        tmp_path, f'[[providers]]\nname = "d"\nkeys = ["{SECRET}"]\n[providers.breaker]\ntimeout = -1\n'
    )
    assert admin(str(path)) == 2
    err = capsys.readouterr().err
    assert "timeout" in err
    assert "greater than 0" in err
    assert SECRET not in err


@pytest.mark.anyio
async def test_serves_the_configured_pool_behind_the_token(
    tmp_path: Path, no_server: list[Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KEYPOOL_ADMIN_TOKEN", "serve-token")
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    assert admin(str(write(tmp_path, GOOD))) == 0
    [(app, host, port)] = no_server
    assert host == "127.0.0.1"
    assert port > 0
    err = capsys.readouterr().err
    assert f"serving deepseek (3 keys), perplexity (2 keys) on http://127.0.0.1:{port}" in err
    assert "perplexity (2 keys)" in err
    assert SECRET not in err
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://t") as http:
        stats = (await http.get("/api/v1/circuit-breaker/stats")).json()
        assert {s["provider"] for s in stats} == {"deepseek", "perplexity"}
        assert {s["config"]["failure_threshold"] for s in stats if s["provider"] == "deepseek"} == {7}
        assert (await http.post("/api/v1/circuit-breaker/reset")).status_code == 401
        ok = await http.post("/api/v1/circuit-breaker/reset", headers={"Authorization": "Bearer serve-token"})
        assert ok.status_code == 200
        metrics = (await http.get("/metrics")).text
        assert "circuit_breaker_state{" in metrics
        assert "process_" in metrics or "python_info" in metrics  # the process's own metrics too
        assert SECRET not in metrics


@pytest.mark.anyio
async def test_insecure_no_token_on_loopback_serves_without_auth(
    no_server: list[Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DEEPSEEK_API_KEYS", "sk-loop-1,sk-loop-2")
    assert admin(host="::1", insecure_no_token=True) == 0
    assert "WARNING" in capsys.readouterr().err
    [(app, _, _)] = no_server
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://t") as http:
        assert (await http.post("/api/v1/circuit-breaker/reset")).status_code == 200


def test_the_keypool_command_calls_serve_admin(
    tmp_path: Path, no_server: list[Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = pytest.importorskip("providers.cli")
    monkeypatch.setenv("KEYPOOL_ADMIN_TOKEN", "t")
    path = write(tmp_path, '[[providers]]\nname = "d"\nkeys = ["sk-cli"]\nkeyz = 1\n')
    assert cli.main(["serve-admin", "--config", str(path)]) == 2
    assert "keyz" in capsys.readouterr().err
    good = write(tmp_path, '[[providers]]\nname = "d"\nkeys = ["sk-cli"]\n')
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    assert cli.main(["serve-admin", "--config", str(good), "--port", str(free), "--protect-reads"]) == 0
    [(_, host, port)] = no_server
    assert (host, port) == ("127.0.0.1", free)
    assert "reads and changes need the token" in capsys.readouterr().err


def test_serve_admin_help_names_the_token_variable(capsys: pytest.CaptureFixture[str]) -> None:
    cli = pytest.importorskip("providers.cli")
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve-admin", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for words in ("KEYPOOL_ADMIN_TOKEN", "Authorization: Bearer", "--protect-reads", "DEEPSEEK_API_KEYS"):
        assert words in text, words


@pytest.mark.anyio
async def test_protect_reads_puts_the_reads_behind_the_token(
    no_server: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYPOOL_ADMIN_TOKEN", "serve-token")
    monkeypatch.setenv("DEEPSEEK_API_KEYS", "sk-reads-1,sk-reads-2")
    assert admin(protect_reads=True) == 0
    [(app, _, _)] = no_server
    token = {"Authorization": "Bearer serve-token"}
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://t") as http:
        for url in ("/api/v1/circuit-breaker/stats", "/api/v1/capacity", "/metrics"):
            assert (await http.get(url)).status_code == 401, url
            assert (await http.get(url, headers=token)).status_code == 200, url
        assert (await http.get("/healthz")).status_code == 200


def test_protect_reads_without_a_token_is_refused(
    no_server: list[Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DEEPSEEK_API_KEYS", SECRET)
    assert admin(insecure_no_token=True, protect_reads=True) == 2
    err = capsys.readouterr().err
    assert "--protect-reads" in err
    assert "KEYPOOL_ADMIN_TOKEN" in err
    assert no_server == []


def test_an_address_in_use_exits_1_without_saying_serving(
    no_server: list[Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KEYPOOL_ADMIN_TOKEN", "t")
    monkeypatch.setenv("DEEPSEEK_API_KEYS", SECRET)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert admin(port=port) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err
    assert "serving" not in err
    assert len(err.strip().splitlines()) == 1
    assert no_server == []


@pytest.mark.anyio
async def test_the_access_log_never_shows_a_secret_pasted_into_a_url(
    no_server: list[Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("KEYPOOL_ADMIN_TOKEN", "serve-token")
    monkeypatch.setenv("DEEPSEEK_API_KEYS", SECRET)
    assert admin() == 0
    [(app, _, _)] = no_server
    caplog.set_level(logging.INFO, logger="keypool")
    token = {"Authorization": "Bearer serve-token"}
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://t") as http:
        assert (await http.post(f"/api/v1/circuit-breaker/{SECRET}/reset", headers=token)).status_code == 404
        assert (await http.post(f"/api/v1/circuit-breaker/{SECRET}/reset")).status_code == 401
        assert (await http.get("/api/v1/circuit-breaker/stats")).status_code == 200
    access = [r.getMessage() for r in caplog.records if r.name == "keypool.admin.access"]
    assert len(access) == 3
    masked = f"<{len(SECRET)} characters, fingerprint {fingerprint(SECRET)}>"
    assert access[0].endswith(f'"POST /api/v1/circuit-breaker/{masked}/reset" 404')
    assert access[1].endswith(f'"POST /api/v1/circuit-breaker/{masked}/reset" 401')
    assert access[2].endswith('"GET /api/v1/circuit-breaker/stats" 200')
    server_side = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpx2"))
    assert SECRET not in server_side
    assert SECRET[:12] not in server_side


def test_serving_is_printed_once_the_port_takes_connections(tmp_path: Path) -> None:
    """The real command in a child process: the moment it says "serving" on a port, that port
    answers (no retry loop here: a connection refused would fail the test)."""
    pytest.importorskip("uvicorn")
    env = {
        **os.environ,
        "KEYPOOL_ADMIN_TOKEN": "serve-token",
        "DEEPSEEK_API_KEYS": "sk-child-1,sk-child-2",
        "PYTHONUNBUFFERED": "1",
    }
    command = [sys.executable, "-m", "providers.cli", "serve-admin", "--port", "0"]
    with subprocess.Popen(
        command, env=env, cwd=Path(__file__).resolve().parents[1], stderr=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stderr is not None
            line = child.stderr.readline()
            assert "serving deepseek (2 keys) on http://127.0.0.1:" in line, line
            url = line.split(" on ", 1)[1].split()[0]
            with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
                assert response.status == 200
        finally:
            child.terminate()
            child.wait(timeout=30)
