"""The batch endpoints of the fake API (tests/fake_api.py): OpenAI Batch and Anthropic
Message Batches, with the real wire shapes (what the official SDKs send and parse).

OpenAI: POST /v1/files (multipart, purpose=batch), GET /v1/files/{id}/content,
POST /v1/batches, GET /v1/batches[/{id}], POST /v1/batches/{id}/cancel.
Anthropic: POST /v1/messages/batches, GET /v1/messages/batches[/{id}],
GET /v1/messages/batches/{id}/results (JSONL), POST /v1/messages/batches/{id}/cancel.

Fake behaviour: a batch ends `batch_delay_s` after creation (answers from the API's
responder, billed like sync requests); `batch_error_fn(custom_id, attempt)` gives a
per-request error ("500": retryable server error, "400": invalid request, None: answer);
the batches whose creation ordinal (0, 1, ...) is in `expire_batches` expire with only their
first half answered. `submit_delay_s` stalls the create call *after* the batch exists (a
client killed meanwhile never learns its id). Counters: `batch_submissions[custom_id]`
(times a request was submitted in any batch), `batches` (by id).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def parse_multipart(content_type: str, body: bytes) -> dict[str, Any]:
    """multipart/form-data fields by name (bytes for a file), with the stdlib's MIME parser."""
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    fields: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        fields[name] = part.get_payload(decode=True)
    return fields


class BatchBackend:
    """State and behaviour of both vendors' batches, mounted on a FakeAPI's app."""

    def __init__(self, api: Any):
        self.api = api
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_submissions: Counter[str] = Counter()
        self.created = 0

    # -- processing

    def _messages(self, flavour: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        from fake_api import _text

        messages = list(body.get("messages", []))
        if flavour == "anthropic" and body.get("system"):
            messages = [{"role": "system", "content": body["system"]}, *messages]
        return [{"role": m["role"], "content": _text(m["content"])} for m in messages]

    def _answer(self, flavour: str, cid: str, body: dict[str, Any], attempt: int) -> dict:
        """One request's result: {"ok": payload} or {"error": (status, type, message)}."""
        from fake_api import completion_body, tokens

        api = self.api
        fault = api.batch_error_fn(cid, attempt) if api.batch_error_fn else None
        if fault == "500":
            return {"error": (500, "server_error" if flavour == "openai" else "api_error", "boom")}
        if fault == "400":
            return {"error": (400, "invalid_request_error", "request refused")}
        messages = self._messages(flavour, body)
        text = api.responder(messages)
        tin, tout = sum(tokens(m["content"]) for m in messages), tokens(text)
        with api._lock:
            api.billed_input_tokens += tin
            api.billed_output_tokens += tout
            api.batch_answered += 1
        ident = uuid.uuid4().hex[:12]
        return {"ok": completion_body(flavour, body.get("model"), text, tin, tout, ident=ident)}

    def _finish(self, b: dict[str, Any], cancelled: bool = False) -> None:
        """Run the batch (once): every request answered, errored, expired or cancelled."""
        if b["results"] is not None:
            return
        n = len(b["requests"])
        cut = n // 2 if b["expire"] else n
        if cancelled:
            cut = 0
        results = {}
        for i, (cid, body) in enumerate(b["requests"]):
            if i >= cut:
                results[cid] = {"cancelled" if cancelled else "expired": True}
            else:
                results[cid] = self._answer(b["flavour"], cid, body, b["attempts"][cid])
        b["results"] = results
        b["ended_at"] = time.time()
        if b["flavour"] == "openai":
            b["status"] = "cancelled" if cancelled else "expired" if b["expire"] else "completed"
            out = [self._openai_line(cid, r) for cid, r in results.items() if "ok" in r]
            err = [self._openai_line(cid, r) for cid, r in results.items() if "ok" not in r]
            for key, lines in (("output_file_id", out), ("error_file_id", err)):
                if lines:
                    fid = f"file-{uuid.uuid4().hex[:20]}"
                    self.files[fid] = "".join(json.dumps(x) + "\n" for x in lines).encode()
                    b[key] = fid
        else:
            b["status"] = "ended"

    @staticmethod
    def _openai_line(cid: str, r: dict[str, Any]) -> dict[str, Any]:
        rid = f"batch_req_{uuid.uuid4().hex[:20]}"
        if "ok" in r:
            response = {"status_code": 200, "request_id": rid, "body": r["ok"]}
            return {"id": rid, "custom_id": cid, "response": response, "error": None}
        if "error" in r:
            status, kind, message = r["error"]
            body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
            response = {"status_code": status, "request_id": rid, "body": body}
            return {"id": rid, "custom_id": cid, "response": response, "error": None}
        code = "batch_expired" if "expired" in r else "batch_cancelled"
        error = {"code": code, "message": f"This request was not executed ({code})."}
        return {"id": rid, "custom_id": cid, "response": None, "error": error}

    def _tick(self, b: dict[str, Any]) -> dict[str, Any]:
        if b["results"] is None and time.time() >= b["created_at"] + self.api.batch_delay_s:
            self._finish(b, cancelled=b.get("cancelling", False))
        return b

    def _create(self, flavour: str, requests: list[tuple[str, dict[str, Any]]], **kw: Any) -> dict:
        with self.api._lock:
            ordinal = self.created
            self.created += 1
            attempts = {}
            for cid, _ in requests:
                self.batch_submissions[cid] += 1
                attempts[cid] = self.batch_submissions[cid]
        prefix = "batch_" if flavour == "openai" else "msgbatch_"
        b = {
            "id": f"{prefix}{uuid.uuid4().hex[:24]}",
            "flavour": flavour,
            "requests": requests,
            "attempts": attempts,
            "created_at": time.time(),
            "expire": ordinal in self.api.expire_batches,
            "results": None,
            "status": "validating" if flavour == "openai" else "in_progress",
            "output_file_id": None,
            "error_file_id": None,
            "ended_at": None,
            **kw,
        }
        self.batches[b["id"]] = b
        return b

    # -- wire views

    def openai_view(self, b: dict[str, Any]) -> dict[str, Any]:
        n = len(b["requests"])
        ended = b["results"] is not None
        ok = sum("ok" in r for r in b["results"].values()) if ended else 0
        return {
            "id": b["id"],
            "object": "batch",
            "endpoint": b["endpoint"],
            "input_file_id": b["input_file_id"],
            "completion_window": "24h",
            "status": b["status"]
            if ended
            else ("cancelling" if b.get("cancelling") else "in_progress"),
            "output_file_id": b["output_file_id"],
            "error_file_id": b["error_file_id"],
            "created_at": int(b["created_at"]),
            "expires_at": int(b["created_at"]) + 86400,
            "completed_at": int(b["ended_at"]) if ended and b["status"] == "completed" else None,
            "expired_at": int(b["ended_at"]) if ended and b["status"] == "expired" else None,
            "metadata": b.get("metadata"),
            "errors": b.get("errors"),
            "request_counts": {"total": n, "completed": ok, "failed": n - ok if ended else 0},
        }

    def anthropic_view(self, b: dict[str, Any], root: str) -> dict[str, Any]:
        ended = b["results"] is not None
        counts = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
        if not ended:
            counts["processing"] = len(b["requests"])
        else:
            for r in b["results"].values():
                kind = (
                    "succeeded"
                    if "ok" in r
                    else "errored"
                    if "error" in r
                    else "expired"
                    if "expired" in r
                    else "canceled"
                )
                counts[kind] += 1
        return {
            "id": b["id"],
            "type": "message_batch",
            "processing_status": "ended"
            if ended
            else ("canceling" if b.get("cancelling") else "in_progress"),
            "request_counts": counts,
            "created_at": iso(b["created_at"]),
            "expires_at": iso(b["created_at"] + 86400),
            "ended_at": iso(b["ended_at"]),
            "cancel_initiated_at": iso(b.get("cancelling_at")),
            "archived_at": None,
            "results_url": f"{root}/v1/messages/batches/{b['id']}/results" if ended else None,
        }

    def mount(self, app: FastAPI) -> None:
        api = self.api

        @app.middleware("http")
        async def auth(request: Request, call_next: Any) -> Response:
            """The key check of the batch endpoints (either header, as in fake_api)."""
            path = request.url.path
            if api.api_key is not None and path.startswith(
                ("/v1/files", "/v1/batches", "/v1/messages/batches")
            ):
                key = request.headers.get("x-api-key") or request.headers.get("authorization", "")
                if key.removeprefix("Bearer ") != api.api_key:
                    with api._lock:
                        api.auth_failures += 1
                    return JSONResponse({"error": {"message": "invalid api key"}}, status_code=401)
            return await call_next(request)

        def refuse(status: int, message: str, flavour: str) -> JSONResponse:
            if flavour == "openai":
                body = {"error": {"message": message, "type": "invalid_request_error"}}
            else:
                body = {
                    "type": "error",
                    "error": {"type": "invalid_request_error", "message": message},
                }
            return JSONResponse(body, status_code=status)

        @app.post("/v1/files")
        async def upload(request: Request) -> Response:
            fields = parse_multipart(request.headers["content-type"], await request.body())
            if fields.get("purpose") != b"batch":
                return refuse(400, "purpose must be batch", "openai")
            fid = f"file-{uuid.uuid4().hex[:20]}"
            self.files[fid] = fields["file"]
            return JSONResponse(
                {
                    "id": fid,
                    "object": "file",
                    "bytes": len(fields["file"]),
                    "created_at": int(time.time()),
                    "filename": "batch.jsonl",
                    "purpose": "batch",
                    "status": "processed",
                }
            )

        @app.get("/v1/files/{fid}/content")
        async def content(fid: str) -> Response:
            if fid not in self.files:
                return refuse(404, f"no file {fid}", "openai")
            return Response(self.files[fid], media_type="application/octet-stream")

        @app.post("/v1/batches")
        async def openai_create(request: Request) -> Response:
            body = await request.json()
            data = self.files.get(body.get("input_file_id"), b"")
            lines = [json.loads(x) for x in data.decode().splitlines() if x.strip()]
            cids = [x["custom_id"] for x in lines]
            if not lines or len(set(cids)) != len(cids) or len(lines) > api.batch_max_requests:
                return refuse(
                    400, "empty input, duplicate custom_id or too many requests", "openai"
                )
            if any(x["url"] != body["endpoint"] for x in lines):
                return refuse(400, "line url differs from the batch endpoint", "openai")
            b = self._create(
                "openai",
                [(x["custom_id"], x["body"]) for x in lines],
                endpoint=body["endpoint"],
                input_file_id=body["input_file_id"],
                metadata=body.get("metadata"),
            )
            if api.submit_delay_s:
                await asyncio.sleep(api.submit_delay_s)
            return JSONResponse(self.openai_view(b))

        @app.get("/v1/batches")
        async def openai_list() -> Response:
            data = [
                self.openai_view(self._tick(b))
                for b in reversed(self.batches.values())
                if b["flavour"] == "openai"
            ]
            return JSONResponse(
                {
                    "object": "list",
                    "data": data,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None,
                    "has_more": False,
                }
            )

        @app.get("/v1/batches/{bid}")
        async def openai_get(bid: str) -> Response:
            if bid not in self.batches:
                return refuse(404, f"no batch {bid}", "openai")
            return JSONResponse(self.openai_view(self._tick(self.batches[bid])))

        @app.post("/v1/batches/{bid}/cancel")
        async def openai_cancel(bid: str) -> Response:
            b = self.batches[bid]
            if b["results"] is None:
                b["cancelling"], b["cancelling_at"] = True, time.time()
            return JSONResponse(self.openai_view(b))

        @app.post("/v1/messages/batches")
        async def anthropic_create(request: Request) -> Response:
            body = await request.json()
            reqs = body.get("requests") or []
            cids = [r["custom_id"] for r in reqs]
            ok_ids = all(
                0 < len(c) <= 64 and c.replace("-", "").replace("_", "").isalnum() for c in cids
            )
            if (
                not reqs
                or len(set(cids)) != len(cids)
                or not ok_ids
                or len(reqs) > api.batch_max_requests
            ):
                return refuse(
                    400, "empty, duplicate or malformed custom_id, or too many", "anthropic"
                )
            b = self._create("anthropic", [(r["custom_id"], r["params"]) for r in reqs])
            if api.submit_delay_s:
                await asyncio.sleep(api.submit_delay_s)
            return JSONResponse(self.anthropic_view(b, str(request.base_url).rstrip("/")))

        @app.get("/v1/messages/batches")
        async def anthropic_list(request: Request) -> Response:
            root = str(request.base_url).rstrip("/")
            data = [
                self.anthropic_view(self._tick(b), root)
                for b in reversed(self.batches.values())
                if b["flavour"] == "anthropic"
            ]
            return JSONResponse(
                {
                    "data": data,
                    "has_more": False,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None,
                }
            )

        @app.get("/v1/messages/batches/{bid}")
        async def anthropic_get(bid: str, request: Request) -> Response:
            if bid not in self.batches:
                return refuse(404, f"no batch {bid}", "anthropic")
            root = str(request.base_url).rstrip("/")
            return JSONResponse(self.anthropic_view(self._tick(self.batches[bid]), root))

        @app.get("/v1/messages/batches/{bid}/results")
        async def anthropic_results(bid: str) -> Response:
            b = self.batches[bid]
            if b["results"] is None:
                return refuse(400, "batch still processing", "anthropic")
            lines = []
            for cid, r in b["results"].items():
                if "ok" in r:
                    result = {"type": "succeeded", "message": r["ok"]}
                elif "error" in r:
                    _, kind, message = r["error"]
                    error = {"type": "error", "error": {"type": kind, "message": message}}
                    result = {"type": "errored", "error": error}
                else:
                    result = {"type": "expired" if "expired" in r else "canceled"}
                lines.append(json.dumps({"custom_id": cid, "result": result}) + "\n")
            return Response("".join(lines), media_type="application/binary")

        @app.post("/v1/messages/batches/{bid}/cancel")
        async def anthropic_cancel(bid: str, request: Request) -> Response:
            b = self.batches[bid]
            if b["results"] is None:
                b["cancelling"], b["cancelling_at"] = True, time.time()
            return JSONResponse(self.anthropic_view(b, str(request.base_url).rstrip("/")))
