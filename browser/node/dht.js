// The page's side of the tab's Kademlia carrier (docs/dht.md, "Carriers"). The DHT node itself
// is shared/dht, run by dht_glue.py in the participant's worker (the same code and the same
// carrier logic as a native node: shared/dht/carrier.py); this moves its frames, since the page
// owns the WebSocket and the data channels (RTCPeerConnection does not exist in workers):
//
//   - a signed Dht frame for the server's relay comes as a `send` event (node.js sends it);
//   - an unsigned Dht frame for a member's open data channel comes as `dht_send`: sent on
//     mesh.js's channel, or handed back (dhtUndelivered) to go through the relay;
//   - a Dht frame arriving on a channel (type byte 16) goes to the worker (dhtLink), not to
//     p2p_glue.py;
//   - every SYNC_MS the worker learns which channels are open and whether the socket is up,
//     and answers with the summary shown on the card (stats.dht).
//
// Started at a Welcome when /api/run's config has `dht` (the server runs its DHT node);
// `?dht=0` keeps this tab out. `node.dhtFind(id)` looks a node up (the e2e test uses it).

const SYNC_MS = 1000;
const DHT_TYPE = 16;  // shared/messages.py Dht.TYPE

export class TabDhtLink {
  constructor(node) {
    this.node = node;      // BrowserNode
    this.runId = null;     // the run the worker's DHT node was started for
    this.pending = new Map();
    this.nextReq = 1;
    this.timer = null;
  }

  /** A Welcome (after node.startMesh): start the worker's DHT node if the run has one. */
  async onWelcome(w) {
    if (new URLSearchParams(location.search).get('dht') === '0' || this.runId === w.run_id) return;
    const run = await fetch('/api/run', { cache: 'no-store' }).then((r) => r.json()).catch(() => null);
    if (!run?.config?.dht || run.run_id !== w.run_id || this.runId === w.run_id) return;
    this.runId = w.run_id;
    await this.node.participant('dhtStart', [w.run_id, Boolean(this.node.mesh)]);
    this.timer ||= setInterval(() => this.sync(), SYNC_MS);
    this.sync();
  }

  sync() {
    const mesh = this.node.mesh;
    const open = mesh ? [...mesh.peers].filter(([, e]) => e.state === 'open'
      && e.channel?.readyState === 'open').map(([peer]) => peer) : [];
    const ws = this.node.ws;
    this.node.participant('dhtSync', [open, Boolean(ws && ws.readyState === WebSocket.OPEN)])
      .catch((err) => this.node.log(`dht: ${err.message || err}`));
  }

  /** A frame on `peer`'s data channel: true when it was the DHT's (taken). */
  onDirect(peer, frame) {
    if (this.runId === null || frame.length < 6 || frame[5] !== DHT_TYPE) return false;
    this.node.participant('dhtLink', [peer, frame], [frame.buffer])
      .catch((err) => this.node.log(`dht: ${err.message || err}`));
    return true;
  }

  /** The worker's dht_* events (node.js's onEvent hands them here). */
  onEvent(e) {
    if (e.kind === 'dht_send') {
      const undelivered = () => this.node.participant('dhtUndelivered', [e.to, e.frame])
        .catch((err) => this.node.log(`dht: ${err.message || err}`));
      const mesh = this.node.mesh;
      if (!mesh) { undelivered(); return; }
      mesh.send(e.to, e.frame).then((ok) => { if (!ok) undelivered(); }).catch(undelivered);
    } else if (e.kind === 'dht_found') {
      const resolve = this.pending.get(e.req);
      this.pending.delete(e.req);
      resolve?.({ target: e.target, found: e.found, hops: e.hops ?? null, queries: e.queries,
        ms: e.ms, error: e.error ?? null });
    } else if (e.kind === 'dht_summary') {
      const { kind, ...summary } = e;
      this.node.set({ dht: summary });
    }
  }

  /** Look `nodeId` up: {found, hops, queries, ms}; found when that node itself answered. */
  async find(nodeId) {
    if (this.runId === null) throw new Error('this tab runs no DHT node (the run has no dht)');
    const req = this.nextReq++;
    const done = new Promise((resolve) => this.pending.set(req, resolve));
    await this.node.participant('dhtFind', [nodeId, req]);
    return done;
  }

  close() { clearInterval(this.timer); this.timer = null; }
}

/** The card's one line about the DHT (panel.js), or '' when the tab runs none. */
export function dhtLine(d) {
  if (!d) return '';
  const via = d.channels ? `, ${d.channels} data channel${d.channels > 1 ? 's' : ''}` : '';
  return `Peer discovery (DHT): ${d.contacts} contact${d.contacts === 1 ? '' : 's'}${via} · ` +
    `lookups ${d.found} / ${d.lookups} found · ${d.relay_up ? 'relay up' : 'relay down'}`;
}
