#!/usr/bin/env node
// A Tether agent in Node.js: claim a task from the sidecar, start it, call a
// tool, upload an artifact, complete it.
//
//   node agent.js --socket /run/tether/tether.sock --token-file alice.token \
//       --queue work --tool echo --artifact-file report.txt
//
// The BrokerService definitions are loaded at run time straight from the
// repository's protos/ (or --protos DIR), so there is nothing hand-copied to
// drift from the wire contract. One JSON line per event goes to stdout
// ("claimed", "started", "heartbeat", "tool", "artifact", "completed", "idle",
// "error"); the exit code is 0 only when the task ended SUCCEEDED (or, with
// --allow-idle, when no task was ready).
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const crypto = require('node:crypto');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const TOKEN_HEADER = 'x-tether-agent-token';
const CHUNK_BYTES = 256 * 1024; // the sidecar accepts up to 1 MiB per chunk

function emit(event, facts = {}) {
  process.stdout.write(JSON.stringify({ event, ...facts }) + '\n');
}

function options() {
  const { values } = parseArgs({
    options: {
      socket: { type: 'string' },
      'token-file': { type: 'string' },
      queue: { type: 'string', default: 'default' },
      'wait-ms': { type: 'string', default: '5000' },
      tool: { type: 'string' },
      'tool-args': { type: 'string', default: '{}' },
      'idempotency-key': { type: 'string', default: '' },
      'artifact-name': { type: 'string', default: 'result.txt' },
      'artifact-file': { type: 'string' },
      protos: { type: 'string', default: path.resolve(__dirname, '..', '..', 'protos') },
      'allow-idle': { type: 'boolean', default: false },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help || !values.socket) {
    process.stderr.write(
      'usage: node agent.js --socket PATH [--token-file FILE] [--queue Q] [--wait-ms N]\n' +
        '         [--tool NAME] [--tool-args JSON] [--idempotency-key K]\n' +
        '         [--artifact-name NAME] [--artifact-file FILE] [--protos DIR] [--allow-idle]\n',
    );
    process.exit(values.help ? 0 : 2);
  }
  return values;
}

/** Loads tether.v1.BrokerService from the .proto files (no generated or copied code). */
function loadBroker(protosDir) {
  const definition = protoLoader.loadSync('tether/v1/broker.proto', {
    includeDirs: [protosDir],
    keepCase: true, // field names exactly as in the .proto (task_id, not taskId)
    longs: String, // uint64 fencing tokens do not fit a JS number safely
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).tether.v1.BrokerService;
}

/** Wraps a unary method as a promise; every call carries the agent token. */
function unary(client, metadata, method) {
  return (request) =>
    new Promise((resolve, reject) => {
      client[method](request, metadata, { deadline: Date.now() + 70_000 }, (err, response) =>
        err ? reject(err) : resolve(response),
      );
    });
}

/** Streams `bytes` as PutArtifact: a header message, then chunks. */
function putArtifact(client, metadata, header, bytes) {
  return new Promise((resolve, reject) => {
    const call = client.PutArtifact(metadata, (err, response) =>
      err ? reject(err) : resolve(response),
    );
    call.write({ header });
    for (let offset = 0; offset < bytes.length; offset += CHUNK_BYTES) {
      call.write({ chunk: bytes.subarray(offset, offset + CHUNK_BYTES) });
    }
    call.end();
  });
}

/** Turns a gRPC error into what an operator needs (the rich details ride in
 * grpc-status-details-bin as a google.rpc.Status, for clients that decode it). */
function describe(err) {
  return { code: grpc.status[err.code] || err.code, message: err.details || err.message };
}

async function main() {
  const opts = options();
  const BrokerService = loadBroker(opts.protos);
  const client = new BrokerService(`unix:${path.resolve(opts.socket)}`, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (opts['token-file']) {
    metadata.set(TOKEN_HEADER, fs.readFileSync(opts['token-file'], 'utf8').trim());
  }
  const call = (method) => unary(client, metadata, method);
  let taskId = '';
  try {
    const claimed = await call('ClaimTask')({ queue: opts.queue, wait_ms: Number(opts['wait-ms']) });
    if (!claimed.task) {
      emit('idle', { queue: opts.queue });
      return opts['allow-idle'] ? 0 : 1;
    }
    const task = claimed.task;
    taskId = task.task_id;
    emit('claimed', {
      task_id: taskId,
      attempt: task.attempt,
      fencing_token: task.fencing_token,
      tools: task.tools,
    });

    await call('StartTask')({ task_id: taskId });
    emit('started', { task_id: taskId });
    const beat = await call('Heartbeat')({ task_id: taskId });
    emit('heartbeat', { task_id: taskId, lease_expires_unix_ms: beat.lease_expires_unix_ms });

    let toolResult = null;
    const tool = opts.tool || task.tools[0];
    if (tool) {
      const out = await call('CallTool')({
        task_id: taskId,
        tool,
        arguments_json: opts['tool-args'],
        idempotency_key: opts['idempotency-key'],
      });
      toolResult = out.result_json;
      emit('tool', {
        task_id: taskId,
        tool,
        status: out.status,
        cost_micros: out.cost_micros,
        replayed: out.replayed,
        result: JSON.parse(out.result_json || 'null'),
      });
    }

    const bytes = opts['artifact-file']
      ? fs.readFileSync(opts['artifact-file'])
      : Buffer.from(JSON.stringify({ task_id: taskId, payload: task.payload.toString('utf8'), tool: toolResult }));
    const stored = await putArtifact(
      client,
      metadata,
      { task_id: taskId, name: opts['artifact-name'], content_type: 'application/octet-stream' },
      bytes,
    );
    const local = crypto.createHash('sha256').update(bytes).digest('hex');
    emit('artifact', {
      task_id: taskId,
      name: opts['artifact-name'],
      sha256: stored.sha256,
      size: stored.size,
      matches_local: stored.sha256 === local,
    });
    if (stored.sha256 !== local) throw new Error(`artifact digest mismatch: ${stored.sha256} != ${local}`);

    const done = await call('CompleteTask')({
      task_id: taskId,
      outcome: 'TASK_OUTCOME_SUCCEEDED',
      result: Buffer.from(JSON.stringify({ artifact_sha256: stored.sha256 })),
    });
    emit('completed', { task_id: taskId, state: done.state, receipts_pending: done.receipts_pending });
    return done.state === 'TASK_STATE_SUCCEEDED' ? 0 : 1;
  } catch (err) {
    emit('error', { task_id: taskId, ...(err.code !== undefined ? describe(err) : { message: String(err) }) });
    return 1;
  } finally {
    client.close();
  }
}

main().then(
  (code) => process.exit(code),
  (err) => {
    emit('error', { message: String(err) });
    process.exit(1);
  },
);
