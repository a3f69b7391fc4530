"""Pushes to the Hub carry the hf_cblr card, one commit per push: ``trainer.push_to_hub()``, the ``hub_strategy``
checkpoint pushes and ``scripts/finetune.py --push_to_hub``, against a local stand-in for the Hub's HTTP API that
records the commits (huggingface_hub 2.4: create_repo, validate-yaml, preupload and commit)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
import transformers.utils.hub
import yaml
from huggingface_hub import HfApi
from transformers import BertConfig, BertForSequenceClassification

from hf_cblr.data import sentiment_examples
from hf_cblr.trainer import CBLRTrainer, CBLRTrainingArguments

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "someone/tiny-cblr"


@dataclass
class Commit:
    repo_id: str
    revision: str
    message: str
    #: path in the repository -> content
    files: dict[str, bytes]


class HubStandIn:
    """An HTTP server answering the Hub API calls of ``create_repo`` and ``upload_folder``, which records each commit.

    Every file is uploaded as a regular (non-LFS) file, inline in the commit's NDJSON payload. Reads (GET, such as
    huggingface_hub's agent-harness registry) are answered 404; a write (POST) it does not know is recorded in
    ``unknown_requests`` and answered 404."""

    def __init__(self) -> None:
        self.commits: list[Commit] = []
        self.created_repos: list[str] = []
        self.unknown_requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.reply({"error": "not served by the stand-in"}, status=404)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                path = self.path.split("?")[0]
                parts = path.strip("/").split("/")
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo_id = f"{request.get('organization') or 'user'}/{request['name']}"
                    hub.created_repos.append(repo_id)
                    self.reply({"url": f"{hub.url}/{repo_id}", "name": repo_id})
                elif path == "/api/validate-yaml":
                    yaml.safe_load(re.match(r"---\n(.*?)\n---", json.loads(body)["content"], re.DOTALL).group(1))
                    self.reply({"warnings": [], "errors": []})
                elif len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    self.reply({"files": [{"path": file["path"], "uploadMode": "regular", "shouldIgnore": False}
                                          for file in files]})
                elif len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    header = next(line["value"] for line in lines if line["key"] == "header")
                    files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                             for line in lines if line["key"] == "file"}
                    repo_id = "/".join(parts[2:4])
                    hub.commits.append(Commit(repo_id, parts[5], header["summary"], files))
                    oid = f"{len(hub.commits):040x}"
                    self.reply({"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                "pullRequestUrl": None})
                else:
                    hub.unknown_requests.append(f"POST {self.path}")
                    self.reply({"error": "not served by the stand-in"}, status=404)

            def reply(self, payload: dict[str, Any], status: int = 200) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def __enter__(self) -> HubStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStandIn]:
    """The stand-in, with huggingface_hub online and transformers' shared HfApi pointed at it."""
    with HubStandIn() as stand_in:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(transformers.utils.hub, "_hf_api", HfApi(endpoint=stand_in.url))
        yield stand_in
        assert not stand_in.unknown_requests


def card_metadata(commit: Commit) -> dict[str, Any]:
    text = commit.files["README.md"].decode()
    match = re.match(r"---\n(.*?)\n---\n", text, flags=re.DOTALL)
    assert match is not None, text[:500]
    return yaml.safe_load(match.group(1))


def tiny_dataset(size: int) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (size, 6), generator=generator)
    return [{"input_ids": row, "attention_mask": torch.ones(6, dtype=torch.long), "labels": int(row[0] % 2)} for row in ids]


def tiny_trainer(tmp_path: Path, **arguments: Any) -> CBLRTrainer:
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                        max_position_embeddings=64)
    args = CBLRTrainingArguments(
        output_dir=str(tmp_path / "out"), optim="mclr_adam", learning_rate=1e-3, per_device_train_batch_size=4, max_steps=2,
        use_cpu=True, report_to="none", disable_tqdm=True, push_to_hub=True, hub_model_id=REPO_ID, hub_token="hf_test",
        **arguments,
    )
    return CBLRTrainer(model=BertForSequenceClassification(config), args=args, train_dataset=tiny_dataset(16),
                       eval_dataset=tiny_dataset(8))


def test_push_to_hub_is_one_commit_with_the_hf_cblr_card(hub: HubStandIn, tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path, save_strategy="no")
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    trainer.push_to_hub(finetuned_from="someone/base-model", dataset="tiny random tokens")
    assert hub.created_repos == [REPO_ID]
    (commit,) = hub.commits
    assert (commit.repo_id, commit.revision, commit.message) == (REPO_ID, "main", "End of training")
    assert {"README.md", "model.safetensors", "config.json", "training_args.bin"} <= set(commit.files)
    meta = card_metadata(commit)
    assert meta["hf_cblr"]["optimizer"] == "mclr_adam" and meta["hf_cblr"]["optimizer_class"] == "hf_cblr.optim.mclr.MCLR"
    assert meta["base_model"] == "someone/base-model"
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["name"] == "tiny random tokens"
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"loss": pytest.approx(eval_loss, abs=1e-6)}
    assert commit.files["README.md"] == (tmp_path / "out" / "README.md").read_bytes()


def test_checkpoint_pushes_carry_the_hf_cblr_card(hub: HubStandIn, tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path, save_strategy="steps", save_steps=1, hub_strategy="every_save", hub_always_push=True)
    trainer.train()
    trainer.push_to_hub()  # waits for the checkpoint pushes, then pushes once more
    assert [commit.message for commit in hub.commits] == ["Training in progress, step 1", "Training in progress, step 2",
                                                          "End of training"]
    for commit in hub.commits:
        assert {"README.md", "model.safetensors", "config.json"} <= set(commit.files), commit.message
        assert card_metadata(commit)["hf_cblr"]["optimizer_class"] == "hf_cblr.optim.mclr.MCLR", commit.message
        assert not any(path.startswith("checkpoint-") for path in commit.files)


def write_tsv(path: Path, examples: list[tuple[str, int]]) -> None:
    path.write_text("\n".join(["sentence\tlabel", *(f"{sentence}\t{label}" for sentence, label in examples)]) + "\n")


@pytest.mark.slow
def test_script_pushes_once_with_the_card(tmp_path: Path) -> None:
    write_tsv(tmp_path / "train.tsv", sentiment_examples("train")[:16])
    write_tsv(tmp_path / "dev.tsv", sentiment_examples("validation")[:8])
    with HubStandIn() as hub:
        env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_DATASETS_OFFLINE": "1",
               "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        command = [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--tiny_model", "--train_file", "train.tsv",
                   "--validation_file", "dev.tsv", "--output_dir", "out", "--optim", "mclr_adam", "--optim_args",
                   "sample_size=64", "--learning_rate", "1e-3", "--per_device_train_batch_size", "8", "--max_steps", "2",
                   "--batch_size_schedule", "linear:4,4,16", "--probe_interval", "0", "--eval_strategy", "no",
                   "--save_strategy", "no", "--disable_tqdm", "true", "--push_to_hub", "--hub_model_id", REPO_ID,
                   "--hub_token", "hf_test"]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        assert not hub.unknown_requests
    (commit,) = hub.commits
    assert commit.message == "End of training" and commit.repo_id == REPO_ID
    assert {"README.md", "model.safetensors", "tokenizer.json", "all_results.json"} <= set(commit.files)
    meta = card_metadata(commit)
    assert meta["hf_cblr"]["optimizer"] == "mclr_adam" and meta["license"] == "apache-2.0"
    (result_entry,) = meta["model-index"][0]["results"]
    assert result_entry["dataset"]["name"] == "train.tsv, dev.tsv" and result_entry["dataset"]["type"] == "csv"
    eval_accuracy = json.loads((tmp_path / "out" / "all_results.json").read_text())["eval_accuracy"]
    assert {m["type"]: m["value"] for m in result_entry["metrics"]}["accuracy"] == pytest.approx(eval_accuracy, abs=1e-6)
    assert commit.files["README.md"] == (tmp_path / "out" / "README.md").read_bytes()
