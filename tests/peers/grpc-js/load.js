#!/usr/bin/env node
// A grpc-js (pure JavaScript gRPC) client for the grpclb tests.
//
// K clients, each with a channel of its own (one TCP connection each), call
// grpc.health.v1.Health/Check in a loop until --until-file exists, then print
// one JSON line shaped like the Rust LoadReport: answers per pod (the x-pod
// response header), failures, and answers per pod in --timeline-ms buckets.
// No generated stubs: an empty HealthCheckRequest is zero bytes, and only the
// header is read back.
'use strict';

const fs = require('fs');
const grpc = require('@grpc/grpc-js');

const ERRORS_KEPT = 10;

function parseArgs(argv) {
  const args = { connections: 1, timelineMs: 500 };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`${flag} needs a value`);
    if (flag === '--to') args.to = value;
    else if (flag === '--connections') args.connections = Number(value);
    else if (flag === '--until-file') args.untilFile = value;
    else if (flag === '--timeline-ms') args.timelineMs = Number(value);
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
    errors: [], seconds: 0, timeline: [],
  };
  const record = (pod, error) => {
    if (error !== null) {
      report.failures += 1;
      if (report.errors.length < ERRORS_KEPT) report.errors.push(error);
      return;
    }
    report.ok += 1;
    report.per_pod[pod] = (report.per_pod[pod] || 0) + 1;
    const bucket = Math.floor(elapsedMs() / args.timelineMs);
    while (report.timeline.length <= bucket) report.timeline.push({});
    report.timeline[bucket][pod] = (report.timeline[bucket][pod] || 0) + 1;
  };
  const identity = (buffer) => buffer;

  const worker = () => new Promise((resolve) => {
    // A channel of its own: grpc-js shares subchannels between clients
    // unless told not to.
    const client = new grpc.Client(args.to, grpc.credentials.createInsecure(), {
      'grpc.use_local_subchannel_pool': 1,
    });
    const callOnce = () => {
      if (fs.existsSync(args.untilFile)) {
        client.close();
        resolve();
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
          setImmediate(callOnce);
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
