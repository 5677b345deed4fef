"""JWT keys without the settings: jwt_keys knows nothing of them, settings names the variable."""

from __future__ import annotations

import pytest

from ingest.auth import AuthError, Verifier
from ingest.jwt_keys import InvalidKey, load_public_key, verification_key
from ingest.settings import Settings, SettingsError, load_settings

from .conftest import token

NOT_A_KEY = "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----"


def test_a_bad_key_is_named_by_the_setting_that_carried_it():
    with pytest.raises(InvalidKey) as bare:
        load_public_key(NOT_A_KEY)
    assert not str(bare.value).startswith("invalid setting")
    with pytest.raises(SettingsError) as named:
        load_settings({}, jwt_public_key=NOT_A_KEY)
    assert str(named.value) == f"invalid setting JWT_PUBLIC_KEY: {bare.value}"


def test_no_key_verifies_nothing():
    assert verification_key(None, None) == (None, [])
    assert verification_key(None, "s" * 32) == ("s" * 32, ["HS256"])


def test_without_a_key_only_auth_disabled_lets_anyone_in():
    """load_settings refuses this configuration; a Settings built by hand must not turn every
    token into the development principal, who may post as anyone."""
    verifier = Verifier(Settings())
    with pytest.raises(AuthError, match="missing bearer token"):
        verifier.verify(None)
    with pytest.raises(AuthError, match="no JWT_SECRET or JWT_PUBLIC_KEY"):
        verifier.verify(token())
    assert Verifier(Settings(auth_disabled=True)).verify(token()).org == "dev"
