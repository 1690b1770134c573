#!/usr/bin/python3
"""A gRPC C-core client (Debian's python3-grpcio) for the grpclb tests.

K workers, each with a channel and subchannel pool of its own (so one TCP
connection each; C-core connects IPv4 targets through AF_INET6 sockets with
::ffff:a.b.c.d addresses), call grpc.health.v1.Health/Check in a loop until
--until-file exists, then print one JSON line shaped like the Rust
LoadReport: answers per pod (the x-pod response header), failures, and
answers per pod in --timeline-ms buckets. No generated stubs: an empty
HealthCheckRequest is zero bytes, and only the header is read back.
"""

import argparse
import json
import os
import threading
import time

import grpc

ERRORS_KEPT = 10


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--to", required=True, help="host:port")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--until-file", required=True)
    parser.add_argument("--timeline-ms", type=int, default=500)
    args = parser.parse_args()

    started = time.monotonic()
    lock = threading.Lock()
    report = {
        "per_pod": {},
        "channels_per_pod": {},
        "mixed_channels": 0,
        "ok": 0,
        "failures": 0,
        "errors": [],
        "seconds": 0.0,
        "timeline": [],
    }

    def record(pod, error):
        with lock:
            if error is not None:
                report["failures"] += 1
                if len(report["errors"]) < ERRORS_KEPT:
                    report["errors"].append(error)
                return
            report["ok"] += 1
            report["per_pod"][pod] = report["per_pod"].get(pod, 0) + 1
            bucket = int((time.monotonic() - started) * 1000) // args.timeline_ms
            timeline = report["timeline"]
            while len(timeline) <= bucket:
                timeline.append({})
            timeline[bucket][pod] = timeline[bucket].get(pod, 0) + 1

    def worker():
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(args.to, options=options) as channel:
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=lambda request: request,
                response_deserializer=lambda response: response,
            )
            while not os.path.exists(args.until_file):
                try:
                    _, call = check.with_call(b"", timeout=5)
                    pod = dict(call.initial_metadata()).get("x-pod")
                    if pod is None:
                        record(None, "response without x-pod")
                    else:
                        record(pod, None)
                except grpc.RpcError as e:
                    record(None, "health check: %s %s" % (e.code(), e.details()))

    workers = [threading.Thread(target=worker) for _ in range(args.connections)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    report["seconds"] = time.monotonic() - started
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
