"""GET /metrics: the engine's counters in Prometheus text under llama.cpp's `llamacpp:` names."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.responses import Response

from http_api.errors import APIError
from http_api.state import ServerState

router = APIRouter()


class _EngineCollector:
    """Reads the engine's stats at scrape time; nothing is counted twice on our side."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        loaded = self.state.require()
        s = loaded.engine.stats()
        t = self.state.totals
        prompt_s, predicted_s = t.prompt_ms / 1e3, t.predicted_ms / 1e3
        counters = (
            ("prompt_tokens_total", "Number of prompt tokens processed.", s.prompt_tokens_total),
            ("prompt_seconds_total", "Prompt process time", prompt_s),
            ("tokens_predicted_total", "Number of generation tokens processed.", s.generation_tokens_total),
            ("tokens_predicted_seconds_total", "Predict process time", predicted_s),
            ("n_decode_total", "Total number of llama_decode() calls", s.steps_total),
            ("preemptions_total", "Requests preempted to free KV blocks (gguf-serve).", s.preemptions_total),
            ("prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache (gguf-serve).",
             s.prefix_cache_hit_tokens),
        )  # fmt: skip
        for name, help_, value in counters:
            yield CounterMetricFamily(f"llamacpp:{name}", help_, value=value)
        gauges = (
            ("prompt_tokens_seconds", "Average prompt throughput in tokens/s.", _rate(t.prompt_n, prompt_s)),
            ("predicted_tokens_seconds", "Average generation throughput in tokens/s.", _rate(t.predicted_n, predicted_s)),
            ("kv_cache_usage_ratio", "KV-cache usage. 1 = 100 percent usage.", s.kv_cache_usage_ratio),
            ("kv_cache_tokens", "KV-cache tokens.", s.kv_cache_tokens),
            ("requests_processing", "Number of requests processing.", s.requests_processing),
            ("requests_deferred", "Number of requests deferred.", s.requests_deferred),
        )  # fmt: skip
        for name, help_, value in gauges:
            yield GaugeMetricFamily(f"llamacpp:{name}", help_, value=value)


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.server
    if not state.settings.metrics:
        raise APIError(
            501, "This server does not support metrics endpoint. Start it with `--metrics`"
        )
    state.require()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_EngineCollector(state))
    return Response(
        generate_latest(registry),
        media_type=CONTENT_TYPE_LATEST,
        headers={"Process-Start-Time-Unix": str(int(state.started))},
    )
