// A partner's Node.js client of Resultity's cloud API, built from the .proto files
// alone (no generated code): it streams a chat completion, then makes a call that
// fails and decodes the google.rpc.ErrorInfo that the status carries in its
// grpc-status-details-bin trailer.
//
//   npm install
//   node chat_stream.js HOST:PORT API_KEY MODEL [PROTO_ROOT]
//
// PROTO_ROOT is the repository root holding proto/ and third_party/proto/
// (default: two folders up). Prints one JSON object.
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const [target, apiKey, model, protoRoot = path.join(__dirname, "..", "..")] =
  process.argv.slice(2);
if (!target || !apiKey || !model) {
  console.error("usage: node chat_stream.js HOST:PORT API_KEY MODEL [PROTO_ROOT]");
  process.exit(2);
}
const includeDirs = [path.join(protoRoot, "proto"), path.join(protoRoot, "third_party", "proto")];

// The service, as @grpc/proto-loader reads it from the contract.
const definition = protoLoader.loadSync("resultity/cloud/v1/inference_service.proto", {
  includeDirs,
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
});
const { resultity } = grpc.loadPackageDefinition(definition);
const cloud = new resultity.cloud.v1.InferenceService(target, grpc.credentials.createInsecure());

// google.rpc.Status and its details, from third_party/proto.
const rpcTypes = new protobuf.Root();
rpcTypes.resolvePath = (_origin, file) =>
  file.startsWith("google/protobuf/") ? file : path.join(includeDirs[1], file);
rpcTypes.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], {
  keepCase: true,
});
const Status = rpcTypes.lookupType("google.rpc.Status");
const ErrorInfo = rpcTypes.lookupType("google.rpc.ErrorInfo");
const ERROR_INFO_URL = "type.googleapis.com/google.rpc.ErrorInfo";

function credentials() {
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${apiKey}`);
  return metadata;
}

function params(modelId) {
  return {
    model: modelId,
    messages: [{ role: "CHAT_ROLE_USER", content: "hello there" }],
    max_tokens: 3,
  };
}

function streamChat() {
  return new Promise((resolve, reject) => {
    const deltas = [];
    let finish = null;
    let usage = null;
    const call = cloud.StreamChatCompletion({ params: params(model) }, credentials());
    call.on("data", (message) => {
      for (const delta of message.choices) {
        if (delta.content) deltas.push(delta.content);
        if (delta.finish_reason !== "FINISH_REASON_UNSPECIFIED") finish = delta.finish_reason;
      }
      if (message.usage) usage = message.usage;
    });
    call.on("error", reject);
    call.on("end", () => resolve({ deltas, finish, usage }));
  });
}

// The ErrorInfo of a failed call: grpc-status-details-bin holds a google.rpc.Status
// whose details are Any messages.
function errorInfo(error) {
  const [details] = error.metadata.get("grpc-status-details-bin");
  if (!details) return null;
  const status = Status.decode(details);
  const any = status.details.find((detail) => detail.type_url === ERROR_INFO_URL);
  if (!any) return null;
  const info = ErrorInfo.toObject(ErrorInfo.decode(any.value));
  return { status_code: status.code, reason: info.reason, domain: info.domain, metadata: info.metadata };
}

function failedCall() {
  return new Promise((resolve) => {
    cloud.CreateChatCompletion(
      { params: params("no-such-model") },
      credentials(),
      (error, response) => {
        if (!error) {
          resolve({ unexpected: response });
          return;
        }
        resolve({ code: grpc.status[error.code], info: errorInfo(error) });
      }
    );
  });
}

async function main() {
  const streamed = await streamChat();
  const failed = await failedCall();
  cloud.close();
  console.log(JSON.stringify({ streamed, failed }));
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
