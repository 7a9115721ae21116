"""`oftsurgery push`: the real huggingface_hub client against a local Hub write-API server.

The server (`oftsurgery.testing.hub_server.LocalHub`) stores what arrives per repo and revision and
enforces the Hub's rules (token, namespace, regular-vs-LFS, sha256 of LFS objects), so a push that
passes here sent what the Hub expects. Every check compares the server's files with the local folder
byte for byte, and the regular/LFS choice with an independent statement of the rule.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import traceback
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from oftsurgery.reporting.card import render_model_card
from oftsurgery.cli import cli
from oftsurgery.errors import HubError, InvalidCheckpointError, UnsupportedFormatError
from oftsurgery.push import push_checkpoint, validate_checkpoint_for_push
from oftsurgery.io import CheckpointWriter
from oftsurgery.testing.hub_server import LocalHub, UploadModeRule, validate_card_metadata

from hub_server import OTHER_TOKEN, TOKEN, USER, local_hub, no_saved_login  # noqa: F401 (fixtures)

REPO = f"{USER}/smol-oft-gptq"

GPTQ_CONFIG = {
    "quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True,
    "checkpoint_format": "gptq", "pack_dtype": "int32",
}


@pytest.fixture
def hub(local_hub):
    return local_hub


@pytest.fixture(autouse=True)
def _isolated_login(no_saved_login):
    """Tests never see a real login: no HF_TOKEN, no token file, no HF_ENDPOINT."""


def make_checkpoint(folder: Path, *, readme: str | None = None, shard_size: int = 6000) -> Path:
    """A small GPTQ-format checkpoint: 2 quantized linears + float tensors, sharded, with side files."""
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    config = {"model_type": "llama", "hidden_size": 64, "quantization_config": GPTQ_CONFIG}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    writer = CheckpointWriter(folder, max_shard_size=shard_size)
    writer.add("model.embed_tokens.weight", torch.randn(40, 64, generator=g).half())
    for i in range(2):
        p = f"model.layers.{i}.self_attn.q_proj"
        writer.add(f"{p}.qweight", torch.randint(-(2**31), 2**31 - 1, (8, 32), dtype=torch.int32, generator=g))
        writer.add(f"{p}.qzeros", torch.full((2, 4), 0x77777777, dtype=torch.int32))
        writer.add(f"{p}.scales", torch.rand(2, 32, generator=g).half())
        writer.add(f"{p}.g_idx", (torch.arange(64) // 32).to(torch.int32))
    writer.add("model.norm.weight", torch.ones(64).half())
    writer.close()
    vocab = {f"tok{i}": i for i in range(300)}
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab}}, indent=1))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    (folder / "tokenizer.model").write_bytes(bytes(range(256)) * 4)  # binary, *.model: LFS by pattern
    if readme is not None:
        (folder / "README.md").write_text(readme)
    return folder


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def expected_mode(path: str, data: bytes, max_regular: int = 10 * 1024 * 1024) -> str:
    """The Hub's rule, stated independently of the server: LFS for binary weights/sentencepiece
    files by extension, for files over the inline limit, and for binary content."""
    if path.endswith((".safetensors", ".model", ".bin")) or len(data) > max_regular or b"\0" in data[:512]:
        return "lfs"
    return "regular"


def assert_arrived_identical(hub: LocalHub, folder: Path, repo: str = REPO, revision: str = "main") -> None:
    stored = hub.files(repo, revision)
    local = local_files(folder)
    assert set(local) <= set(stored), f"missing on the Hub: {set(local) - set(stored)}"
    for path, data in local.items():
        assert hub.read(repo, path, revision) == data, path


# -- pushing -------------------------------------------------------------------------------------
def test_push_uploads_every_file_byte_identical_with_the_hubs_upload_modes(hub, tmp_path):
    folder = make_checkpoint(tmp_path / "ckpt")
    result = push_checkpoint(folder, REPO, token=TOKEN, endpoint=hub.url)

    assert result.card_written == folder / "README.md"
    assert_arrived_identical(hub, folder)
    shards = [f for f in local_files(folder) if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in hub.files(REPO)
    # The client stored each file the way the preupload answer said, and that answer is the Hub's rule.
    stored = hub.files(REPO)
    decided = hub.upload_modes(REPO)
    for path, data in local_files(folder).items():
        assert stored[path].mode == decided[path] == expected_mode(path, data), path
    lfs_files = {p for p, f in stored.items() if f.mode == "lfs"}
    assert lfs_files == set(shards) | {"tokenizer.model"}
    assert len(hub.requests_to("lfs_upload")) == len(lfs_files)  # plain LFS PUTs: Xet was off
    commits = hub.commits(REPO)
    assert len(commits) == 2 and result.commit_url.endswith(commits[-1].oid) and result.commit_oid == commits[-1].oid
    assert commits[-1].summary == "Upload GPTQ 4-bit g32 sym (gptq) checkpoint with oftsurgery"


def test_client_follows_the_servers_upload_mode_for_large_text_files(tmp_path):
    folder = make_checkpoint(tmp_path / "ckpt")
    limit = 2048  # tokenizer.json is larger: the server asks for LFS though it is text
    assert (folder / "tokenizer.json").stat().st_size > limit
    with LocalHub(tokens={TOKEN: USER}, rule=UploadModeRule(max_regular_size=limit)) as hub:
        push_checkpoint(folder, REPO, token=TOKEN, endpoint=hub.url)
        assert_arrived_identical(hub, folder)
        stored = hub.files(REPO)
        for path, data in local_files(folder).items():
            assert stored[path].mode == expected_mode(path, data, max_regular=limit), path
        assert stored["tokenizer.json"].mode == "lfs" and stored["config.json"].mode == "regular"


def test_second_push_of_the_same_folder_is_a_clean_no_change_and_a_changed_file_a_new_commit(hub, tmp_path):
    folder = make_checkpoint(tmp_path / "ckpt")
    runner = CliRunner()
    args = ["push", str(folder), "--repo-id", REPO, "--token", TOKEN, "--endpoint", hub.url]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.stderr
    n_commits = len(hub.commits(REPO))
    second = runner.invoke(cli, args)
    assert second.exit_code == 0, second.stderr
    assert second.stdout.strip() == first.stdout.strip()  # the same head commit: nothing new
    assert len(hub.commits(REPO)) == n_commits

    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True}))
    third = runner.invoke(cli, args)
    assert third.exit_code == 0, third.stderr
    commits = hub.commits(REPO)
    assert len(commits) == n_commits + 1 and commits[-1].changes == {"generation_config.json": "regular"}
    assert third.stdout.strip().endswith(commits[-1].oid)
    assert_arrived_identical(hub, folder)


def test_push_to_a_branch_and_as_a_pull_request(hub, tmp_path):
    folder = make_checkpoint(tmp_path / "ckpt")
    result = push_checkpoint(folder, REPO, token=TOKEN, endpoint=hub.url, revision="dev", private=True)
    assert result.revision == "dev" and hub.repos[REPO].private
    assert_arrived_identical(hub, folder, revision="dev")
    assert set(hub.files(REPO, "main")) == {".gitattributes"}  # main untouched

    pr = CliRunner().invoke(
        cli, ["push", str(folder), "--repo-id", REPO, "--create-pr", "--token", TOKEN, "--endpoint", hub.url]
    )
    assert pr.exit_code == 0, pr.stderr
    assert f"{hub.url}/{REPO}/discussions/1" in pr.stderr
    assert_arrived_identical(hub, folder, revision="refs/pr/1")
    assert set(hub.files(REPO, "main")) == {".gitattributes"}


def test_transient_server_error_on_an_lfs_upload_is_retried(hub, tmp_path):
    folder = make_checkpoint(tmp_path / "ckpt")
    hub.fail("lfs_upload", 500, times=1)
    push_checkpoint(folder, REPO, token=TOKEN, endpoint=hub.url)
    assert_arrived_identical(hub, folder)
    assert [r.status for r in hub.requests_to("lfs_upload")].count(500) == 1


def test_existing_model_card_is_left_untouched(hub, tmp_path):
    card = "---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# My own card\n"
    folder = make_checkpoint(tmp_path / "ckpt", readme=card)
    result = push_checkpoint(folder, REPO, token=TOKEN, endpoint=hub.url)
    assert result.card_written is None
    assert (folder / "README.md").read_text() == card
    assert hub.read(REPO, "README.md") == card.encode()


# -- the model card ------------------------------------------------------------------------------
def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_generated_card_has_the_hub_metadata_and_the_merge_figures(hub, tmp_path):
    folder = make_checkpoint(tmp_path / "ckpt")
    command = "oftsurgery merge ./smol-gptq ./oft-adapter --out ./merged --method calibrated"
    report = {
        "checkpoint": "HuggingFaceTB/SmolLM2-135M-Instruct", "adapter": "./oft-adapter", "method": "calibrated",
        "output_format": "GPTQ 4-bit g32 sym (gptq)", "command": command, "fidelity": {"top1_agreement": 0.9871},
        "summary": {"codes_changed": 0.1234, "mean_residual_before": 0.05, "mean_residual_after": 0.0123,
                    "kept_fraction": 0.754, "warnings": []},
    }
    (folder / "merge_report.json").write_text(json.dumps(report))
    push_checkpoint(folder, REPO, token=TOKEN, endpoint=hub.url)

    text = hub.read(REPO, "README.md").decode()
    meta = _front_matter(text)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["base_model_relation"] == "finetune"  # an adapter was merged into the weights
    assert meta["library_name"] == "transformers"
    assert {"oftsurgery", "oft", "gptq"} <= set(meta["tags"])
    assert validate_card_metadata(text) == ([], [])
    assert command in text and "0.9871" in text and "0.754" in text and "12.34%" not in text
    assert "Fine-tune kept per layer" in text and f'from_pretrained("{REPO}"' in text


def test_card_rules():
    awq = _front_matter(render_model_card(quant_method="awq", base_model="org/base"))
    assert awq["base_model_relation"] == "quantized" and "awq" in awq["tags"]
    local = render_model_card(quant_method="gptq", base_model="./my/local/model", adapter="org/adapter")
    assert "base_model" not in _front_matter(local)  # the Hub rejects a local path there
    assert "`./my/local/model`" in local and validate_card_metadata(local) == ([], [])
    with pytest.raises(ValueError):
        render_model_card(quant_method="nf4")


# -- refusals before anything is uploaded ----------------------------------------------------------
def test_push_a_checkpoint_quantized_by_gptqmodel(hub, tmp_path, tiny_gptq_dir):
    """A real GPTQ checkpoint (gptqmodel's own output) arrives complete and loadable as it left."""
    import shutil

    folder = Path(shutil.copytree(tiny_gptq_dir, tmp_path / "ckpt"))  # the session fixture stays untouched
    validate_checkpoint_for_push(folder)
    push_checkpoint(folder, REPO, token=TOKEN, endpoint=hub.url)
    assert_arrived_identical(hub, folder)
    stored = hub.files(REPO)
    for path, data in local_files(folder).items():
        assert stored[path].mode == expected_mode(path, data), path
    meta = _front_matter(hub.read(REPO, "README.md").decode())
    assert {"oftsurgery", "oft", "gptq"} <= set(meta["tags"])


def _break_missing_shard(folder: Path) -> None:
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()


def _break_not_quantized(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))


def _break_index_lists_absent_tensor(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.qweight"] = next(iter(index["weight_map"].values()))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _break_no_quantized_tensors(folder: Path) -> None:
    for shard in folder.glob("model-*.safetensors"):
        shard.unlink()
    (folder / "model.safetensors.index.json").unlink()
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2, 2)}, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("breaker", "error", "words"),
    [
        (_break_missing_shard, InvalidCheckpointError, "missing"),
        (_break_not_quantized, UnsupportedFormatError, "not quantized"),
        (_break_index_lists_absent_tensor, InvalidCheckpointError, "not found in their shard"),
        (_break_no_quantized_tensors, InvalidCheckpointError, "no quantized tensors"),
    ],
)
def test_incomplete_checkpoints_are_refused_and_nothing_is_sent(hub, tmp_path, breaker, error, words):
    folder = make_checkpoint(tmp_path / "ckpt")
    breaker(folder)
    before = local_files(folder)
    with pytest.raises(error, match=words):
        validate_checkpoint_for_push(folder)
    result = CliRunner().invoke(cli, ["push", str(folder), "--repo-id", REPO, "--token", TOKEN, "--endpoint", hub.url])
    assert result.exit_code == error.exit_code
    assert result.stderr.startswith("Error: Not pushing:") and result.stderr.count("\n") == 1
    assert hub.requests == []
    assert local_files(folder) == before  # not even a model card written


# -- failures a user meets ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_token(hub):
    return [], "No Hugging Face token found"


def _wrong_token(hub):
    return ["--token", "hf_wrong_" + TOKEN[::-1]], "rejected the token (401 Unauthorized)"


def _repo_not_found(hub):
    hub.fail("preupload", 404)
    return ["--token", TOKEN], f"repository {REPO} was not found"


def _server_error_on_commit(hub):
    hub.fail("commit", 500)
    return ["--token", TOKEN], "failed with HTTP 500 while uploading the files"


def _foreign_namespace(hub):
    return ["--token", OTHER_TOKEN], f"may not write to {REPO} (403 Forbidden"


def _unreachable(hub):
    return ["--token", TOKEN, "--endpoint", f"http://127.0.0.1:{_free_port()}"], "Cannot reach the Hub"


@pytest.mark.parametrize(
    "scenario", [_no_token, _wrong_token, _repo_not_found, _server_error_on_commit, _foreign_namespace, _unreachable]
)
def test_failures_give_one_line_messages_exit_code_and_never_show_the_token(hub, tmp_path, caplog, monkeypatch, scenario):
    folder = make_checkpoint(tmp_path / "ckpt")
    extra, expected = scenario(hub)
    if scenario is _no_token:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    # -vv: huggingface_hub and its HTTP client log at DEBUG, the most they can say, and still no token
    args = ["push", str(folder), "--repo-id", REPO, "--endpoint", hub.url, "--retries", "1", "--retry-wait", "0",
            "-vv", *extra]
    hf_logger = logging.getLogger("huggingface_hub")
    hf_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.DEBUG):
            result = CliRunner().invoke(cli, args)
    finally:
        hf_logger.removeHandler(caplog.handler)

    assert result.exit_code == HubError.exit_code
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], result.stderr
    if scenario is not _no_token:
        assert caplog.records, "huggingface_hub logged nothing: the leak check would be vacuous"
    for text in (result.stdout, result.stderr, caplog.text):
        assert TOKEN not in text
    if scenario is _server_error_on_commit:
        assert [r.status for r in hub.requests_to("commit")] == [500, 500]  # tried, then retried once
        assert len(hub.commits(REPO)) == 1  # only the repo's initial commit


def test_library_errors_do_not_carry_the_token_even_in_tracebacks(hub, tmp_path):
    folder = make_checkpoint(tmp_path / "ckpt")
    hub.fail("commit", 500)
    with pytest.raises(HubError) as info:
        push_checkpoint(folder, REPO, token=TOKEN, endpoint=hub.url, retries=0)
    assert TOKEN not in "".join(traceback.format_exception(info.value))
    hub.clear_failures()
    push_checkpoint(folder, REPO, token=TOKEN, endpoint=hub.url)  # the same push again completes it
    assert_arrived_identical(hub, folder)


def test_token_from_the_environment_and_bad_arguments(hub, tmp_path, monkeypatch):
    folder = make_checkpoint(tmp_path / "ckpt")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # read at call time, not at import
    push_checkpoint(folder, REPO)
    assert_arrived_identical(hub, folder)
    with pytest.raises(HubError, match="NAMESPACE/NAME"):
        push_checkpoint(folder, "just-a-name")
    with pytest.raises(HubError, match="pull request"):
        push_checkpoint(folder, REPO, revision="dev", create_pr=True)


# -- the server's own checks can fail (so the tests above mean something) ------------------------
def _post(url: str, body: bytes, token: str | None = TOKEN, method: str = "POST") -> int:
    request = urllib.request.Request(url, data=body, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_server_refuses_binary_files_inline_unknown_lfs_objects_and_wrong_hashes(hub, tmp_path):
    push_checkpoint(make_checkpoint(tmp_path / "ckpt"), REPO, token=TOKEN, endpoint=hub.url)
    commit_url = f"{hub.url}/api/models/{REPO}/commit/main"

    def ndjson(*ops):
        lines = [{"key": "header", "value": {"summary": "x"}}, *ops]
        return b"".join(json.dumps(line).encode() + b"\n" for line in lines)

    inline_binary = {"key": "file", "value": {"path": "w.safetensors", "encoding": "base64",
                                              "content": base64.b64encode(b"\0\1\2").decode()}}
    assert _post(commit_url, ndjson(inline_binary)) == 400
    ghost = {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "0" * 64, "size": 3}}
    assert _post(commit_url, ndjson(ghost)) == 422
    text = {"key": "file", "value": {"path": "notes.txt", "encoding": "base64",
                                     "content": base64.b64encode(b"hello").decode()}}
    assert _post(commit_url, ndjson(text), token=None) == 401
    assert _post(commit_url, ndjson(text), token=OTHER_TOKEN) == 403
    assert _post(commit_url, ndjson(text)) == 200 and hub.read(REPO, "notes.txt") == b"hello"

    import hashlib

    data = os.urandom(100)
    oid = hashlib.sha256(data).hexdigest()
    batch = json.dumps({"operation": "upload", "objects": [{"oid": oid, "size": 100}]}).encode()
    request = urllib.request.Request(f"{hub.url}/{REPO}.git/info/lfs/objects/batch", data=batch, method="POST")
    request.add_header("Authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(request) as response:
        href = json.load(response)["objects"][0]["actions"]["upload"]["href"]
    assert _post(href, os.urandom(100), token=None, method="PUT") == 400  # sha256 != oid
    assert _post(href, data, token=None, method="PUT") == 200
