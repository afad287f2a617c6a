"""llama-server's /tokenize and /detokenize, with the base's own vocabulary."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict

from serving.auth import client_key
from serving.context import ServingContext, context
from serving.responses import Open

router = APIRouter(dependencies=[Depends(client_key)])


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # llama-server ignores fields it does not know, so do we
    content: str
    add_special: bool = False  # llama-server's defaults: no BOS unless asked, <|special|> tags read as tokens
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[int]


class TokenPiece(Open):
    id: int
    piece: str


class TokenList(Open):
    tokens: list[int] | list[TokenPiece]  # ids, or {id, piece} with `with_pieces`


class Detokenized(Open):
    content: str


@router.post("/tokenize", responses={200: {"model": TokenList}})
async def tokenize(body: TokenizeRequest, ctx: ServingContext = Depends(context)):
    engine = ctx.engine

    def run() -> dict:
        ids = engine.tokenize(body.content, add_special=body.add_special, parse_special=body.parse_special)
        if not body.with_pieces:
            return {"tokens": ids}
        return {"tokens": [{"id": t, "piece": engine.detokenize([t])} for t in ids]}

    return await anyio.to_thread.run_sync(run)  # a worker thread: megabytes of text take a while


@router.post("/detokenize", responses={200: {"model": Detokenized}})
async def detokenize(body: DetokenizeRequest, ctx: ServingContext = Depends(context)):
    return {"content": await anyio.to_thread.run_sync(ctx.engine.detokenize, body.tokens)}
