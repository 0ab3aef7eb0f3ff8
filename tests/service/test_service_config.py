"""Service settings from MULTITALK_* variables (pydantic-settings): names, parsing, precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from multitalk.errors import UserInputError
from multitalk.service.config import ServiceConfig


def test_environment_variables_parse_and_overrides_win(monkeypatch):
    monkeypatch.setenv("MULTITALK_DATA_DIR", "/srv/multitalk")
    monkeypatch.setenv("MULTITALK_API_TOKENS", " alice:tok-alice-1, legacy-token-2 ,")
    monkeypatch.setenv("MULTITALK_ADMIN_TOKENS", "ops:tok-ops-123")
    monkeypatch.setenv("MULTITALK_QUEUE_QUOTA", "4")
    monkeypatch.setenv("MULTITALK_QUEUE_QUOTAS", "alice:2")
    monkeypatch.setenv("MULTITALK_DB", "postgresql://u:secret@db:5432/multitalk")
    monkeypatch.setenv("MULTITALK_LEASE_S", "12.5")
    monkeypatch.setenv("MULTITALK_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("MULTITALK_LOCAL_ROOT", "/srv/media")
    monkeypatch.setenv("MULTITALK_S3_ALLOW", "inputs, outputs/multitalk ,")
    monkeypatch.setenv("MULTITALK_KEEP_WORKDIRS", "0")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    cfg = ServiceConfig.from_env()
    assert cfg.data_dir == Path("/srv/multitalk") and cfg.db_path.parent == Path("/srv/multitalk")
    assert cfg.api_tokens == ("alice:tok-alice-1", "legacy-token-2") and cfg.authenticated
    assert cfg.principals() == {"tok-alice-1": ("alice", False),
                                "legacy-token-2": ("default", False),   # a bare token
                                "tok-ops-123": ("ops", True)}
    assert (cfg.quota_for("alice"), cfg.quota_for("bob")) == (2, 4)
    assert cfg.db_url == "postgresql://u:secret@db:5432/multitalk"
    assert (cfg.lease_s, cfg.max_attempts) == (12.5, 7)
    assert cfg.local_root == Path("/srv/media") and cfg.keep_workdirs is False
    assert cfg.s3_allow == ("inputs", "outputs/multitalk")
    assert cfg.s3_endpoint_url == "http://minio:9000"           # the AWS variable as fallback
    monkeypatch.setenv("MULTITALK_S3_ENDPOINT_URL", "http://own:9000")
    assert ServiceConfig.from_env().s3_endpoint_url == "http://own:9000"

    cfg = ServiceConfig.from_env(lease_s=3, data_dir=None)     # None: keep the environment's
    assert cfg.lease_s == 3.0 and cfg.data_dir == Path("/srv/multitalk")
    copy = cfg.with_overrides(api_tokens="a:tok-aaaa-1,b:tok-bbbb-1", heartbeat_s=1, db="")
    assert copy.api_tokens == ("a:tok-aaaa-1", "b:tok-bbbb-1") and copy.heartbeat_s == 1.0
    assert copy.lease_s == 3.0 and copy.db_url == f"sqlite:///{copy.data_dir / 'jobs.sqlite3'}"
    with pytest.raises(TypeError, match="unknown"):
        cfg.with_overrides(no_such_setting=1)


@pytest.mark.parametrize("name, raw", [("MULTITALK_LEASE_S", "soon"),
                                       ("MULTITALK_MAX_ATTEMPTS", "0"),
                                       ("MULTITALK_ALLOW_PRIVATE_URLS", "perhaps"),
                                       ("MULTITALK_API_TOKENS", "alice:short"),
                                       ("MULTITALK_API_TOKENS", "a b:tok-xxxx-1"),
                                       ("MULTITALK_API_TOKENS", "a:tok-same-1,b:tok-same-1"),
                                       ("MULTITALK_QUEUE_QUOTAS", "alice"),
                                       ("MULTITALK_WEBHOOK_SECRET", "plain-secret"),
                                       ("MULTITALK_WEBHOOK_SECRET", "whsec_c2hvcnQ="),
                                       ("MULTITALK_WEBHOOK_SECRET", "whsec_%%%")])
def test_a_bad_variable_is_a_user_error_naming_it(monkeypatch, name, raw):
    monkeypatch.setenv(name, raw)
    with pytest.raises(UserInputError) as e:
        ServiceConfig.from_env()
    assert e.value.field == name
