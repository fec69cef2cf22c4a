// Reading what server/browser_data.py serves (/data/shard, /data/val): a u32 LE length m,
// m bytes of JSON metadata, then x and y (x_bytes tells where y starts).

/** GET `url` -> {meta, x: ArrayBuffer, y: ArrayBuffer}; throws with the server's message. */
export async function fetchArrays(url) {
  const resp = await fetch(url);
  if (!resp.ok) throw new Error(`${url}: HTTP ${resp.status}: ${await resp.text()}`);
  const all = await resp.arrayBuffer();
  const m = new DataView(all).getUint32(0, true);
  const meta = JSON.parse(new TextDecoder().decode(new Uint8Array(all, 4, m)));
  const body = all.slice(4 + m);
  return { meta, x: body.slice(0, meta.x_bytes), y: body.slice(meta.x_bytes) };
}
