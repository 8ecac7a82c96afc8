// A vmctl client in Node.js, as another language's caller would write one:
// @grpc/grpc-js with @grpc/proto-loader on proto/vmctl/v1/vmctl.proto, the
// channel's default options (gRPC's 4 MiB receive limit), and
// google.rpc.ErrorInfo decoded from a refusal's grpc-status-details-bin
// trailer with protobufjs. tests/test_node_client.py drives it against a
// real agent.
//
//   node node_client.mjs TARGET GOOGLEAPIS_DIR COMMAND ARGS...
//     maps PID                              GetVmaInfo
//     stream PID                            StreamVmaInfo
//     advise PID START END ADVICE COOKIE    AdviseRanges (addresses in decimal, the cookie in base64)
//
// Prints one JSON object: the answer, or {"error": {code, details, reason, domain, metadata}}.

import path from "node:path";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const PROTO_ROOT = path.join(path.dirname(fileURLToPath(import.meta.url)), "..", "proto");
// 64-bit numbers as strings: addresses above 2**53 ([vsyscall]) do not fit a JS number.
const LOADER_OPTIONS = {
  keepCase: true, // field names as the proto spells them
  longs: String,
  enums: String,
  bytes: Buffer,
  defaults: true,
  includeDirs: [PROTO_ROOT],
};
const DEADLINE_MS = 60_000;

const [target, googleapis, command, ...args] = process.argv.slice(2);
const vmctl = grpc.loadPackageDefinition(protoLoader.loadSync("vmctl/v1/vmctl.proto", LOADER_OPTIONS)).vmctl.v1;
const client = new vmctl.VmControl(target, grpc.credentials.createInsecure());

function deadline() {
  return { deadline: Date.now() + DEADLINE_MS };
}

// The ErrorInfo in a refusal's google.rpc.Status, if it carries one.
function errorInfo(error) {
  const [details] = error.metadata?.get("grpc-status-details-bin") ?? [];
  if (!details) return {};
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => path.join(googleapis, target);
  root.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"]);
  const status = root.lookupType("google.rpc.Status").decode(details);
  const infoType = root.lookupType("google.rpc.ErrorInfo");
  const any = status.details.find((d) => d.type_url === "type.googleapis.com/google.rpc.ErrorInfo");
  if (!any) return {};
  const info = infoType.decode(any.value);
  return { reason: info.reason, domain: info.domain, metadata: info.metadata };
}

function failure(error) {
  return { error: { code: grpc.status[error.code], details: error.details, ...errorInfo(error) } };
}

function summary(response) {
  return {
    process: response.process,
    cookie: response.cookie.toString("base64"),
    result_mask: response.result_mask,
    vmas: response.vmas.map((v) => ({ start: v.start, end: v.end, kind: v.kind, path: v.path, rss: v.rss_bytes })),
  };
}

function getVmaInfo(pid) {
  return new Promise((resolve) => {
    client.GetVmaInfo({ pid: Number(pid), attr_mask: 4 }, deadline(), (error, response) => {
      resolve(error ? failure(error) : summary(response));
    });
  });
}

// StreamVmaInfo through the same generated method definition, with each
// message's size noted as it is deserialized.
function streamVmaInfo(pid) {
  const method = vmctl.VmControl.service.StreamVmaInfo;
  const sizes = [];
  const deserialize = (bytes) => {
    sizes.push(bytes.length);
    return method.responseDeserialize(bytes);
  };
  return new Promise((resolve) => {
    const messages = [];
    const call = client.makeServerStreamRequest(
      method.path,
      method.requestSerialize,
      deserialize,
      { pid: Number(pid), attr_mask: 4 },
      deadline(),
    );
    call.on("data", (message) => messages.push(message));
    call.on("error", (error) => resolve(failure(error)));
    call.on("end", () => {
      const [header, ...chunks] = messages;
      resolve({
        ...summary({ ...header, vmas: chunks.flatMap((c) => c.vmas) }),
        first_message_vmas: header.vmas.length,
        message_sizes: sizes,
      });
    });
  });
}

function adviseRanges(pid, start, end, advice, cookie) {
  const request = {
    pid: Number(pid),
    ranges: [{ start, end }],
    advice,
    cookie: Buffer.from(cookie, "base64"),
  };
  return new Promise((resolve) => {
    client.AdviseRanges(request, deadline(), (error, response) => {
      resolve(error ? failure(error) : response);
    });
  });
}

const commands = { maps: getVmaInfo, stream: streamVmaInfo, advise: adviseRanges };
if (!(command in commands)) {
  console.error(`unknown command ${command}: one of ${Object.keys(commands).join(", ")}`);
  process.exit(2);
}
const answer = await commands[command](...args);
client.close();
console.log(JSON.stringify(answer));
