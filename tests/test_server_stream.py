"""The streaming predictor (predict.py:StreamingPredictor) behind Cog's real server, started by `make serve-stream`."""
from __future__ import annotations

import json

import pytest
import requests

from cog_server import golden_request, make_serve

GOLDEN_CASE = ("mla", "single_tiled")


@pytest.fixture(scope="module")
def server(project_dir, fixtures_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("cog") / "server.log"
    with make_serve("serve-stream", project_dir, log, DEEPSEEK_VL2_WEIGHTS=str(fixtures_dir / "checkpoints" / GOLDEN_CASE[0]),
                    DEEPSEEK_VL2_MAX_CONCURRENCY="4") as srv:
        yield srv


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    request, expected, _ = golden_request(fixtures_dir, *GOLDEN_CASE)
    return request, expected


def _events(response: requests.Response) -> list[tuple[str, dict]]:
    """(event, data) of a Server-Sent Events response."""
    events, kind = [], None
    response.encoding = "utf-8"  # (text/event-stream is UTF-8; requests would guess Latin-1 without a charset)
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event:"):
            kind = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            events.append((kind, json.loads(line.split(":", 1)[1])))
    return events


def test_schema_has_the_six_inputs_and_seed_and_a_concatenate_iterator(server):
    schema = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    props = schema["components"]["schemas"]["Input"]["properties"]
    assert sorted(props, key=lambda n: props[n]["x-order"]) == [
        "image", "prompt", "top_p", "temperature", "max_length_tokens", "repetition_penalty", "seed"]
    assert props["seed"]["type"] == "integer" and "default" not in props["seed"]
    assert sorted(schema["components"]["schemas"]["Input"]["required"]) == ["image", "prompt"]
    output = schema["components"]["schemas"]["Output"]
    assert output == {"title": "Output", "type": "array", "items": {"type": "string"},
                      "x-cog-array-type": "iterator", "x-cog-array-display": "concatenate"}
    assert schema["paths"]["/predictions"]["post"]["x-cog-streaming"] is True


def test_streamed_greedy_pieces_join_to_the_golden_answer(server, golden):
    request, expected = golden
    with requests.post(f"{server.url}/predictions", json={"input": request}, stream=True, timeout=120,
                       headers={"Accept": "text/event-stream"}) as response:
        assert response.status_code == 200, response.text
        events = _events(response)
    pieces = [data["chunk"] for kind, data in events if kind == "output"]
    assert len(pieces) > 1 and "".join(pieces) == expected
    assert all("\ufffd" not in piece or "\ufffd" in expected for piece in pieces)  # no character split in two
    completed = [data for kind, data in events if kind == "completed"]
    assert completed and completed[-1]["status"] == "succeeded" and "".join(completed[-1]["output"]) == expected


def test_the_same_seed_gives_the_same_text(server, golden):
    request, _ = golden
    sampled = {**request, "temperature": 0.9, "top_p": 0.9, "max_length_tokens": 24}
    first = server.predict({**sampled, "seed": 7}).json()
    again = server.predict({**sampled, "seed": 7}).json()
    other = server.predict({**sampled, "seed": 8}).json()
    assert first["status"] == again["status"] == other["status"] == "succeeded"
    assert "".join(first["output"]) == "".join(again["output"])
    assert "".join(first["output"]) != "".join(other["output"])


def test_bad_input_fails_before_the_first_piece(server, golden):
    request, _ = golden
    body = server.predict({**request, "prompt": "  "}).json()
    assert body["status"] == "failed" and "prompt is empty" in body["error"] and not body.get("output")
