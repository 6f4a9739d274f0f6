// An agent built on the official MCP TypeScript SDK (@modelcontextprotocol/sdk), knowing
// nothing of Tether. It reads its MCP server from a standard {"mcpServers": {...}} config
// (the one `tether run` writes and names in $TETHER_MCP_CONFIG), lists the tools, makes the
// calls its JSON input on stdin asks for, and prints what came back as one JSON line.
//
//   tether run --queue research --socket node-1/tether.sock --token-file node-1/alice.token \
//       -- node examples/mcp-ts-agent/agent.mjs
//
// Input: {"calls": [{"tool": "echo", "arguments": {"text": "hi"}, "key": "k1"}],
//         "allow_errors": false}. "key" travels as _meta["tether/idempotencyKey"].
// Exit 1 when a call came back as a tool error (unless allow_errors), 2 on a failure.
import { readFileSync } from "node:fs";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";

function transportFor(server) {
  if (server.url && (server.type === "http" || server.type === "streamable-http" || !server.command)) {
    return new StreamableHTTPClientTransport(new URL(server.url), {
      requestInit: { headers: server.headers ?? {} },
    });
  }
  return new StdioClientTransport({
    command: server.command,
    args: server.args ?? [],
    env: { ...process.env, ...(server.env ?? {}) },
    stderr: "inherit",
  });
}

async function main() {
  const config = JSON.parse(readFileSync(process.env.TETHER_MCP_CONFIG, "utf8"));
  const server = Object.values(config.mcpServers)[0];
  const input = readFileSync(0, "utf8");
  const request = input.trim() ? JSON.parse(input) : {};
  const client = new Client({ name: "tether-example-ts-agent", version: "0.1.0" });
  await client.connect(transportFor(server));
  const results = [];
  let tools;
  try {
    tools = (await client.listTools()).tools;
    for (const call of request.calls ?? []) {
      const params = { name: call.tool, arguments: call.arguments ?? {} };
      if (call.key) params._meta = { "tether/idempotencyKey": call.key };
      const out = await client.callTool(params);
      results.push({
        tool: call.tool,
        is_error: Boolean(out.isError),
        text: out.content?.[0]?.text ?? "",
        result: out.structuredContent ?? null,
        meta: out._meta ?? null,
      });
    }
  } finally {
    await client.close();
  }
  const listed = tools.map((t) => ({ name: t.name, description: t.description ?? null, inputSchema: t.inputSchema }));
  console.log(JSON.stringify({ tools: listed, results }));
  const failed = results.some((r) => r.is_error);
  return failed && !request.allow_errors ? 1 : 0;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(`agent failed: ${err?.stack ?? err}`);
    process.exit(2);
  },
);
