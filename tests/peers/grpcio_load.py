#!/usr/bin/python3
"""A gRPC C-core client (Debian's python3-grpcio) for the grpclb tests.

K worker processes (threads would take turns on the GIL unevenly, and so
call at uneven rates), each with a channel of its own (so one TCP connection
each; C-core connects IPv4 targets through AF_INET6 sockets with
::ffff:a.b.c.d addresses), call grpc.health.v1.Health/Check in a loop until
--until-file exists, then print one JSON line shaped like the Rust
LoadReport: answers per pod (the x-pod response header), failures, and
answers per pod in --timeline-ms buckets. No generated stubs: an empty
HealthCheckRequest is zero bytes, and only the header is read back.
"""

import argparse
import json
import multiprocessing
import os
import time

ERRORS_KEPT = 10


def worker(to, until_file, timeline_ms, started, results):
    # Imported here: each process sets up C-core for itself.
    import grpc

    per_pod, timeline, errors = {}, [], []
    failures = 0
    with grpc.insecure_channel(to) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=lambda request: request,
            response_deserializer=lambda response: response,
        )
        while not os.path.exists(until_file):
            try:
                _, call = check.with_call(b"", timeout=5)
                pod = dict(call.initial_metadata()).get("x-pod")
                if pod is None:
                    raise ValueError("response without x-pod")
            except (grpc.RpcError, ValueError) as e:
                failures += 1
                if len(errors) < ERRORS_KEPT:
                    detail = "%s %s" % (e.code(), e.details()) if isinstance(e, grpc.RpcError) else e
                    errors.append("health check: %s" % detail)
                continue
            per_pod[pod] = per_pod.get(pod, 0) + 1
            bucket = int((time.time() - started) * 1000) // timeline_ms
            while len(timeline) <= bucket:
                timeline.append({})
            timeline[bucket][pod] = timeline[bucket].get(pod, 0) + 1
    results.put((per_pod, timeline, failures, errors))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--to", required=True, help="host:port")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--until-file", required=True)
    parser.add_argument("--timeline-ms", type=int, default=500)
    args = parser.parse_args()

    started = time.time()
    results = multiprocessing.Queue()
    workers = [
        multiprocessing.Process(
            target=worker,
            args=(args.to, args.until_file, args.timeline_ms, started, results),
        )
        for _ in range(args.connections)
    ]
    for w in workers:
        w.start()
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
    for _ in workers:
        per_pod, timeline, failures, errors = results.get()
        for pod, n in per_pod.items():
            report["per_pod"][pod] = report["per_pod"].get(pod, 0) + n
            report["ok"] += n
        while len(report["timeline"]) < len(timeline):
            report["timeline"].append({})
        for bucket, counts in enumerate(timeline):
            for pod, n in counts.items():
                report["timeline"][bucket][pod] = report["timeline"][bucket].get(pod, 0) + n
        report["failures"] += failures
        report["errors"] = (report["errors"] + errors)[:ERRORS_KEPT]
    for w in workers:
        w.join()
    report["seconds"] = time.time() - started
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
