#!/usr/bin/env python3
"""A loopback webhook receiver that checks every delivery with the official Standard
Webhooks verifier (`standardwebhooks` from PyPI), for tests/tests/all/webhooks.rs.

Usage: receiver.py --port PORT --secret whsec_... --log FILE [--fail-first N]

For every POST it appends one JSON line to FILE:
  {"webhook_id", "timestamp", "arrived", "verified", "error", "tampered_rejected", "body"}
where `verified` is what `Webhook(secret).verify(body, headers)` said, and
`tampered_rejected` whether the same verifier refuses the same headers over the body with
one byte changed. Answers 500 to the first N verified deliveries, then 204; 400 to one that
does not verify. Prints "ready" once listening. A missing `standardwebhooks` exits 2
(a failure, never a skip).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError
except ImportError as exc:
    print(f"FAIL: standardwebhooks is not importable ({exc}); pip install standardwebhooks==1.1.0", file=sys.stderr)
    sys.exit(2)


def tamper(body: bytes) -> bytes:
    """The same body with one byte changed (a digit, else the last byte)."""
    data = bytearray(body)
    for i, byte in enumerate(data):
        if chr(byte).isdigit():
            data[i] = ord("1") if chr(byte) != "1" else ord("2")
            return bytes(data)
    data[-1] = (data[-1] + 1) % 256 if data else 0
    return bytes(data)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--fail-first", type=int, default=0)
    args = parser.parse_args()

    verifier = Webhook(args.secret)
    lock = threading.Lock()
    state = {"verified": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_args) -> None:  # quiet
            pass

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            headers = {k: v for k, v in self.headers.items()}
            entry = {
                "webhook_id": headers.get("webhook-id") or headers.get("Webhook-Id"),
                "timestamp": self.headers.get("webhook-timestamp"),
                "arrived": time.time(),
                "verified": False,
                "error": None,
                "tampered_rejected": False,
                "body": body.decode("utf-8", "replace"),
            }
            try:
                verifier.verify(body, headers)
                entry["verified"] = True
            except WebhookVerificationError as exc:
                entry["error"] = str(exc)
            except Exception as exc:  # malformed headers are a failed verification too
                entry["error"] = f"{type(exc).__name__}: {exc}"
            try:
                verifier.verify(tamper(body), headers)
            except WebhookVerificationError:
                entry["tampered_rejected"] = True
            with lock:
                if entry["verified"]:
                    state["verified"] += 1
                    status = 500 if state["verified"] <= args.fail_first else 204
                else:
                    status = 400
                entry["answered"] = status
                with open(args.log, "a", encoding="utf-8") as log:
                    log.write(json.dumps(entry) + "\n")
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print("ready", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
