"""``python -m bench.probe PORT OUT DURATION``: ask ``/healthz`` back to back for DURATION s.

One keep-alive connection, one request at a time: each line of OUT is
``sent_at answer_seconds status`` (status 0: no answer within 5 s, or the connection broke,
after which a new connection is made). This is what a load balancer's or an orchestrator's
probe sees, only much more often.
"""

from __future__ import annotations

import http.client
import sys
import time
from pathlib import Path


def main(port: int, out: Path, duration: float) -> None:
    rows: list[str] = []
    end = time.time() + duration
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    while (sent := time.time()) < end:
        status = 0
        t0 = time.perf_counter()
        try:
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            response.read()
            status = response.status
        except OSError:
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        rows.append(f"{sent:.6f} {time.perf_counter() - t0:.6f} {status}")
        if status == 0:
            time.sleep(0.01)
    conn.close()
    out.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]))
