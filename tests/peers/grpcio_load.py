#!/usr/bin/python3
"""A gRPC C-core client (Debian's python3-grpcio) for the grpclb tests.

K worker processes (threads would take turns on the GIL unevenly, and so
call at uneven rates), each with a channel of its own (so one TCP connection
each; C-core connects IPv4 targets through AF_INET6 sockets with
::ffff:a.b.c.d addresses), call grpc.health.v1.Health/Check in a loop until
--until-file exists, then print one JSON line shaped like the Rust
LoadReport: answers per pod (the x-pod response header), failures, and
answers per pod in --timeline-ms buckets. No generated stubs: an empty
HealthCheckRequest is zero bytes, and only the header is read back. With
--rate, each worker calls at that rate (catching up when late) instead of as
fast as it can, so every connection carries the same load however the
processes share the CPU.

With --stream-messages, a thread of each worker also makes server-streaming
/grpclb.test.Stream/Download calls on the same channel one after another
(tests/src/grpc_stream.rs: a 12-byte request, message i is all bytes i % 251)
and checks every message; whole streams count in streams_per_pod.
"""

import argparse
import json
import multiprocessing
import os
import struct
import threading
import time

ERRORS_KEPT = 10


def keep_error(errors, what, e):
    """Keeps the first ERRORS_KEPT failure messages."""
    import grpc

    if len(errors) < ERRORS_KEPT:
        detail = "%s %s" % (e.code(), e.details()) if isinstance(e, grpc.RpcError) else e
        errors.append("%s: %s" % (what, detail))


def download_until(channel, until_file, stream, streams_per_pod, errors):
    """Download calls one after another until until_file exists; returns the
    number of failed ones."""
    import grpc

    messages, message_bytes, interval_ms = stream
    download = channel.unary_stream(
        "/grpclb.test.Stream/Download",
        request_serializer=lambda request: request,
        response_deserializer=lambda response: response,
    )
    request = struct.pack(">III", messages, message_bytes, interval_ms)
    failures = 0
    while not os.path.exists(until_file):
        try:
            call = download(request, timeout=30)
            pod = dict(call.initial_metadata()).get("x-pod")
            received = 0
            for message in call:
                if message != bytes([received % 251]) * message_bytes:
                    raise ValueError("message %d from %s is not whole" % (received, pod))
                received += 1
            if received != messages:
                raise ValueError("%d of %d messages from %s" % (received, messages, pod))
            if pod is None:
                raise ValueError("response without x-pod")
        except (grpc.RpcError, ValueError) as e:
            failures += 1
            keep_error(errors, "download", e)
            continue
        streams_per_pod[pod] = streams_per_pod.get(pod, 0) + 1
    return failures


def worker(to, until_file, timeline_ms, rate, stream, started, results):
    # Imported here: each process sets up C-core for itself.
    import grpc

    per_pod, timeline, errors, streams_per_pod = {}, [], [], {}
    failures = 0
    stream_failures = []
    with grpc.insecure_channel(to) as channel:
        if stream is not None:
            streaming = threading.Thread(
                target=lambda: stream_failures.append(
                    download_until(channel, until_file, stream, streams_per_pod, errors)
                )
            )
            streaming.start()
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=lambda request: request,
            response_deserializer=lambda response: response,
        )
        due = time.time()
        while not os.path.exists(until_file):
            if rate > 0:
                due += 1.0 / rate
                time.sleep(max(0.0, due - time.time()))
            try:
                _, call = check.with_call(b"", timeout=5)
                pod = dict(call.initial_metadata()).get("x-pod")
                if pod is None:
                    raise ValueError("response without x-pod")
            except (grpc.RpcError, ValueError) as e:
                failures += 1
                keep_error(errors, "health check", e)
                continue
            per_pod[pod] = per_pod.get(pod, 0) + 1
            bucket = int((time.time() - started) * 1000) // timeline_ms
            while len(timeline) <= bucket:
                timeline.append({})
            timeline[bucket][pod] = timeline[bucket].get(pod, 0) + 1
        if stream is not None:
            streaming.join()
            failures += stream_failures[0]
    results.put((per_pod, timeline, failures, errors[:ERRORS_KEPT], streams_per_pod))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--to", required=True, help="host:port")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--until-file", required=True)
    parser.add_argument("--timeline-ms", type=int, default=500)
    parser.add_argument("--rate", type=float, default=0, help="calls per second per worker (0: as fast as it can)")
    parser.add_argument("--stream-messages", type=int, default=0)
    parser.add_argument("--stream-message-bytes", type=int, default=1024)
    parser.add_argument("--stream-interval-ms", type=int, default=0)
    args = parser.parse_args()
    stream = None
    if args.stream_messages > 0:
        stream = (args.stream_messages, args.stream_message_bytes, args.stream_interval_ms)

    started = time.time()
    results = multiprocessing.Queue()
    workers = [
        multiprocessing.Process(
            target=worker,
            args=(args.to, args.until_file, args.timeline_ms, args.rate, stream, started, results),
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
        "streams_per_pod": {},
    }
    for _ in workers:
        per_pod, timeline, failures, errors, streams_per_pod = results.get()
        for pod, n in streams_per_pod.items():
            report["streams_per_pod"][pod] = report["streams_per_pod"].get(pod, 0) + n
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
