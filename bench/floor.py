"""The floor: a bare FastAPI app under the same uvicorn settings as the suite's processes."""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI, Request

from shared.errors import JSONResponse

app = FastAPI(default_response_class=JSONResponse)


@app.post("/floor", status_code=202)
async def floor_post(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({"accepted": 1, "ids": ["x"]}, status_code=202)


@app.get("/floor/{item}")
async def floor_get(item: str) -> dict[str, str]:
    return {"customer_id": item}


if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )
