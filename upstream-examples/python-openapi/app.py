"""A small REST API (FastAPI) for the gateway's `openapi` servers: items
in memory, behind an API key. FastAPI publishes its OpenAPI 3.1 document at
/openapi.json, which the gateway reads.

    ./run --port 9201 [--host 127.0.0.1] [--name python-openapi]

Environment:
    EXAMPLE_API_KEY   the key callers must send in X-API-Key (default: none
                      needed)

GET /debug/headers returns the headers of the last requests (as the other
examples' do), so tests can see what the gateway sent.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python-common"))
from example_http import configure_logging, serve  # noqa: E402

API_KEY = os.environ.get("EXAMPLE_API_KEY")
SEEN: collections.deque[dict[str, str]] = collections.deque(maxlen=200)


async def api_key(request: Request,
                  x_api_key: str | None = Depends(APIKeyHeader(name="X-API-Key", auto_error=False))) -> None:
    if request.url.path.startswith("/debug/"):
        return
    SEEN.append({k.lower(): v for k, v in request.headers.items()})
    if API_KEY and x_api_key != API_KEY:
        raise HTTPException(status_code=401, detail="missing or wrong X-API-Key")


app = FastAPI(title="Items API", version="1.0.0", description="Keeps items in memory.",
              dependencies=[Depends(api_key)])


class NewItem(BaseModel):
    name: str = Field(min_length=1, description="What the item is called")
    price: float = Field(ge=0, description="Its price, at least 0")
    tags: list[str] = []


class Item(NewItem):
    id: int


ITEMS: dict[int, Item] = {1: Item(id=1, name="hammer", price=12.5, tags=["tools"])}


@app.get("/items", operation_id="listItems", summary="List items", response_model=list[Item])
async def list_items(limit: int = Query(default=10, ge=1, le=100, description="At most this many"),
                     tag: str | None = None) -> list[Item]:
    items = [i for i in ITEMS.values() if tag is None or tag in i.tags]
    return items[:limit]


@app.get("/items/{item_id}", operation_id="getItem", summary="Get one item", response_model=Item)
async def get_item(item_id: int) -> Item:
    if item_id not in ITEMS:
        raise HTTPException(status_code=404, detail=f"no item {item_id}")
    return ITEMS[item_id]


@app.post("/items", operation_id="createItem", summary="Create an item", status_code=201, response_model=Item)
async def create_item(item: NewItem) -> Item:
    new = Item(id=max(ITEMS, default=0) + 1, **item.model_dump())
    ITEMS[new.id] = new
    return new


@app.delete("/items/{item_id}", operation_id="deleteItem", summary="Delete an item", status_code=204)
async def delete_item(item_id: int) -> None:
    ITEMS.pop(item_id, None)


@app.get("/fail", operation_id="failAlways", summary="Always fails (for tests)")
async def fail() -> dict:
    raise RuntimeError("the example's deliberate failure")


@app.get("/debug/headers", include_in_schema=False)
async def debug_headers() -> list[dict[str, str]]:
    return list(SEEN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="python-openapi")
    args = parser.parse_args()
    configure_logging(args.name, args.port)
    asyncio.run(serve(app, args.host, args.port, args.name))


if __name__ == "__main__":
    main()
