"""Configuration and bad input: every mistake is a ConfigError naming the field, never the secret."""

from __future__ import annotations

import re
from typing import Any

import httpx2
import pytest
from pydantic import SecretStr

from keypool import (
    BreakerConfig,
    BreakerState,
    ConfigError,
    KeyPool,
    KeyPoolError,
    KeyPoolTransport,
    KeySpec,
    PoolConfig,
    ProviderConfig,
    SyncKeyPoolTransport,
    UnknownKeyError,
    UnknownProviderError,
    fingerprint,
)
from keypool.testing import FakeClock

SECRET = "sk-SECRET-abc123def456ghi789"
SECRET2 = "sk-SECRET-zyx987wvu654tsr321"


def config_error(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert SECRET not in message
    assert SECRET2 not in message
    assert "SECRET" not in repr(info.value)
    return message


# ---------------------------------------------------------------------------------- breaker config


@pytest.mark.parametrize(
    ("field", "value", "range_words"),
    [
        ("failure_threshold", 0, "greater than or equal to 1"),
        ("failure_threshold", -3, "greater than or equal to 1"),
        ("success_threshold", 0, "greater than or equal to 1"),
        ("half_open_max_calls", 0, "greater than or equal to 1"),
        ("timeout", 0, "greater than 0"),
        ("timeout", -1.5, "greater than 0"),
        ("max_timeout", 0, "greater than 0"),
        ("probe_timeout", 0, "greater than 0"),
        ("default_retry_after", -1, "greater than 0"),
        ("backoff_multiplier", 0.5, "greater than or equal to 1"),
        ("jitter", -0.1, "greater than or equal to 0"),
        ("jitter", 1.5, "less than or equal to 1"),
        ("timeout", 10**9, "less than or equal to"),
        ("failure_threshold", "many", "valid integer"),
    ],
)
def test_breaker_config_out_of_range(field: str, value: object, range_words: str) -> None:
    message = config_error(BreakerConfig, **{field: value})
    assert field in message
    assert range_words in message


def test_max_timeout_below_timeout() -> None:
    message = config_error(BreakerConfig, timeout=120, max_timeout=60)
    assert "max_timeout" in message
    assert "timeout" in message


def test_max_retry_after_below_default() -> None:
    message = config_error(BreakerConfig, default_retry_after=100, max_retry_after=10)
    assert "max_retry_after" in message


def test_unknown_breaker_field() -> None:
    message = config_error(BreakerConfig, failure_treshold=3)
    assert "failure_treshold" in message


def test_updated_names_unknown_fields_and_lists_allowed() -> None:
    message = config_error(BreakerConfig().updated, {"bogus": 1})
    assert "bogus" in message
    assert "failure_threshold" in message


def test_updated_validates_the_whole_result() -> None:
    cfg = BreakerConfig()
    message = config_error(cfg.updated, {"timeout": 900})
    assert "max_timeout" in message
    assert cfg.updated({"timeout": 900, "max_timeout": 900}).timeout == 900


def test_configs_are_frozen() -> None:
    cfg = BreakerConfig()
    with pytest.raises(Exception, match="frozen"):
        cfg.timeout = 5  # type: ignore[misc]


def test_config_error_is_a_value_error_and_a_keypool_error() -> None:
    with pytest.raises(ConfigError) as info:
        BreakerConfig(failure_threshold=0)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, KeyPoolError)


# ---------------------------------------------------------------------------------- keys


@pytest.mark.parametrize("weight", [0, -1, -0.5])
def test_weight_must_be_positive(weight: float) -> None:
    message = config_error(KeySpec, secret=SECRET, weight=weight)
    assert "weight" in message
    assert "greater than 0" in message


@pytest.mark.parametrize("secret", ["", "   ", "\t\n"])
def test_secret_must_not_be_empty(secret: str) -> None:
    message = config_error(KeySpec, secret=secret)
    assert "secret" in message


def test_bad_secret_type_does_not_echo() -> None:
    message = config_error(KeySpec, secret=["sk-SECRET-abc123def456ghi789"])
    assert "secret" in message


@pytest.mark.parametrize("key_id", ["", "has space", "-leading-dash", "x" * 65, "a/b"])
def test_key_id_pattern(key_id: str) -> None:
    message = config_error(KeySpec, secret=SECRET, key_id=key_id)
    assert "key_id" in message


def test_unknown_key_field_holding_a_secret_is_not_echoed() -> None:
    message = config_error(KeySpec, secret=SECRET, api_key=SECRET2)
    assert "api_key" in message


def test_max_concurrency_must_be_positive() -> None:
    assert "max_concurrency" in config_error(KeySpec, secret=SECRET, max_concurrency=0)


def test_tier_must_be_known() -> None:
    message = config_error(KeySpec, secret=SECRET, tier="tertiary")
    assert "tier" in message


def test_key_id_defaults_to_a_fingerprint() -> None:
    spec = KeySpec(secret=SecretStr(SECRET))
    assert spec.id == fingerprint(SECRET)
    assert re.fullmatch(r"key-[0-9a-f]{10}", spec.id)
    assert SECRET not in spec.id
    assert KeySpec(secret=SECRET, key_id="primary-1").id == "primary-1"


def test_empty_key_list() -> None:
    message = config_error(ProviderConfig, name="deepseek", keys=[])
    assert "keys" in message
    assert "at least 1" in message


def test_duplicate_key_ids() -> None:
    message = config_error(
        ProviderConfig,
        name="deepseek",
        keys=[{"secret": SECRET, "key_id": "k1"}, {"secret": SECRET2, "key_id": "k1"}],
    )
    assert "duplicate key id" in message
    assert "k1" in message


def test_the_same_secret_twice_is_a_duplicate() -> None:
    message = config_error(KeyPool.from_keys, "deepseek", [SECRET, SECRET])
    assert "duplicate key id" in message
    assert fingerprint(SECRET) in message


def test_keys_given_as_plain_strings_in_a_mapping_do_not_echo_the_secret() -> None:
    message = config_error(KeyPool, {"providers": [{"name": "p", "keys": [SECRET, SECRET2]}]})
    assert "keys" in message


def test_keys_given_as_one_string_do_not_echo_the_secret() -> None:
    message = config_error(ProviderConfig, name="p", keys=SECRET)
    assert "keys" in message


def test_duplicate_provider_names() -> None:
    message = config_error(
        PoolConfig,
        providers=[{"name": "p", "keys": [{"secret": SECRET}]}, {"name": "p", "keys": [{"secret": SECRET2}]}],
    )
    assert "duplicate provider" in message


def test_empty_provider_list() -> None:
    assert "providers" in config_error(PoolConfig, providers=[])


def test_weights_length_mismatch() -> None:
    message = config_error(KeyPool.from_keys, "p", [SECRET, SECRET2], weights=[1.0])
    assert "weights" in message


def test_backup_threshold_range() -> None:
    message = config_error(KeyPool.from_keys, "p", [SECRET], backup_threshold=1.5)
    assert "backup_threshold" in message


def test_provider_name_pattern() -> None:
    assert "name" in config_error(ProviderConfig, name="bad name", keys=[{"secret": SECRET}])


def test_adding_an_existing_provider_or_key() -> None:
    pool = KeyPool.from_keys("p", [SECRET])
    assert "'p'" in config_error(pool.add_provider, {"name": "p", "keys": [{"secret": SECRET2}]})
    message = config_error(pool.add_key, "p", SECRET)
    assert fingerprint(SECRET) in message


def test_transport_rejects_a_zero_attempt_budget() -> None:
    pool = KeyPool.from_keys("p", [SECRET])
    assert "max_attempts" in config_error(KeyPoolTransport, pool, "p", max_attempts=0)
    assert "max_attempts" in config_error(SyncKeyPoolTransport, pool, "p", max_attempts=-1)


# ---------------------------------------------------------------------------------- unknown names


def test_unknown_provider_lists_the_known_ones() -> None:
    pool = KeyPool(
        {
            "providers": [
                {"name": "deepseek", "keys": [{"secret": SECRET}]},
                {"name": "perplexity", "keys": [{"secret": SECRET2}]},
            ]
        }
    )
    for call in (
        lambda: pool.try_acquire("openia"),
        lambda: pool.capacity("openia"),
        lambda: pool.stats("openia"),
        lambda: pool.reset("openia"),
        lambda: pool.activate_backup("openia"),
        lambda: KeyPoolTransport(
            pool, "openia", transport=httpx2.MockTransport(lambda r: httpx2.Response(200))
        ),
    ):
        with pytest.raises(UnknownProviderError) as info:
            call()
        message = str(info.value)
        assert "'openia'" in message
        assert "'deepseek'" in message
        assert "'perplexity'" in message
        assert info.value.known == ["deepseek", "perplexity"]
        assert isinstance(info.value, LookupError)
        assert SECRET not in message


def test_unknown_key_lists_the_known_ids() -> None:
    pool = KeyPool.from_keys(
        "p", [KeySpec(secret=SECRET, key_id="alpha"), KeySpec(secret=SECRET2, key_id="beta")]
    )
    for call in (
        lambda: pool.reset("p", "gamma"),
        lambda: pool.reset(key_id="gamma"),
        lambda: pool.key_stats("gamma"),
        lambda: pool.quarantine("gamma"),
        lambda: pool.update_config({"timeout": 5}, key_id="gamma"),
        lambda: pool.remove_key("p", "gamma"),
    ):
        with pytest.raises(UnknownKeyError) as info:
            call()
        message = str(info.value)
        assert "'gamma'" in message
        assert "'alpha'" in message
        assert "'beta'" in message
        assert isinstance(info.value, LookupError)
        assert SECRET not in message


def test_a_long_list_of_known_ids_is_shortened() -> None:
    pool = KeyPool.from_keys(
        "p", [KeySpec(secret=f"sk-{i:03d}-xxxxxxxx", key_id=f"k{i:03d}") for i in range(50)]
    )
    with pytest.raises(UnknownKeyError) as info:
        pool.key_stats("nope")
    assert "30 more" in str(info.value)


# ---------------------------------------------------------------------------------- hot updates


def _two_provider_pool(clock: FakeClock) -> KeyPool:
    return KeyPool(
        {
            "providers": [
                {
                    "name": "p",
                    "keys": [
                        {"secret": SECRET, "key_id": "p1"},
                        {"secret": "sk-p2-xxxxxxxx", "key_id": "p2"},
                    ],
                },
                {"name": "q", "keys": [{"secret": SECRET2, "key_id": "q1"}]},
            ]
        },
        clock=clock,
    )


def _all_configs(pool: KeyPool) -> dict[str, BreakerConfig]:
    return {k: pool.breaker_config(k) for k in pool.key_ids()}


@pytest.mark.parametrize(
    "changes",
    [
        {"failure_threshold": 0},
        {"timeout": -1},
        {"timeout": 700},  # above every max_timeout
        {"bogus": 1},
        {"failure_threshold": 7, "jitter": 2.0},  # one good, one bad: neither applies
        {"failure_threshold": True},  # as strict as the admin API: a bool is not a count
        {"failure_threshold": "10"},
        {"failure_threshold": 3.0},
        {"timeout": "90"},
        {"timeout": None},
    ],
)
def test_invalid_update_changes_nothing_anywhere(changes: dict[str, Any]) -> None:
    clock = FakeClock()
    pool = _two_provider_pool(clock)
    pool.trip("p", "p1")
    before_configs = _all_configs(pool)
    before_stats = pool.stats()
    for scope in ({}, {"provider": "p"}, {"key_id": "q1"}, {"provider": "q", "key_id": "q1"}):
        with pytest.raises(ConfigError):
            pool.update_config(changes, **scope)
    assert _all_configs(pool) == before_configs
    assert pool.stats() == before_stats
    # new keys still get the old provider defaults
    pool.add_key("p", KeySpec(secret="sk-new-key-xxxxxx", key_id="p3"))
    assert pool.breaker_config("p3") == BreakerConfig()


def test_invalid_update_for_one_provider_changes_no_other_provider() -> None:
    clock = FakeClock()
    pool = _two_provider_pool(clock)
    pool.update_config({"max_timeout": 1000}, provider="p")  # p allows timeout 700 ...
    pool.update_config({"max_timeout": 1000}, key_id="q1")  # ... and so does q's only key
    with pytest.raises(ConfigError):
        pool.update_config({"timeout": 700})  # but q's default (max_timeout 600) does not
    assert {k: c.timeout for k, c in _all_configs(pool).items()} == {"p1": 60, "p2": 60, "q1": 60}
    pool.add_key("p", KeySpec(secret="sk-new-key-xxxxxx", key_id="p3"))
    assert pool.breaker_config("p3").timeout == 60
    assert pool.breaker_config("p3").max_timeout == 1000


def test_valid_update_keeps_state_and_applies() -> None:
    clock = FakeClock()
    pool = _two_provider_pool(clock)
    pool.trip("p", "p1")
    assert pool.update_config({"failure_threshold": 7}) == 3
    stats = {s["key_id"]: s for s in pool.stats()}
    assert stats["p1"]["state"] == BreakerState.OPEN.label
    assert stats["p1"]["trips"] == 1
    assert {s["config"]["failure_threshold"] for s in stats.values()} == {7}


def test_per_key_update_keeps_the_others() -> None:
    pool = _two_provider_pool(FakeClock())
    assert pool.update_config({"timeout": 90}, key_id="p2") == 1
    assert pool.breaker_config("p2").timeout == 90
    assert pool.breaker_config("p1").timeout == 60
    # a later global change keeps the per-key override's own fields
    pool.update_config({"failure_threshold": 3})
    assert pool.breaker_config("p2").timeout == 90
    assert pool.breaker_config("p2").failure_threshold == 3


def test_update_with_a_whole_config() -> None:
    pool = _two_provider_pool(FakeClock())
    pool.update_config(BreakerConfig(success_threshold=4), provider="q")
    assert pool.breaker_config("q1").success_threshold == 4
    assert pool.breaker_config("p1").success_threshold == 2


def test_a_single_string_of_keys_is_refused_not_split_into_characters() -> None:
    from keypool._config import keys_from

    with pytest.raises(ConfigError, match=r"api_keys: expected a list of keys, got one string"):
        keys_from("sk-live-one")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="backup_keys"):
        keys_from(["sk-a"], backup="sk-b")  # type: ignore[arg-type]
