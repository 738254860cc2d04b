"""What a client on the network could do with one small request, through a real uvicorn: add metric
series without bound, stall the event loop that every other client shares, or get a 500. Each test
replays an attack that worked before its fix."""

import httpx
from prometheus_client.parser import text_string_to_metric_families

TEXT, AUDIO = "tiny-text", "tiny-audio"


def _handlers(client: httpx.Client) -> set[str]:
    """Every `handler` label of http_requests_total."""
    return {s.labels["handler"] for f in text_string_to_metric_families(client.get("/metrics").text)
            if f.name == "http_requests" for s in f.samples}  # fmt: skip


def test_a_path_a_trailing_slash_away_from_a_route_adds_no_metric_series(client):
    """prometheus-fastapi-instrumentator labels a path that would match a route once a trailing slash is
    added or removed (Starlette redirects it) with the path itself: `GET /v1/sessions/<any id>/` made a
    series per request (1.2 KB of /metrics and 1.7 KB of memory each, with or without an API key).
    Such paths are "none", as any unknown path."""
    paths = ["/v1/sessions/sess-attack-1/", "/v1/models/attack-2/", "/v1/sessions/sess-attack-3/export/",
             "/v1/generate/", "/no/such/attack-4/"]  # fmt: skip
    for path in paths:
        client.get(path)
    handlers = _handlers(client)
    assert not any("attack" in h or h.endswith("/generate/") for h in handlers), handlers
    assert "none" in handlers
