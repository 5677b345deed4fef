"""Settings (ingest/settings.py): refused at load, by name, before anything starts; the JWT
secret from a file (JWT_SECRET_FILE: a mounted secret, `make run`'s .dev/jwt_secret)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.auth import issue_token
from ingest.settings import SettingsError, load_settings


def test_the_secret_is_read_from_the_file_without_surrounding_whitespace(tmp_path: Path) -> None:
    secret = tmp_path / "jwt_secret"
    secret.write_text("  s3cret-from-a-file-0123456789abcdef\n")
    settings = load_settings({"JWT_SECRET_FILE": str(secret)})
    assert settings.jwt_secret == "s3cret-from-a-file-0123456789abcdef"
    same = load_settings({"JWT_SECRET": "s3cret-from-a-file-0123456789abcdef"})
    claims = ("drv_1", "driver", "org_1", 60)
    assert issue_token(settings, *claims) == issue_token(same, *claims)


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (None, {}, "JWT_SECRET_FILE: cannot read"),
        ("\n  \n", {}, "JWT_SECRET_FILE: .* is empty"),
        ("a-secret", {"JWT_SECRET": "another"}, "JWT_SECRET_FILE: set JWT_SECRET or"),
    ],
)
def test_a_bad_secret_file_is_a_settings_error_naming_it(
    tmp_path: Path, content: str | None, extra: dict[str, str], message: str
) -> None:
    path = tmp_path / "jwt_secret"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SettingsError, match=f"invalid setting {message}") as caught:
        load_settings({"JWT_SECRET_FILE": str(path), **extra})
    assert "a-secret" not in str(caught.value) and "another" not in str(caught.value)


def test_auth_disabled_must_be_explicit():
    with pytest.raises(SettingsError, match="JWT_SECRET"):
        load_settings({})
    with pytest.raises(SettingsError, match="JWT_SECRET"):
        load_settings({"AUTH_DISABLED": "false"})
    with pytest.raises(SettingsError, match="AUTH_DISABLED"):
        load_settings({"AUTH_DISABLED": "maybe"})
    assert load_settings({"AUTH_DISABLED": "true"}).auth_disabled


def test_bad_public_key_is_a_settings_error_at_load():
    """`python -m ingest serve` prints settings errors cleanly only from load_settings."""
    with pytest.raises(SettingsError, match="JWT_PUBLIC_KEY"):
        load_settings(
            {}, jwt_public_key="-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----"
        )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("EXPORT_MIN_BYTES_PER_S", "0"),
        ("EXPORT_MIN_BYTES_PER_S", "-1"),
        ("EXPORT_MIN_BYTES_PER_S", "fast"),
        ("EXPORT_RATE_GRACE_S", "0"),
        ("EXPORT_RATE_GRACE_S", "-5"),
    ],
)
def test_the_export_rate_floor_must_be_positive(name: str, value: str) -> None:
    """Refused at load, which `python -m ingest serve` reports before starting (exit 2): a zero
    floor would let a client hold an export slot for ever, a zero grace would cut every
    download the moment it first waits for its client."""
    with pytest.raises(SettingsError, match=f"invalid setting {name}: Expected"):
        load_settings({"AUTH_DISABLED": "true", name: value})


def test_the_export_rate_floor_defaults() -> None:
    settings = load_settings({"AUTH_DISABLED": "true"})
    assert settings.export_min_bytes_per_s == 32 * 1024
    assert settings.export_rate_grace_s == 30.0
    env = {"AUTH_DISABLED": "true", "EXPORT_MIN_BYTES_PER_S": "65536", "EXPORT_RATE_GRACE_S": "2.5"}
    settings = load_settings(env)
    assert (settings.export_min_bytes_per_s, settings.export_rate_grace_s) == (65536, 2.5)


def test_an_orgs_share_of_the_pods_subscriptions_defaults_to_a_fifth():
    """WS_MAX_SUBSCRIPTIONS_PER_ORG unset follows WS_MAX_SUBSCRIPTIONS_PER_POD (docs/live.md)."""

    def share(**env: str) -> int:
        return load_settings({"AUTH_DISABLED": "true", **env}).ws_org_subscription_limit

    assert share() == 20_000
    assert share(WS_MAX_SUBSCRIPTIONS_PER_POD="1000") == 200
    assert share(WS_MAX_SUBSCRIPTIONS_PER_POD="3") == 1
    assert share(WS_MAX_SUBSCRIPTIONS_PER_POD="1000", WS_MAX_SUBSCRIPTIONS_PER_ORG="7") == 7
    with pytest.raises(SettingsError, match="WS_MAX_SUBSCRIPTIONS_PER_ORG"):
        share(WS_MAX_SUBSCRIPTIONS_PER_ORG="0")


def test_a_geofence_polygon_holds_at_most_10000_positions():
    """Validation costs up to ~10 us per position (geofence_shapes.MAX_PAIRS_PER_EDGE): the
    bound keeps one create within ~0.1 s of the validation thread."""
    env = {"AUTH_DISABLED": "true"}
    assert load_settings(env).geofence_max_vertices == 1000
    assert load_settings({**env, "GEOFENCE_MAX_VERTICES": "10000"}).geofence_max_vertices == 10_000
    with pytest.raises(SettingsError, match="invalid setting GEOFENCE_MAX_VERTICES"):
        load_settings({**env, "GEOFENCE_MAX_VERTICES": "10001"})
