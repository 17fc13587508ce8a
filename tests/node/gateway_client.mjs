// The official openai Node SDK against a running gateway. Prints one JSON object on stdout.
// usage: node gateway_client.mjs <ok|errors>  (GATEWAY_URL, GATEWAY_KEY in the environment)
import OpenAI from "openai";

const baseURL = process.env.GATEWAY_URL;
const apiKey = process.env.GATEWAY_KEY;
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 15000 });
const messages = [{ role: "user", content: "hello from node" }];
const out = {};

async function failure(run) {
  try {
    await run();
    return { status: null };
  } catch (err) {
    return {
      status: err.status ?? null,
      name: err.constructor.name,
      code: err.code ?? null,
      retryAfter: err.headers?.get?.("retry-after") ?? null,
    };
  }
}

if (process.argv[2] === "ok") {
  const { data, response } = await client.chat.completions
    .create({ model: "chat", messages })
    .withResponse();
  out.chat = { content: data.choices[0].message.content, model: data.model };
  out.provider = response.headers.get("x-keypool-provider");
  out.attempts = response.headers.get("x-keypool-attempts");
  const stream = await client.chat.completions.create({ model: "chat", messages, stream: true });
  let text = "";
  for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
  out.stream = text;
  const models = [];
  for await (const model of client.models.list()) models.push(model.id);
  out.models = models.sort();
  const embedded = await client.embeddings.create({ model: "embed", input: "one" });
  out.embedding = embedded.data[0].embedding.length;
  const wrong = new OpenAI({ baseURL, apiKey: "kp-0000c0de-wrong-secret-xxxxxxxxxx", maxRetries: 0 });
  out.badKey = await failure(() => wrong.chat.completions.create({ model: "chat", messages }));
  out.unknownModel = await failure(() => client.chat.completions.create({ model: "nope", messages }));
} else {
  out.throttled = await failure(() => client.chat.completions.create({ model: "embed", messages }));
  out.down = await failure(() => client.chat.completions.create({ model: "chat-beta", messages }));
}
console.log(JSON.stringify(out));
