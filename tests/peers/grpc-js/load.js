#!/usr/bin/env node
// A grpc-js (pure JavaScript gRPC) client for the grpclb tests.
//
// K clients, each with a channel of its own (one TCP connection each), call
// grpc.health.v1.Health/Check in a loop until --until-file exists, then print
// one JSON line shaped like the Rust LoadReport: answers per pod (the x-pod
// response header), failures, and answers per pod in --timeline-ms buckets.
// No generated stubs: an empty HealthCheckRequest is zero bytes, and only the
// header is read back. With --rate, each client calls at that rate (catching
// up when late) instead of as fast as it can, so every connection carries the
// same load however the event loop shares its time.
//
// With --stream-messages, each client also makes server-streaming
// /grpclb.test.Stream/Download calls one after another on its channel
// (tests/src/grpc_stream.rs: a 12-byte request, message i is all bytes
// i % 251) and checks every message; whole streams count in streams_per_pod.
'use strict';

const fs = require('fs');
const grpc = require('@grpc/grpc-js');

const ERRORS_KEPT = 10;

function parseArgs(argv) {
  const args = {
    connections: 1, timelineMs: 500, rate: 0, streamMessages: 0, streamMessageBytes: 1024,
    streamIntervalMs: 0,
  };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`${flag} needs a value`);
    if (flag === '--to') args.to = value;
    else if (flag === '--connections') args.connections = Number(value);
    else if (flag === '--until-file') args.untilFile = value;
    else if (flag === '--timeline-ms') args.timelineMs = Number(value);
    else if (flag === '--rate') args.rate = Number(value);
    else if (flag === '--stream-messages') args.streamMessages = Number(value);
    else if (flag === '--stream-message-bytes') args.streamMessageBytes = Number(value);
    else if (flag === '--stream-interval-ms') args.streamIntervalMs = Number(value);
    else throw new Error(`unknown flag ${flag}`);
  }
  if (!args.to || !args.untilFile) {
    throw new Error('usage: load.js --to HOST:PORT --until-file PATH [--connections K] [--timeline-ms MS]');
  }
  return args;
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const started = process.hrtime.bigint();
  const elapsedMs = () => Number((process.hrtime.bigint() - started) / 1000000n);
  const report = {
    per_pod: {}, channels_per_pod: {}, mixed_channels: 0, ok: 0, failures: 0,
    errors: [], seconds: 0, timeline: [], streams_per_pod: {},
  };
  const recordFailure = (error) => {
    report.failures += 1;
    if (report.errors.length < ERRORS_KEPT) report.errors.push(error);
  };
  const record = (pod, error) => {
    if (error !== null) {
      recordFailure(error);
      return;
    }
    report.ok += 1;
    report.per_pod[pod] = (report.per_pod[pod] || 0) + 1;
    const bucket = Math.floor(elapsedMs() / args.timelineMs);
    while (report.timeline.length <= bucket) report.timeline.push({});
    report.timeline[bucket][pod] = (report.timeline[bucket][pod] || 0) + 1;
  };
  const identity = (buffer) => buffer;
  const streamRequest = Buffer.alloc(12);
  streamRequest.writeUInt32BE(args.streamMessages, 0);
  streamRequest.writeUInt32BE(args.streamMessageBytes, 4);
  streamRequest.writeUInt32BE(args.streamIntervalMs, 8);

  // Download calls one after another on `client` until the stop file exists.
  const downloadUntilStopped = (client) => new Promise((resolve) => {
    const downloadOnce = () => {
      if (fs.existsSync(args.untilFile)) {
        resolve();
        return;
      }
      let pod = null;
      let received = 0;
      let broken = null;
      const call = client.makeServerStreamRequest(
        '/grpclb.test.Stream/Download', identity, identity, streamRequest,
        new grpc.Metadata(), { deadline: Date.now() + 30000 });
      call.on('metadata', (metadata) => {
        const values = metadata.get('x-pod');
        if (values.length > 0) pod = String(values[0]);
      });
      call.on('data', (message) => {
        const whole = message.length === args.streamMessageBytes
          && message.every((b) => b === received % 251);
        if (!whole && broken === null) broken = `message ${received} from ${pod} is not whole`;
        received += 1;
      });
      // 'error' or 'status' ends a call, exactly one of them with an error.
      call.on('error', (error) => {
        recordFailure(`download: ${error.code} ${error.details}`);
        setImmediate(downloadOnce);
      });
      call.on('status', (status) => {
        if (status.code !== grpc.status.OK) return;
        if (broken === null && received !== args.streamMessages) {
          broken = `${received} of ${args.streamMessages} messages from ${pod}`;
        }
        if (broken === null && pod === null) broken = 'response without x-pod';
        if (broken !== null) recordFailure(`download: ${broken}`);
        else report.streams_per_pod[pod] = (report.streams_per_pod[pod] || 0) + 1;
        setImmediate(downloadOnce);
      });
    };
    downloadOnce();
  });

  const worker = () => new Promise((resolve) => {
    // A channel of its own: grpc-js shares subchannels between clients
    // unless told not to.
    const client = new grpc.Client(args.to, grpc.credentials.createInsecure(), {
      'grpc.use_local_subchannel_pool': 1,
    });
    const streaming = args.streamMessages > 0 ? downloadUntilStopped(client) : Promise.resolve();
    let due = Date.now();
    const next = () => {
      if (args.rate <= 0) {
        setImmediate(callOnce);
        return;
      }
      due += 1000 / args.rate;
      setTimeout(callOnce, Math.max(0, due - Date.now()));
    };
    const callOnce = () => {
      if (fs.existsSync(args.untilFile)) {
        streaming.then(() => {
          client.close();
          resolve();
        });
        return;
      }
      let pod = null;
      const call = client.makeUnaryRequest(
        '/grpc.health.v1.Health/Check', identity, identity, Buffer.alloc(0),
        new grpc.Metadata(), { deadline: Date.now() + 5000 },
        (error) => {
          if (error) record(null, `health check: ${error.code} ${error.details}`);
          else if (pod === null) record(null, 'response without x-pod');
          else record(pod, null);
          next();
        });
      call.on('metadata', (metadata) => {
        const values = metadata.get('x-pod');
        if (values.length > 0) pod = String(values[0]);
      });
    };
    callOnce();
  });

  Promise.all(Array.from({ length: args.connections }, worker)).then(() => {
    report.seconds = elapsedMs() / 1000;
    process.stdout.write(JSON.stringify(report) + '\n');
  });
}

main();
