"""The served OpenAPI document against the server's behaviour: schemathesis generates requests from the document
(valid and invalid) and checks each answer's status code, content type, headers and body against what it says."""
from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from nanokyro.config import EngineConfig
from nanokyro.server import create_app
from conftest import KEY, ServerThread


@pytest.fixture(scope="module")
def served(llama_dir):
    srv = ServerThread(create_app(EngineConfig(model=llama_dir, dtype="float32", kv_cache_memory=16 << 20)))
    yield srv
    srv.stop()


def test_schemathesis_finds_no_mismatch_between_document_and_server(served, tmp_path):
    # Every check but positive_data_acceptance: whether a schema-valid request is served depends on what no schema
    # says (a prompt's token count against the context, token ids against the vocabulary, seed + n), so such
    # requests are a 400 with the reason. Bounded examples and a fixed seed keep this to seconds, reproducibly.
    run = subprocess.run([
        sys.executable, "-m", "schemathesis.cli", "run", f"{served.url}/schema/openapi.json", "--checks", "all",
        "--exclude-checks", "positive_data_acceptance", "--phases", "examples,coverage,fuzzing",
        "--max-examples", "25", "--seed", "1", "--workers", "1", "--no-color",
    ], capture_output=True, text=True, timeout=240, cwd=tmp_path)  # fmt: skip  (its cache directory goes there)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


def test_the_document_names_the_server_and_its_model_and_every_error_is_openai_shaped(served, llama_dir):
    doc = httpx.get(f"{served.url}/schema/openapi.json").json()
    assert doc["info"]["title"] == "nanokyro"
    request = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert request["additionalProperties"] is False and request["properties"]["model"]["enum"] == [served.model]
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "404", "413", "429", "503"} <= chat.keys() and "401" not in chat
    assert all(r["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
               for code, r in chat.items() if code != "200")  # fmt: skip
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    # With an API key, 401 is documented too.
    keyed = ServerThread(create_app(EngineConfig(model=llama_dir, dtype="float32", kv_cache_memory=16 << 20),
                                    api_key=KEY), wait_ready=False)  # fmt: skip
    try:
        doc = httpx.get(f"{keyed.url}/schema/openapi.json").json()
        assert "401" in doc["paths"]["/v1/models"]["get"]["responses"]
    finally:
        keyed.stop()
