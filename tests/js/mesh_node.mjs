// Runs browser/node/mesh.js's Reassembler under Node.js for tests/test_p2p_tabs.py: reads JSON
// on stdin {messages: [hex]} (data-channel messages in arrival order, shared.rtc's chunks) and
// prints {frames: [hex], bad}: the verified frames it delivered and the messages it refused.

import { readFileSync } from 'node:fs';
import { Reassembler } from '../../browser/node/mesh.js';

const input = JSON.parse(readFileSync(0, 'utf8'));
const frames = [];
const re = new Reassembler((f) => frames.push(Buffer.from(f).toString('hex')), input.max_frame);
for (const h of input.messages) {
  const b = Buffer.from(h, 'hex');
  re.push(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
}
process.stdout.write(JSON.stringify({ frames, bad: re.bad }));
