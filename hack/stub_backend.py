"""A small stand-in model server for integration tests and the overhead benchmark: several ports in one process, each answering
which port served it. Run as a script: `python backend.py --listen 127.0.0.2:8001,127.0.0.3:8002`.

- POST /v1/*: JSON `{"served_by": served_by, "model": ..., "body_len": n, "body_sha256": ...}` with headers
  `x-served-by` (host:port); `"stream": true` answers SSE (`x-events` events, usage in the last one); header
  `x-echo: 1` answers the request body itself, byte for byte; `x-delay-ms` delays the answer;
  `x-event-delay-ms` spaces the SSE events.
- GET /v1/models, GET /health, GET /metrics (vLLM metric names).
- POST /admin/metrics `{"waiting": n, "running": n, "kv": f}` sets what /metrics reports for that port.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import signal

from aiohttp import web


def make_app(served_by: str) -> web.Application:
    state = {"waiting": 0, "running": 0, "kv": 0.0, "served": 0}

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        state["served"] += 1
        delay = int(request.headers.get("x-delay-ms", "0"))
        if delay:
            await asyncio.sleep(delay / 1000)
        headers = {"x-served-by": served_by}
        if request.headers.get("x-echo") == "1":
            return web.Response(body=body, headers=headers, content_type="application/octet-stream")
        try:
            data = json.loads(body) if body else {}
        except ValueError:
            data = {}
        model = data.get("model", "")
        if data.get("stream"):
            resp = web.StreamResponse(headers={**headers, "content-type": "text/event-stream"})
            await resp.prepare(request)
            n = int(request.headers.get("x-events", "5"))
            gap = int(request.headers.get("x-event-delay-ms", "0")) / 1000
            for i in range(n):
                if gap and i:
                    await asyncio.sleep(gap)
                event = {"id": "x", "object": "text_completion", "model": model,
                         "choices": [{"index": 0, "text": f"token{i} ", "finish_reason": None}]}
                await resp.write(b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")
            usage = {"id": "x", "object": "text_completion", "model": model, "choices": [],
                     "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n,
                               "prompt_tokens_details": {"cached_tokens": 3}}}
            await resp.write(b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        out = {"served_by": served_by, "model": model, "path": request.path, "body_len": len(body),
               "body_sha256": hashlib.sha256(body).hexdigest(),
               "headers": {k.lower(): v for k, v in request.headers.items()},
               "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}}
        return web.Response(text=json.dumps(out, separators=(",", ":")), headers=headers,
                            content_type="application/json")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}], "served_by": served_by},
                                 headers={"x-served-by": served_by})

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(request: web.Request) -> web.Response:
        text = (
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="m",engine="0"}} {state["waiting"]}\n'
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="m",engine="0"}} {state["running"]}\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f'vllm:kv_cache_usage_perc{{model_name="m",engine="0"}} {state["kv"]}\n'
            "# TYPE vllm:cache_config_info gauge\n"
            'vllm:cache_config_info{block_size="16",num_gpu_blocks="1000",engine="0"} 1.0\n'
        )
        return web.Response(text=text, content_type="text/plain")

    async def admin_metrics(request: web.Request) -> web.Response:
        state.update(await request.json())
        return web.json_response(state)

    async def admin_stats(request: web.Request) -> web.Response:
        return web.json_response(state)

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/admin/metrics", admin_metrics)
    app.router.add_get("/admin/stats", admin_stats)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/{tail:.*}", completions)
    return app


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True, help="host:port pairs separated by commas")
    args = ap.parse_args()
    runners = []
    for hostport in args.listen.split(","):
        host, port = hostport.rsplit(":", 1)
        runner = web.AppRunner(make_app(hostport), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, int(port), reuse_address=True).start()
        runners.append(runner)
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for r in runners:
        await r.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
