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
