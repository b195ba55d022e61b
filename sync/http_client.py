"""`EngineClient`: a trainer's handle on a running `mxroll serve`, with `Engine`'s method names and
return values, so a training loop can switch between an in-process engine and a remote one.

Standard library only (urllib), so a training job needs nothing beyond mxroll itself. Differences
from the in-process `Engine`: routed experts arrive as nested lists rather than tensors, and
`update_weights_from_tensor` sends its tensors serialized (base64) in the request body.

Errors: a weight update the server rejects (HTTP 400) raises `WeightUpdateError`, any other bad
request `ValueError` (as the engine would); every other failure (a wrong token, a server that is
down or shut down, a 500) raises `EngineHTTPError`, a RuntimeError carrying the HTTP status.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from ..rollout.sampling_params import positional_order
from .bucket import dtype_name
from .receiver import WeightUpdateError

DEFAULT_TIMEOUT_S = 600.0  # per blocking socket read: a distributed update waits for the whole broadcast


class EngineHTTPError(RuntimeError):
    def __init__(self, method: str, url: str, status: int | None, message: str):
        where = f"{method} {url}"
        super().__init__(f"{where}: HTTP {status}: {message}" if status else f"{where}: {message}")
        self.status, self.message = status, message


class EngineClient:
    """base_url like "http://127.0.0.1:30000"; admin_token for weight sync and controls, api_key for
    generation (the admin token is sent there when no API key is given)."""

    def __init__(self, base_url: str, admin_token: str | None = None, api_key: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT_S):
        self.base_url = base_url.rstrip("/")
        self.admin_token, self.api_key, self.timeout = admin_token, api_key, timeout

    # ---- transport ---------------------------------------------------------------------------
    def _open(self, method: str, path: str, body: dict | None, admin: bool):
        token = self.admin_token if admin else (self.api_key or self.admin_token)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = json.dumps(body).encode() if body is not None else None
        url = self.base_url + path
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            message = _error_message(e.read())
            if e.code == 400:
                raise (WeightUpdateError if path.startswith(WEIGHT_PATHS) else ValueError)(message) from None
            raise EngineHTTPError(method, url, e.code, message) from None
        except (urllib.error.URLError, OSError) as e:
            raise EngineHTTPError(method, url, None, f"cannot reach the server ({getattr(e, 'reason', e)})") from None

    def _post(self, path: str, body: dict | None = None, admin: bool = True) -> Any:
        with self._open("POST", path, body, admin) as resp:
            return _parse(resp.read())

    def _get(self, path: str, admin: bool = False) -> Any:
        with self._open("GET", path, None, admin) as resp:
            return _parse(resp.read())

    def _weights(self, path: str, body: dict) -> tuple[bool, str]:
        out = self._post(path, body)
        if not out.get("success", False):  # the server answers failures with a 400; this is a safety net
            raise WeightUpdateError(out.get("message", f"{path} failed"))
        return True, out.get("message", "")

    # ---- generation --------------------------------------------------------------------------
    def generate(self, prompt: str | list[str] | None = None, input_ids=None, sampling_params=None,
                 return_logprob: bool | list = False, top_logprobs_num: int | list | None = None,
                 return_routed_experts: bool | list = False, rid: str | list | None = None, stream: bool = False,
                 **sglang_fields):
        """As `Engine.generate`: a dict (one prompt, n = 1) or a list; stream=True -> an iterator of
        cumulative partial outputs, the last one final. sglang_fields (`return_text_in_logprobs`, ...) go in the body
        as they are; the server names any it refuses. Positionally also in sglang's order (prompt, sampling_params,
        input_ids)."""
        input_ids, sampling_params = positional_order(input_ids, sampling_params)
        body = {"text": prompt, "input_ids": _plain(input_ids), "sampling_params": sampling_params,
                "return_logprob": return_logprob, "top_logprobs_num": top_logprobs_num,
                "return_routed_experts": return_routed_experts, "rid": rid, "stream": stream, **sglang_fields}
        body = {k: v for k, v in body.items() if v is not None}
        if stream:
            return self._stream(body)
        out = self._post("/generate", body, admin=False)
        return [_restore(o) for o in out] if isinstance(out, list) else _restore(out)

    def _stream(self, body: dict) -> Iterator[dict]:
        with self._open("POST", "/generate", body, admin=False) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise EngineHTTPError("POST", self.base_url + "/generate", event["error"].get("code"),
                                          event["error"].get("message", "stream failed"))
                yield _restore(event)

    # ---- weight sync -------------------------------------------------------------------------
    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "nccl") -> tuple[bool, str]:
        return self._weights("/init_weights_update_group", dict(
            master_address=master_address, master_port=int(master_port), rank_offset=int(rank_offset),
            world_size=int(world_size), group_name=group_name, backend=backend))

    def update_weights_from_distributed(self, names: list[str], dtypes: list, shapes: list,
                                        group_name: str = "weight_update_group", flush_cache: bool = True,
                                        weight_version: str | None = None, load_format: str | None = None,
                                        commit: bool = True, bucket_sizes: list[int] | None = None) -> tuple[bool, str]:
        """dtypes as names ("bfloat16") or torch dtypes; shapes as lists, tuples or torch.Size. commit=False
        stages a bucket; the next call with commit=True applies everything staged at once. bucket_sizes:
        the tensors form consecutive flattened buckets of these counts, all received in this one call."""
        return self._weights("/update_weights_from_distributed", dict(
            names=list(names), dtypes=[dtype_name(d) for d in dtypes], shapes=[[int(s) for s in sh] for sh in shapes],
            group_name=group_name, flush_cache=flush_cache, weight_version=weight_version, load_format=load_format,
            commit=commit, bucket_sizes=None if bucket_sizes is None else [int(n) for n in bucket_sizes]))

    def update_weights_from_tensor(self, named_tensors, load_format: str | None = None, flush_cache: bool = True,
                                   weight_version: str | None = None) -> tuple[bool, str]:
        """named_tensors: a list of (name, tensor), or the string `serialize_named_tensors` made of one."""
        if not isinstance(named_tensors, str):
            from .receiver import serialize_named_tensors  # torch is needed only to serialize tensors

            named_tensors = serialize_named_tensors(named_tensors)
        return self._weights("/update_weights_from_tensor", dict(
            serialized_named_tensors=named_tensors, load_format=load_format, flush_cache=flush_cache,
            weight_version=weight_version))

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None, flush_cache: bool = True,
                                 weight_version: str | None = None) -> tuple[bool, str]:
        return self._weights("/update_weights_from_disk", dict(
            model_path=str(model_path), load_format=load_format, flush_cache=flush_cache,
            weight_version=weight_version))

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> tuple[bool, str]:
        return self._weights("/destroy_weights_update_group", {"group_name": group_name})

    def update_weight_version(self, new_version: str, abort_all_requests: bool = True) -> tuple[bool, str]:
        return self._weights("/update_weight_version", {"new_version": new_version,
                                                        "abort_all_requests": abort_all_requests})

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        return self._post("/get_weights_by_name", {"name": name, "truncate_size": truncate_size})

    # ---- controls ----------------------------------------------------------------------------
    def pause_generation(self, mode: str = "abort") -> None:
        self._post("/pause_generation", {"mode": mode})

    def continue_generation(self) -> None:
        self._post("/continue_generation")

    def flush_cache(self) -> bool:
        return bool(self._post("/flush_cache").get("success", False))

    def _post_text(self, path: str, body: dict | None = None) -> str:
        """An admin POST whose reply is plain text (as sglang's freeze_gc / profile endpoints answer)."""
        with self._open("POST", path, body, True) as resp:
            return resp.read().decode()

    def freeze_gc(self) -> None:
        self._post_text("/freeze_gc")

    def start_profile(self, **options) -> None:
        """sglang's start_profile: options as `Engine.start_profile` (output_dir, num_steps, activities, ...)."""
        self._post_text("/start_profile", options)

    def stop_profile(self) -> str:
        """Stop the server's profile; the reply's text names the trace written (on the server's machine)."""
        return self._post_text("/stop_profile")

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        self._post("/abort_request", {"rid": rid, "abort_all": abort_all})

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        self._post("/release_memory_occupation", {"tags": tags})

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        self._post("/resume_memory_occupation", {"tags": tags})

    # ---- info --------------------------------------------------------------------------------
    def get_model_info(self) -> dict:
        return self._get("/get_model_info")

    def get_server_info(self) -> dict:
        return self._get("/get_server_info")

    def get_load(self) -> dict:
        """The server's load report: load / num_tokens, num_reqs, num_waiting_reqs, dp_rank."""
        return self._get("/get_load")

    def get_weight_version(self) -> str:
        return self._get("/get_weight_version")["weight_version"]

    def health(self) -> bool:
        """True when the server answers and its engine loop runs; never raises."""
        try:
            with self._open("GET", "/health", None, admin=False):
                return True
        except (EngineHTTPError, ValueError):
            return False

    def wait_until_healthy(self, timeout: float = 300.0, interval: float = 0.5) -> None:
        """Poll /health until it answers 200 (a server still loading its model refuses connections)."""
        deadline = time.monotonic() + timeout
        while not self.health():
            if time.monotonic() > deadline:
                raise EngineHTTPError("GET", self.base_url + "/health", None, f"not healthy after {timeout:.0f} s")
            time.sleep(interval)


WEIGHT_PATHS = ("/init_weights_update_group", "/update_weights_", "/destroy_weights_update_group",
                "/get_weights_by_name")


def _parse(raw: bytes) -> Any:
    return json.loads(raw) if raw.strip() else None


def _error_message(raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")[:500] or "no message"
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return err["message"]
        if "message" in body:
            return body["message"]
        if "detail" in body:
            return str(body["detail"])
    return json.dumps(body)[:500]


def _restore(out: dict) -> dict:
    """JSON lists back into the engine's (logprob, token_id, None) tuples."""
    meta = out.get("meta_info", {})
    if "output_token_logprobs" in meta:
        meta["output_token_logprobs"] = [tuple(x) for x in meta["output_token_logprobs"]]
    if "output_top_logprobs" in meta:
        meta["output_top_logprobs"] = [[tuple(x) for x in top] for top in meta["output_top_logprobs"]]
    return out


def _plain(ids):
    """Token ids from tensors or numpy arrays as plain lists."""
    return ids.tolist() if hasattr(ids, "tolist") else ids


