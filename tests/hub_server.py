"""Pytest fixtures around the local Hub server (`oftsurgery.testing.hub_server.LocalHub`).

Import them into a test module (`from hub_server import TOKEN, USER, local_hub, no_saved_login`)
to push to a throwaway Hub on 127.0.0.1: `local_hub.url` is the endpoint, `TOKEN` writes to the
`USER` namespace, `hf_bob_token` belongs to another user (for 403s). `no_saved_login` makes sure
no real login or HF_ENDPOINT leaks into a test.
"""

from __future__ import annotations

import pytest

from oftsurgery.testing.hub_server import LocalHub

TOKEN = "hf_oftsurgeryTEST_s3cr3t_9f2c7d1e"  # distinctive: any leak into output is easy to spot
USER = "alice"
OTHER_TOKEN = "hf_bob_token"


@pytest.fixture
def local_hub():
    with LocalHub(tokens={TOKEN: USER, OTHER_TOKEN: "bob"}) as server:
        yield server


@pytest.fixture
def no_saved_login(monkeypatch, tmp_path):
    """No HF_TOKEN, no saved token file, no HF_ENDPOINT: tests see only the token they pass."""
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
