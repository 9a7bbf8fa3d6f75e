"""An OTLP/HTTP trace receiver that only accepts (for measuring what tracing costs the
suite's processes, not the receiver): ``python -m bench.otlp_sink PORT``."""

from __future__ import annotations

import sys

from aiohttp import web


async def traces(request: web.Request) -> web.Response:
    await request.read()
    # an empty ExportTraceServiceResponse serialises to no bytes
    return web.Response(body=b"", content_type="application/x-protobuf")


def main() -> None:
    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/traces", traces)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
