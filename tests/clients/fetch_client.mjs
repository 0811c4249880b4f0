// The API from Node (fetch, no dependency): run a webhook receiver, submit a job that calls it,
// follow the SSE stream to its end, download the image through the redirect, verify the webhook's
// Standard Webhooks signature and that its data matches the final record. Env: API, KEY, SECRET.
import crypto from "node:crypto";
import http from "node:http";

const { API, KEY, SECRET } = process.env;
const auth = { Authorization: `Bearer ${KEY}` };
const fail = (msg) => { console.error(msg); process.exit(1); };

function verify(secret, headers, body) {
  const key = Buffer.from(secret.replace(/^whsec_/, ""), "base64");
  const signed = `${headers["webhook-id"]}.${headers["webhook-timestamp"]}.${body}`;
  const expected = crypto.createHmac("sha256", key).update(signed).digest();
  const age = Math.abs(Date.now() / 1000 - Number(headers["webhook-timestamp"]));
  return age < 300 && headers["webhook-signature"].split(" ").some((s) => {
    const sig = Buffer.from(s.split(",")[1] ?? "", "base64");
    return sig.length === expected.length && crypto.timingSafeEqual(sig, expected);
  });
}

const received = [];
const server = http.createServer((req, res) => {
  let body = "";
  req.on("data", (c) => (body += c));
  req.on("end", () => { received.push({ headers: req.headers, body }); res.writeHead(204).end(); });
});
await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
const hook = `http://127.0.0.1:${server.address().port}/hook`;

const submitted = await fetch(`${API}/v1/jobs`, {
  method: "POST", headers: { ...auth, "Content-Type": "application/json" },
  body: JSON.stringify({ prompt: "a green square, from node", width: 128, height: 128, num_inference_steps: 3,
                         webhook: { url: hook, events: ["succeeded"] } }),
});
if (submitted.status !== 201) fail(`submit answered ${submitted.status}: ${await submitted.text()}`);
const job = (await submitted.json()).id;

const stream = await fetch(`${API}/v1/jobs/${job}/events`, { headers: auth });
let text = "";
for await (const chunk of stream.body) text += Buffer.from(chunk).toString();
const events = text.split("\n\n").filter((b) => b.includes("event: ")).map((b) => ({
  event: b.match(/^event: (.*)$/m)[1], data: JSON.parse(b.match(/^data: (.*)$/m)[1]) }));
const final = events.at(-1);
if (final.event !== "succeeded") fail(`stream ended with ${final.event}`);
if (!events.some((e) => e.event === "running" && e.data.step === 3)) fail("no step 3 event");

const redirect = await fetch(`${API}/v1/jobs/${job}/images/0`, { headers: auth, redirect: "manual" });
if (redirect.status !== 302) fail(`image answered ${redirect.status}`);
const image = Buffer.from(await (await fetch(redirect.headers.get("location"))).arrayBuffer());
const sha = crypto.createHash("sha256").update(image).digest("hex");
if (sha !== final.data.images[0].sha256) fail(`image sha256 ${sha} != ${final.data.images[0].sha256}`);

const deadline = Date.now() + 30000;
while (received.length === 0 && Date.now() < deadline) await new Promise((ok) => setTimeout(ok, 50));
server.close();
if (received.length === 0) fail("no webhook arrived");
const hit = received[0];
if (!verify(SECRET, hit.headers, hit.body)) fail("webhook signature does not verify");
if (verify(SECRET.replace(/.$/, SECRET.endsWith("A") ? "B" : "A"), hit.headers, hit.body)) fail("a wrong secret verified");
const payload = JSON.parse(hit.body);
if (hit.headers["webhook-id"] !== `${job}:succeeded` || payload.type !== "job.succeeded") fail("wrong webhook");
if (payload.data.images[0].sha256 !== sha) fail("webhook data does not match the image");
console.log(`ok ${job}`);
